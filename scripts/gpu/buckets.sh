#!/usr/bin/env bash
# Bucketed training (issue 31, item 5): the step time of each bucket within a mixed-shape run against a single-shape
# run of that shape, and the first-step cost of each (compilation included), with train.compile=true
# (`python -m vsa_train.bench buckets`: the trainer's own step on hand-made batches of each shape, loader not timed).
# The mixed run and each single-shape run run in their own process with an empty compile cache, so that no row's
# first step finds another's graphs; a last pass with the mixed run's cache kept measures a requeued run's first
# steps (warm cache). Everything goes to $OUT/buckets.log; the table is printed at the end.
#
#   OUT=/tmp/bk bash scripts/gpu/buckets.sh                                         # dit_120m VSA, three buckets
#   BUCKETS=16x64x64,16x48x80,12x64x64 MODEL=dit_410m OUT=/tmp/bk bash scripts/gpu/buckets.sh
#   SMOKE=1 OUT=/tmp/bk bash scripts/gpu/buckets.sh                                 # CPU smoke run: dit_tiny, eager
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log buckets
log_header buckets > "$LOG" 2>&1
if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  args=(--smoke)
  BUCKETS=4x16x16,5x10x14,3x8x20
else
  BUCKETS=${BUCKETS:-16x64x64,16x48x80,12x64x64}  # 16,384, 15,360 and 12,288 tokens; 16x48x80 has edge tiles
  args=(--model "${MODEL:-dit_120m}" --attn "${ATTN:-vsa}" --batch "${BATCH:-4}" --compile "${COMPILE:-true}"
        --steps "${STEPS:-10}" --warmup "${WARMUP:-2}")
fi
row() {  # row CACHE ARGS...: one process on the compile cache CACHE (created empty unless it exists)
  local cache=$1; shift
  echo -e "\n## python -m vsa_train.bench buckets $* (cache $cache)\n" >> "$LOG"
  rc=0
  TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" timeout -k 5 "${LIMIT:-900}" \
    python -u -m vsa_train.bench buckets "${args[@]}" --out "$OUT" "$@" >> "$LOG" 2>&1 || rc=$?
  echo "exit code: $rc" >> "$LOG"
}
caches=$(mktemp -d /tmp/vsa_bucket_caches.XXXX)  # outside $OUT: caches do not come back with the results
row "$caches/mixed" --mode mixed --buckets "$BUCKETS"
IFS=, read -ra shapes <<< "$BUCKETS"
for shape in "${shapes[@]}"; do
  row "$caches/$shape" --mode single --buckets "$shape"
done
mkdir -p "$OUT/warm" && row "$caches/mixed" --mode mixed --buckets "$BUCKETS" --out "$OUT/warm"  # the cache kept
rm -rf "$caches"
python -m vsa_train.bench buckets "${args[@]}" --buckets "$BUCKETS" --table "$OUT" | tee -a "$LOG"
echo "warm-cache mixed run (first steps of a requeued run): $OUT/warm/mixed.json" | tee -a "$LOG"
grep -E '^(## |exit code|Traceback|[A-Za-z]*Error)' "$LOG" | cut -c1-300 || true
