#!/usr/bin/env bash
# Training step time, dense vs VSA (87.5%: top 32 of 256 tiles), dit_120m at synthetic_16k (16,384 tokens),
# batch 4, bf16, eager and torch.compile (as train.compile=true), same GPU, same process, rows in the order
# dense eager, VSA eager, VSA compiled, dense compiled; after each row a torch.profiler table of one step
# (top kernels, top aten ops: which SDPA backend runs, copies) and the table so far. Everything goes to $OUT/train_step.log (Markdown, for docs/benchmarks.md
# "Training step: dense vs VSA"); results.json into $OUT/train_step.tgz. Budget: 220 s including compilation
# by default (BUDGET=seconds for the Python part changes it)
# (rows that may not fit are skipped and say so).
#
#   OUT=/tmp/ts bash scripts/gpu/train_step.sh            # on the GPU, from the repo root
#   SMOKE=1 OUT=/tmp/ts bash scripts/gpu/train_step.sh    # CPU smoke run: dit_tiny, small video, 2 steps
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log train_step
{
  log_header train_step
} > "$LOG" 2>&1

if [ "${SMOKE:-0}" = 1 ]; then
  args=(--smoke --budget 900)
  limit=1000
else
  args=(--batch "${BATCH:-4}" --steps "${STEPS:-20}" --warmup 2 --budget "${BUDGET:-195}")
  limit=$(( ${BUDGET:-195} + 15 ))
fi
echo "command: python -m vsa_train.bench step ${args[*]} --out $OUT/results" >> "$LOG"
rc=0
timeout -k 5 "$limit" python -m vsa_train.bench step "${args[@]}" --out "$OUT/results" >> "$LOG" 2>&1 || rc=$?
echo "exit code: $rc$([ "$rc" = 124 ] && echo ' (timed out: rows above are complete, later ones missing)')" >> "$LOG"
if [ -d "$OUT/results" ]; then
  tar -czf "$OUT/train_step.tgz" -C "$OUT" results && rm -rf "$OUT/results"
fi
cat "$LOG" | grep -v '^| `' | tail -25
