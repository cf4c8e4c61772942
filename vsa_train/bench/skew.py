"""How unevenly VSA's top-k selections spread over the key tiles: the dK/dV kernel's load balance, per layer.

    python -m vsa_train.bench skew                                   # dit_120m at init, synthetic_16k, batch 1
    python -m vsa_train.bench skew --model dit_tiny --data synthetic # seconds on a CPU
    python -m vsa_train.bench skew train.init_from=RUN_DIR           # a trained model's selections

One forward (no gradient) of the model a run builds from the composed `train` config (attn=vsa), on one batch
of the run's data stream and its per-sample noise. Each query tile picks `topk` key tiles; a key tile's "uses"
are how many query tiles picked it, and one dK/dV program walks that many query tiles. Per layer, averaged over
(batch, head): the most-used tile's uses / the mean (the longest program against an average one), the share of
tiles no query tile picked, and the share of all uses held by the top 10% of tiles. The dQ and forward programs
always walk `topk` tiles, so they are balanced whatever this prints. Last column: how many distinct key tiles two
neighbouring query tiles (2i, 2i + 1 in tile order) pick together, over `topk` (1: the same tiles, 2: disjoint),
the work a kernel program serving both over the union of their picks would do. On a CPU the op runs its PyTorch
backend. The selections are watched through the library's observer hook (ops.observe_selections).
"""
import argparse
import contextlib
import time

import torch

from ..ops import observe_selections


def uses_per_key_tile(index: torch.Tensor, n_kv: int) -> torch.Tensor:
    """fp32 [B, H, n_kv]: how many query tiles chose each key tile, from q2k_index int32 [B, H, n_q, K]."""
    flat = index.long().flatten(2)  # [B, H, n_q * K]
    ones = torch.ones(flat.shape, device=index.device)
    return torch.zeros(*flat.shape[:2], n_kv, device=index.device).scatter_add_(-1, flat, ones)


def pair_union(index: torch.Tensor, n_kv: int) -> float:
    """Mean over (batch, head, i) of |picks of query tile 2i ∪ picks of 2i + 1| / K, from q2k_index [B, H, n_q, K]."""
    B, H, n_q, K = index.shape
    picked = torch.zeros(B, H, n_q, n_kv, dtype=torch.bool, device=index.device)
    picked.scatter_(-1, index.long(), True)  # [B, H, n_q, n_kv]
    pairs = picked[:, :, :n_q // 2 * 2].view(B, H, n_q // 2, 2, n_kv)
    return (pairs.any(3).sum(-1).float() / K).mean().item()


def skew_row(uses: torch.Tensor) -> dict:
    """Load-balance figures of one layer's uses [B, H, n] (means over batch and heads)."""
    mean = uses.mean(-1)  # [B, H]
    top = max(1, uses.shape[-1] // 10)
    return {"mean": mean.mean().item(), "max/mean": (uses.amax(-1) / mean).mean().item(),
            "worst max/mean": (uses.amax(-1) / mean).max().item(), "unused": (uses == 0).float().mean().item(),
            "top 10% share": (uses.sort(-1, descending=True).values[..., :top].sum(-1) / uses.sum(-1)).mean().item()}


@contextlib.contextmanager
def record_selections():
    """Within: every top-k selection of the VSA op appends (uses per key tile, pair_union) to the yielded list."""
    layers = []

    def record(index, n_kv):
        layers.append((uses_per_key_tile(index, n_kv).cpu(), pair_union(index, n_kv)))

    with observe_selections(record):
        yield layers


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vsa_train.bench skew", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit_120m")
    p.add_argument("--data", default="synthetic_16k")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("override", nargs="*", help="extra Hydra overrides of the train config")
    args = p.parse_args(argv)
    # Here, not at the top: the op benchmark imports this file's helpers without Hydra or accelerate.
    from ..diffusion import flow_loss, sample_draws
    from . import step

    if not torch.cuda.is_available() and not any(o.startswith("attn.backend=") for o in args.override):
        args.override.append("attn.backend=torch")  # the Triton kernels need a GPU (or the slow interpreter)
    step_args = step.parse_args(["--model", args.model, "--data", args.data, "--batch", str(args.batch),
                                 *args.override])
    cfg = step.load_cfg(step_args, "vsa", compiled=False)
    target = step.trainer_target(cfg)
    batch, device = target.batch, target.device
    started = time.perf_counter()
    with record_selections() as layers, torch.no_grad(), target.autocast():
        t, noise, _ = sample_draws(cfg.train.seed, batch["position"], batch["video"].shape[1:], device)
        flow_loss(target.model, batch["video"], batch["text"], batch["text_mask"], t=t, noise=noise)
    target.close()
    if not layers:
        raise SystemExit("no layer selected tiles by top-k (attn.select=window, or every layer dense?)")
    print(f"{args.model}, {args.data}, batch {args.batch}, {device}, overrides {args.override}: one forward, "
          f"{time.perf_counter() - started:.0f} s\n\n| VSA layer | mean uses | max / mean | worst head "
          f"| unused tiles | top 10% of tiles hold | neighbours' union / topk |\n|---|---|---|---|---|---|---|")
    for i, (uses, union) in enumerate(layers):
        r = skew_row(uses)
        print(f"| {i} | {r['mean']:.1f} | {r['max/mean']:.2f} | {r['worst max/mean']:.2f} | "
              f"{100 * r['unused']:.1f}% | {100 * r['top 10% share']:.0f}% | {union:.2f} |")


if __name__ == "__main__":
    main()
