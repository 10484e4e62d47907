"""Multi-token prediction (MTP) modules: the draft layer some releases store beside the model,
which transformers does not build and vLLM and SGLang draft tokens with (MTP speculative decoding).

A module reads the model's final-normed hidden state h_i and the next token's embedding e_{i+1}:

    x_i = proj([embed_norm(e_{i+1}); hidden_norm(h_i)])       # [D] from [2D]
    y_i = decoder_layer(x)_i                                  # attention over positions <= i, routed experts
    draft of token i + 2 = head(final_norm(y_i))

Two ways of storing one are read (`find_mtp_modules`):

- DeepSeek-V3 / GLM-4.5: decoder layer `num_hidden_layers + k` (`model.layers.61.` for DeepSeek-V3),
  with enorm, hnorm, eh_proj and a shared_head (norm, head) of its own beside the decoder layer's
  tensors, k < num_nextn_predict_layers;
- Qwen3-Next / Qwen3.5: `mtp.layers.k.` for the decoder layer, and mtp.pre_fc_norm_embedding,
  mtp.pre_fc_norm_hidden, mtp.fc and mtp.norm beside it; the model's embedding and output head.

moelab numbers a module's layer `num_hidden_layers + k` either way (its statistics, decisions and
expert map are filed under that number).
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.hf.checkpoint import Checkpoint
from moelab.hf.view import stored_layers

QWEN_ROOT = "mtp."


@dataclass(frozen=True)
class MTPModule:
    """One stored multi-token prediction layer.

    index: the layer number moelab files it under (the model's layer count + k); block: the
    prefix of its decoder layer's tensors (named as a decoder layer's); root: the prefix of every
    tensor of the module (what goes where it is left out); embed_norm, hidden_norm, proj [D, 2D],
    final_norm: the drafter's own tensors (the formula in the module docstring); head and
    embedding: the module's own output head and embedding, None where it uses the model's;
    zero_first: the first position's embedding is zeroed (vLLM's DeepSeek drafter; its Qwen one
    does not)."""

    index: int
    block: str
    root: str
    embed_norm: str
    hidden_norm: str
    proj: str
    final_norm: str
    head: str | None = None
    embedding: str | None = None
    zero_first: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The drafter's tensors a run needs."""
        return (self.embed_norm, self.hidden_norm, self.proj, self.final_norm)


def find_mtp_modules(
    ckpt: Checkpoint, layer_prefix: str, num_layers: int, nextn: object
) -> tuple[MTPModule, ...]:
    """The multi-token prediction layers `ckpt` stores in either way (module docstring), given the
    family's decoder-layer prefix ("model.layers.{n}."), layer count and num_nextn_predict_layers
    (absent for Qwen's); routed experts or not (the caller keeps those with experts)."""
    found = []
    if isinstance(nextn, int) and not isinstance(nextn, bool):
        for index in range(num_layers, num_layers + max(nextn, 0)):
            block = layer_prefix.format(n=index)
            if block + "eh_proj.weight" in ckpt:
                own = {
                    name: block + name if block + name in ckpt else None
                    for name in ("shared_head.head.weight", "embed_tokens.weight")
                }
                found.append(MTPModule(
                    index, block, block, block + "enorm.weight", block + "hnorm.weight", block + "eh_proj.weight",
                    block + "shared_head.norm.weight", own["shared_head.head.weight"], own["embed_tokens.weight"],
                    zero_first=True,
                ))  # fmt: skip
    if QWEN_ROOT + "fc.weight" in ckpt:
        for k in sorted(stored_layers(ckpt, QWEN_ROOT + "layers.{n}.")):
            found.append(MTPModule(
                num_layers + k, f"{QWEN_ROOT}layers.{k}.", QWEN_ROOT, QWEN_ROOT + "pre_fc_norm_embedding.weight",
                QWEN_ROOT + "pre_fc_norm_hidden.weight", QWEN_ROOT + "fc.weight", QWEN_ROOT + "norm.weight",
            ))  # fmt: skip
    return tuple(found)
