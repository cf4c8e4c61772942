"""The trainer's own config sections, `train`, `optim`, `parallel` and `logger`, each rule next to its field
(configs/train.yaml, configs/optim/, configs/logger/ document the keys). The model's, attention's and data's
sections live with their code: `DiTConfig`/`WanConfig` (models/dit.py, models/wan.py), `DenseConfig`/`VSAConfig`
(models/attention.py, models/vsa.py), `data/config.py`. vsa_train/config_schema.py reads them all and checks the
rules that join sections.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fields import Section, choice, flag, integer, is_int, is_num, number, positive, setting, text

LR_SCHEDULES = ("constant", "cosine", "wsd")  # vsa_train/schedules.py
STRATEGIES = ("ddp", "fsdp")  # vsa_train/parallel.py
RESUME_MODES = ("auto", "never", "force")  # vsa_train/rundir.py, RunDir.check_launch


def _seed(v) -> bool:
    return is_int(v) and v >= 0


@dataclass(frozen=True)
class TrainConfig(Section):
    """The `train` section (configs/train.yaml says what each key does)."""

    seed: int = setting(0, ok=is_int, allowed="an integer")
    max_steps: int = integer(150, low=0)
    batch_size: int = integer(8)
    grad_accum: int = integer(1)
    log_every: int = integer(10)
    eval_every: int = integer(25)
    eval_every_flops: float | None = positive(None, optional=True)
    ckpt_every: int = integer(100)
    keep_checkpoints: int = integer(2)
    ckpt_background: bool = flag(True)
    eval_samples: int = integer(16)
    eval_timesteps: int = integer(8)
    eval_batch_size: int = integer(16)
    flops_budget: float | None = positive(None, optional=True)
    init_from: str | None = text(None, optional=True)
    dry_run: bool = flag(False)
    compile: bool | str = choice(False, (True, False, "blocks", "model"), "one of true, false, blocks, model")
    compile_cache: str | None = text(None, optional=True)
    mixed_precision: str = choice("auto", ("auto", "no", "bf16", "fp16"))
    ema: float | None = setting(None, ok=lambda v: is_num(v) and 0 < v < 1, allowed="a decay in (0, 1)",
                                optional=True)
    peak_tflops: float = positive(989.0)
    sample_every: int | None = integer(None, optional=True)
    sample_count: int = integer(2)
    sample_prompts: tuple[str, ...] | None = setting(
        None, ok=lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(p, str) and p.strip()
                                                                               for p in v),
        allowed="a list of non-empty strings", optional=True, convert=tuple)
    # int | tuple[int, ...]: Any, as OmegaConf's structured configs (config_schema.register) have no union of a
    # container
    sample_seeds: Any = setting(
        0, ok=lambda v: _seed(v) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_seed, v))),
        allowed="an integer >= 0 (prompt k gets seed + k) or a list of them, one per prompt",
        convert=lambda v: v if is_int(v) else tuple(v))
    sample_steps: int = integer(25)
    # [frames, height, width] of the model input, one of a bucketed run's shapes; null: the data's (first bucket's)
    # Any, as for sample_seeds: OmegaConf's structured configs have no optional container of a fixed length
    sample_shape: Any = setting(None, ok=lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(
        is_int(x) and x >= 1 for x in v), allowed="3 positive integers [frames, height, width]", optional=True,
        convert=tuple)
    sample_cfg_scale: float = number(5.0, lambda v: v >= 0, "a number >= 0")
    resume: str = choice("auto", RESUME_MODES)
    on_nonfinite: str = choice("stop", ("stop", "rollback"))
    max_rollbacks: int = integer(3, low=0)
    explode_factor: float = positive(10.0)
    dist_timeout_s: float = positive(600)
    lock_stale_s: float = positive(900)

    @property
    def compiled(self) -> bool:
        """train.compile asks for any compilation (true, blocks or model)."""
        return self.compile is not False

    @property
    def sample_number(self) -> int:
        """Videos per sampling: one per train.sample_prompts, else train.sample_count (of the eval captions)."""
        return len(self.sample_prompts) if self.sample_prompts is not None else self.sample_count

    def prompt_seeds(self) -> list[int]:
        """One noise seed per sample prompt, from the config alone: the same in every run of a sweep."""
        if isinstance(self.sample_seeds, tuple):
            return list(self.sample_seeds)
        return [self.sample_seeds + k for k in range(self.sample_number)]

    def validate(self) -> list[str]:
        seeds, n = self.sample_seeds, self.sample_number
        if isinstance(seeds, tuple) and len(seeds) != n:
            what = (f"the {n} train.sample_prompts" if self.sample_prompts is not None else
                    f"train.sample_count={n} (sample_prompts is null: the first eval captions)")
            return [f"train.sample_seeds must have one seed per prompt, {n} for {what}, got {len(seeds)}: "
                    f"{list(seeds)} (or one integer: prompt k gets seed + k)"]
        return []


@dataclass(frozen=True)
class OptimConfig(Section):
    """The `optim` section: AdamW and the learning-rate schedule (configs/optim/adamw.yaml)."""

    name: str = text()
    lr: float = positive(6e-4)
    betas: tuple[float, float] = setting([0.9, 0.95], ok=lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                                         and all(is_num(b) and 0 <= b < 1 for b in v),
                                         allowed="two numbers in [0, 1)", convert=tuple)
    weight_decay: float = number(0.01, lambda v: v >= 0, "a number >= 0")
    warmup_steps: int = integer(100, low=0)
    grad_clip: float | None = positive(1.0, optional=True)
    schedule: str = choice("constant", LR_SCHEDULES)
    min_lr_ratio: float = number(0.1, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    decay_fraction: float = number(0.2, lambda v: 0 < v <= 1, "a number in (0, 1]")


@dataclass(frozen=True)
class ParallelConfig(Section):
    """The `parallel` section, the one place that sets the layout over processes (vsa_train/parallel.py)."""

    strategy: str = choice("ddp", STRATEGIES)
    sp_size: int = integer(1)
    reshard_after_forward: bool = flag(True)


@dataclass(frozen=True)
class LoggerConfig(Section):
    """The `logger` section (configs/logger/): wandb's settings, or name=none for metrics.jsonl only."""

    name: str = choice("wandb", ("wandb", "none"))
    project: str | None = text("vsa_train", optional=True)
    entity: str | None = text(None, optional=True)
    mode: str = choice("offline", ("offline", "online", "disabled"))
    group: str | None = text(None, optional=True)
    job_type: str = text("train")
    tags: tuple[str, ...] = setting([], ok=lambda v: isinstance(v, (list, tuple)), allowed="a list of tags",
                                    convert=tuple)
