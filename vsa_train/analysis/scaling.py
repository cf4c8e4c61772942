"""Loss-vs-FLOPs frontiers, the power-law fit L(C) = a·C^(-b) + c, and the FLOPs ratio at equal loss (or, for
frontiers that share no loss range, a one-sided bound on it). Intervals: bootstrap.py; isoFLOP: isoflop.py.

The fit is scipy-free: for a fixed floor c the model is a straight line in log-log space (log(L - c) against
log C), so c is profiled over a grid below the lowest loss, and the best (a, b, c) is then polished by
Levenberg-Marquardt on the log-space residuals log(a·C^(-b) + c) - log L (every point weighs alike, whatever
its loss scale).
"""
import itertools
import math
from typing import NamedTuple

import numpy as np


def pareto_frontier(points, tolerance: float = 0.0) -> list[tuple[float, float]]:
    """The (FLOPs, loss) points not beaten by any with at most (1 + tolerance)× their FLOPs, by increasing FLOPs."""
    # A tolerance treats runs that stopped at one budget (each a fraction of a step past it) as equals: only the
    # best of them stays, rather than a staircase of near-vertical steps between them.
    frontier = []
    for flops, loss in sorted(points):
        if not frontier or loss < frontier[-1][1]:
            frontier.append((flops, loss))
    # losses fall along the frontier, so a point is beaten within the tolerance exactly when its successor is
    after = [f for f, _ in frontier[1:]] + [math.inf]
    return [(f, l) for (f, l), g in zip(frontier, after) if g > f * (1 + tolerance)]


class PowerLaw(NamedTuple):
    """L(C) = a·C^(-b) + c, with the rms of its log-space residuals over the fitted points."""

    a: float
    b: float
    c: float
    rms_log: float

    def loss(self, flops):
        """L at the given FLOPs."""
        return self.a * np.power(np.asarray(flops, dtype=np.float64), -self.b) + self.c

    def flops_at(self, loss: float) -> float:
        """The FLOPs at which the fit reaches `loss` (nan at or below its floor c)."""
        if loss <= self.c or self.b <= 0:
            return math.nan
        # solved in logs: a can be astronomically large in raw FLOPs units
        return math.exp((math.log(self.a) - math.log(loss - self.c)) / self.b)


MIN_POINTS = 4  # more points than parameters: three points fit any (a, b, c) exactly, however absurd
MAX_EXPONENT = 2.0  # b is kept in [0, 2]; measured exponents are ~0.05-0.5, a steeper fit is a degenerate one


