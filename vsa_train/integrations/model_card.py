"""The model card (README.md) of an export: what was trained, for how much compute, to what eval loss, at which
commit, on which data, and how to load it. Read from the run directory: the checkpoint's state.json (step, executed
FLOPs, the code's commits its weights were trained with, a Hub dataset's commit), metrics.jsonl (eval losses),
config.yaml; for a checkpoint from before state.json held the code's commits, the study runner's record.json."""
from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from ..checkpoint.format import read_state
from ..metrics import read_metrics
from ..provenance import code_commit


def exported_ema(cfg, ckpt: Path, ema: bool) -> bool:
    """Whether an export of `ckpt` holds EMA weights: asked for, and kept by the run."""
    return ema and cfg.train.get("ema") is not None and (Path(ckpt) / "ema.safetensors").is_file()


def trained_commits(run_dir: Path, state: dict) -> list[str]:
    """The code's commits a checkpoint's weights were trained with, oldest first: its state.json's (the trainer's
    record), else the study runner's record.json (vsa_train.grid); none where neither recorded one."""
    if state.get("code_commits"):
        return list(state["code_commits"])
    record = run_dir / "record.json"
    commit = json.loads(record.read_text()).get("commit") if record.is_file() else None
    return [commit] if commit else []


def _commit_line(commits: list[str]) -> str:
    if not commits:
        return "not recorded (a checkpoint from before vsa_train recorded it)"
    return commits[-1] + (f" (resumed from weights trained at {', '.join(commits[:-1])})" if commits[1:] else "")


def _data_line(cfg, state: dict) -> str:
    """The data source, and a Hub dataset's id at the commit the checkpoint trained on."""
    if state.get("data_commit"):
        return f"`{cfg.data.path}` at commit {state['data_commit']}"
    return f"`{cfg.data.source}`" + (f" (`{cfg.data.path}`)" if cfg.data.get("path") else "")


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
    commits, exporter = trained_commits(run_dir, state), code_commit()
    weights = "EMA weights" if used_ema else "raw weights"
    facts = {"step": state["step"], "training_flops": state.get("flops"), "eval_loss": evaluated and evaluated[1],
             "eval_step": evaluated and evaluated[0], "ema": used_ema, "commit": commits[-1] if commits else None,
             "commits": commits, "export_commit": exporter, "model": cfg.model.name, "attn": cfg.attn.name,
             "data": cfg.data.source, "data_commit": state.get("data_commit")}
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
| trained at commit | {_commit_line(commits)} |
| exported at commit | {exporter} |
| run directory | `{run_dir}` |
| checkpoint | `{ckpt.name}` |
| data | {_data_line(cfg, state)} |

The training config (the run's `config.yaml`):

```yaml
{OmegaConf.to_yaml(cfg).strip()}
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = Path(out_dir) / "README.md"
    card.save(path)
    return path
