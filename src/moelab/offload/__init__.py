"""Offloaded inference: routed experts read from the checkpoint's files into a cache of hot
experts and, with a predictor, each layer's likely experts read ahead on a background thread
while its attention runs (`POLICIES`: the combinations measured). On a GPU (`device="cuda"`) the
cache lives in GPU memory and experts reach it through pinned host buffers on a copy stream
(`moelab.offload.copier`).

    from moelab.offload import RoutingPrior, load_offloaded

    prior = RoutingPrior.from_trace(open_trace("runs/trace"))       # calibration statistics
    model = load_offloaded("path/to/checkpoint", resident=0.25, prior=prior)
    ids = model.generate(prompt_ids, max_new_tokens=64)
"""

from moelab.offload.cache import EVICTIONS, CacheStats, ExpertCache, PrefetchStats
from moelab.offload.model import POLICIES, OffloadedExperts, OffloadedModel, load_offloaded
from moelab.offload.predict import PREDICTORS, RoutingPrior
from moelab.offload.store import ExpertStore

__all__ = [
    "EVICTIONS",
    "POLICIES",
    "PREDICTORS",
    "CacheStats",
    "ExpertCache",
    "ExpertStore",
    "OffloadedExperts",
    "OffloadedModel",
    "PrefetchStats",
    "RoutingPrior",
    "load_offloaded",
]
