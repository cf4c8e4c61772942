"""The study report: per attention type a frontier and its fit, FLOPs multipliers at equal loss with bootstrap
intervals, isoFLOP parabolas, per-timestep frontiers, plots and summary.md (with a one-line verdict)."""
import math
from pathlib import Path

from .plot import plot_curves, plot_frontier, plot_isoflop, plot_timestep_frontiers
from .runs import EVAL, Run, timestep_of
from .scaling import (
    PowerLaw,
    bootstrap_multiplier,
    common_losses,
    fit_parabola,
    fit_power_law,
    flops_at_loss,
    flops_bound,
    flops_multiplier,
    mean_curve,
    pareto_frontier,
    pooled_seed_sd,
)


def cells_of(runs: list[Run], key: str = EVAL, all_points: bool = False) -> dict:
    """(attention, size, budget) -> the frontier points of each of its runs (one curve per seed)."""
    cells = {}
    for run in runs:
        points = run.frontier_points(key, all_points=all_points)
        if points:
            cells.setdefault((run.attn, run.size, run.budget), []).append(points)
    return cells


def frontiers_of(cells: dict) -> dict:
    """Per attention type, the Pareto frontier of the seed-averaged curves of all its cells."""
    points = {}
    for (attn, _, _), curves in cells.items():
        points.setdefault(attn, []).extend(mean_curve(curves))
    return {attn: pareto_frontier(p) for attn, p in sorted(points.items())}


def seed_spread(runs: list[Run]) -> float | None:
    """Seed-to-seed standard deviation of log final eval loss, pooled over the grid points with 2+ seeds."""
    groups = {}
    for run in runs:
        if run.final() is not None and run.finished:
            groups.setdefault((run.attn, run.size, run.budget), []).append(run.final())
    return pooled_seed_sd(list(groups.values()))


