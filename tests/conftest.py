"""Shared test settings. `tests/reference.py` holds the naive reference the tests compare against.

Hypothesis profiles: "default" (random examples, no per-example deadline: the first call of a
torch op can be slow) and "ci" (derandomised, reproducible from run to run); pick one with
HYPOTHESIS_PROFILE=ci.
"""

import os

from hypothesis import settings

settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
