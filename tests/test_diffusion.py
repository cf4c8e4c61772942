"""Rectified flow: timestep law, noising algebra, loss, and the Euler sampler with guidance."""
import torch

from vsa_train.diffusion import add_noise, euler_sample, flow_loss, sample_timesteps


def test_timesteps_are_logit_normal():
    t = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and ((t > 0) & (t < 1)).all()
    logit = torch.logit(t.double())
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    again = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_add_noise_algebra():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    t = torch.tensor([0.0, 1.0])
    x_t, v = add_noise(x0, noise, t)
    torch.testing.assert_close(x_t[0], x0[0])  # t = 0 is data
    torch.testing.assert_close(x_t[1], noise[1])  # t = 1 is noise
    t = torch.tensor([0.3, 0.8])
    x_t, v = add_noise(x0, noise, t)
    torch.testing.assert_close(v, noise - x0)
    torch.testing.assert_close(x_t - t.view(-1, 1, 1, 1, 1) * v, x0)  # stepping back along v recovers x0


class Oracle(torch.nn.Module):
    """Knows x0, so predicts the exact velocity (x_t - x0) / t; conditioning is ignored."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, text, text_mask):
        return (x - self.x0) / t.view(-1, 1, 1, 1, 1)


def test_flow_loss_with_injected_t_and_noise():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 1, 2, 2, generator=g), torch.randn(2, 3, 1, 2, 2, generator=g)
    t = torch.tensor([0.25, 0.75])
    assert flow_loss(Oracle(x0), x0, None, None, t=t, noise=noise) < 1e-10

    def zero(x, t, text, mask):
        return torch.zeros_like(x)

    torch.testing.assert_close(flow_loss(zero, x0, None, None, t=t, noise=noise), (noise - x0).square().mean())
    # drawn t and noise follow the generator
    a = flow_loss(zero, x0, None, None, generator=torch.Generator().manual_seed(3))
    b = flow_loss(zero, x0, None, None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, flow_loss(zero, x0, None, None, generator=torch.Generator().manual_seed(4)))


def test_euler_sampler_follows_straight_paths():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 1, 2, 2, generator=g), torch.randn(2, 3, 1, 2, 2, generator=g)
    for steps in (1, 7):
        torch.testing.assert_close(euler_sample(Oracle(x0), noise, None, None, steps=steps), x0)


def test_classifier_free_guidance_mixes_conditional_and_null():
    """v_text = +1 wherever the caption has a token, v_null = -1 for the empty caption; guidance s gives -1 + 2s."""

    def model(x, t, text, text_mask):
        sign = torch.where(text_mask.any(-1), 1.0, -1.0)  # [B]
        return sign.view(-1, 1, 1, 1, 1).expand_as(x)

    noise = torch.zeros(2, 3, 1, 2, 2)
    text, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    out = euler_sample(model, noise, text, mask, steps=4, cfg_scale=3.0)
    torch.testing.assert_close(out, torch.full_like(noise, -(-1 + 2 * 3.0)))  # x(0) = x(1) - v over unit time
    torch.testing.assert_close(euler_sample(model, noise, text, mask, steps=4), torch.full_like(noise, -1.0))


def test_sample_draws_depend_on_seed_and_position_only():
    """Each training sample's (t, noise, u) is a function of (seed, stream position): the same sample gets the
    same draws in any batch split, and seeds never share a draw (seed 1's position 0 is not seed 0's 2^20)."""
    from vsa_train.diffusion import sample_draws

    t, noise, u = sample_draws(0, torch.arange(4), (3, 2, 4, 4), "cpu")
    t2, noise2, u2 = sample_draws(0, torch.tensor([2, 3]), (3, 2, 4, 4), "cpu")
    assert torch.equal(t[2:], t2) and torch.equal(noise[2:], noise2) and torch.equal(u[2:], u2)
    assert ((t > 0) & (t < 1)).all() and ((u >= 0) & (u < 1)).all() and len(set(t.tolist())) == 4
    other, far = sample_draws(1, torch.tensor([0]), (3, 2, 4, 4), "cpu"), sample_draws(0, torch.tensor([2**20]),
                                                                                      (3, 2, 4, 4), "cpu")
    assert not torch.equal(other[1], noise[:1]) and not torch.equal(other[1], far[1])
