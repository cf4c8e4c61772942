"""Which runs can be compared, decided from their files before any number is taken; one line per run (or group)
left out, cut or flagged:

- runs whose last eval loss is not finite (diverged): left out;
- runs scored on another eval set than the largest group (another data config or eval size): left out;
- runs started from other weights (train.init_from): their FLOPs count from 0, so they are left out unless
  record.json gives the FLOPs they inherited (`inherited_flops`), which are then added to theirs;
- runs that went on past their budget (a finished run relaunched with a larger train.flops_budget resumes
  silently; config.yaml keeps the first budget): cut at the step that reached their budget when that part is
  intact (the learning rate there is the schedule's floor), else left out;
- runs resumed with a changed config (train.resume=force, recorded in config_history.jsonl): left out;
- the same config and seed twice (a copy of a run): one is kept;
- runs that overshot their budget by more than 2%, or whose record.json gives other executed FLOPs than
  their rows: flagged.
"""
import dataclasses
from collections import Counter

from ..metrics import BUDGET_OVERSHOOT
from .runs import EVAL, Run, finite



def screen(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """(the runs the analysis can compare, possibly cut or shifted; notes naming every run left out or changed)."""
    notes = []
    kept = []
    for run in _one_eval_set(runs, notes):
        run = _diverged(run, notes)
        run = run and _warm_start(run, notes)
        run = run and _forced_resume(run, notes)
        run = run and _past_budget(run, notes)
        if run is not None:
            kept.append(run)
    kept = _no_copies(kept, notes)
    notes += [_record_note(run) for run in kept if _record_note(run)]
    over = [f"{run.path.name} (+{100 * overshoot(run):.1f}%)" for run in kept
            if overshoot(run) is not None and overshoot(run) > BUDGET_OVERSHOOT]
    if over:  # a flag, not a reason to leave them out: their FLOPs are what they executed
        notes.append(f"{len(over)} run(s) overshot their budget by more than +{100 * BUDGET_OVERSHOOT:.0f}% (the last step "
                     f"crosses it; the FLOPs axis has what they executed): {', '.join(over)}")
    return kept, notes


def overshoot(run: Run) -> float | None:
    """Executed FLOPs over the budget, as a fraction (None: no budget, or not reached)."""
    return run.rows[-1]["flops"] / run.budget - 1 if run.reached_budget and run.budget > 0 else None


def _one_eval_set(runs: list[Run], notes: list) -> list[Run]:
    """The runs of the eval set most runs share; every other eval set's runs left out in one line each."""
    groups = Counter(run.protocol for run in runs)
    # most runs first; a tie goes to the group whose first run sorts first, so the choice is reproducible
    first = {p: min(str(r.path) for r in runs if r.protocol == p) for p in groups}
    chosen = min(groups, key=lambda p: (-groups[p], first[p]))
    for protocol in sorted(set(groups) - {chosen}, key=lambda p: first[p]):
        names = [r.path.name for r in runs if r.protocol == protocol]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        notes.append(f"left out {len(names)} run(s) scored on another eval set (data config or eval size) than "
                     f"the {groups[chosen]} analysed, so not comparable with them: {shown} (analyse them on "
                     f"their own)")
    return [run for run in runs if run.protocol == chosen]


def _diverged(run: Run, notes: list) -> Run | None:
    """A run whose last eval loss is not a finite number: nothing of it can be compared."""
    last = run.rows[-1].get(EVAL, 0.0)
    if finite(last):
        return run
    notes.append(f"{run.path.name}: its last eval loss is {last!r} (diverged?); left out")
    return None


def _warm_start(run: Run, notes: list) -> Run | None:
    """A run started from other weights: shifted by the FLOPs its record says it inherited, else left out."""
    if run.init_from is None:
        return run
    inherited = run.record.get("inherited_flops")
    if not isinstance(inherited, (int, float)) or isinstance(inherited, bool) or inherited < 0:
        notes.append(f"{run.path.name}: started from other weights (train.init_from={run.init_from}) and its files "
                     f"record no inherited FLOPs (record.json 'inherited_flops'), so its FLOPs count from 0; "
                     f"left out")
        return None
    notes.append(f"{run.path.name}: started from other weights (train.init_from={run.init_from}); its FLOPs "
                 f"count from the {inherited:.3g} it inherited (record.json)")
    rows = [{**r, "flops": r["flops"] + inherited} for r in run.rows]
    budget = None if run.budget is None else run.budget + inherited
    return dataclasses.replace(run, rows=rows, budget=budget)


def _forced_resume(run: Run, notes: list) -> Run | None:
    """A run resumed with changed trajectory keys (train.resume=force) mixes two configs: left out."""
    changed = sorted({k for launch in run.history if launch.get("forced") for k in (launch.get("changed") or {})})
    if not changed:
        return run
    notes.append(f"{run.path.name}: resumed with a changed config ({', '.join(changed)}; config_history.jsonl), "
                 f"so its rows mix two configs; left out")
    return None


def _past_budget(run: Run, notes: list) -> Run | None:
    """A run whose rows go on past the step that reached its budget: cut there if that part is intact."""
    if run.budget is None:
        return run
    crossing = next((i for i, r in enumerate(run.rows) if r["flops"] >= run.budget), None)
    if crossing is None or crossing == len(run.rows) - 1:
        return run
    row = run.rows[crossing]
    went = (f"{run.path.name}: went on past its budget {run.budget:.2g} to {run.rows[-1]['flops']:.2g} FLOPs "
            f"(relaunched in its directory with a larger train.flops_budget or max_steps?)")
    if not _intact(run, crossing):
        notes.append(went + ": the learning rate at its budget is not the schedule's floor, so its schedule "
                            "changed before it got there; left out")
        return None
    notes.append(went + f": analysed up to step {row['step']}, where it reached its budget")
    return dataclasses.replace(run, rows=run.rows[:crossing + 1])


def _intact(run: Run, crossing: int) -> bool:
    """Whether the rows up to `crossing` are the run its config describes, untouched by the later launch."""
    if not run.decays:
        return True  # a constant rate does not depend on where the run ends
    lr = run.rows[crossing].get("lr")
    if lr is not None:  # a decaying schedule ends at its floor; one re-stretched to a later end is above it there
        return lr <= min(r["lr"] for r in run.rows if "lr" in r) * (1 + 1e-3)
    step = run.rows[crossing]["step"]
    resumed = [launch.get("resumed_from") for launch in run.history if launch.get("resumed_from")]
    return bool(run.history) and all(_step_of(name) >= step for name in resumed)


def _step_of(checkpoint: str) -> int:
    digits = "".join(ch for ch in str(checkpoint) if ch.isdigit())
    return int(digits) if digits else -1


def _record_note(run: Run) -> str | None:
    """A flag when record.json's executed FLOPs are not the FLOPs of the metrics rows beside it."""
    recorded = run.record.get("executed_flops")
    if not finite(recorded) or run.init_from is not None:
        return None
    last = run.rows[-1]["flops"]
    if abs(last - recorded) <= 1e-3 * max(abs(recorded), 1.0):
        return None
    return (f"{run.path.name}: record.json says {recorded:.4g} FLOPs executed, its metrics.jsonl ends at {last:.4g} "
            f"(the rows and the record are not of one run?)")


def _no_copies(runs: list[Run], notes: list) -> list[Run]:
    """One run per (config, seed): a second is a copy (or a rerun) and would count as another seed."""
    seen, kept = {}, []
    for run in runs:
        key = (run.attn, run.size, run.recipe, run.seed)
        if key in seen:
            notes.append(f"{_label(run)} has the config and seed of {_label(seen[key])} (a copy?); left out")
            continue
        seen[key] = run
        kept.append(run)
    return kept


def _label(run: Run) -> str:
    """A run's folder with its parent's name: enough to find it, and no absolute path in summary.md."""
    return f"{run.path.parent.name}/{run.path.name}"