def analyze(runs: list[Run], out_dir, baseline: str = "dense", fit_from: float = 0.0, resamples: int = 1000,
            all_points: bool = False) -> dict:
    """Writes summary.md, curves.png, frontier.png (and isoflop.png, frontier_t.png when there is data for
    them) to out_dir; returns frontiers, fits, ratios, multipliers, isoFLOP fits, per-timestep rows and notes.

    Frontiers use, per (attention, size, budget), the seed average of its runs' points (every eval point after
    step 0 under a constant learning rate, the final one under a decaying schedule); fits use frontier points
    with at least `fit_from` FLOPs. `all_points`: every eval point of decaying runs too (biased: not annealed). Ratios are baseline FLOPs / other FLOPs at equal eval loss (> 1: the other
    attention needs fewer FLOPs); the headline multiplier is their geometric mean over the loss range both
    frontiers reach, with a bootstrap interval over runs (scaling.flops_multiplier, bootstrap_multiplier)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = []
    cells = cells_of(runs, all_points=all_points)
    frontiers = frontiers_of(cells)
    for attn in sorted({r.attn for r in runs} - set(frontiers)):
        notes.append(f"{attn}: no usable eval rows (after step 0; the final row of a finished run under a decaying "
                     f"schedule); left out")
    unfinished = [r.path.name for r in runs if r.decays and not r.finished]
    if unfinished and not all_points:
        notes.append(f"runs with a decaying schedule that did not reach their end (left out of the frontiers): "
                     f"{', '.join(unfinished)}")
    fits = {}
    for attn, frontier in frontiers.items():
        fit_points = [p for p in frontier if p[0] >= fit_from]
        try:
            fits[attn] = fit_power_law([c for c, _ in fit_points], [l for _, l in fit_points])
        except ValueError as err:
            notes.append(f"{attn}: no power-law fit ({err})")
    if baseline not in frontiers and frontiers:
        notes.append(f"baseline attention {baseline!r} not among the runs; no ratios")
    others = [a for a in frontiers if a != baseline] if baseline in frontiers else []

    ratios, multipliers = [], {}
    spread = seed_spread(runs)
    for attn in others:
        for loss in common_losses([frontiers[baseline], frontiers[attn]]):
            base_flops, flops = flops_at_loss(frontiers[baseline], loss), flops_at_loss(frontiers[attn], loss)
            ratios.append({"attn": attn, "loss": loss, "baseline_flops": base_flops, "flops": flops,
                           "interpolated": base_flops / flops,
                           "fit": _ratio(fits.get(baseline), fits.get(attn), loss)})
        used = [r for r in runs if r.attn in (baseline, attn) and r.frontier_points(all_points=all_points)]
        counts = {"runs": len(used), "seeds": len({r.seed for r in used})}
        low, high, ratio = flops_multiplier(frontiers[baseline], frontiers[attn])
        if math.isnan(ratio):
            bound = flops_bound(frontiers[baseline], frontiers[attn])
            multipliers[attn] = {**bound, "ci": None, **counts}
            notes.append(f"{attn} and {baseline} frontiers share no loss range: the multiplier is only bounded "
                         f"({bound['bound']} bound {bound['ratio']:.3g}×)")
            continue
        ci = bootstrap_multiplier(cells, baseline, attn, resamples=resamples, seed_sd=spread)
        why = ("no grid point has a second seed" if spread is None else "no bootstrap asked for" if resamples <= 0
               else "too few bootstrap resamples gave a ratio")
        multipliers[attn] = {"low": low, "high": high, "ratio": ratio, "ci": ci, "bound": None,
                             "no_ci": None if ci else why, **counts}
    if others and spread is None:
        notes.append("no grid point has two seeds: the FLOPs multiplier gets no confidence interval")

    isoflop = isoflop_fits(runs, notes)
    per_t = timestep_rows(runs, baseline, others, resamples=max(resamples // 4, 0), seed_sd=spread,
                          all_points=all_points)

    plot_curves(runs, out_dir / "curves.png")
    plot_frontier(frontiers, fits, out_dir / "frontier.png")
    if isoflop["points"]:
        plot_isoflop(isoflop, out_dir / "isoflop.png")
    if per_t["frontiers"]:
        plot_timestep_frontiers(per_t["frontiers"], out_dir / "frontier_t.png")
    result = {"frontiers": frontiers, "fits": fits, "ratios": ratios, "multipliers": multipliers,
              "isoflop": isoflop, "per_t": per_t, "seed_sd": spread, "notes": notes}
    (out_dir / "summary.md").write_text(summary_markdown(runs, result, baseline, fit_from))
    return result


def isoflop_fits(runs: list[Run], notes: list) -> dict:
    """Per (attention, budget): the seed-mean final eval loss of each model size (runs that reached the budget),
    and, with 3+ sizes, the parabola in log10(params) and its minimum."""
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
    return {"points": points, "parabolas": parabolas}


def timestep_rows(runs: list[Run], baseline: str, others: list[str], resamples: int, seed_sd,
                  all_points: bool = False) -> dict:
    """Per eval timestep: frontiers per attention and the multiplier over their common loss range (with CI)."""
    keys = sorted({k for r in runs for k in r.timestep_keys()}, key=timestep_of)
    frontiers, rows = {}, []
    for key in keys:
        cells = cells_of(runs, key, all_points)
        frontiers[key] = frontiers_of(cells)
        for attn in others:
            if baseline not in frontiers[key] or attn not in frontiers[key]:
                continue
            low, high, ratio = flops_multiplier(frontiers[key][baseline], frontiers[key][attn])
            ci = bootstrap_multiplier(cells, baseline, attn, resamples=resamples, seed_sd=seed_sd) \
                if math.isfinite(ratio) else None
            rows.append({"t": timestep_of(key), "key": key, "attn": attn, "low": low, "high": high, "ratio": ratio,
                         "ci": ci})
    return {"frontiers": frontiers, "rows": rows}


def _ratio(base: PowerLaw | None, other: PowerLaw | None, loss: float) -> float:
    return base.flops_at(loss) / other.flops_at(loss) if base is not None and other is not None else math.nan


def verdict(attn: str, baseline: str, m: dict) -> str:
    """One plain sentence: how many times fewer (or more) FLOPs `attn` needs for the losses both reach."""
    ratio, ci = m["ratio"], m["ci"]
    fewer = ratio >= 1
    value = ratio if fewer else 1 / ratio
    if m.get("bound"):  # the frontiers do not overlap: one side's every point beats the other's best
        tail = f" (the frontiers share no loss range: a bound, no interval), from {m['runs']} runs."
        if m["bound"] == "lower":
            return (f"{attn} reaches {baseline}'s best eval loss {m['loss']:.4f} already at its cheapest point: at "
                    f"least {ratio:.2f}× fewer FLOPs than {baseline}" + tail)
        return (f"{baseline} reaches {attn}'s best eval loss {m['loss']:.4f} already at its cheapest point: {attn} "
                f"needs at least {1 / ratio:.2f}× more FLOPs than {baseline}" + tail)
    if ci is None:
        interval = f"no confidence interval: {m.get('no_ci') or 'none computed'}"
    else:
        low, high = (ci[0], ci[1]) if fewer else (1 / ci[1], 1 / ci[0])
        interval = f"95% CI {low:.2f}–{high:.2f}"
    return (f"{attn} reaches {baseline}'s eval losses {m['low']:.4f}–{m['high']:.4f} with {value:.2f}× "
            f"({interval}) {'fewer' if fewer else 'more'} FLOPs than {baseline}, from {m['runs']} runs "
            f"({m['seeds']} seed{'s' if m['seeds'] != 1 else ''}).")


def summary_markdown(runs, result, baseline, fit_from) -> str:
    """summary.md: the verdict, the runs, the fits, the FLOPs ratios, isoFLOP minima and per-timestep ratios."""
    frontiers, fits, ratios = result["frontiers"], result["fits"], result["ratios"]
    intro = (f"{len(runs)} runs. Eval loss: the trainer's fixed held-out set (docs/design.md, 'Evaluation protocol'); "
             "FLOPs: cumulative executed training FLOPs (analytic, forward × 3). Frontier points: every eval after "
             "step 0 of a constant-learning-rate run, the final eval of a run with a decaying schedule; runs of "
             "one (attention, size, budget) averaged over seeds.")
    lines = ["# Loss-vs-FLOPs study", ""]
    for attn, m in result["multipliers"].items():
        lines.append("**Verdict:** " + verdict(attn, baseline, m))
    if result["multipliers"]:
        lines.append("")
    lines += [intro, "",
              "| run | attention | model | params | seed | schedule | FLOPs budget | steps | FLOPs | final eval loss | "
              "best eval loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        evals = run.evals()
        last = run.rows[-1] if run.rows else {"step": 0, "flops": 0.0}
        budget = "—" if run.budget is None else f"{run.budget:.3g}" + ("" if run.reached_budget else " (not reached)")
        final = f"{evals[-1][1]:.5f}" if evals else "—"
        best = f"{min(l for _, l in evals):.5f}" if evals else "—"
        params = f"{run.params / 1e6:.2f}M" if run.params else "—"
        lines.append(f"| {run.path.name} | {run.attn} | {run.size} | {params} | {run.seed} | {run.schedule} | "
                     f"{budget} | {last['step']} | {last['flops']:.3g} | {final} | {best} |")
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
    if result["multipliers"]:
        spread = result["seed_sd"]
        lines += ["", "The multiplier of the verdict: the geometric mean of the ratio at 5 losses evenly spaced (in log) "
                  "inside the range both frontiers reach, with a bootstrap interval: runs resampled with replacement "
                  "within each (attention, size, budget) (deviations from the point's mean scaled by √(n/(n−1))), "
                  "frontiers rebuilt, 2.5th–97.5th percentiles; a grid point with one seed is perturbed instead by "
                  "the pooled seed-to-seed spread of log final loss ("
                  f"{'%.4f' % spread if spread is not None else 'not measured: no point has two seeds'}).",
                  "", "| attention | eval loss range | multiplier | 95% CI | bootstrap resamples used | runs |",
                  "|---|---|---|---|---|---|"]
        for attn, m in result["multipliers"].items():
            if m["bound"]:
                lines.append(f"| {attn} | — | {m['bound']} bound {m['ratio']:.3f}× | — | — | {m['runs']} |")
                continue
            ci = f"{m['ci'][0]:.3f}× – {m['ci'][1]:.3f}×" if m["ci"] else "—"
            used = str(m["ci"][2]) if m["ci"] else "—"
            lines.append(f"| {attn} | {m['low']:.5f} – {m['high']:.5f} | {m['ratio']:.3f}× | {ci} | {used} | "
                         f"{m['runs']} |")
    lines += _isoflop_section(result["isoflop"])
    lines += _timestep_section(result["per_t"], baseline)
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in dict.fromkeys(result["notes"])]
    return "\n".join(lines) + "\n"


def _isoflop_section(isoflop: dict) -> list[str]:
    if not isoflop["points"]:
        return []
    lines = ["", "## IsoFLOP view: final eval loss against parameters at each budget", "",
             "Per budget, the final eval loss of each size (seed mean; runs that reached the budget), and with 3+ "
             "sizes a parabola in log10(params) whose minimum is the compute-optimal size (isoflop.png). A minimum "
             "outside the sizes trained is an extrapolation.", "",
             "| attention | FLOPs budget | sizes (params: loss) | optimal params | loss at optimum | within sizes |",
             "|---|---|---|---|---|---|"]
    for (attn, budget), points in isoflop["points"].items():
        sizes = ", ".join(f"{p / 1e6:.2f}M: {l:.4f}" + (f" ({n} seeds)" if n > 1 else "") for p, l, n in points)
        fit = isoflop["parabolas"].get((attn, budget))
        if fit is None:
            cells = ["— (fewer than 3 sizes)", "—", "—"]
        elif not fit.convex:
            cells = ["— (not convex: no minimum)", "—", "no"]
        else:
            cells = [f"{fit.params_opt / 1e6:.2f}M", f"{fit.loss_opt:.4f}", "yes" if fit.inside else "no"]
        lines.append(f"| {attn} | {budget:.3g} | {sizes} | " + " | ".join(cells) + " |")
    return lines


def _timestep_section(per_t: dict, baseline: str) -> list[str]:
    if not per_t["rows"]:
        return []
    lines = ["", f"## Per timestep: FLOPs multiplier against {baseline} at each eval t", "",
             "Frontiers of each per-timestep eval loss (frontier_t.png); multiplier over the loss range both reach, "
             "as in the verdict.", "", "| t | attention | eval loss range | multiplier | 95% CI |",
             "|---|---|---|---|---|"]
    for r in per_t["rows"]:
        ci = f"{r['ci'][0]:.3f}× – {r['ci'][1]:.3f}×" if r["ci"] else "—"
        lines.append(f"| {r['t']:.4f} | {r['attn']} | {r['low']:.5f} – {r['high']:.5f} | {_fmt_ratio(r['ratio'])} "
                     f"| {ci} |")
    return lines


def _fmt_ratio(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}×"
