#!/usr/bin/env bash
# The VSA op's speed before and after a change, in one device call: fwd and fwd+bwd of video_sparse_attention
# (raster order in and out, coarse gate, bf16, 87.5% sparse, medians of triton.testing.do_bench) at 16K tokens
# D=64 with 12 heads at batch 1 and 4, and 32K tokens D=128 at batch 1, for the old code and the new one.
# The old code is the `vsa_train` package in old/ (old/vsa_train/..., or old/ holding the package's own files);
# the new one is ./vsa_train. Each side runs in its own process (both register the same custom-op names), the
# sides alternate ROUNDS times (default 2: old, new, old, new) so that drift in the card's clocks hits both, and
# one table compares the best round of each. Under 2 minutes on an H100 (the kernels compile once: both sides
# share Triton's cache where their kernels are the same).
#
#   cp -r <checkout of the old commit>/vsa_train old/    # once, from the repo root
#   bash scripts/gpu/op_before_after.sh                  # on the GPU, from the repo root
#   ROUNDS=3 REP=200 bash scripts/gpu/op_before_after.sh
set -euo pipefail
source "$(dirname "$0")/header.sh"
log_header "op_before_after: video_sparse_attention, old/ vs ./"
[ -d old ] || { echo "old/ is missing: copy the old commit's vsa_train there (see the header)" >&2; exit 2; }
if [ -d old/vsa_train ]; then
  old_root=$(cd old && pwd)
else  # old/ is the package folder itself: import it as vsa_train through a link
  old_root=$(mktemp -d)
  ln -s "$(cd old && pwd)" "$old_root/vsa_train"
fi
results=$(mktemp -d)
worker=$(cat <<'PY'
import json, sys
import torch
from triton.testing import do_bench
import vsa_train
from vsa_train.ops import video_sparse_attention

CASES = [("16K D=64 B=1", (16, 32, 32), 64, 1), ("16K D=64 B=4", (16, 32, 32), 64, 4),
         ("32K D=128 B=1", (32, 32, 32), 128, 1)]
rep = int(sys.argv[2])
rows = {}
for name, video, D, batch in CASES:
    S = video[0] * video[1] * video[2]
    topk = S // 64 // 8  # 87.5% sparse
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, gate = (torch.randn(batch, S, 12, D, device="cuda", dtype=torch.bfloat16, generator=g)
                     .requires_grad_() for _ in range(4))
    grad = torch.randn(batch, S, 12, D, device="cuda", dtype=torch.bfloat16, generator=g)

    def fwd():
        return video_sparse_attention(q, k, v, video, topk, gate_coarse=gate, backend="triton")

    rows[name] = {"fwd": do_bench(fwd, warmup=25, rep=rep, return_mode="median"),
                  "fwd_bwd": do_bench(lambda: fwd().backward(grad), warmup=25, rep=rep, grad_to_none=[q, k, v, gate],
                                      return_mode="median")}
    del q, k, v, gate, grad
    torch.cuda.empty_cache()
with open(sys.argv[1], "w") as f:
    json.dump({"code": vsa_train.__file__, "rows": rows}, f)
PY
)
for round in $(seq "${ROUNDS:-2}"); do
  for side in old new; do
    root=$([ "$side" = old ] && echo "$old_root" || pwd)
    # From $root: `python -c` puts the working directory first on the import path.
    (cd "$root" && PYTHONPATH="$root" python -c "$worker" "$results/$side.$round.json" "${REP:-100}")
  done
done
python - "$results" <<'PY'
import glob, json, os, sys
runs = {side: [json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], f"{side}.*.json")))]
        for side in ("old", "new")}
for side, found in runs.items():
    print(f"{side}: {found[0]['code']}")
print("\n| case | old fwd ms | new fwd ms | new/old fwd | old fwd+bwd ms | new fwd+bwd ms | new/old fwd+bwd "
      "| rounds (old; new fwd+bwd ms) |\n|---|---|---|---|---|---|---|---|")
for case in runs["old"][0]["rows"]:
    best = {side: {key: min(r["rows"][case][key] for r in found) for key in ("fwd", "fwd_bwd")}
            for side, found in runs.items()}
    rounds = "; ".join(" ".join(f"{r['rows'][case]['fwd_bwd']:.3f}" for r in runs[s]) for s in ("old", "new"))
    o, n = best["old"], best["new"]
    print(f"| {case} | {o['fwd']:.3f} | {n['fwd']:.3f} | {n['fwd'] / o['fwd']:.3f} | {o['fwd_bwd']:.3f} | "
          f"{n['fwd_bwd']:.3f} | {n['fwd_bwd'] / o['fwd_bwd']:.3f} | {rounds} |")
PY
rm -rf "$results"
[ -d old/vsa_train ] || rm -rf "$old_root"
