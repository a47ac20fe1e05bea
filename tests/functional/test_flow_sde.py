import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lightning_sdrl.functional.flow_sde import (
    cps_step_distribution,
    flow_sde_step_distribution,
    flow_sde_step_with_logprob,
)
from lightning_sdrl.functional.gaussian import gaussian_log_prob, sample_step

NOISE_LEVELS = [0.3, 0.7, 1.0]


def sd3_scheduler(steps: int) -> FlowMatchEulerDiscreteScheduler:
    """Stable Diffusion 3's schedule: shift 3, starting at sigma = 1."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


def sigma_pair(scheduler, i):
    """sigma_i and sigma_{i+1} in float64, from the schedule's own sigmas (last one is 0)."""
    sigmas = scheduler.sigmas.double().tolist()
    return sigmas[i], sigmas[i + 1]


def reference_sde(scheduler, i, x, v, a):
    """Flow-GRPO's SDE step at step i, in float64, grouped as x (1 + ...) + v (1 + ...) dt like flow_grpo."""
    t, s = sigma_pair(scheduler, i)
    one_minus = 1 - (scheduler.sigmas[1].item() if t == 1.0 else t)
    sigma_t = a * math.sqrt(t / one_minus)
    dt = s - t
    x, v = x.double(), v.double()
    mean = x * (1 + sigma_t**2 / (2 * t) * dt) + v * (1 + sigma_t**2 * (1 - t) / (2 * t)) * dt
    return mean, sigma_t * math.sqrt(-dt)


def reference_cps(scheduler, i, x, v, a):
    """Coefficients-preserving step at step i, in float64, from predicted x_0 and predicted noise."""
    t, s = sigma_pair(scheduler, i)
    x, v = x.double(), v.double()
    x0_hat, noise_hat = x - t * v, x + (1 - t) * v
    std = s * math.sin(a * math.pi / 2)
    mean = (1 - s) * x0_hat + math.sqrt(max(s**2 - std**2, 0.0)) * noise_hat
    return mean, std


def reference_log_prob(prev, mean, std):
    return torch.distributions.Normal(mean, std).log_prob(prev.double()).flatten(1).mean(1)


def rows_like(values, x):
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))


# -- Flow-GRPO SDE: the Gaussian and its log-density --------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 28])
@pytest.mark.parametrize("noise_level", NOISE_LEVELS)
@pytest.mark.parametrize(
    ("dtype", "mean_atol", "log_prob_atol"),
    [(torch.float64, 1e-12, 1e-10), (torch.float32, 2e-6, 1e-5)],
    ids=["float64", "float32"],
)
def test_sde_log_prob_matches_independent_gaussian_at_every_step(steps, noise_level, dtype, mean_atol, log_prob_atol):
    scheduler = sd3_scheduler(steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator, dtype=dtype)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=generator, dtype=dtype)
        dist = flow_sde_step_distribution(scheduler, v, t, x, noise_level)
        mean, std = reference_sde(scheduler, i, x, v, noise_level)
        torch.testing.assert_close(dist.mean.double(), mean, atol=mean_atol, rtol=0)
        torch.testing.assert_close(dist.std.double(), torch.full((1, 1, 1, 1), std, dtype=torch.float64))
        t_float = sigma_pair(scheduler, i)[0]
        torch.testing.assert_close(dist.pred_original_sample.double(), x.double() - t_float * v.double())
        prev, log_prob = flow_sde_step_with_logprob(scheduler, v, t, x, noise_level, generator=generator)
        assert prev.dtype == dtype and log_prob.dtype == dtype and log_prob.shape == (3,)
        torch.testing.assert_close(log_prob.double(), reference_log_prob(prev, mean, std), atol=log_prob_atol, rtol=0)
        x = prev


