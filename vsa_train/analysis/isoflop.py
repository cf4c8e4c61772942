"""The isoFLOP view: at each budget, final eval loss against log10(parameters) per attention type, a parabola
through it and its minimum, the compute-optimal size, flagged when it lies outside the sizes that ran."""
import math
from typing import NamedTuple

import numpy as np

from .runs import Run


class Parabola(NamedTuple):
    """loss = a·x² + b·x + c in x = log10(parameters), fitted at one FLOPs budget; its minimum is the
    compute-optimal size (`inside`: the minimum lies within the sizes fitted, else it is an extrapolation)."""

    a: float
    b: float
    c: float
    x_min: float
    x_max: float

    @property
    def convex(self) -> bool:
        return self.a > 0

    @property
    def params_opt(self) -> float:
        return 10 ** (-self.b / (2 * self.a)) if self.convex else math.nan

    @property
    def loss_opt(self) -> float:
        return self.c - self.b ** 2 / (4 * self.a) if self.convex else math.nan

    @property
    def inside(self) -> bool:
        return self.convex and self.x_min <= -self.b / (2 * self.a) <= self.x_max

    def loss(self, params):
        x = np.log10(np.asarray(params, dtype=np.float64))
        return self.a * x ** 2 + self.b * x + self.c


def fit_parabola(params, loss) -> Parabola:
    """Least-squares parabola of loss against log10(params); needs 3+ distinct sizes."""
    x, y = np.log10(np.asarray(params, dtype=np.float64)), np.asarray(loss, dtype=np.float64)
    if len(set(x.tolist())) < 3:
        raise ValueError(f"an isoFLOP parabola needs at least 3 model sizes, got {len(set(x.tolist()))}")
    a, b, c = np.polyfit(x, y, 2)
    return Parabola(float(a), float(b), float(c), float(x.min()), float(x.max()))



def where_optimum(fit: Parabola | None) -> str:
    """Where a budget's compute-optimal size lies: inside the sizes run, or which way outside (a flag)."""
    if fit is None:
        return "fewer than 3 sizes: no parabola"
    if not fit.convex:
        return "no minimum (the parabola is not convex): the optimum is outside the sizes run"
    x = -fit.b / (2 * fit.a)
    if x < fit.x_min:
        return "optimum below the smallest size run: an extrapolation"
    if x > fit.x_max:
        return "optimum above the largest size run: an extrapolation"
    return "optimum inside the sizes run"


def isoflop_fits(runs: list[Run], notes: list) -> dict:
    """Per (attention, budget): seed-mean final losses by size and, with 3+ sizes, the parabola (noted if outside)."""
    finals, unknown = {}, []
    for run in runs:
        if run.budget is None or not run.reached_budget or run.final() is None:
            continue
        if run.params is None:
            unknown.append(run.path.name)
            continue
        finals.setdefault((run.attn, run.budget), {}).setdefault(run.params, []).append(run.final())
    if unknown:
        notes.append(f"parameters unknown (the config does not build a model), so not in the isoFLOP view: "
                     f"{', '.join(unknown)}")
    points, parabolas = {}, {}
    for key, by_size in sorted(finals.items()):
        points[key] = sorted((p, sum(v) / len(v), len(v)) for p, v in by_size.items())
        if len(by_size) >= 3:
            parabolas[key] = fit_parabola([p for p, _, _ in points[key]], [l for _, l, _ in points[key]])
            if not parabolas[key].inside:
                notes.append(f"isoFLOP {key[0]} at {key[1]:.3g} FLOPs: {where_optimum(parabolas[key])}")
    return {"points": points, "parabolas": parabolas}
