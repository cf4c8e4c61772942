"""The FLOPs multiplier of an attention type over the baseline at equal eval loss, from the Pareto frontiers of
seed-averaged cells: overall, at each model size alone (that size's runs at its budgets: final loss against
FLOPs, interpolated in log-log), and at each eval timestep; with a bootstrap interval, or a one-sided bound when
the frontiers share no loss range."""
import math

from ..metrics import BUDGET_OVERSHOOT
from .bootstrap import aligned, bootstrap_multiplier, mean_curve, pooled_seed_sd
from .runs import EVAL, Run, timestep_of
from .scaling import flops_bound, flops_multiplier, pareto_frontier



def cells_of(runs: list[Run], key: str = EVAL, all_points: bool = False, notes: list | None = None) -> dict:
    """(attention, size, budget, recipe) -> its runs' frontier points (one curve per seed, on shared FLOPs)."""
    cells = {}
    for run in runs:
        points = run.frontier_points(key, all_points=all_points)
        if points:
            cells.setdefault((run.attn, run.size, run.budget, run.recipe), []).append(points)
    for cell, curves in list(cells.items()):
        cells[cell] = aligned(curves)
        dropped = sum(len(c) for c in curves) - sum(len(c) for c in cells[cell])
        if dropped and notes is not None:
            notes.append(f"seeds cover different FLOPs: {cell[0]} {cell[1]} (budget {cell[2]}) averaged over the "
                         f"{len(cells[cell][0])} eval FLOPs all its {len(curves)} seeds logged ({dropped} points of "
                         f"the longer ones left out)")
        if not cells[cell][0]:
            del cells[cell]
    return cells


def frontiers_of(cells: dict) -> dict:
    """Per attention type, the Pareto frontier of the seed-averaged curves of all its cells."""
    points = {}
    for key, curves in cells.items():
        points.setdefault(key[0], []).extend(mean_curve(curves))
    return {attn: pareto_frontier(p, BUDGET_OVERSHOOT) for attn, p in sorted(points.items())}


def seed_spread(runs: list[Run]) -> float | None:
    """Seed-to-seed standard deviation of log final eval loss, pooled over the configs with 2+ seeds."""
    groups = {}
    for run in runs:
        if run.final() is not None and run.finished:
            groups.setdefault((run.attn, run.size, run.recipe), []).append(run.final())
    return pooled_seed_sd(list(groups.values()))


def compare(cells: dict, base: str, other: str, resamples: int, seed_sd: float | None) -> dict | None:
    """The multiplier (base FLOPs / other FLOPs at equal loss) with its interval, a bound, or None (no points)."""
    mine = {key: curves for key, curves in cells.items() if key[0] in (base, other)}
    frontiers = frontiers_of(mine)
    if base not in frontiers or other not in frontiers:
        return None
    counts = {"runs": sum(len(c) for c in mine.values()), "seeds": max(len(c) for c in mine.values())}
    low, high, ratio = flops_multiplier(frontiers[base], frontiers[other])
    if math.isnan(ratio):
        return {**flops_bound(frontiers[base], frontiers[other]), "ci": None, **counts}
    ci = bootstrap_multiplier(mine, base, other, resamples=resamples, seed_sd=seed_sd, tolerance=BUDGET_OVERSHOOT)
    why = ("no grid point has a second seed" if seed_sd is None else "no bootstrap asked for" if resamples <= 0
           else "too few bootstrap resamples gave a ratio")
    return {"low": low, "high": high, "ratio": ratio, "ci": ci, "bound": None, "no_ci": None if ci else why,
            **counts}


def size_frontiers(cells: dict, order) -> dict:
    """Model size (sorted by `order`) -> its frontiers per attention type, from that size's runs alone."""
    sizes = sorted({key[1] for key in cells}, key=order)
    return {size: frontiers_of({k: c for k, c in cells.items() if k[1] == size}) for size in sizes}


def per_size(cells: dict, base: str, other: str, resamples: int, seed_sd: float | None) -> dict:
    """Model size -> the multiplier from that size's runs alone, for the sizes both attention types ran."""
    sizes = sorted({key[1] for key in cells if key[0] == base} & {key[1] for key in cells if key[0] == other})
    out = {}
    for size in sizes:
        mine = {key: curves for key, curves in cells.items() if key[1] == size}
        out[size] = compare(mine, base, other, resamples, seed_sd)
    return out


def per_timestep(runs: list[Run], base: str, others: list[str], resamples: int, seed_sd,
                 all_points: bool = False) -> dict:
    """Per eval timestep key: the frontiers per attention and each other attention's multiplier."""
    keys = sorted({k for r in runs for k in r.timestep_keys()}, key=timestep_of)
    frontiers, rows = {}, []
    for key in keys:
        cells = cells_of(runs, key, all_points)
        frontiers[key] = frontiers_of(cells)
        for attn in others:
            m = compare(cells, base, attn, resamples, seed_sd)
            if m is not None:
                rows.append({"t": timestep_of(key), "key": key, "attn": attn, **m})
    return {"frontiers": frontiers, "rows": rows}