@pytest.mark.parametrize("steps", [10, 28])
@pytest.mark.parametrize("noise_level", NOISE_LEVELS)
def test_sde_per_sample_timesteps_match_the_reference_and_scalar_calls(steps, noise_level):
    scheduler = sd3_scheduler(steps)
    generator = torch.Generator().manual_seed(1)
    # one sample per step, shuffled: every step of the schedule appears once in the mixed batch
    order = torch.randperm(steps, generator=generator)
    x = torch.randn(steps, 2, 4, 4, generator=generator)
    v = torch.randn(steps, 2, 4, 4, generator=generator)
    prev = torch.randn(steps, 2, 4, 4, generator=generator)
    timesteps = scheduler.timesteps[order]
    dist = flow_sde_step_distribution(scheduler, v, timesteps, x, noise_level)
    assert dist.std.shape == (steps, 1, 1, 1)
    _, batched = flow_sde_step_with_logprob(scheduler, v, timesteps, x, noise_level, prev_sample=prev)
    references = [
        reference_sde(scheduler, int(i), x[b : b + 1], v[b : b + 1], noise_level) for b, i in enumerate(order)
    ]
    torch.testing.assert_close(dist.mean.double(), torch.cat([m for m, _ in references]), atol=2e-6, rtol=0)
    torch.testing.assert_close(dist.std.double(), rows_like([s for _, s in references], x))
    expected = torch.cat([reference_log_prob(prev[b : b + 1], m, s) for b, (m, s) in enumerate(references)])
    # an unsampled prev gives log-probs up to -1e5 at the last steps: float32 rounding is relative there
    torch.testing.assert_close(batched.double(), expected, atol=1e-5, rtol=1e-6)
    for b, t in enumerate(timesteps):
        for timestep in (t, float(t)):  # 0-dim tensor and python number
            _, single = flow_sde_step_with_logprob(
                scheduler, v[b : b + 1], timestep, x[b : b + 1], noise_level, prev_sample=prev[b : b + 1]
            )
            assert torch.equal(single, batched[b : b + 1]), f"sample {b}, step {int(order[b])}"


def test_sd3_schedule_starts_at_sigma_one_and_that_step_is_finite_with_std_noise_level():
    scheduler = sd3_scheduler(28)
    assert scheduler.sigmas[0].item() == 1.0 and scheduler.timesteps[0].item() == 1000.0
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for noise_level in NOISE_LEVELS:
        dist = flow_sde_step_distribution(scheduler, v, scheduler.timesteps[0], x, noise_level)
        assert torch.isfinite(dist.mean).all() and torch.isfinite(dist.std).all()
        # sigma_t = a sqrt(1 / (1 - sigma_1)) and sqrt(-dt) = sqrt(1 - sigma_1): the std is a itself
        torch.testing.assert_close(dist.std, torch.full((1, 1, 1, 1), noise_level), rtol=1e-6, atol=0)
        # the drift uses the same sigma_1 (and 1 - t = 0): the mean is a^2 / (2 (1 - sigma_1)) x dt from Euler
        s1 = scheduler.sigmas[1].double()
        expected = x.double() + (v.double() + noise_level**2 / (2 * (1 - s1)) * x.double()) * (s1 - 1)
        torch.testing.assert_close(dist.mean.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [10, 28])
def test_tiny_noise_level_is_diffusers_euler_step(steps):
    scheduler = sd3_scheduler(steps)
    diffusers_scheduler = sd3_scheduler(steps)  # its own copy: step() advances a step_index
    generator = torch.Generator().manual_seed(0)
    x = x_ref = torch.randn(2, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        v = torch.randn(x.shape, generator=generator)
        x_ref = diffusers_scheduler.step(v, t, x).prev_sample
        x, _ = flow_sde_step_with_logprob(scheduler, v, t, x, noise_level=1e-6, generator=generator)
        torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=0)
        x = x_ref
    assert diffusers_scheduler.step_index == steps  # it walked the same steps


