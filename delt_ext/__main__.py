"""``python -m delt_ext``: print the build information of the installed package."""

from delt_ext.build_info import build_info

print(build_info())
