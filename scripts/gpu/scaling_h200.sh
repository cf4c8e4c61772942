#!/usr/bin/env bash
# The one-GPU reproduction of the scaling study (docs/study.md): the isoFLOP grid of
# configs/experiment/scaling_law_h200.yaml (3 sizes x {dense, vsa} x 3 budgets over a decade + a second seed at
# the middle budget = 24 runs at 16,384 tokens, cosine to each run's own budget), then
# `python -m vsa_train.analysis` on it, inside one 10-minute call on one H200.
#
# Seven lanes run at once (each a Hydra multirun over some of the grid's points; small models leave the GPU idle
# between kernel launches, so lanes overlap). Training stops at a hard deadline
# (DEADLINE_S, default 420 s) whatever is left; a run cut short keeps its rows, is marked
# "not reached" and is left out of the frontiers. Everything reported goes to $OUT/scaling.log (Markdown);
# $OUT/scaling.tgz holds every run's metrics.jsonl, config.yaml and log, and the analysis (summary.md, plots).
#
#   OUT=/tmp/scaling bash scripts/gpu/scaling_h200.sh                  # on the GPU, from the repo root
#   SMOKE=1 OUT=/tmp/scaling bash scripts/gpu/scaling_h200.sh          # CPU: the same steps on scaling_law_tiny
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log scaling  # logger=none in the experiment; metrics.jsonl is the record
START=$SECONDS

if [ "${SMOKE:-0}" = 1 ]; then
  EXPERIMENT=scaling_law_tiny DEADLINE_S=${DEADLINE_S:-600} ANALYSIS_S=120 BOOTSTRAP=200
  export OMP_NUM_THREADS=1
else
  EXPERIMENT=scaling_law_h200 DEADLINE_S=${DEADLINE_S:-420} ANALYSIS_S=90 BOOTSTRAP=1000
fi
# Lanes of `python train.py experiment=... size=<s> attn=<a> point=<points>`, each a multirun, all at once. The
# smallest VSA model takes the most steps (its FLOPs per sample are the lowest), so its largest budget has a lane
# of its own: measured at 763834d with six lanes (one per size x attention), that lane alone missed the deadline.
LANES=("s dense low,mid,mid_s1,high" "s vsa low,mid,mid_s1" "s vsa high" "m dense low,mid,mid_s1,high"
       "m vsa low,mid,mid_s1,high" "l dense low,mid,mid_s1,high" "l vsa low,mid,mid_s1,high")
RUNS=${SCALING_RUNS:-runs/multirun/scaling_h200_reproduction}
RESULTS="$RUNS/analysis"
rm -rf "$RUNS"
mkdir -p "$RUNS"

{
  log_header "scaling study ($EXPERIMENT)"
  echo "lanes: ${#LANES[@]} concurrently (size attention points); training deadline ${DEADLINE_S}s; analysis limit ${ANALYSIS_S}s"
} > "$LOG"

pids=()
for spec in "${LANES[@]}"; do
  read -r size attn points <<< "$spec"
  lane="${size}_${attn}_${points//,/_}"
  cmd=(python -u train.py "experiment=$EXPERIMENT" "size=$size" "attn=$attn" "point=$points" "hydra.sweep.dir=$RUNS")
  echo "lane $lane: ${cmd[*]}" >> "$LOG"
  ( t0=$SECONDS; rc=0; timeout --kill-after=10 "$DEADLINE_S" "${cmd[@]}" || rc=$?
    printf "\nlane wall time: %s s, exit code %s\n" "$((SECONDS - t0))" "$rc"; exit "$rc" ) > "$RUNS/lane_$lane.out" 2>&1 &
  pids+=("$!:$lane")
done

for entry in "${pids[@]}"; do
  pid=${entry%%:*} lane=${entry#*:}
  rc=0
  wait "$pid" || rc=$?
  {
    echo
    echo "## lane $lane: exit code $rc$([ "$rc" = 124 ] && echo " (stopped by the ${DEADLINE_S}s deadline)")"
    grep -E '^(params|flops_per_sample|flops budget|rank 0|lane wall time)' "$RUNS/lane_$lane.out" || true
    [ "$rc" = 0 ] || [ "$rc" = 124 ] || tail -n 40 "$RUNS/lane_$lane.out"
  } >> "$LOG"
done
echo "training done at $((SECONDS - START))s" >> "$LOG"

# Per run: steps, FLOPs, budget reached, final eval loss, median throughput (lanes share the GPU: not a speed
# measurement; docs/benchmarks.md has those).
python - "$RUNS" >> "$LOG" 2>&1 <<'EOF' || true
import json, sys
import yaml
from pathlib import Path
print("\n| run | steps | FLOPs | budget | reached | final eval loss | final lr | median samples/s |")
print("|---|---|---|---|---|---|---|---|")
for metrics in sorted(Path(sys.argv[1]).rglob("metrics.jsonl")):
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    if not rows:
        continue
    cfg = yaml.safe_load((metrics.parent / "config.yaml").read_text())
    budget, last = cfg["train"]["flops_budget"], rows[-1]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    speeds = sorted(r["samples/s"] for r in rows[2:] if "samples/s" in r)
    lr = [r["lr"] for r in rows if "lr" in r]
    print(f"| {metrics.parent.name} | {last['step']} | {last['flops']:.3g} | {budget:.3g} | "
          f"{'yes' if last['flops'] >= budget else 'NO'} | {evals[-1] if evals else float('nan'):.5f} | "
          f"{lr[-1] if lr else float('nan'):.3g} | {speeds[len(speeds) // 2] if speeds else float('nan'):.1f} |")
EOF

rc=0
timeout "$ANALYSIS_S" python -m vsa_train.analysis "$RUNS" --out "$RESULTS" --bootstrap "$BOOTSTRAP" >> "$LOG" 2>&1 || rc=$?
echo "analysis exit code: $rc" >> "$LOG"
if [ -f "$RESULTS/summary.md" ]; then
  { echo; cat "$RESULTS/summary.md"; } >> "$LOG"
fi
# the runs' records and the analysis, without checkpoints
(cd "$RUNS" && find . \( -name metrics.jsonl -o -name config.yaml -o -name 'lane_*.out' -o -path './analysis/*' \) \
   -not -path '*/.hydra/*' -type f -print0 | tar --null -czf "$OUT/scaling.tgz" --files-from=-) >> "$LOG" 2>&1 \
   || echo "archive failed" >> "$LOG"
echo "scaling_h200.sh finished in $((SECONDS - START))s" >> "$LOG"
exit 0
