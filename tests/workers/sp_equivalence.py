"""Run under torchrun (2 gloo ranks): a sequence-parallel VideoDiT against the same model on one process.

Prints one line per check: "<name> out <rel err> grad <max rel err over parameters>". Used by test_parallel.py.
"""
import sys

import torch
import torch.distributed as dist

from vsa_train.diffusion import flow_loss
from vsa_train.models import build_model
from vsa_train.parallel import Layout, apply_sequence_parallel, sp_group

MODEL = {"name": "t", "hidden_size": 64, "depth": 2, "num_heads": 2, "patch_size": [1, 2, 2]}
ATTN = {"dense": {"name": "dense"},
        "vsa": {"name": "vsa", "topk": 2, "backend": "torch", "gate_fine": True}}


def inputs(T, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, T, H, W, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    t = torch.rand(2, generator=g)
    noise = torch.randn(x.shape, generator=g)
    return x, text, mask, t, noise


def run(model, x, text, mask, t, noise):
    model.zero_grad(set_to_none=True)
    loss = flow_loss(model, x, text, mask, t=t, noise=noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = Layout(world=world, rank=rank, sp_size=world)
    group = sp_group(layout)
    for attn in ("dense", "vsa"):
        # (4, 8, 12) pixels -> 4 x 4 x 6 = 96 tokens: not a multiple of 2 x 64; edge tiles for VSA
        for shape in ((4, 8, 8), (4, 8, 12), (3, 6, 10)):
            torch.manual_seed(0)
            ref = build_model(MODEL, ATTN[attn], in_channels=3, text_dim=16)
            torch.manual_seed(0)
            sp = build_model(MODEL, ATTN[attn], in_channels=3, text_dim=16)
            for m in (ref, sp):  # a trained-looking model: non-zero output layer and gates
                torch.manual_seed(1)
                for p in m.parameters():
                    p.data.add_(0.05 * torch.randn_like(p))
            apply_sequence_parallel(sp, layout, group)
            data = inputs(*shape)
            loss_ref, grads_ref = run(ref, *data)
            loss_sp, grads_sp = run(sp, *data)
            # the trainer's rule: x sp_size, then the mean over ranks (DDP's all-reduce)
            for g in grads_sp.values():
                g.mul_(world)
                dist.all_reduce(g)
                g.div_(world)
            out_err = ((loss_sp - loss_ref).abs() / loss_ref.abs()).item()
            grad_err = max(((grads_sp[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in grads_ref.items())
            missing = set(grads_ref) ^ set(grads_sp)
            if rank == 0:
                print(f"{attn}{shape} out {out_err:.3e} grad {grad_err:.3e} missing {sorted(missing)}", flush=True)
            with torch.no_grad():
                ref.eval(), sp.eval()
                o_ref = ref(data[0], data[3], data[1], data[2])
                o_sp = sp(data[0], data[3], data[1], data[2])
            if rank == 0:
                print(f"{attn}{shape} forward {((o_sp - o_ref).norm() / o_ref.norm()).item():.3e}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
