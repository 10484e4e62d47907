#!/usr/bin/env bash
# The equal-compute comparison: 7 architectures, one recipe, SEEDS seeds each (default 3: about
# two hours on 2 CPU cores), then the CoE pair. Re-running resumes an interrupted comparison and
# keeps the runs that finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/equal_compute}
SEEDS=${SEEDS:-3}
M=configs/models
.venv/bin/moelab compare \
  $M/dense.yaml $M/moe_top2.yaml $M/topp.yaml $M/coe2.yaml $M/uoe.yaml $M/blockffn.yaml $M/expert_choice.yaml \
  --train experiments/equal_compute/recipe.yaml --seeds "$SEEDS" --out "$OUT"
TOPP="$OUT/topp"
[ "$SEEDS" -gt 1 ] && TOPP="$OUT/topp-seed0"
.venv/bin/python experiments/equal_compute/topp_difficulty.py "$TOPP/model" --out "$OUT/topp_difficulty.json"
.venv/bin/moelab compare $M/coe2.yaml $M/coe_3x_experts.yaml \
  --train experiments/equal_compute/recipe.yaml --seeds "$SEEDS" --out "$OUT-coe_pair"
