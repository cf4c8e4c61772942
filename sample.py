r"""Generate videos from a trained run (latest checkpoint, EMA weights when present) and write mp4 + GIF.

    python sample.py checkpoint=RUN_DIR prompt="a man talks on a phone" steps=30 cfg_scale=5   # RUN_DIR/samples/
    python sample.py checkpoint=RUN_DIR prompt="a man talks on a phone" out=phone.mp4          # ./phone.mp4, .gif
    python sample.py checkpoint=RUN_DIR/checkpoints/step_00001000 prompt="..." num=4 seed=1 ema=false

Keys (key=value): checkpoint (run dir or one checkpoint dir), prompt, steps (30), cfg_scale (5.0),
out (default: RUN_DIR/samples/<checkpoint>_<prompt>.mp4; num > 1 writes out_0.mp4, out_1.mp4, ...), num (1),
seed (0), ema (true), fps (8), device (cuda if available, else cpu). Each mp4 comes with a GIF beside it. Runs trained
on latents are decoded through the VAE of their index.

Usage: python sample.py checkpoint=RUN_DIR prompt="..." [key=value ...]     (python sample.py --help: this text)
"""
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vsa_train.data.video_io import write_video
from vsa_train.sampling import generate, load_model, slug

DEFAULTS = {"checkpoint": None, "prompt": None, "steps": 30, "cfg_scale": 5.0, "out": None, "num": 1,
            "seed": 0, "ema": True, "fps": 8.0, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def parse(argv: list[str]):
    """key=value arguments (as Hydra's) over DEFAULTS; unknown keys and missing required ones fail clearly."""
    if not argv or {"-h", "--help", "help"} & set(argv):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments must be key=value, got {bad}\n{__doc__}")
    args = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_dotlist(argv))
    if unknown := set(args) - set(DEFAULTS):
        raise SystemExit(f"unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    for key in ("checkpoint", "prompt"):
        if args[key] is None:
            raise SystemExit(f"{key}=... is required\n{__doc__}")
    return args


def default_out(ckpt: Path, prompt: str) -> Path:
    """RUN_DIR/samples/<checkpoint>_<prompt's first words>.mp4: beside the run's own samples, not in the current
    folder."""
    return ckpt.parent.parent / "samples" / f"{ckpt.name}_{slug(prompt)}.mp4"


def main(argv: list[str]) -> list[Path]:
    args = parse(argv)
    start = time.perf_counter()
    model, cfg, ckpt = load_model(args.checkpoint, device=args.device, ema=args.ema)
    print(f"loaded {ckpt} ({'EMA' if args.ema and cfg.train.get('ema') is not None else 'raw'} weights, "
          f"data={cfg.data.name})")
    videos = generate(model, cfg.data, [str(args.prompt)] * args.num, args.steps, args.cfg_scale, args.seed)
    out = Path(args.out) if args.out is not None else default_out(ckpt, str(args.prompt))
    written = []
    for k, video in enumerate(videos):
        path = out if args.num == 1 else out.with_name(f"{out.stem}_{k}{out.suffix}")
        written += write_video(video, path, fps=args.fps)
    print(f"wrote {', '.join(map(str, written))} ({tuple(videos.shape[1:])}, {time.perf_counter() - start:.1f} s)")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
