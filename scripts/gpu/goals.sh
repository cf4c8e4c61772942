#!/usr/bin/env bash
# The performance goals in one process, one device call (`python -m vsa_train.bench goals`; ~6 min on an H100/H200,
# compilation included, under a 570 s limit):
#   1. the VSA op vs dense cuDNN SDPA at 16K D=64 and 32K D=128: fwd+bwd speed-up, eager and graphed, and the
#      fine stage's TFLOP/s at 32K (the op benchmark's tables);
#   2. dq with offset keys, bf16, D=64 and 128: Triton fine stage (centred keys) vs dense SDPA;
#   3. the trainer's step, compiled, dense and VSA, dit_120m batch 4 and dit_1b batch 2 (the step benchmark's tables);
#   4. the goal table: | goal | target | measured | met? |, one row per goal.
# dit_1b dense without checkpointing needs ~87 GiB: on a card with less memory (nvidia-smi's total under 100 GiB)
# its rows run with model.grad_checkpointing=selective, and the table says so (DIT1B_POLICY=none|selective forces
# one). BUDGET (seconds, default 480) is the Python part's: a unit that may not fit is not started and its goals
# say "not run (budget)". OP_BATCH (default 1) is the op rows' batch (4: the dit_120m step's). Everything goes to
# $OUT/goals.log, results.json to $OUT/results.json.
#
#   OUT=/tmp/goals bash scripts/gpu/goals.sh            # on the GPU, from the repo root
#   SMOKE=1 OUT=/tmp/goals bash scripts/gpu/goals.sh    # CPU smoke run: Triton interpreter, tiny sizes, dit_tiny
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log goals

{
  log_header "goals: op, dq and step goals"
} > "$LOG" 2>&1

if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  # One intra-op thread: the tiny rows run ~3x faster so on a small shared CPU.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  args=(--dit1b-policy "${DIT1B_POLICY:-none}")
  limit=600
else
  budget="${BUDGET:-480}"
  policy="${DIT1B_POLICY:-}"
  if [ -z "$policy" ]; then
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -d ' ' || true)
    policy=$([ "${mib:-0}" -ge 100000 ] && echo none || echo selective)
    echo "dit_1b policy: $policy (card memory ${mib:-unknown} MiB; none needs ~87 GiB)" >> "$LOG"
  fi
  args=(--dit1b-policy "$policy" --steps "${STEPS:-6}" --rep 100 --budget "$budget" --op-batch "${OP_BATCH:-1}")
  # Imports (~15 s) come before the budget's clock; the rest is the margin for a unit over its estimate.
  limit=$(( budget + 80 ))
fi
echo "command: python -u -m vsa_train.bench goals ${args[*]} --out $OUT" >> "$LOG"
rc=0
# -u: a run stopped by the timeout still leaves every line it printed; SIGTERM makes it print the goal table of
# what it measured (-k: killed 10 s later if it cannot).
timeout -k 10 "$limit" python -u -m vsa_train.bench goals "${args[@]}" --out "$OUT" >> "$LOG" 2>&1 || rc=$?
echo "vsa_train.bench goals exit code: $rc$([ "$rc" = 124 ] && echo ' (timed out after '"$limit"' s)')" >> "$LOG"
sed -n '/^## Goals/,$p' "$LOG"
exit 0
