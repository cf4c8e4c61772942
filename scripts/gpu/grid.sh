#!/usr/bin/env bash
# One device call's share of a study grid (vsa_train/grid.py): runs the experiment's unfinished points that fit in
# TIME seconds on this GPU, compiled, with one compile cache for the call, and leaves in $OUT:
#   grid.log   the runner's lines, the card and versions, and the ledger afterwards
#   runs.tgz   the runs finished here (runs/<name>/{metrics.jsonl,config.yaml,record.json}): untar into RESULTS
#   logs.tgz   every run's console output, each line timestamped (the failures' tracebacks)
#   compile_cache.tgz  the call's torch.compile / Triton caches, when under 16 MB: copied to .compile_cache/cache.tgz
#              here (git ignores it) and carried to the next call, its runs skip most of their first-step compile
#
#   GRID_COMMIT=$(git rev-parse HEAD) OUT=/tmp/g bash scripts/gpu/grid.sh                  # on the GPU, repo root
#   EXP=study_16k TIME=540 LANES=2 ONLY="*_low *_mid" OUT=/tmp/g bash scripts/gpu/grid.sh     # two at once, a subset
#   SAFETY=1.02 TIME=580 ONLY=dit_60m_vsa_high ...          # a run no call fits at the default margin (1.1)
#   export CALL_END=$(( $(date +%s) + 590 )); <install the wheels>; OUT=/tmp/g bash scripts/gpu/grid.sh   # the rest of the call
#   EXTRA="model.depth=1 ..." ...                       # overrides for every run (tests/test_grid.py: a CPU smoke run)
#   tar xzf /tmp/g/runs.tgz -C docs/study/study_16k                                          # then, here
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log grid
EXP=${EXP:-study_16k}
# CALL_END (epoch seconds, exported first thing in the device command: $(( $(date +%s) + 590 ))) gives the runner
# what is left of the call after the wheels' install, less END_S for the tarballs below; else TIME, else 540.
if [ -n "${CALL_END:-}" ] && [ -z "${TIME:-}" ]; then
  TIME=$(( CALL_END - $(date +%s) - ${END_S:-15} ))
fi
TIME=${TIME:-540}
EXTRA=${EXTRA:-}
WORK=${WORK:-/tmp/vsa_grid}
RESULTS=${RESULTS:-docs/study/$EXP}  # the committed ledger
CACHE=${CACHE:-/tmp/vsa_compile_cache}
log_header "grid $EXP" > "$LOG"
if [ -f .compile_cache/cache.tgz ]; then  # an earlier call's caches (same torch and Triton: the record says)
  mkdir -p "$CACHE" && tar xzf .compile_cache/cache.tgz -C "$CACHE" && echo "compile cache: carried in" >> "$LOG"
fi
rc=0
set -f  # ONLY holds globs for the runner, not for the shell
python -m vsa_train.grid run "$EXP" "$RESULTS" --time "$TIME" --lanes "${LANES:-1}" --safety "${SAFETY:-1.1}" --work "$WORK" \
  --archive "$OUT/runs.tgz" \
  --log "$LOG" ${ONLY:+--only $ONLY} -- train.compile=true train.compile_cache="$CACHE" $EXTRA || rc=$?
set +f
(cd "$WORK" && tar czf "$OUT/logs.tgz" ./*.out) 2>/dev/null || true
if [ -d "$CACHE" ]; then
  tar czf "$OUT/compile_cache.tgz" -C "$CACHE" . 2>/dev/null || true
  [ "$(stat -c %s "$OUT/compile_cache.tgz" 2>/dev/null || echo 0)" -le 16000000 ] || rm -f "$OUT/compile_cache.tgz"
fi
exit "$rc"
