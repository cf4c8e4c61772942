"""Export a trained run as a diffusers folder that stock diffusers loads (its code, weights and model card).

A VideoDiT run's folder holds the pipeline, transformer and caption encoder with their own code, the scheduler,
model_index.json and a model card (README.md: training config, FLOPs, final eval loss, commit, how to load).

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
from_pretrained(OUT_DIR). See vsa_train/integrations/diffusers.py for the layout and the time convention (scheduler
sigma = our t).

A model=wan run on data=latents becomes a stock WanPipeline folder (its VAE and text encoder: those recorded in the
latent index, or --vae / --text-encoder; with VSA the transformer carries its code and loads through
trust_remote_code=True); OUT_DIR/README.md says how to sample it as it was trained. See
vsa_train/integrations/wan_export.py.

    python scripts/export_diffusers.py RUN_DIR OUT_DIR [--vae PATH_OR_ID [--vae-subfolder vae]]
        [--text-encoder PATH_OR_ID [--text-encoder-subfolder text_encoder] [--tokenizer-subfolder tokenizer]]
    python scripts/export_diffusers.py RUN_DIR OUT_DIR --transformer-only     # OUT_DIR/transformer alone
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from vsa_train.errors import LaunchError  # noqa: E402
from vsa_train.integrations.diffusers import export_run  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory or checkpoint directory")
    parser.add_argument("out_dir", help="diffusers folder to write")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even if the run kept EMA")
    wan = parser.add_argument_group("model=wan runs")
    wan.add_argument("--vae", help="AutoencoderKLWan (Hub id or folder) instead of the latent index's")
    wan.add_argument("--vae-subfolder", help="e.g. vae (in a diffusers repo)")
    wan.add_argument("--text-encoder", help="transformers text encoder (Hub id or folder) instead of the index's")
    wan.add_argument("--text-encoder-subfolder", help="e.g. text_encoder (in a diffusers repo)")
    wan.add_argument("--tokenizer-subfolder", help="e.g. tokenizer; default: the text encoder's")
    wan.add_argument("--transformer-only", action="store_true", help="write OUT_DIR/transformer alone")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = _export(args)
    except LaunchError as e:  # what is missing or does not fit: one line
        raise SystemExit(f"export_diffusers: {e}") from None
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
    return out


def _export(args) -> Path:
    """export_run, with the model=wan options that are given."""
    wan = {}
    if args.vae:
        wan["vae"] = {"path": args.vae, "subfolder": args.vae_subfolder}
    if args.text_encoder:
        wan["text_encoder"] = {"path": args.text_encoder, "subfolder": args.text_encoder_subfolder,
                               "tokenizer_subfolder": args.tokenizer_subfolder}
    if args.transformer_only:
        wan["transformer_only"] = True
    return export_run(args.run_dir, args.out_dir, ema=not args.no_ema, **wan)


if __name__ == "__main__":
    main()
