#!/usr/bin/env bash
# A first loss-vs-FLOPs study on one GPU, in under 180 s of wall time (startup and Triton compilation included):
# two model sizes x {dense, vsa} at synthetic_16k (16,384 tokens), one equal FLOPs budget, evals at fixed FLOPs
# intervals; the four runs share the GPU concurrently, and each is stopped at its budget or at a common
# deadline, whichever comes first. Then `python -m vsa_train.analysis` on the four runs.
# Everything it reports goes to $OUT/study.log (Markdown, for docs/study.md); $OUT/study.tgz holds each run's
# metrics.jsonl and .hydra/config.yaml (enough to re-run the analysis) and the analysis output.
#
#   OUT=/tmp/study bash scripts/gpu/study.sh              # on the GPU, from the repo root
#   SMOKE=1 OUT=/tmp/study bash scripts/gpu/study.sh      # CPU smoke run: tiny widths and videos, same steps
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log study  # logger=none below; metrics.jsonl is the record
START=$SECONDS

# Sizes (name width depth heads; head dim 64): custom widths below dit_60m, so that ~30 s of GPU time per run
# buys hundreds of optimizer steps at 16K tokens (dit_60m would get a few dozen).
if [ "${SMOKE:-0}" = 1 ]; then
  SIZES=("s 128 1 2" "m 128 2 2")
  DATA=(data=synthetic_16k data.frames=4 data.height=16 data.width=16 data.num_workers=0)  # 256 tokens, 4 tiles
  BUDGET=4e9 EVAL_EVERY=1e9 WARMUP=2 DEADLINE=150 BATCH=2
else
  SIZES=("s 256 4 4" "m 384 6 6")
  DATA=(data=synthetic_16k data.num_workers=3)
  BUDGET=4e15 EVAL_EVERY=5e14 WARMUP=20 DEADLINE=140 BATCH=4
fi
ATTNS=(dense vsa)
RUNS=${STUDY_RUNS:-runs/study_gpu}
RESULTS="$RUNS/analysis"
rm -rf "$RUNS"
mkdir -p "$RUNS"

{
  log_header "study: loss vs FLOPs"
  echo "budget $BUDGET FLOPs per run, eval every $EVAL_EVERY FLOPs, batch $BATCH, warm-up $WARMUP steps, deadline ${DEADLINE}s"
} > "$LOG"

# One command per run, all started at once; `timeout` stops a run still short of its budget at the deadline
# (its metrics.jsonl keeps every row logged so far).
pids=()
for size in "${SIZES[@]}"; do
  read -r name width depth heads <<< "$size"
  for attn in "${ATTNS[@]}"; do
    run="${name}${width}x${depth}_${attn}"
    cmd=(python -u train.py "attn=$attn" model=dit_tiny "model.name=study_$name" "model.hidden_size=$width"
         "model.depth=$depth" "model.num_heads=$heads" "${DATA[@]}" logger=none "train.batch_size=$BATCH"
         "train.flops_budget=$BUDGET" "train.eval_every_flops=$EVAL_EVERY" train.max_steps=100000000
         train.eval_every=100000000 train.ckpt_every=100000000 train.log_every=10 train.eval_samples=8
         train.eval_timesteps=4 train.eval_batch_size=8 "optim.warmup_steps=$WARMUP" "hydra.run.dir=$RUNS/$run")
    echo "run $run: ${cmd[*]}" >> "$LOG"
    left=$(( DEADLINE - (SECONDS - START) ))
    left=$(( left > 10 ? left : 10 ))  # `timeout 0` would mean no limit at all
    ( t0=$SECONDS; rc=0; timeout --kill-after=5 "$left" "${cmd[@]}" || rc=$?
      printf "\nwall time: %s s\n" "$((SECONDS - t0))"; exit "$rc" ) > "$RUNS/$run.out" 2>&1 &
    pids+=("$!:$run")
  done
done

for entry in "${pids[@]}"; do
  pid=${entry%%:*} run=${entry#*:}
  rc=0
  wait "$pid" || rc=$?
  {
    echo
    echo "## run $run: exit code $rc$([ "$rc" = 124 ] && echo " (stopped by the ${DEADLINE}s deadline; see summary.md for whether it reached its budget)")"
    grep -E '^(params|flops_per_sample|topk|flops budget|rank 0|wall time)' "$RUNS/$run.out" || true
    [ "$rc" = 0 ] || [ "$rc" = 124 ] || tail -n 30 "$RUNS/$run.out"
    python - "$RUNS/$run/metrics.jsonl" <<'EOF' 2>&1 || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
evals = [r for r in rows if "eval/loss" in r]
speeds = [r["samples/s"] for r in rows if "samples/s" in r][1:]  # the first window holds start-up
last = rows[-1]
rows = [r for r in rows if "topk" in r]  # logged with the training rows (every log_every steps)
print(f"steps {last['step']}, samples {last.get('samples', 0)}, FLOPs {last['flops']:.4g}, "
      f"{len(evals)} evals, eval loss {evals[0]['eval/loss']:.5f} -> {evals[-1]['eval/loss']:.5f}; "
      f"median samples/s {sorted(speeds)[len(speeds) // 2] if speeds else float('nan'):.1f} (GPU shared by 4 runs)"
      + "".join(f"; VSA topk {r['topk']}, sparsity {r['sparsity']:.4f}" for r in rows[-1:] if "topk" in r))
EOF
  } >> "$LOG"
done
echo "training done at $((SECONDS - START))s" >> "$LOG"

rc=0
timeout 25 python -m vsa_train.analysis "$RUNS" --out "$RESULTS" >> "$LOG" 2>&1 || rc=$?
echo "analysis exit code: $rc" >> "$LOG"
if [ -f "$RESULTS/summary.md" ]; then
  { echo; cat "$RESULTS/summary.md"; } >> "$LOG"
fi
# the runs' records and the analysis, without checkpoints
(cd "$RUNS" && find . \( -name metrics.jsonl -o -path '*/.hydra/config.yaml' -o -name '*.out' -o -path './analysis/*' \) \
   -type f -print0 | tar --null -czf "$OUT/study.tgz" --files-from=-) >> "$LOG" 2>&1 || echo "archive failed" >> "$LOG"
echo "study.sh finished in $((SECONDS - START))s" >> "$LOG"
exit 0
