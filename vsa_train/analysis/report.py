"""The study report: per attention type a frontier and its fit, FLOPs ratios at equal loss, plots and summary.md."""
import math
from pathlib import Path

from .plot import plot_curves, plot_frontier
from .runs import Run
from .scaling import (
    PowerLaw,
    common_losses,
    fit_power_law,
    flops_at_loss,
    pareto_frontier,
)


def analyze(runs: list[Run], out_dir, baseline: str = "dense", fit_from: float = 0.0) -> dict:
    """Writes frontier.png, curves.png and summary.md to out_dir; returns frontiers, fits and ratio rows.

    Frontiers use every eval point after step 0; fits use frontier points with at least `fit_from` FLOPs.
    Ratios are baseline FLOPs / other FLOPs at equal eval loss (> 1: the other attention needs fewer FLOPs).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frontiers, fits, notes = {}, {}, []
    for attn in sorted({r.attn for r in runs}):
        points = [p for r in runs if r.attn == attn for p in r.evals()]
        if not points:
            notes.append(f"{attn}: no eval rows after step 0; left out")
            continue
        frontiers[attn] = pareto_frontier(points)
        fit_points = [p for p in frontiers[attn] if p[0] >= fit_from]
        try:
            fits[attn] = fit_power_law([c for c, _ in fit_points], [l for _, l in fit_points])
        except ValueError as err:
            notes.append(f"{attn}: no fit ({err})")
    if baseline not in frontiers and frontiers:
        notes.append(f"baseline attention {baseline!r} not among the runs; no ratios")
    ratios = []
    for attn in sorted(frontiers):
        if attn == baseline or baseline not in frontiers:
            continue
        for loss in common_losses([frontiers[baseline], frontiers[attn]]):
            base_flops, flops = flops_at_loss(frontiers[baseline], loss), flops_at_loss(frontiers[attn], loss)
            ratios.append({"attn": attn, "loss": loss, "baseline_flops": base_flops, "flops": flops,
                           "interpolated": base_flops / flops,
                           "fit": _ratio(fits.get(baseline), fits.get(attn), loss)})
        if not any(r["attn"] == attn for r in ratios):
            notes.append(f"{attn} and {baseline} frontiers share no loss range; no ratio")

    plot_curves(runs, out_dir / "curves.png")
    plot_frontier(frontiers, fits, out_dir / "frontier.png")
    (out_dir / "summary.md").write_text(summary_markdown(runs, frontiers, fits, ratios, baseline, fit_from, notes))
    return {"frontiers": frontiers, "fits": fits, "ratios": ratios, "notes": notes}


def _ratio(base: PowerLaw | None, other: PowerLaw | None, loss: float) -> float:
    return base.flops_at(loss) / other.flops_at(loss) if base is not None and other is not None else math.nan


def summary_markdown(runs, frontiers, fits, ratios, baseline, fit_from, notes) -> str:
    """summary.md: the runs, the fits and the FLOPs ratios as Markdown tables."""
    intro = (f"{len(runs)} runs. Eval loss: the trainer's fixed held-out set (docs/design.md, 'Evaluation protocol'); "
             "FLOPs: cumulative executed training FLOPs (analytic, forward × 3).")
    lines = ["# Loss-vs-FLOPs study", "", intro, "",
             "| run | attention | model | FLOPs budget | steps | FLOPs | final eval loss | best eval loss |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        evals = run.evals()
        last = run.rows[-1] if run.rows else {"step": 0, "flops": 0.0}
        budget = "—" if run.budget is None else f"{run.budget:.3g}" + ("" if run.reached_budget else " (not reached)")
        final = f"{evals[-1][1]:.5f}" if evals else "—"
        best = f"{min(l for _, l in evals):.5f}" if evals else "—"
        lines.append(f"| {run.path.name} | {run.attn} | {run.size} | {budget} | {last['step']} | "
                     f"{last['flops']:.3g} | {final} | {best} |")
    lines += ["", "## Frontier fits: L(C) = a·C^(-b) + c", "",
              f"Pareto frontier per attention type across all its runs; fitted on frontier points with C ≥ {fit_from:.3g}.",
              "", "| attention | frontier points | FLOPs range | loss range | a | b | c | rms log residual |",
              "|---|---|---|---|---|---|---|---|"]
    for attn, frontier in sorted(frontiers.items()):
        fit = fits.get(attn)
        cells = [f"{fit.a:.4g}", f"{fit.b:.4f}", f"{fit.c:.4f}", f"{fit.rms_log:.4f}"] if fit else ["—"] * 4
        lines.append(f"| {attn} | {len(frontier)} | {frontier[0][0]:.3g} – {frontier[-1][0]:.3g} | "
                     f"{frontier[-1][1]:.5f} – {frontier[0][1]:.5f} | " + " | ".join(cells) + " |")
    title = f"## FLOPs at equal eval loss (ratio = {baseline} FLOPs / other FLOPs; > 1: fewer FLOPs than {baseline})"
    header = (f"| attention | eval loss | FLOPs, {baseline} (frontier) | FLOPs, other (frontier) | "
              "ratio (frontier, interpolated) | ratio (fits) |")
    lines += ["", title, "", header, "|---|---|---|---|---|---|"]
    for r in ratios:
        lines.append(f"| {r['attn']} | {r['loss']:.5f} | {r['baseline_flops']:.3g} | {r['flops']:.3g} | "
                     f"{r['interpolated']:.3f}× | {_fmt_ratio(r['fit'])} |")
    if ratios:
        lows = {}
        for r in ratios:  # ratios are listed lowest loss first: the first per attention is the headline
            lows.setdefault(r["attn"], r)
        lines.append("")
        for attn, r in lows.items():
            ratio = r["interpolated"]
            verdict = f"{ratio:.2f}× fewer" if ratio >= 1 else f"{1 / ratio:.2f}× more"
            lines.append(f"At the lowest eval loss both frontiers reach ({r['loss']:.5f}), {attn} needs {verdict} "
                         f"FLOPs than {baseline} (frontier interpolation; fits: {_fmt_ratio(r['fit'])}).")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _fmt_ratio(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}×"
