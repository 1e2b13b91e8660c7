"""Frozen pre-optimisation copies of the load-controller step and solver (the reference of test_lc_step_equivalence)."""
