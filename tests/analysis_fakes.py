"""Fake run directories for the analysis tests: the files a finished run of the 16K study leaves in
docs/study/<name>/runs/<size>_<attn>_<point>/ (metrics.jsonl, config.yaml, record.json), with final losses
from a made-up L(N, D) = E + A·N^-α + B·D^-β plus noise. VSA gets the same L at `ratio`× cheaper samples, so
its FLOPs multiplier at equal loss is `ratio` at every size, overall and at every timestep."""
import json
import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = ("dit_60m", "dit_120m", "dit_410m")
DENSE_PARAMS = {"dit_60m": 61154316, "dit_120m": 118435596, "dit_410m": 411929612}  # L uses these for both
POINTS = {"1e16": (1e16, 0), "3e16": (3e16, 0), "1e17": (1e17, 0), "1e16_s1": (1e16, 1)}
E, A, B, ALPHA = 0.02, 38.7, 1.0, 0.34  # optimum near 120M at 3e16: inside the sizes
TOKENS = 16384
TIMESTEPS = (0.125, 0.375, 0.625, 0.875)


def study_config(size, attn, budget, seed=0, schedule="cosine", **train):
    """A resolved run config as the trainer writes it (model, attn, data, optim, train sections)."""
    data = OmegaConf.merge(OmegaConf.load(CONFIGS / "data" / "synthetic.yaml"),
                           OmegaConf.load(CONFIGS / "data" / "synthetic_16k.yaml"))
    data.pop("defaults", None)
    return {"model": OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{size}.yaml")),
            "attn": OmegaConf.to_container(OmegaConf.load(CONFIGS / "attn" / f"{attn}.yaml")),
            "data": OmegaConf.to_container(data),
            "optim": {"lr": 6e-4, "schedule": schedule, "min_lr_ratio": 0.1, "warmup_steps": 10},
            "train": {"flops_budget": budget, "seed": seed, "max_steps": 10**8, "batch_size": 4,
                      "eval_samples": 32, "eval_timesteps": 4, "init_from": None, **train}}


def law(params, samples):
    """The made-up final eval loss of a model of `params` parameters trained on `samples` samples."""
    return E + A * params ** -ALPHA + B * samples ** -ALPHA


def per_sample(size, attn, ratio):
    return 6.0 * DENSE_PARAMS[size] * TOKENS / (ratio if attn == "vsa" else 1.0)


def study_rows(size, attn, budget, ratio=2.5, noise=0.0, rng=None, batch=4, evals=4):
    """metrics.jsonl rows of one run: a row per step-chunk, evals along the way (before the decay: above the
    law) and at the last step, the first step past the budget (lr at the cosine's floor)."""
    step_flops = batch * per_sample(size, attn, ratio)
    last = math.ceil(budget / step_flops)
    scale = math.exp(noise * rng.standard_normal()) if noise else 1.0
    eval_steps = sorted({*np.linspace(0, last, evals + 1).astype(int).tolist(), last})
    rows = []
    for step in eval_steps:
        # one law for both: at equal FLOPs VSA has trained on `ratio`x more samples
        loss = 2.0 if step == 0 else law(DENSE_PARAMS[size], step * batch) * scale * (1.0 if step == last else 1.08)
        row = {"step": step, "flops": step * step_flops, "samples": step * batch, "loss": loss * 1.05,
               "lr": 6e-5 if step == last else 6e-4, "eval/loss": loss}
        row.update({f"eval/loss_t{t:.4f}": loss * (0.5 + t) for t in TIMESTEPS})
        rows.append(row)
    return rows


def write_study_run(run_dir, cfg, rows, record=None, history=None):
    """A committed run folder: metrics.jsonl, config.yaml, record.json (and config_history.jsonl if given)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = record if record is not None else {"commit": "0000000", "card": "NVIDIA H100 80GB HBM3",
                                                "wall_s": 100.0, "flops": rows[-1]["flops"] if rows else 0.0}
    (run_dir / "record.json").write_text(json.dumps(record))
    if history is not None:
        (run_dir / "config_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def study_folder(root, ratio=2.5, noise=0.004, seed=0, sizes=SIZES, points=POINTS):
    """The 24-run study_16k layout (3 sizes x dense/vsa x 3 budgets + seed 1 at 1e16) under root/runs."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "runs"
    for size in sizes:
        for attn in ("dense", "vsa"):
            for point, (budget, run_seed) in points.items():
                rows = study_rows(size, attn, budget, ratio=ratio, noise=noise, rng=rng)
                write_study_run(root / f"{size}_{attn}_{point}", study_config(size, attn, budget, run_seed), rows)
    return root
