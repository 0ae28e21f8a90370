"""``python -m delt``: the same as the ``delt`` command."""

import sys

from delt.cli import main

sys.exit(main())
