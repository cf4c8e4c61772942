"""loss_vs_flops.png: train loss and eval loss of one run against cumulative training FLOPs."""
import matplotlib
import matplotlib.ticker

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
