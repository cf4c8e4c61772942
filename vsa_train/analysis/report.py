"""The study report: screens the runs (screen.py), then per attention type a frontier and its fit, the FLOPs
multiplier at equal loss with its bootstrap interval (overall, per size, per timestep), isoFLOP parabolas, plots
and summary.md with its verdict lines."""
import math
from pathlib import Path

from .compare import cells_of, compare, frontiers_of, per_size, per_timestep, seed_spread, size_frontiers
from .isoflop import isoflop_fits
from .plot import plot_curves, plot_frontier, plot_isoflop, plot_sizes, plot_timestep_frontiers
from .runs import Run
from .scaling import PowerLaw, common_losses, fit_power_law, flops_at_loss
from .screen import screen
from .summary import size_order, summary_markdown
from .verdict import bound_note


def analyze(runs: list[Run], out_dir, baseline: str = "dense", fit_from: float = 0.0, resamples: int = 1000,
            all_points: bool = False, notes: list | None = None) -> dict:
    """Writes summary.md and the plots to out_dir; returns every number they show, the verdicts and the notes."""
    # Ratios are baseline FLOPs / other FLOPs at equal eval loss (> 1: the other needs fewer FLOPs); fits use
    # frontier points with at least `fit_from` FLOPs; `all_points`: every eval point of decaying runs too (biased:
    # not annealed); `notes`: lines from reading the runs, kept first.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, screened = screen(runs)
    notes = [*(notes or []), *screened]
    cells = cells_of(runs, all_points=all_points, notes=notes)
    frontiers = frontiers_of(cells)
    notes += _missing(runs, frontiers, baseline, all_points)
    fits = _fits(frontiers, fit_from, notes)
    others = [a for a in frontiers if a != baseline] if baseline in frontiers else []
    spread = seed_spread(runs)
    if others and spread is None:
        notes.append("no config has two seeds: the FLOPs multiplier gets no interval")
    multipliers = {attn: compare(cells, baseline, attn, resamples, spread) for attn in others}
    sizes = {attn: per_size(cells, baseline, attn, resamples, spread) for attn in others}
    for attn in others:
        for label, m in [("all sizes", multipliers[attn]), *sizes[attn].items()]:
            if m is not None and m["bound"]:
                notes.append(bound_note(attn, baseline, m, label))
    result = {"frontiers": frontiers, "fits": fits, "ratios": _ratio_rows(frontiers, fits, baseline, others),
              "multipliers": multipliers, "per_size": sizes, "isoflop": isoflop_fits(runs, notes),
              "per_t": per_timestep(runs, baseline, others, max(resamples // 4, 0), spread, all_points),
              "seed_sd": spread, "notes": notes, "verdicts": _verdicts(runs, multipliers, sizes)}
    _plots(runs, result, size_frontiers(cells, size_order(runs)), out_dir)
    (out_dir / "summary.md").write_text(summary_markdown(runs, result, baseline, fit_from))
    return result


def _missing(runs: list[Run], frontiers: dict, baseline: str, all_points: bool) -> list[str]:
    notes = [f"{attn}: no usable eval rows (after step 0; the final row of a finished run under a decaying "
             f"schedule); left out" for attn in sorted({r.attn for r in runs} - set(frontiers))]
    unfinished = [r.path.name for r in runs if r.decays and not r.finished]
    if unfinished and not all_points:
        notes.append(f"runs with a decaying schedule that did not reach their end (left out of the frontiers): "
                     f"{', '.join(unfinished)}")
    if baseline not in frontiers and frontiers:
        notes.append(f"baseline attention {baseline!r} not among the runs; no ratios")
    return notes


def _fits(frontiers: dict, fit_from: float, notes: list) -> dict:
    fits = {}
    for attn, frontier in frontiers.items():
        points = [p for p in frontier if p[0] >= fit_from]
        try:
            fits[attn] = fit_power_law([c for c, _ in points], [l for _, l in points])
        except ValueError as err:
            notes.append(f"{attn}: no power-law fit ({err})")
    return fits


def _ratio_rows(frontiers: dict, fits: dict, baseline: str, others: list[str]) -> list[dict]:
    """The FLOPs ratio at four losses across the range both frontiers reach (interpolated and from the fits)."""
    rows = []
    for attn in others:
        for loss in common_losses([frontiers[baseline], frontiers[attn]]):
            base_flops, flops = flops_at_loss(frontiers[baseline], loss), flops_at_loss(frontiers[attn], loss)
            rows.append({"attn": attn, "loss": loss, "baseline_flops": base_flops, "flops": flops,
                         "interpolated": base_flops / flops, "fit": _ratio(fits.get(baseline), fits.get(attn), loss)})
    return rows


def _ratio(base: PowerLaw | None, other: PowerLaw | None, loss: float) -> float:
    return base.flops_at(loss) / other.flops_at(loss) if base is not None and other is not None else math.nan


def _verdicts(runs: list[Run], multipliers: dict, sizes: dict) -> list[tuple]:
    """(label, attention, multiplier) of each verdict line: all sizes, then the largest size both ran alone."""
    params = {}
    for run in runs:
        if run.params:
            params.setdefault(run.size, []).append(run.params)
    lines = []
    for attn, m in multipliers.items():
        lines.append(("all sizes", attn, m))
        both = [s for s in sizes[attn] if s in params]
        if len(sizes[attn]) > 1 and both:
            largest = max(both, key=lambda s: max(params[s]))
            lines.append((f"{largest} alone", attn, sizes[attn][largest]))
    return lines


def _plots(runs: list[Run], result: dict, sizes: dict, out_dir: Path) -> None:
    plot_curves(runs, out_dir / "curves.png")
    if len(sizes) > 1:
        plot_sizes(sizes, out_dir / "sizes.png")
    plot_frontier(result["frontiers"], result["fits"], out_dir / "frontier.png")
    if result["isoflop"]["points"]:
        plot_isoflop(result["isoflop"], out_dir / "isoflop.png")
    if result["per_t"]["frontiers"]:
        plot_timestep_frontiers(result["per_t"]["frontiers"], out_dir / "frontier_t.png")
