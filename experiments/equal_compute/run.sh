#!/usr/bin/env bash
# The equal-compute comparison: 7 architectures, one recipe, about an hour on 2 CPU cores.
# Re-running resumes an interrupted comparison and keeps the variants that finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/equal_compute}
M=configs/models
.venv/bin/moelab compare \
  $M/dense.yaml $M/moe_top2.yaml $M/topp.yaml $M/coe2.yaml $M/uoe.yaml $M/blockffn.yaml $M/expert_choice.yaml \
  --train experiments/equal_compute/recipe.yaml --out "$OUT"
.venv/bin/python experiments/equal_compute/topp_difficulty.py "$OUT/topp/model" --out "$OUT/topp_difficulty.json"
