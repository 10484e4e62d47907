"""Routing traces: record which experts every token chose, by forward hooks, into safetensors shards.

    from moelab.trace import load_model, load_streams, trace_model, open_trace

    loaded = load_model("path/to/checkpoint")            # moelab or local transformers checkpoint
    trace = trace_model(loaded, load_streams("corpus", encoder=loaded.encoder), "out/trace")
    for shard in trace.shards():                          # one shard in memory at a time
        shard.layers[layer].indices                       # [N, K] chosen experts, -1 = empty slot

`RoutingCapture` is the hook layer on its own (also during `generate`).
"""

from moelab.trace.capture import LayerRouting, RoutingCapture, RoutingCheck, entropy_bits
from moelab.trace.data import Batch, batches, load_streams
from moelab.trace.model import LoadedModel, load_model, wrap_model
from moelab.trace.store import Trace, TraceInfo, TraceShard, TraceWriter, is_trace, open_trace
from moelab.trace.tracer import TraceOptions, trace_from_files, trace_model

__all__ = [
    "Batch",
    "LayerRouting",
    "LoadedModel",
    "RoutingCapture",
    "RoutingCheck",
    "Trace",
    "TraceInfo",
    "TraceOptions",
    "TraceShard",
    "TraceWriter",
    "batches",
    "entropy_bits",
    "is_trace",
    "load_model",
    "load_streams",
    "open_trace",
    "trace_from_files",
    "trace_model",
    "wrap_model",
]
