#!/usr/bin/env bash
# Checkpoint save and resume times of a real train.py run (issue 9: dit_1b must survive preemption): each row runs
# train.py for 4 steps saving every 2, then resumes it for one more step and a save, and prints one table row from
# the trainer's own lines: each save's total time and how long it held training up (`saved checkpoint step N in
# X s (training held for Y s)`; a foreground save holds it for all of it) and the resume's time from the first
# line to `resumed from` (checksums and loading included). The run directory is removed after each row.
#
#   OUT=/tmp/ck bash scripts/gpu/checkpoint.sh                                  # dit_1b VSA, both save modes
#   MODES="true" RD=/scratch/me OUT=/tmp/ck bash scripts/gpu/checkpoint.sh      # run directories on another disk
#   SMOKE=1 OUT=/tmp/ck bash scripts/gpu/checkpoint.sh                          # CPU smoke run: dit_tiny
#
# A dit_1b checkpoint is 17.5 GB (weights + AdamW moments; 23 GB with train.ema): RD needs ~40 GB free.
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log checkpoint
RD=${RD:-$(mktemp -d "$PWD/../vsa_ckpt_bench.XXXX")}
log_header checkpoint > "$LOG" 2>&1
if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  common=(model=dit_tiny data.frames=4 data.height=8 data.width=8 train.batch_size=2)
else
  common=(model="${MODEL:-dit_1b}" data=synthetic_16k attn=vsa train.batch_size="${BATCH:-2}")
fi
common+=(train.eval_samples=2 train.eval_timesteps=1 train.eval_every=1000 train.log_every=1 train.ckpt_every=2
         train.keep_checkpoints=1 logger=none)
stamp() { python3 -u -c '
import sys, time
for line in sys.stdin:
    for part in line.rstrip("\n").split("\r"):
        print(f"{time.time():.3f} {part}", flush=True)'; }
echo "| train.ckpt_background | save step 2 (held) s | save step 4 (held) s | resume to 'resumed from' s | save after resume (held) s |"
echo "|---|---|---|---|---|"
for mode in ${MODES:-true false}; do
  run=("${common[@]}" run_dir="$RD/$mode" train.ckpt_background="$mode")
  python -u train.py "${run[@]}" train.max_steps=4 2>&1 | stamp > "$OUT/$mode.log"
  python -u train.py "${run[@]}" train.max_steps=5 2>&1 | stamp > "$OUT/$mode.resume.log"
  cat "$OUT/$mode.log" "$OUT/$mode.resume.log" >> "$OUT/checkpoint.log"
  python3 - "$mode" "$OUT/$mode.log" "$OUT/$mode.resume.log" <<'PY'
import re, sys
mode, first, resume = sys.argv[1], sys.argv[2], sys.argv[3]
def saves(path):
    out = []
    for line in open(path, errors="replace"):
        m = re.search(r"saved checkpoint step (\d+) in ([\d.]+) ?s(?: \(training held for ([\d.]+) s\))?", line)
        if m:
            out.append(f"{m.group(2)} ({m.group(3) or m.group(2)})")
    return out
lines = [l.split(" ", 1) for l in open(resume, errors="replace") if " " in l]
start = float(lines[0][0]) if lines else 0.0
resumed = next((float(t) - start for t, text in lines if text.startswith("resumed from")), float("nan"))
a, b = (saves(first) + ["?", "?"])[:2]
print(f"| {mode} | {a} | {b} | {resumed:.1f} | {(saves(resume) + ['?'])[0]} |")
PY
  rm -rf "${RD:?}/$mode"
done
[ -n "$(ls -A "$RD" 2>/dev/null)" ] || rmdir "$RD"
