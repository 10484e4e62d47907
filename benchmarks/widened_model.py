"""A shipped reference model with its experts widened to a real size: each expert's hidden units
padded from 192 to `--hidden-dim` (default 8,192: 25 MB an expert in fp32, 1.2 GB in all for
ref-8e-top2), the new gate and up rows random and the new down-projection columns zero. The
padded units add exact zeros, so the model computes what the shipped one does (up to the order of
float sums) and routes as it learned to, while every expert read moves real-size weights: the
offloading benchmark at expert sizes where reads, not Python, decide tokens/s
(`benchmarks/large_model.py` has real sizes but random weights, so degenerate routing).

    python benchmarks/widened_model.py /tmp/wide-8e-top2
    moelab bench offload /tmp/wide-8e-top2 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from moelab.models import MoETransformer, load_pretrained
from moelab.models.pretrained import save_pretrained
from moelab.models.reference import REFERENCE_MODELS, reference_model_dir


def widened(model: MoETransformer, hidden_dim: int) -> MoETransformer:
    """A copy of `model` whose routed experts (SwiGLU, stacked) have `hidden_dim` hidden units."""
    moe = model.config.moe
    small = moe.hidden_dim
    if moe.activation != "swiglu" or moe.expert_mlp_bias:
        raise ValueError(f"widening handles SwiGLU experts without biases, not {moe.activation} (bias {moe.expert_mlp_bias})")
    if hidden_dim < small:
        raise ValueError(f"--hidden-dim must be at least the model's {small}, got {hidden_dim}")
    shared = moe.shared_hidden_dim or (moe.num_shared * small or None)  # the shared experts keep their width
    config = dataclasses.replace(model.config, moe=dataclasses.replace(moe, hidden_dim=hidden_dim, shared_hidden_dim=shared))
    wide = MoETransformer(config)  # seeded random init: the padded gate and up rows
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in wide.state_dict().items():
            old = state[name]
            if name.endswith("gate_up_proj"):  # [E, 2I, D]: gate rows, then up rows
                tensor[:, :small] = old[:, :small]
                tensor[:, hidden_dim : hidden_dim + small] = old[:, small:]
            elif name.endswith("experts.down_proj"):  # [E, D, I]: the padded units write nothing
                tensor.zero_()
                tensor[..., :small] = old
            else:
                tensor.copy_(old)
    return wide.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the checkpoint (must not exist, or hold moelab's)")
    parser.add_argument("--model", default="ref-8e-top2", choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--hidden-dim", type=int, default=8192, help="the experts' new hidden size")
    parser.add_argument("--overwrite", action="store_true", help="replace moelab's earlier checkpoint there")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = widened(load_pretrained(reference_model_dir(args.model)), args.hidden_dim)
    path = save_pretrained(model, args.directory, overwrite=args.overwrite)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