@pytest.mark.parametrize("distribution", [flow_sde_step_distribution, cps_step_distribution])
def test_noise_level_zero_is_exactly_the_euler_ode_step(distribution):
    scheduler = sd3_scheduler(10)
    x, v = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps):
        dist = distribution(scheduler, v, t, x, noise_level=0.0)
        assert torch.equal(dist.std, torch.zeros(1, 1, 1, 1, dtype=torch.float64))
        t_i, s_i = sigma_pair(scheduler, i)
        torch.testing.assert_close(dist.mean, x + (s_i - t_i) * v, atol=1e-12, rtol=0)
    # and in float32 it is diffusers' step bit for bit (same float32 sigmas, same operations)
    euler = sd3_scheduler(10)
    x32, v32 = x.float(), v.float()
    expected = euler.step(v32, euler.timesteps[0], x32).prev_sample
    assert torch.equal(flow_sde_step_distribution(scheduler, v32, scheduler.timesteps[0], x32, 0.0).mean, expected)


def linear_velocity(seed: int = 0):
    """A fixed random "model": v(x, t) = W x + (t / 1000) b on the flattened sample."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(32, 32, generator=generator) / math.sqrt(32)
    bias = torch.randn(32, generator=generator)

    def velocity(x, timesteps):
        t = torch.as_tensor(timesteps, dtype=x.dtype).reshape(-1, 1) / 1000
        return (x.flatten(1) @ weight.T + t * bias).reshape(x.shape)

    return velocity


@pytest.mark.parametrize("noise_level", [0.7, 1.0])
def test_rescoring_a_sampled_trajectory_gives_its_log_probs(noise_level):
    scheduler, velocity = sd3_scheduler(10), linear_velocity()
    generator = torch.Generator().manual_seed(0)
    latents, log_probs = [torch.randn(4, 2, 4, 4, generator=generator)], []
    for t in scheduler.timesteps:
        prev, log_prob = flow_sde_step_with_logprob(
            scheduler, velocity(latents[-1], t), t, latents[-1], noise_level, generator=generator
        )
        latents.append(prev)
        log_probs.append(log_prob)
    latents, log_probs = torch.stack(latents, 1), torch.stack(log_probs, 1)  # [B, T + 1, ...], [B, T]
    for j, t in enumerate(scheduler.timesteps):  # shared (scalar) timesteps
        x, stored = latents[:, j], latents[:, j + 1]
        returned, new = flow_sde_step_with_logprob(scheduler, velocity(x, t), t, x, noise_level, prev_sample=stored)
        assert returned is stored
        torch.testing.assert_close(torch.exp(new - log_probs[:, j]), torch.ones(4), atol=1e-6, rtol=0)
    rows = torch.arange(4)
    for shift in range(10):  # per-sample timesteps: sample b re-scores its step (b + shift) % T
        steps = (rows + shift) % 10
        x, t = latents[rows, steps], scheduler.timesteps[steps]
        _, new = flow_sde_step_with_logprob(
            scheduler, velocity(x, t), t, x, noise_level, prev_sample=latents[rows, steps + 1]
        )
        torch.testing.assert_close(torch.exp(new - log_probs[rows, steps]), torch.ones(4), atol=1e-6, rtol=0)


def test_bf16_inputs_are_computed_in_float32():
    scheduler = sd3_scheduler(10)
    x, v = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8).bfloat16()
    for t in (scheduler.timesteps[0], scheduler.timesteps[5], scheduler.timesteps[[2, 7]]):
        prev, log_prob = flow_sde_step_with_logprob(scheduler, v, t, x, generator=torch.Generator().manual_seed(0))
        assert prev.dtype == torch.bfloat16 and log_prob.dtype == torch.float32
        dist = flow_sde_step_distribution(scheduler, v, t, x)
        dist32 = flow_sde_step_distribution(scheduler, v.float(), t, x.float())
        assert dist.mean.dtype == torch.float32
        assert torch.equal(dist.mean, dist32.mean) and torch.equal(dist.std, dist32.std)
        # the log-prob is that of the stored bf16 sample, under the float32 Gaussian of the upcast inputs
        assert torch.equal(log_prob, gaussian_log_prob(prev.float(), dist32.mean, dist32.std))
        _, rescored = flow_sde_step_with_logprob(scheduler, v.float(), t, x.float(), prev_sample=prev)
        assert torch.equal(rescored, log_prob)
        # the same noise as the float32 computation, rounded once at the end
        prev32, _ = sample_step(dist32, torch.float32, torch.Generator().manual_seed(0))
        assert torch.equal(prev, prev32.bfloat16())


def test_seeded_generator_is_reproducible():
    scheduler = sd3_scheduler(10)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[3]
    a = flow_sde_step_with_logprob(scheduler, v, t, x, generator=torch.Generator().manual_seed(7))
    b = flow_sde_step_with_logprob(scheduler, v, t, x, generator=torch.Generator().manual_seed(7))
    c = flow_sde_step_with_logprob(scheduler, v, t, x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_bad_inputs_raise_clear_errors():
    scheduler = sd3_scheduler(10)
    x = torch.randn(2, 4, 4, 4)
    t = scheduler.timesteps[2]
    with pytest.raises(ValueError, match=r"timestep=500.0 is not one of scheduler.timesteps.*set_timesteps"):
        flow_sde_step_distribution(scheduler, x, 500.0, x)
    with pytest.raises(ValueError, match=r"timesteps \[500.0\] are not in scheduler.timesteps.*set_timesteps"):
        flow_sde_step_distribution(scheduler, x, torch.tensor([float(t), 500.0]), x)
    with pytest.raises(ValueError, match=r"expected a scalar or shape \[2\]"):
        flow_sde_step_distribution(scheduler, x, scheduler.timesteps[:3], x)
    for distribution in (flow_sde_step_distribution, cps_step_distribution):
        with pytest.raises(ValueError, match="noise_level=-0.1"):
            distribution(scheduler, x, t, x, noise_level=-0.1)
    with pytest.raises(ValueError, match="noise_level=1.5; expected 0 <= noise_level <= 1"):
        cps_step_distribution(scheduler, x, t, x, noise_level=1.5)
    with pytest.raises(ValueError, match="noise_level=0.0; expected noise_level > 0"):
        flow_sde_step_with_logprob(scheduler, x, t, x, noise_level=0.0)
    with pytest.raises(ValueError, match="prev_sample has shape"):
        flow_sde_step_with_logprob(scheduler, x, t, x, prev_sample=torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="model_output has shape"):
        flow_sde_step_distribution(scheduler, x[:1], t, x)
    with pytest.raises(ValueError, match="call scheduler.set_timesteps"):
        flow_sde_step_distribution(FlowMatchEulerDiscreteScheduler(), x, 1000.0, x)
    inverted = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    inverted.set_timesteps(4)
    with pytest.raises(ValueError, match="invert_sigmas=False"):
        flow_sde_step_distribution(inverted, x, inverted.timesteps[0], x)


# -- coefficients-preserving sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 28])
@pytest.mark.parametrize("noise_level", NOISE_LEVELS)
def test_cps_matches_the_independent_formula_at_every_step(steps, noise_level):
    scheduler = sd3_scheduler(steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=generator)
        dist = cps_step_distribution(scheduler, v, t, x, noise_level)
        mean, std = reference_cps(scheduler, i, x, v, noise_level)
        torch.testing.assert_close(dist.mean.double(), mean, atol=2e-6, rtol=0)
        torch.testing.assert_close(dist.std.double(), torch.full((1, 1, 1, 1), std, dtype=torch.float64))
        if i < steps - 1:
            prev, log_prob = sample_step(dist, x.dtype, generator)
            torch.testing.assert_close(log_prob.double(), reference_log_prob(prev, mean, std), atol=1e-5, rtol=0)
            x = prev
    # the last step goes to sigma 0: deterministic, straight to the predicted x_0
    assert torch.equal(dist.std, torch.zeros(1, 1, 1, 1)) and torch.equal(dist.mean, dist.pred_original_sample)
    # per-sample timesteps: every step once, in a mixed batch, equal to scalar calls
    order = torch.randperm(steps, generator=generator)
    x, v = torch.randn(steps, 2, 4, 4, generator=generator), torch.randn(steps, 2, 4, 4, generator=generator)
    batched = cps_step_distribution(scheduler, v, scheduler.timesteps[order], x, noise_level)
    for b, i in enumerate(order.tolist()):
        mean, std = reference_cps(scheduler, i, x[b : b + 1], v[b : b + 1], noise_level)
        torch.testing.assert_close(batched.mean[b : b + 1].double(), mean, atol=2e-6, rtol=0)
        torch.testing.assert_close(batched.std[b].double().squeeze(), torch.tensor(std, dtype=torch.float64))
        single = cps_step_distribution(scheduler, v[b : b + 1], scheduler.timesteps[i], x[b : b + 1], noise_level)
        assert torch.equal(single.mean, batched.mean[b : b + 1]) and torch.equal(single.std[0], batched.std[b])


def exact_flow_batch(t: float, generator):
    """x_t = (1 - t) x_0 + t eps with the exact velocity eps - x_0; 16 x 65536 values in float64."""
    x0 = torch.rand(16, 1, 256, 256, generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return x0, eps, (1 - t) * x0 + t * eps, eps - x0


@pytest.mark.parametrize("noise_level", [0.5, 1.0])
def test_cps_with_the_exact_velocity_preserves_signal_and_noise_coefficients(noise_level):
    scheduler = sd3_scheduler(10)
    generator = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        t_i, s = sigma_pair(scheduler, i)
        x0, eps, x_t, v = exact_flow_batch(t_i, generator)
        dist = cps_step_distribution(scheduler, v, t, x_t, noise_level)
        kept = math.sqrt(s**2 - float(dist.std) ** 2)
        torch.testing.assert_close(dist.mean, (1 - s) * x0 + kept * eps, atol=1e-12, rtol=0)
        prev, _ = sample_step(dist, torch.float64, generator)
        noise_variance = ((prev - (1 - s) * x0) ** 2).mean().item()
        assert noise_variance == pytest.approx(s**2, rel=0.01, abs=1e-10), f"step {i}"


def test_flow_grpo_sde_with_the_exact_velocity_keeps_the_marginal_to_first_order():
    """On the 50-step SD3 schedule: signal coefficient exactly 1 - s, noise variance s^2 (1 + O(dt^2))."""
    scheduler = sd3_scheduler(50)
    generator = torch.Generator().manual_seed(0)
    for i in range(5, 36):
        t_i, s = sigma_pair(scheduler, i)
        x0, eps, x_t, v = exact_flow_batch(t_i, generator)
        dist = flow_sde_step_distribution(scheduler, v, scheduler.timesteps[i], x_t, noise_level=0.7)
        # the mean is (1 - s) x_0 plus a multiple of the sample's noise: no x_0 leaks into the noise part
        rest = (dist.mean - (1 - s) * x0).flatten()
        coefficient = rest @ eps.flatten() / (eps.flatten() @ eps.flatten())
        assert (rest - coefficient * eps.flatten()).abs().max().item() < 1e-12, f"step {i}"
        prev, _ = sample_step(dist, torch.float64, generator)
        noise_variance = ((prev - (1 - s) * x0) ** 2).mean().item()
        # the discretisation error here is below 0.4%; dropping the score term from the drift gives over 4%
        assert noise_variance == pytest.approx(s**2, rel=0.01), f"step {i}"
