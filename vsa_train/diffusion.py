"""Rectified flow (docs/design.md, 'Rectified flow'): x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0."""
import torch
import torch.nn.functional as F


def sample_timesteps(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n flow times t ~ LogitNormal(0, 1), i.e. sigmoid of a standard normal: [n] in (0, 1)."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=device))


def sample_draws(seed: int, positions: torch.Tensor, shape, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t [B], noise [B, *shape], u [B] uniform) for the training samples at stream `positions`, each drawn from
    its own generator seeded by (seed, position): the same sample gets the same draws whatever the number of
    processes, the per-process batch or the sequence-parallel layout (elastic restarts stay exact)."""
    ts, noises, us = [], [], []
    for p in positions.tolist():
        g = torch.Generator(device=device).manual_seed(_mix(seed, p))
        ts.append(sample_timesteps(1, generator=g, device=device))
        noises.append(torch.randn((1, *shape), generator=g, device=device))
        us.append(torch.rand(1, generator=g, device=device))
    return torch.cat(ts), torch.cat(noises), torch.cat(us)


def _mix(seed: int, position: int) -> int:
    """A well-mixed 64-bit seed for (seed, position) (splitmix64): the CPU generator keeps only its low 32 bits,
    so a plain seed * K + position would give seed 1's first samples the noise of seed 0's later ones."""
    z = ((seed & 0xFFFFFF) << 40 | (position & (2**40 - 1))) + 0x9E3779B97F4A7C15
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 2**64 - 1
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 2**64 - 1
    return (z ^ (z >> 31)) & (2**63 - 1)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy sample x_t and the velocity target v = noise - x0 for per-sample times t [B]."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, ..., 1]
    return (1 - t) * x0 + t * noise, noise - x0


def flow_loss(model, x0, text, text_mask, t=None, noise=None, generator=None) -> torch.Tensor:
    """Mean squared error of the predicted velocity; t and noise are drawn unless given (fixed eval protocol)."""
    if t is None:
        t = sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t, target = add_noise(x0, noise, t)
    pred = model(x_t, t, text, text_mask)
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def euler_sample(model, noise, text, text_mask, steps: int, cfg_scale: float = 1.0, null_text=None, null_mask=None):
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 in `steps` Euler steps, with classifier-free guidance.

    With cfg_scale != 1 the velocity is v_null + cfg_scale * (v_text - v_null); the null condition defaults
    to an empty caption (all-False mask), which the model's cross-attention turns into no text at all.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    B = noise.shape[0]
    guided = cfg_scale != 1.0
    if guided:
        if null_text is None:
            null_text = torch.zeros_like(text)
        if null_mask is None:
            null_mask = torch.zeros(text.shape[:2], dtype=torch.bool, device=text.device)
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        text = torch.cat([text, null_text.expand_as(text)])  # [2B, L, text_dim]: one forward for both
        text_mask = torch.cat([text_mask, null_mask.expand_as(text_mask)])  # [2B, L]
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    x = noise
    for i in range(steps):
        t = ts[i].expand(B)  # [B]
        if guided:
            v_text, v_null = model(torch.cat([x, x]), torch.cat([t, t]), text, text_mask).chunk(2)
            v = v_null + cfg_scale * (v_text - v_null)
        else:
            v = model(x, t, text, text_mask)
        x = x + (ts[i + 1] - ts[i]) * v  # step towards t = 0
    return x