def fit_power_law(flops, loss, iterations: int = 200) -> PowerLaw:
    """Least-squares fit of L(C) = a·C^(-b) + c (c >= 0, 0 <= b <= 2) in log space; needs 4+ points with C > 0."""
    C, L = np.asarray(flops, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if C.shape != L.shape or C.ndim != 1:
        raise ValueError(f"flops and loss must be 1-D and of equal length, got {C.shape} and {L.shape}")
    if len(C) < MIN_POINTS:
        raise ValueError(f"fitting a·C^(-b) + c needs at least {MIN_POINTS} points, got {len(C)}")
    if not (np.all(np.isfinite(C)) and np.all(np.isfinite(L)) and np.all(C > 0) and np.all(L > 0)):
        raise ValueError("fitting needs finite, positive FLOPs and losses")
    # Normalised FLOPs (x = log(C / C0)) keep the problem well conditioned; a = A·C0^b at the end.
    log_c0 = np.log(C).mean()
    x, y = np.log(C) - log_c0, np.log(L)

    def residuals(theta):
        log_A, b, c = theta
        return np.log(np.exp(log_A - b * x) + c) - y

    # Profile the floor: for fixed c, log(L - c) = log A - b·x is linear least squares.
    best = None
    for c in L.min() * np.linspace(0.0, 0.999, 400):
        b_neg, log_A = np.polyfit(x, np.log(L - c), 1)
        if not 0.0 <= -b_neg <= MAX_EXPONENT:
            continue
        theta = np.array([log_A, -b_neg, c])
        cost = float(np.sum(residuals(theta) ** 2))
        if best is None or cost < best[0]:
            best = (cost, theta)
    if best is None:
        raise ValueError(f"no fit with 0 <= b <= {MAX_EXPONENT}: the loss does not fall like a power of FLOPs here")
    cost, theta = best

    # Levenberg-Marquardt polish of all three parameters, keeping 0 <= c < min L.
    damping = 1e-3
    for _ in range(iterations):
        log_A, b, c = theta
        f = np.exp(log_A - b * x)
        r = np.log(f + c) - y
        J = np.stack([f / (f + c), -x * f / (f + c), 1.0 / (f + c)], axis=1)
        step = np.linalg.solve(J.T @ J + damping * np.diag(np.diag(J.T @ J) + 1e-12), -J.T @ r)
        candidate = theta + step
        candidate[1] = min(max(candidate[1], 0.0), MAX_EXPONENT)
        candidate[2] = min(max(candidate[2], 0.0), 0.999 * L.min())
        new_cost = float(np.sum(residuals(candidate) ** 2))
        if new_cost < cost:
            theta, cost, damping = candidate, new_cost, damping / 3
            if np.max(np.abs(step)) < 1e-12:
                break
        else:
            damping *= 4
            if damping > 1e12:
                break
    log_A, b, c = theta
    return PowerLaw(a=float(np.exp(log_A + b * log_c0)), b=float(b), c=float(c),
                    rms_log=float(np.sqrt(cost / len(C))))


def flops_at_loss(frontier, loss: float) -> float:
    """FLOPs at which a frontier first reaches `loss`, interpolated linearly in log-log (nan outside its range)."""
    for (c0, l0), (c1, l1) in itertools.pairwise(frontier):
        if l1 <= loss <= l0:
            w = math.log(l0 / loss) / math.log(l0 / l1)
            return math.exp(math.log(c0) + w * math.log(c1 / c0))
    return frontier[0][0] if frontier and loss == frontier[0][1] else math.nan


def common_losses(frontiers, levels: int = 4) -> list[float]:
    """`levels` losses, evenly spaced in log, across the range every frontier covers (lowest first)."""
    low = max(min(l for _, l in f) for f in frontiers)
    high = min(max(l for _, l in f) for f in frontiers)
    if low > high:
        return []
    return [float(v) for v in np.exp(np.linspace(math.log(low), math.log(high), levels))] if high > low else [low]


def lowest_common_loss(frontiers) -> float:
    """The lowest loss every frontier reaches (nan when their loss ranges do not overlap)."""
    low = max(min(l for _, l in f) for f in frontiers)
    high = min(max(l for _, l in f) for f in frontiers)
    return float(low) if low <= high else math.nan


def flops_multiplier(base_frontier, other_frontier, levels: int = 5) -> tuple[float, float, float]:
    """(low loss, high loss, multiplier): the loss range both frontiers reach and the geometric mean, over
    `levels` losses evenly spaced in log strictly inside that range, of base FLOPs / other FLOPs at equal loss
    (log-log interpolation along each frontier). > 1: the other needs fewer FLOPs.

    The mean over the shared range, rather than the ratio at its lowest loss alone, keeps the estimate off the
    range's edge, where one frontier ends at a single run's last point: in tests with a known multiplier the
    edge value was biased by ~5% and its bootstrap interval missed the truth far more often than 5%."""
    if not base_frontier or not other_frontier:
        return math.nan, math.nan, math.nan
    low = lowest_common_loss([base_frontier, other_frontier])
    if math.isnan(low):
        return math.nan, math.nan, math.nan
    high = min(max(l for _, l in f) for f in (base_frontier, other_frontier))
    losses = [low] if high <= low else np.exp(np.linspace(math.log(low), math.log(high), levels + 2))[1:-1]
    logs = [math.log(flops_at_loss(base_frontier, l) / flops_at_loss(other_frontier, l)) for l in losses]
    logs = [v for v in logs if math.isfinite(v)]
    return float(low), float(high), (math.exp(sum(logs) / len(logs)) if logs else math.nan)


def flops_bound(base_frontier, other_frontier) -> dict:
    """For frontiers that share no loss range: a one-sided bound on base FLOPs / other FLOPs at equal loss."""
    # If the other's every point beats the base's best loss L, the other reaches L with at most its cheapest
    # point's FLOPs: the multiplier is at least base FLOPs(L) / that ("lower" bound). If the base's every point
    # beats the other's best loss L, the base reaches L with at most its cheapest point's FLOPs: the multiplier is
    # at most that / other FLOPs(L) ("upper" bound). `tells` whether the bound settles who needs fewer FLOPs: a
    # lower bound >= 1 (the other needs fewer) or an upper bound <= 1 (more); a lower bound of 0.3 or an upper
    # bound of 3.4 leaves either answer open.
    base_best, other_best = base_frontier[-1], other_frontier[-1]
    if max(l for _, l in other_frontier) < base_best[1]:
        ratio = base_best[0] / other_frontier[0][0]
        return {"bound": "lower", "loss": base_best[1], "ratio": ratio, "tells": ratio >= 1}
    ratio = base_frontier[0][0] / other_best[0]
    return {"bound": "upper", "loss": other_best[1], "ratio": ratio, "tells": ratio <= 1}
