#!/usr/bin/env bash
# Scale-out on one GPU (docs/benchmarks.md "Scale-out on one GPU: dit_1b and dit_410m"): trainer.train_step through
# `python -m vsa_train.bench step`, regional compilation (train.compile=true), bf16, synthetic_16k (16,384 tokens).
#   1. dit_1b, batch 2, dense and VSA, for each model.grad_checkpointing policy (selective, full, none): samples/s,
#      MFU, peak GiB, build and first-step time (the first step is where compilation happens);
#   2. dit_410m, batch 4, dense and VSA (none, then selective);
#   3. the largest dit_1b VSA batch that fits an 80 GB card, per policy: predicted from part 1's peaks (static
#      memory + activations per sample), then run in a process capped at 80 GiB (set_per_process_memory_fraction),
#      with the next batch up expected to fail.
# Each part writes its results.json after every row, so a time limit keeps what was measured. Everything goes to
# $OUT/scale_out.log (Markdown); the rows as JSON into $OUT/scale_out.tgz.
#
#   OUT=/tmp/so bash scripts/gpu/scale_out.sh            # on the GPU, from the repo root (about 9 minutes)
#   SMOKE=1 OUT=/tmp/so bash scripts/gpu/scale_out.sh    # CPU smoke run: dit_tiny at a small video, 2 steps
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log scale_out
{
  log_header scale_out
} > "$LOG" 2>&1

CK=model.grad_checkpointing
if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  BIG=(--model dit_tiny --data synthetic --batch 2 data.frames=4 data.height=16 data.width=16)
  MID=("${BIG[@]}")
  STEPS=(--warmup 1 --steps 1 --no-profile) T1=600 T2=300 T3=300 CAP=()
else
  BIG=(--model dit_1b --data synthetic_16k --batch 2)
  MID=(--model dit_410m --data synthetic_16k --batch 4)
  STEPS=(--warmup 2 --steps 4 --no-profile) T1=${T1:-280} T2=${T2:-100} T3=${T3:-150} CAP=(--memory-cap-gib 80)
fi

part() {  # part NAME SECONDS ARGS...: one bench process, its output in the log, stopped at SECONDS
  local name=$1 limit=$2; shift 2
  echo -e "\n## $name\n\ncommand: python -m vsa_train.bench step $*\n" >> "$LOG"
  local rc=0
  timeout -k 5 "$limit" python -u -m vsa_train.bench step --budget "$((limit - 20))" "$@" >> "$LOG" 2>&1 || rc=$?
  echo "exit code: $rc$([ "$rc" = 124 ] && echo " (stopped after $limit s: rows above are complete, later ones missing)")" >> "$LOG"
}

rows1="vsa:compile:$CK=selective,dense:compile:$CK=selective,vsa:compile:$CK=full,dense:compile:$CK=full"
rows1="$rows1,vsa:compile:$CK=none,dense:compile:$CK=none"
part "1. ${BIG[1]}: grad-checkpointing policies" "$T1" "${BIG[@]}" "${STEPS[@]}" --rows "$rows1" --out "$OUT/part1"
part "2. ${MID[1]}" "$T2" "${MID[@]}" "${STEPS[@]}" \
  --rows "vsa:compile,dense:compile,vsa:compile:$CK=selective,dense:compile:$CK=selective" --out "$OUT/part2"

# 3. Predicted largest batch per policy: peak(b) = static + b * per_sample, with static = the memory held between
# steps (weights, AdamW state, EMA) plus one set of fp32 gradients, read from the run's parameter count.
python - "$OUT/part1/results.json" "${CAP[1]:-80}" "$OUT/rows3" >> "$LOG" 2>&1 <<'EOF' || true
import json, sys, pathlib
path, cap, dest = pathlib.Path(sys.argv[1]), float(sys.argv[2]), pathlib.Path(sys.argv[3])
rows = [r for r in json.loads(path.read_text()) if r["attn"] == "vsa" and r["peak_GiB"] is not None] if path.exists() else []
print(f"\n### predicted largest batch under {cap:g} GiB\n")
print("| policy | batch | peak GiB (reserved) | static GiB | GiB per sample | predicted |\n|---|---|---|---|---|---|")
first, second = [], []
for r in rows:
    static = r["static_GiB"] + r["grad_GiB"]  # between steps, plus the gradients a step holds
    per = (r["reserved_GiB"] - static) / r["batch"]
    best = int((cap * 0.97 - static) // per) if per > 0 else 0
    print(f"| {r['grad_checkpointing']} | {r['batch']} | {r['peak_GiB']:.1f} ({r['reserved_GiB']:.1f}) | {static:.1f} | "
          f"{per:.2f} | {best} |")
    if best >= 1 and r["grad_checkpointing"] != "none":  # none: part 1 already says whether batch 2 fits
        first.append(f"vsa:compile:model.grad_checkpointing={r['grad_checkpointing']}:train.batch_size={best}")
        second.append(f"vsa:compile:model.grad_checkpointing={r['grad_checkpointing']}:train.batch_size={best + 1}")
dest.write_text(",".join(first + second))  # the predicted batches first; one more each (expected to fail) after
EOF
rows3=$(cat "$OUT/rows3" 2>/dev/null || true)
if [ -n "$rows3" ] && [ "${SMOKE:-0}" != 1 ]; then
  part "3. ${BIG[1]}: largest batch in 80 GiB (capped process)" "$T3" "${BIG[@]}" --warmup 1 --steps 1 --no-profile \
    "${CAP[@]}" --rows "$rows3" --out "$OUT/part3"
fi
(cd "$OUT" && tar -czf scale_out.tgz part*/results.json 2>/dev/null && rm -rf part1 part2 part3 rows3) || true
grep -E '^(\| |done|FAILED|skipped|exit code|## )' "$LOG" | grep -v '^| `' | tail -60
