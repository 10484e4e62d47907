"""moelab: Mixture-of-Experts transformers — build, train, inspect and compress."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenMP's idle threads (libgomp's, torch's intra-op pool) spin up to 300,000 times before they
# sleep, several milliseconds in which each holds a core. When the MoE layer hands its experts to
# its own single-threaded workers (`moelab.nn.expert_threads`), the caller's idle OpenMP thread
# spins beside them and one worker runs at half speed. 30,000 cut a 2-thread training step of
# the `small` preset by 17 % and left decoding and dense layers as they were (docs/benchmarks.md,
# "OpenMP's idle threads"). libgomp reads this once, when torch is loaded: so only where moelab
# is imported first (the `moelab` command, `python -m moelab`), and never over a value set.
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", "30000")
