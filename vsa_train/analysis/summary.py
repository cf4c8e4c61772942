"""summary.md: the verdict lines, the runs, the frontier fits, the FLOPs ratios, the multipliers (overall and per
size), the isoFLOP minima, the per-timestep view and the notes (what was left out, cut or flagged)."""
import math

from .isoflop import where_optimum
from .screen import overshoot
from .verdict import verdict

INTRO = ("Eval loss: the trainer's fixed held-out set (docs/design.md, 'Evaluation protocol'); FLOPs: cumulative "
         "executed training FLOPs (analytic, forward × 3). Frontier points: every eval after step 0 of a "
         "constant-learning-rate run, the final eval of a run with a decaying schedule; runs of one config "
         "averaged over seeds.")
METHOD = ("The multiplier: the geometric mean of the ratio at 5 losses evenly spaced (in log) inside the range both "
          "frontiers reach (per size: that size's final losses against FLOPs over its budgets), with a bootstrap "
          "interval: runs resampled with replacement within each config (deviations from its mean scaled by "
          "√(n/(n−1))), frontiers rebuilt, 2.5th–97.5th percentiles (fixed seed); a config with one seed is "
          "perturbed instead by the pooled seed-to-seed spread of log final loss ({spread}).")


def summary_markdown(runs, result, baseline, fit_from) -> str:
    """The whole summary.md."""
    lines = ["# Loss-vs-FLOPs study", ""]
    for label, attn, m in result["verdicts"]:
        lines.append(f"**Verdict ({label}):** " + verdict(attn, baseline, m))
    lines += ["", f"{len(runs)} runs analysed. " + INTRO]
    lines += _runs_table(runs)
    lines += _fits_section(result["frontiers"], result["fits"], fit_from)
    lines += _ratios_section(result["ratios"], baseline)
    lines += _multiplier_section(result, baseline, size_order(runs))
    lines += _isoflop_section(result["isoflop"])
    lines += _timestep_section(result["per_t"], baseline)
    lines += _timestep_losses(runs, baseline)
    if result["notes"]:
        notes = dict.fromkeys(result["notes"])  # in order, each once
        lines += ["", "## Notes: runs left out, cut or flagged", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def size_order(runs):
    """A sort key for model sizes: by parameters (then by name), smallest first."""
    params = {}
    for run in runs:
        params[run.size] = min(params.get(run.size, run.params or 0), run.params or 0)
    return lambda size: (params.get(size, 0), size)


def _runs_table(runs) -> list[str]:
    size = size_order(runs)
    runs = sorted(runs, key=lambda r: (size(r.size), r.attn, r.budget or 0, r.seed, str(r.path)))
    lines = ["", "| run | attention | model | params | seed | schedule | FLOPs budget | steps | FLOPs | vs budget | "
             "final eval loss | best eval loss | card |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        evals, last = run.evals(), run.rows[-1]
        budget = "—" if run.budget is None else f"{run.budget:.3g}" + ("" if run.reached_budget else " (not reached)")
        over = overshoot(run)
        final = f"{evals[-1][1]:.5f}" if evals else "—"
        best = f"{min(l for _, l in evals):.5f}" if evals else "—"
        params = f"{run.params / 1e6:.2f}M" if run.params else "—"
        lines.append(f"| {run.path.name} | {run.attn} | {run.size} | {params} | {run.seed} | {run.schedule} | "
                     f"{budget} | {last['step']} | {last['flops']:.3g} | "
                     f"{'—' if over is None else f'+{100 * over:.1f}%'} | {final} | {best} | "
                     f"{run.record.get('card', '—')} |")
    return lines


def _fits_section(frontiers, fits, fit_from) -> list[str]:
    lines = ["", "## Frontier fits: L(C) = a·C^(-b) + c", "",
             f"Pareto frontier per attention type across all its runs; fitted on frontier points with C ≥ "
             f"{fit_from:.3g}.", "", "| attention | frontier points | FLOPs range | loss range | a | b | c | "
             "rms log residual |", "|---|---|---|---|---|---|---|---|"]
    for attn, frontier in sorted(frontiers.items()):
        fit = fits.get(attn)
        cells = [f"{fit.a:.4g}", f"{fit.b:.4f}", f"{fit.c:.4f}", f"{fit.rms_log:.4f}"] if fit else ["—"] * 4
        lines.append(f"| {attn} | {len(frontier)} | {frontier[0][0]:.3g} – {frontier[-1][0]:.3g} | "
                     f"{frontier[-1][1]:.5f} – {frontier[0][1]:.5f} | " + " | ".join(cells) + " |")
    return lines


def _ratios_section(ratios, baseline) -> list[str]:
    if not ratios:
        return []
    lines = ["", f"## FLOPs at equal eval loss (ratio = {baseline} FLOPs / other FLOPs; > 1: fewer FLOPs than "
                 f"{baseline})", "", f"| attention | eval loss | FLOPs, {baseline} (frontier) | FLOPs, other "
                 "(frontier) | ratio (frontier, interpolated) | ratio (fits) |", "|---|---|---|---|---|---|"]
    for r in ratios:
        lines.append(f"| {r['attn']} | {r['loss']:.5f} | {r['baseline_flops']:.3g} | {r['flops']:.3g} | "
                     f"{_fmt(r['interpolated'])} | {_fmt(r['fit'])} |")
    return lines


def _multiplier_section(result, baseline, order) -> list[str]:
    if not result["multipliers"]:
        return []
    spread = result["seed_sd"]
    lines = ["", f"## The FLOPs multiplier over {baseline} ({baseline} FLOPs / other FLOPs at equal eval loss)", "",
             METHOD.format(spread=f"{spread:.4f}" if spread is not None else "not measured: no config has two "
                                                                             "seeds"),
             "", "| attention | runs of | eval loss range | multiplier | 95% interval | resamples used | runs |",
             "|---|---|---|---|---|---|---|"]
    for attn, m in result["multipliers"].items():
        sizes = result["per_size"].get(attn, {})
        rows = [("all sizes", m)] + [(s, sizes[s]) for s in sorted(sizes, key=order)]
        lines += [_multiplier_row(attn, label, m) for label, m in rows if m is not None]
    return lines


def _multiplier_row(attn, label, m) -> str:
    if m["bound"]:
        sign = "≥" if m["bound"] == "lower" else "≤"
        return f"| {attn} | {label} | — | {sign} {m['ratio']:.3f}× ({m['bound']} bound) | — | — | {m['runs']} |"
    ci = f"[{m['ci'][0]:.3f}×, {m['ci'][1]:.3f}×]" if m["ci"] else "—"
    used = str(m["ci"][2]) if m["ci"] else "—"
    return (f"| {attn} | {label} | {m['low']:.5f} – {m['high']:.5f} | {_fmt(m['ratio'])} | {ci} | {used} | "
            f"{m['runs']} |")


def _isoflop_section(isoflop: dict) -> list[str]:
    if not isoflop["points"]:
        return []
    lines = ["", "## IsoFLOP view: final eval loss against parameters at each budget", "",
             "Per budget, the final eval loss of each size (seed mean; runs that reached the budget), and with 3+ "
             "sizes a parabola in log10(params) whose minimum is the compute-optimal size (isoflop.png). A minimum "
             "outside the sizes run is flagged: it is an extrapolation.", "",
             "| attention | FLOPs budget | sizes (params: loss) | optimal params | loss at optimum | optimum |",
             "|---|---|---|---|---|---|"]
    for (attn, budget), points in isoflop["points"].items():
        sizes = ", ".join(f"{p / 1e6:.2f}M: {l:.4f}" + (f" ({n} seeds)" if n > 1 else "") for p, l, n in points)
        fit = isoflop["parabolas"].get((attn, budget))
        opt = [f"{fit.params_opt / 1e6:.2f}M", f"{fit.loss_opt:.4f}"] if fit is not None and fit.convex else ["—"] * 2
        flag = where_optimum(fit)
        lines.append(f"| {attn} | {budget:.3g} | {sizes} | " + " | ".join(opt) + " | "
                     + (flag if fit is None or fit.inside else f"**{flag}**") + " |")
    return lines


def _timestep_section(per_t: dict, baseline: str) -> list[str]:
    if not per_t["rows"]:
        return []
    lines = ["", f"## Per timestep: FLOPs multiplier over {baseline} at each eval t", "",
             "Frontiers of each per-timestep eval loss (frontier_t.png); multiplier over the loss range both reach, "
             "as in the verdict.", "", "| t | attention | eval loss range | multiplier | 95% interval |",
             "|---|---|---|---|---|"]
    for r in per_t["rows"]:
        if r["bound"]:
            sign = "≥" if r["bound"] == "lower" else "≤"
            lines.append(f"| {r['t']:.4f} | {r['attn']} | — | {sign} {r['ratio']:.3f}× ({r['bound']} bound) | — |")
            continue
        ci = f"[{r['ci'][0]:.3f}×, {r['ci'][1]:.3f}×]" if r["ci"] else "—"
        lines.append(f"| {r['t']:.4f} | {r['attn']} | {r['low']:.5f} – {r['high']:.5f} | {_fmt(r['ratio'])} "
                     f"| {ci} |")
    return lines


def _timestep_losses(runs, baseline) -> list[str]:
    """Final eval loss per timestep bin of every finished run, by size and budget (seed mean)."""
    finals = {}
    for run in runs:
        if run.finished and run.final() is not None:
            for key in run.timestep_keys():
                finals.setdefault((run.size, run.budget, run.attn, key), []).append(run.final(key))
    keys = sorted({k for *_, k in finals}, key=lambda k: float(k.split("_t")[1]))
    if not keys:
        return []
    attns = sorted({a for _, _, a, _ in finals}, key=lambda a: (a != baseline, a))
    lines = ["", "## Per timestep: final eval loss per timestep bin (seed mean; " + " / ".join(attns) + ")", "",
             "| size | FLOPs budget | " + " | ".join(f"t = {k.split('_t')[1]}" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    order = size_order(runs)
    for size, budget in sorted({(s, b) for s, b, _, _ in finals}, key=lambda sb: (order(sb[0]), sb[1] or 0)):
        cells = [" / ".join(_mean(finals.get((size, budget, a, k))) for a in attns) for k in keys]
        lines.append(f"| {size} | {'—' if budget is None else f'{budget:.3g}'} | " + " | ".join(cells) + " |")
    return lines


def _mean(values) -> str:
    return "—" if not values else f"{sum(values) / len(values):.4f}"


def _fmt(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3f}×"
