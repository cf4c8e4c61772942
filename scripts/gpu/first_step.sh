#!/usr/bin/env bash
# Time to the first compiled step (issue 9's goal: <= 30 s for dit_1b on the H200), cold and warm: the same bench
# row (`python -m vsa_train.bench step`, train.compile=true, one fresh process each) first with empty inductor and
# Triton caches (a new node), then again with the caches the first process left (a requeue or the next job of a
# sweep, when the caches sit on a shared disk: train.compile_cache). Each row prints the build time, the first
# step's time and torch.compile's phases in it. TRITON_PRINT_AUTOTUNING=1 prints the VSA kernels' autotuning
# (compilation included) only where a kernel has several configs (VSA_AUTOTUNE=full); with the default one config
# they compile in a background thread started by build_run (models/vsa.py warm_up_kernels), overlapping the
# first step's torch.compile, and are not shown apart. Everything goes to $OUT/first_step.log.
#
#   OUT=/tmp/fs bash scripts/gpu/first_step.sh                   # dit_1b VSA, batch 2 (about 2 minutes)
#   ROW=dense:compile OUT=/tmp/fs bash scripts/gpu/first_step.sh
#   SMOKE=1 OUT=/tmp/fs bash scripts/gpu/first_step.sh           # CPU smoke run: dit_tiny, small video
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log first_step
export TRITON_PRINT_AUTOTUNING=1
log_header first_step > "$LOG" 2>&1

if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  args=(--smoke --steps 1)
else
  args=(--model "${MODEL:-dit_1b}" --data synthetic_16k --batch "${BATCH:-2}" --warmup 2 --steps 3)
fi
# CACHE=folder (empty or new) keeps the caches for later commands; by default they are removed at the end.
cache=${CACHE:-$(mktemp -d /tmp/vsa_compile_cache.XXXX)}  # outside $OUT: caches do not come back with the results
[ -z "$(ls -A "$cache" 2>/dev/null)" ] || { echo "CACHE=$cache is not empty: the first row would not be cold" >&2; exit 2; }
export TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton"
for caches in cold warm; do
  echo -e "\n## $caches caches: python -m vsa_train.bench step ${args[*]} --rows ${ROW:-vsa:compile}\n" >> "$LOG"
  rc=0
  timeout -k 5 "${LIMIT:-200}" python -u -m vsa_train.bench step "${args[@]}" --no-profile \
    --rows "${ROW:-vsa:compile}" >> "$LOG" 2>&1 || rc=$?
  echo "exit code: $rc" >> "$LOG"
done
[ -n "${CACHE:-}" ] || rm -rf "$cache"
grep -E '^(## |first step|Triton autotuning|done|FAILED|exit code)' "$LOG" | cut -c1-300 || true
