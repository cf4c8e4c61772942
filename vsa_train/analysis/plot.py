"""Plots against cumulative training FLOPs: one run (loss_vs_flops.png), all runs (curves.png), frontiers
(frontier.png, per timestep frontier_t.png), each size's final losses (sizes.png); and against parameters at
fixed budgets (isoflop.png)."""
import itertools

import matplotlib
import matplotlib.lines
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..metrics import read_metrics


def plot_loss_vs_flops(metrics_path, out_path, title: str = "") -> None:
    """Plots a run's metrics.jsonl (train/loss as a thin line, eval/loss as markers) with FLOPs on a log x-axis."""
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("train/loss", {"lw": 0.8, "alpha": 0.6}), ("eval/loss", {"marker": "o", "lw": 1.5})):
        points = [(r["flops"], r[key]) for r in rows if key in r and r["flops"] > 0]
        if points:
            ax.plot(*zip(*points), label=key, **style)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short runs
    ax.set_xlabel("training FLOPs (cumulative, executed)")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:  # a run stopped at step 0 has nothing to plot yet
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_curves(runs, out_path) -> None:
    """curves.png: every run's eval loss against FLOPs (log-log); colour by model size, line style by attention."""
    sizes = sorted({r.size for r in runs})
    attns = sorted({r.attn for r in runs})
    colors = dict(zip(sizes, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])))
    styles = dict(zip(attns, itertools.cycle(["-", "--", ":", "-."])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = run.evals()
        if points:
            ax.plot(*zip(*points), color=colors[run.size], ls=styles[run.attn], marker=".", ms=4, lw=1.2)
    _log_axes(ax, "eval loss", legend=False)
    # one legend entry per size (colour) and per attention (line style), however many runs (budgets, seeds)
    handles = [matplotlib.lines.Line2D([], [], color=colors[s], lw=2, label=s) for s in sizes]
    handles += [matplotlib.lines.Line2D([], [], color="0.3", ls=styles[a], label=a) for a in attns]
    if ax.lines:
        ax.legend(handles=handles, fontsize=7)
    ax.set_title("eval loss of every run")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_frontier(frontiers: dict, fits: dict, out_path) -> None:
    """frontier.png: per attention type, the Pareto frontier across runs (markers) and its fit a·C^-b + c (line)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (attn, frontier), color in zip(sorted(frontiers.items()),
                                       itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])):
        flops, loss = zip(*frontier)
        fit = fits.get(attn)
        # without a fit (fewer than 4 points) the frontier's own segments are what the multiplier interpolates
        ax.plot(flops, loss, "o" if fit is not None else "o--", color=color, ms=4, lw=0.8, label=f"{attn} frontier")
        if fit is not None:
            grid = np.geomspace(min(flops), max(flops), 200)
            ax.plot(grid, fit.loss(grid), "-", color=color, lw=1.2,
                    label=f"{attn} fit: {fit.a:.3g}·C^-{fit.b:.3g} + {fit.c:.3g}")
    _log_axes(ax, "eval loss (frontier)")
    ax.set_title("loss-vs-FLOPs frontier per attention type")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_sizes(frontiers: dict, out_path) -> None:
    """sizes.png: per model size, each attention's final eval loss against FLOPs (the per-size multiplier's view)."""
    sizes, attns = list(frontiers), sorted({a for f in frontiers.values() for a in f})
    colors = dict(zip(sizes, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])))
    styles = dict(zip(attns, itertools.cycle([("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for size, by_attn in frontiers.items():
        for attn, frontier in sorted(by_attn.items()):
            marker, line = styles[attn]
            ax.plot(*zip(*frontier), marker=marker, ls=line, color=colors[size], ms=5, lw=1.2, label=f"{size}, {attn}")
    _log_axes(ax, "final eval loss (seed mean)")
    ax.set_title("each size at its budgets: final eval loss against FLOPs")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_isoflop(isoflop: dict, out_path) -> None:
    """isoflop.png: final loss against parameters per budget and attention, parabolas, minima inside (stars)."""
    # a minimum outside the sizes run is not drawn (it could be far off the axes); its legend entry says so
    budgets = sorted({b for _, b in isoflop["points"]})
    attns = sorted({a for a, _ in isoflop["points"]})
    colors = dict(zip(budgets, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])))
    markers = dict(zip(attns, itertools.cycle(["o", "s", "^", "D"])))
    styles = dict(zip(attns, itertools.cycle(["-", "--", ":", "-."])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (attn, budget), points in isoflop["points"].items():
        params, loss, _ = zip(*points)
        fit = isoflop["parabolas"].get((attn, budget))
        flag = " (optimum outside the sizes)" if fit is not None and not fit.inside else ""
        ax.plot(params, loss, markers[attn], color=colors[budget], ms=5, label=f"{attn}, {budget:.2g} FLOPs{flag}")
        if fit is not None:
            grid = np.geomspace(min(params) / 1.5, max(params) * 1.5, 100)
            ax.plot(grid, fit.loss(grid), styles[attn], color=colors[budget], lw=1)
            if fit.inside:
                ax.plot([fit.params_opt], [fit.loss_opt], "*", color=colors[budget], ms=12, mec="k")
    _log_axes(ax, "final eval loss")
    ax.set_xlabel("parameters")
    ax.set_title("isoFLOP curves (star: fitted optimum)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_timestep_frontiers(frontiers: dict, out_path) -> None:
    """frontier_t.png: one panel per eval timestep, the frontier of that timestep's loss per attention type."""
    keys = list(frontiers)
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for (attn, frontier), color in zip(sorted(frontiers[key].items()),
                                           itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])):
            flops, loss = zip(*frontier)
            ax.plot(flops, loss, "o-", color=color, ms=3, lw=1, label=attn)
        _log_axes(ax, key.replace("eval/loss_", "loss at "))
        ax.set_xlabel("training FLOPs")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def _log_axes(ax, ylabel: str, legend: bool = True) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Losses often span less than a decade, where a log axis has no major tick: label the minor ticks then.
    plain = matplotlib.ticker.FormatStrFormatter("%.3g")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if high < 10 * low else matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training FLOPs (cumulative, executed)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines and legend:
        ax.legend(fontsize=7)
