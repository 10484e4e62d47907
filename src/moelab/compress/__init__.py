"""Compression of pretrained MoE checkpoints: calibrate once, then prune with any method.

    from moelab.compress import calibrate, compress
    calibrate("ckpt/", "stats/")                                            # moelab calibrate
    compress("ckpt/", "pruned/", method="reap", ratio=0.25, stats="stats/")  # moelab compress

`moelab.compress.methods.METHODS` lists the methods; `docs/compress.md` compares them.
"""

from moelab.compress.calibration import CalibrationOptions, calibrate
from moelab.compress.methods import METHODS, get_method
from moelab.compress.mixture import build_mixture
from moelab.compress.run import compress
from moelab.compress.stats import Calibration, LayerStats

__all__ = [
    "METHODS",
    "Calibration",
    "CalibrationOptions",
    "LayerStats",
    "build_mixture",
    "calibrate",
    "compress",
    "get_method",
]
