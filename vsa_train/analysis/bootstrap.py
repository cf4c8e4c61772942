"""Seed averages and the bootstrap interval of the FLOPs multiplier (scaling.flops_multiplier).

Cells map a key whose first item is the attention type to the curves of one config's runs (one per seed; a
curve is [(FLOPs, loss)]). Every curve of a cell holds the same FLOPs values (`aligned`), so any resample of
its seeds averages point by point.
"""
import math

import numpy as np

from .scaling import flops_multiplier, pareto_frontier

SEED = 0  # the bootstrap's fixed seed: summary.md and the plots are the same on every run of the analysis


def aligned(curves: list[list[tuple[float, float]]]) -> list[list[tuple[float, float]]]:
    """Each curve restricted to the FLOPs values all of them logged (seeds that ran for different lengths)."""
    if len(curves) == 1:
        return [list(curves[0])]
    shared = set.intersection(*({f for f, _ in c} for c in curves))
    return [[(f, l) for f, l in c if f in shared] for c in curves]


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The seed average of runs of one configuration: the mean loss at each FLOPs value all of them logged."""
    curves = aligned(curves)
    if not curves[0]:
        return []
    return sorted((c[0][0], float(np.mean([l for _, l in c]))) for c in zip(*(sorted(c) for c in curves)))


def pooled_seed_sd(groups: list[list[float]]) -> float | None:
    """The pooled within-group standard deviation of log losses over groups of 2+ seeds (None: no such group)."""
    ss, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            logs = np.log(np.asarray(values, dtype=np.float64))
            ss += float(np.sum((logs - logs.mean()) ** 2))
            dof += len(values) - 1
    return math.sqrt(ss / dof) if dof else None


def _resample(curves, rng, seed_sd):
    """One bootstrap draw of a cell's seed-mean curve."""
    if len(curves) == 1:  # nothing to redraw: the measured seed-to-seed spread stands in
        scale = math.exp(rng.normal(0.0, seed_sd))
        return [(f, l * scale) for f, l in curves[0]]
    drawn = mean_curve([curves[i] for i in rng.integers(0, len(curves), len(curves))])
    # residuals about the cell mean scaled by sqrt(n / (n - 1)): the plain bootstrap of a mean of n runs has
    # (n - 1) / n of its variance, half with two seeds
    centre, inflate = dict(mean_curve(curves)), math.sqrt(len(curves) / (len(curves) - 1))
    return [(f, centre[f] * (l / centre[f]) ** inflate) for f, l in drawn]


def bootstrap_multiplier(cells: dict, base: str, other: str, resamples: int = 1000, seed: int = SEED,
                         seed_sd: float | None = None, tolerance: float = 0.0):
    """(2.5th percentile, 97.5th percentile, valid resamples) of the multiplier over resamples, or None."""
    # Each resample draws, in every cell, as many runs as it has, with replacement (every grid point stays
    # represented), averages them, rebuilds both frontiers and takes the multiplier. A cell with a single run is
    # scaled by exp(N(0, seed_sd)), the seed-to-seed spread of log loss where there are several seeds (without
    # any, there is no interval). `tolerance`: the frontiers' (scaling.pareto_frontier).
    if resamples <= 0:
        return None
    cells = {key: aligned(curves) for key, curves in cells.items() if key[0] in (base, other)}
    cells = {key: curves for key, curves in cells.items() if curves[0]}
    if any(len(curves) == 1 for curves in cells.values()) and not seed_sd:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        points = {base: [], other: []}
        for key, curves in cells.items():
            points[key[0]].extend(_resample(curves, rng, seed_sd))
        ratio = flops_multiplier(*(pareto_frontier(points[a], tolerance) for a in (base, other)))[2]
        if math.isfinite(ratio):
            values.append(ratio)
    if len(values) < max(10, resamples // 2):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high), len(values)
