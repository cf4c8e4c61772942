#!/usr/bin/env bash
# The VSA op on the GPU, in one process (compilation included, under 110 s on an H100):
#   1. bf16 correctness against float64: the fine stage alone, and the full op on the same tile selection,
#      outputs and gradients, unit and 16x logits, D = 64 and 128;
#   2. the timing table (eager and CUDA-graph columns) at 16K D=64, 32K and 48K D=128 tokens;
#   3. the GPU kernel profile of one full-op fwd+bwd at 16K: per-kernel time, launches, the non-fine share.
# Everything goes to $OUT/op_speed.log (Markdown tables, for docs/benchmarks.md "VSA op: speed" and "VSA op: accuracy against float64").
#
#   OUT=/tmp/ops bash scripts/gpu/op_speed.sh                  # on the GPU, from the repo root
#   SMOKE=1 OUT=/tmp/ops bash scripts/gpu/op_speed.sh          # CPU smoke run: Triton interpreter, tiny sizes
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log op_speed

{
  log_header "op_speed: VSA op"
} > "$LOG"

if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  args=(--check fp32 --sizes tiny --profile tiny --no-flex --rep 20)
  limit=900
else
  # FlexAttention is left out: compiling it takes longer than this script's whole budget.
  args=(--check bf16 --sizes 16k,32k,48k --profile 16k --no-flex --rep 100)
  limit=104
fi
echo "command: python -u -m vsa_train.bench op ${args[*]}" >> "$LOG"
rc=0
# -u: a run stopped by the timeout still leaves every line it printed.
timeout "$limit" python -u -m vsa_train.bench op "${args[@]}" >> "$LOG" 2>&1 || rc=$?
echo "vsa_train.bench op exit code: $rc$([ "$rc" = 124 ] && echo ' (timed out after '"$limit"' s)')" >> "$LOG"
exit 0
