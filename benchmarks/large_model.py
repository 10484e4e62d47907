"""A 1.2 GB moelab checkpoint with random weights, for decode benchmarks where the weights do not
fit a CPU cache (the shipped reference models, 41-45 MB, largely do): 4 layers of width 1,024, 8
experts of hidden size 2,816 (35 MB each in fp32), top-2, vocabulary 8,192, seeded.

    python benchmarks/large_model.py /tmp/large-8e-top2
    moelab bench generate /tmp/large-8e-top2 --batch 1 --batch 4 --new-tokens 32 --rounds 5 --compile
"""

from __future__ import annotations

import argparse

import torch

from moelab.models import MoETransformer
from moelab.models.config import ModelConfig
from moelab.models.pretrained import save_pretrained
from moelab.nn.config import MoEConfig

CONFIG = ModelConfig(
    vocab_size=8192, dim=1024, n_layers=4, n_heads=16, n_kv_heads=8, max_seq_len=512, tie_embeddings=True,
    moe=MoEConfig(dim=1024, num_experts=8, hidden_dim=2816, top_k=2),
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the checkpoint (must not exist, or hold moelab's)")
    parser.add_argument("--overwrite", action="store_true", help="replace moelab's earlier checkpoint there")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = save_pretrained(MoETransformer(CONFIG), args.directory, overwrite=args.overwrite)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
