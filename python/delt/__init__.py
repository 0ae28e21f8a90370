"""delt: the orchestration layer of delt-ext (data, teachers, selection, synthesis, evaluation).

It builds on :mod:`delt_ext` for every kernel; nothing in :mod:`delt_ext` imports it.
"""
