"""Export a trained run as a diffusers folder that stock diffusers loads (its code, weights and model card).

The folder holds the pipeline, transformer and caption encoder with their own code, the scheduler, model_index.json
and a model card (README.md: training config, FLOPs, final eval loss, commit, how to load).

    python scripts/export_diffusers.py RUN_DIR OUT_DIR [--no-ema]

RUN_DIR is a run directory (its newest verified checkpoint) or one checkpoint directory. EMA weights are exported
when the run kept them, unless --no-ema. Load and sample with diffusers alone (vsa_train need not be installed):

    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import export_to_video
    pipe = DiffusionPipeline.from_pretrained(OUT_DIR, trust_remote_code=True)
    video = pipe("a red circle moving left to right", num_inference_steps=30, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).frames[0]      # [T, H, W, 3] float in [0, 1]
    export_to_video(video, "video.mp4", fps=8)

which samples what `python sample.py checkpoint=RUN_DIR prompt=... steps=30 cfg_scale=5 seed=0` writes; or with
vsa_train's own classes, running none of the folder's code: vsa_train.integrations.diffusers.VSAVideoPipeline.
from_pretrained(OUT_DIR). A model=wan run exports its transformer alone. See vsa_train/integrations/diffusers.py for
the layout and the time convention (scheduler sigma = our t).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from vsa_train.integrations.diffusers import export_run  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory or checkpoint directory")
    parser.add_argument("out_dir", help="diffusers folder to write")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even if the run kept EMA")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = export_run(args.run_dir, args.out_dir, ema=not args.no_ema)
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
    return out


if __name__ == "__main__":
    main()
