"""The model card (README.md) of an export: what was trained, for how much compute, to what eval loss, at which
commit, and how to load it. Read from the run directory: the checkpoint's state.json (step, executed FLOPs),
metrics.jsonl (eval losses), config.yaml, and the commit from the study runner's record.json (a plain train.py run
records none; the card then names the commit that exported it)."""
from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from ..checkpoint.format import read_state
from ..grid.runner import commit_of
from ..metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]  # the code that exports (a git checkout when installed editable)


def exported_ema(cfg, ckpt: Path, ema: bool) -> bool:
    """Whether an export of `ckpt` holds EMA weights: asked for, and kept by the run."""
    return ema and cfg.train.get("ema") is not None and (Path(ckpt) / "ema.safetensors").is_file()


def run_commit(run_dir: Path) -> str | None:
    """The commit a run trained at, where one was recorded: record.json, the study runner's (vsa_train.grid)."""
    record = run_dir / "record.json"
    return json.loads(record.read_text()).get("commit") if record.is_file() else None


def final_eval(run_dir: Path, step: int, ema: bool) -> tuple[int, float] | None:
    """(step, eval loss) of the run's last evaluation at or before `step`, of the EMA weights when `ema`."""
    key = "eval/loss_ema" if ema else "eval/loss"
    metrics = run_dir / "metrics.jsonl"
    rows = [r for r in read_metrics(metrics) if r["step"] <= step and key in r] if metrics.is_file() else []
    return (rows[-1]["step"], rows[-1][key]) if rows else None


def write_model_card(out_dir, run_dir, ckpt, cfg, ema: bool, how_to_load: str) -> Path:
    """Writes out_dir/README.md for an export of checkpoint `ckpt` of run `run_dir` (config `cfg`); `how_to_load`
    is the markdown that says how (code in a fenced block). Returns its path."""
    run_dir, ckpt = Path(run_dir).resolve(), Path(ckpt)
    used_ema = exported_ema(cfg, ckpt, ema)
    state = read_state(ckpt)
    evaluated = final_eval(run_dir, state["step"], used_ema)
    commit, exporter = run_commit(run_dir), commit_of(REPO)
    weights = "EMA weights" if used_ema else "raw weights"
    facts = {"step": state["step"], "training_flops": state.get("flops"), "eval_loss": evaluated and evaluated[1],
             "eval_step": evaluated and evaluated[0], "ema": used_ema, "commit": commit, "export_commit": exporter,
             "model": cfg.model.name, "attn": cfg.attn.name, "data": cfg.data.source}
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-video",
                         tags=["vsa_train", "video-diffusion", f"attention-{cfg.attn.name}"], vsa_train=facts)
    loss = f"{evaluated[1]:.5g} ({weights}, eval at step {evaluated[0]})" if evaluated else "not evaluated"
    flops = f"{state['flops']:.4g}" if state.get("flops") is not None else "not recorded"
    body = f"""
# {run_dir.name}

A `{cfg.model.name}` video diffusion transformer with `{cfg.attn.name}` attention, trained with vsa_train on
`{cfg.data.source}` data: {state['step']} steps, {flops} training FLOPs, final eval loss {loss}.

## How to load

{how_to_load.strip()}

## Training

| | |
|---|---|
| steps | {state['step']} |
| training FLOPs (executed, cumulative) | {flops} |
| final eval loss | {loss} |
| weights | {weights} |
| trained at commit | {commit or "not recorded (only a study runner's record.json holds one)"} |
| exported at commit | {exporter} |
| run directory | `{run_dir}` |
| checkpoint | `{ckpt.name}` |

The training config (the run's `config.yaml`):

```yaml
{OmegaConf.to_yaml(cfg).strip()}
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = Path(out_dir) / "README.md"
    card.save(path)
    return path
