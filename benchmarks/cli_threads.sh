#!/bin/bash
# The command line's --threads on an idle or busy machine: `moelab generate` (both shipped models,
# 128 greedy tokens, batch 1) and `moelab eval` (ref-8e-top2, 8,192 tokens of each of two domains: its wall
# time, start-up included) on 1 thread, 2 threads and 'auto' (the cores no other process is
# using), 3 rounds in that order.
#
#   bash benchmarks/cli_threads.sh idle   > idle.log
#   bash benchmarks/cli_threads.sh load1 1 > load1.log   # with 1 busy process beside it
set -euo pipefail
label=${1:?usage: cli_threads.sh LABEL [BUSY_PROCESSES]}
busy=${2:-0}
python=${PYTHON:-python}
pids=()
for _ in $(seq 1 "$busy"); do
  "$python" -c 'while True: pass' &
  pids+=($!)
done
trap '[ ${#pids[@]} -eq 0 ] || kill "${pids[@]}"' EXIT
sleep 1
for round in 1 2 3; do
  for model in ref-8e-top2 ref-32e-top4-shared; do
    for threads in 1 2 auto; do
      line=$("$python" -m moelab generate "The history of" --model "$model" --max-new-tokens 128 --ignore-eos \
        --threads "$threads" 2>&1 | tail -1)
      echo "$label gen $model threads=$threads round=$round :: $line"
    done
  done
  for threads in 1 2 auto; do
    start=$(date +%s%N)
    "$python" -m moelab eval ref-8e-top2 --eval-tokens 8192 --domain code --domain german --prompts 0 --quiet \
      --threads "$threads" > /dev/null
    echo "$label eval threads=$threads round=$round :: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  done
done
