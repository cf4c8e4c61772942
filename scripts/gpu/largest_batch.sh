#!/usr/bin/env bash
# The largest batch that trains in a memory cap: tries the given batches in order, largest first, each in its own
# capped process (`python -m vsa_train.bench step --memory-cap-gib`), and stops at the first that runs its steps.
# Rows and errors go to $OUT/largest_batch.log.
#
#   OUT=/tmp/lb bash scripts/gpu/largest_batch.sh dit_1b vsa full 80 21 20 19     # model attn policy GiB batches...
set -uo pipefail
start_log largest_batch
[ $# -ge 5 ] || { echo "usage: largest_batch.sh MODEL ATTN POLICY CAP_GIB BATCH [BATCH...]" >&2; exit 2; }
model=$1 attn=$2 policy=$3 cap=$4; shift 4
echo "## largest $model $attn batch with model.grad_checkpointing=$policy under $cap GiB" >> "$LOG"
for batch in "$@"; do
  out="$OUT/b$batch"
  python -u -m vsa_train.bench step --model "$model" --data "${DATA:-synthetic_16k}" --batch "$batch" \
    --warmup 1 --steps 1 --no-profile --memory-cap-gib "$cap" --rows "$attn:compile:model.grad_checkpointing=$policy" \
    --out "$out" > "$out.log" 2>&1
  grep -E '^(done|FAILED)' "$out.log" | cut -c1-400 >> "$LOG"
  if [ -f "$out/results.json" ]; then
    grep -E "^\| $attn " "$out.log" | tail -1 >> "$LOG"
    echo "largest batch that runs under $cap GiB: $batch (tried in order: $*)" >> "$LOG"
    exit 0
  fi
done
echo "none of the batches $* runs under $cap GiB" >> "$LOG"
