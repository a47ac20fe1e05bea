import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

import lightning_sdrl
from lightning_sdrl.functional.ddim import ddim_step_distribution, ddim_step_with_logprob
from lightning_sdrl.functional.gaussian import gaussian_kl_same_std, gaussian_log_prob

DIGITS_SCHEDULER_DIR = Path(lightning_sdrl.__file__).parent / "digits" / "assets" / "diffusion" / "scheduler"

# every timestep layout diffusers' DDIMScheduler offers, with both final alphas and a few step counts
ALL_SCHEDULES = [
    pytest.param(spacing, offset, alpha_to_one, steps, id=f"{spacing}-offset{offset}-one{alpha_to_one}-{steps}")
    for spacing in ("leading", "trailing", "linspace")
    for offset in (0, 1)
    for alpha_to_one in (True, False)
    for steps in (2, 10, 20, 50)
]


def make_scheduler(
    set_alpha_to_one: bool,
    prediction_type: str = "epsilon",
    steps: int = 10,
    steps_offset: int = 1,
    timestep_spacing: str = "leading",
) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=steps_offset,
        timestep_spacing=timestep_spacing,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def step_distribution_before_t0_fix(scheduler, model_output, timestep, sample, eta):
    """Frozen copy of ``ddim_step_distribution`` (epsilon prediction) before the t = 0 variance.

    Kept verbatim, op for op, so that ``torch.equal`` can pin every step whose std was positive.
    """
    offset = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    dtype = torch.promote_types(sample.dtype, torch.float32)
    final = float(scheduler.final_alpha_cumprod)
    if not isinstance(timestep, torch.Tensor) or timestep.ndim == 0:
        alphas, t, shape = scheduler.alphas_cumprod.to(dtype), torch.tensor(int(timestep)), ()
    else:
        alphas = scheduler.alphas_cumprod.to(device=sample.device, dtype=dtype)
        t, shape = timestep.to(sample.device).long(), (-1, *([1] * (sample.ndim - 1)))
    is_last = (t - offset < 0).reshape(shape)
    alpha_t = alphas[t].reshape(shape)
    alpha_prev = torch.where(is_last, final, alphas[(t - offset).clamp(min=0)].reshape(shape))
    alpha_prev_for_var = torch.where(is_last & (alpha_prev >= 1), alphas[0], alpha_prev)
    sample, model_output = sample.to(dtype), model_output.to(dtype)
    beta_t = 1 - alpha_t
    pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
    pred_eps = model_output
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)
    variance = (1 - alpha_prev_for_var) / beta_t * (1 - alpha_t / alpha_prev_for_var)
    std = eta * variance.sqrt()
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * pred_eps
    mean = alpha_prev.sqrt() * pred_x0 + direction
    if std.ndim == 0:
        std = torch.full([1] * sample.ndim, std.item(), device=sample.device, dtype=dtype)
    return mean, std


def independent_log_prob(scheduler, eps, t, x_t, x_prev, eta):
    """Gaussian density of x_prev from the scheduler's alphas, written out step by step."""
    acp = scheduler.alphas_cumprod.double()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = acp[t]
    a_prev = acp[prev_t] if prev_t >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod).double()
    # documented floor: sigma from alphas_cumprod[0] when the final alpha is exactly one
    a_var = acp[0] if (prev_t < 0 and a_prev >= 1) else a_prev
    # documented t = 0 rule: sigma of the one-training-step move alphas_cumprod[1] -> alphas_cumprod[0]
    a_t_var = acp[1] if t == 0 else a_t
    sigma = eta * math.sqrt((1 - a_var) / (1 - a_t_var) * (1 - a_t_var / a_var))
    x0 = (x_t.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    mean = a_prev.sqrt() * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps.double()
    normal = torch.distributions.Normal(mean, sigma)
    return normal.log_prob(x_prev.double()).flatten(1).mean(1)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_log_prob_matches_independent_gaussian_at_every_step(set_alpha_to_one, eta):
    scheduler = make_scheduler(set_alpha_to_one)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        eps = torch.randn(x.shape, generator=generator)
        prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, eta=eta, generator=generator)
        assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all()
        expected = independent_log_prob(scheduler, eps, int(t), x, prev, eta)
        torch.testing.assert_close(log_prob.double(), expected, atol=1e-5, rtol=0)
        x = prev
    assert int(t) - scheduler.config.num_train_timesteps // 10 < 0  # the last step was covered


@pytest.mark.parametrize(("spacing", "offset", "alpha_to_one", "steps"), ALL_SCHEDULES)
def test_every_step_of_every_schedule_has_positive_std_and_the_documented_density(spacing, offset, alpha_to_one, steps):
    scheduler = make_scheduler(alpha_to_one, steps=steps, steps_offset=offset, timestep_spacing=spacing)
    generator = torch.Generator().manual_seed(0)
    # float64 end to end, so the comparison is exact up to float64 rounding
    x = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    for t in scheduler.timesteps:
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        assert (ddim_step_distribution(scheduler, eps, t, x).std > 0).all(), f"t={int(t)}"
        prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, generator=generator)
        assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all(), f"t={int(t)}"
        expected = independent_log_prob(scheduler, eps, int(t), x, prev, 1.0)
        torch.testing.assert_close(log_prob, expected, atol=1e-10, rtol=1e-10)
        x = prev


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_std_at_t0_is_the_one_training_step_posterior_std_and_that_of_t1(set_alpha_to_one):
    ends_at_0 = make_scheduler(set_alpha_to_one, steps=20, steps_offset=0)
    ends_at_1 = make_scheduler(set_alpha_to_one, steps=20, steps_offset=1)
    assert int(ends_at_0.timesteps[-1]) == 0 and int(ends_at_1.timesteps[-1]) == 1
    # DDPM's posterior variance beta-tilde (eq. 7 of Ho et al.) of the move 1 -> 0, from the betas in float64;
    # (the scheduler's float32 cumulative product moves the std by ~2e-6, relative)
    acp = torch.cumprod(1 - ends_at_0.betas.double(), 0)
    posterior_std = ((1 - acp[0]) / (1 - acp[1]) * ends_at_0.betas[1].double()).sqrt()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    for eta in (0.5, 1.0):
        std_0 = ddim_step_distribution(ends_at_0, x, 0, x, eta=eta).std
        torch.testing.assert_close(std_0.squeeze(), eta * posterior_std, rtol=1e-5, atol=0)
        assert torch.equal(std_0, ddim_step_distribution(ends_at_1, x, 1, x, eta=eta).std)


@pytest.mark.parametrize(("spacing", "offset", "alpha_to_one", "steps"), ALL_SCHEDULES)
def test_steps_with_positive_std_before_the_t0_fix_are_bit_identical(spacing, offset, alpha_to_one, steps):
    scheduler = make_scheduler(alpha_to_one, steps=steps, steps_offset=offset, timestep_spacing=spacing)
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for t in scheduler.timesteps:
        for timestep in (int(t), t.repeat(3)):  # the scalar and the per-sample code paths
            old_mean, old_std = step_distribution_before_t0_fix(scheduler, eps, timestep, x, 0.7)
            if (old_std > 0).all():
                dist = ddim_step_distribution(scheduler, eps, timestep, x, eta=0.7)
                assert torch.equal(dist.mean, old_mean) and torch.equal(dist.std, old_std), f"t={int(t)}"
            else:
                assert int(t) == 0  # the only zero-variance step before the fix


def test_digits_schedule_is_bit_identical_to_before_the_t0_fix():
    scheduler = DDIMScheduler.from_pretrained(DIGITS_SCHEDULER_DIR)
    config = scheduler.config
    assert (config.steps_offset, config.timestep_spacing, config.set_alpha_to_one) == (1, "leading", False)
    scheduler.set_timesteps(20)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        eps = torch.randn(x.shape, generator=generator)
        for timestep in (int(t), t.repeat(4)):
            old_mean, old_std = step_distribution_before_t0_fix(scheduler, eps, timestep, x, 1.0)
            dist = ddim_step_distribution(scheduler, eps, timestep, x, eta=1.0)
            assert (old_std > 0).all()
            assert torch.equal(dist.mean, old_mean) and torch.equal(dist.std, old_std), f"t={int(t)}"
        x = old_mean + old_std * torch.randn(x.shape, generator=generator)


@pytest.mark.parametrize(("spacing", "offset", "alpha_to_one", "steps"), ALL_SCHEDULES)
def test_mean_is_diffusers_step_without_noise(spacing, offset, alpha_to_one, steps):
    """Everywhere but t = 0 with set_alpha_to_one=False, whose diffusers step has zero variance."""
    scheduler = make_scheduler(alpha_to_one, steps=steps, steps_offset=offset, timestep_spacing=spacing)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in scheduler.timesteps:
        if int(t) == 0 and not alpha_to_one:
            continue
        expected = scheduler.step(eps, t, x, eta=0.6, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(ddim_step_distribution(scheduler, eps, t, x, eta=0.6).mean, expected)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize(("spacing", "offset"), [("leading", 0), ("linspace", 1)])
def test_mixed_batch_with_t0_gives_each_sample_its_log_prob_alone(set_alpha_to_one, spacing, offset):
    scheduler = make_scheduler(set_alpha_to_one, steps=20, steps_offset=offset, timestep_spacing=spacing)
    x, out, prev = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = scheduler.timesteps[[19, 0, 18, 19]]
    assert int(timesteps[0]) == 0
    _, batched = ddim_step_with_logprob(scheduler, out, timesteps, x, prev_sample=prev)
    assert torch.isfinite(batched).all()
    for i, t in enumerate(timesteps):
        for timestep in (t, int(t)):
            _, single = ddim_step_with_logprob(
                scheduler, out[i : i + 1], timestep, x[i : i + 1], prev_sample=prev[i : i + 1]
            )
            assert torch.equal(batched[i : i + 1], single), f"sample {i}, t={int(t)}"


def test_matches_diffusers_step_with_the_same_noise():
    scheduler = make_scheduler(set_alpha_to_one=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        eps = torch.randn(x.shape, generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        expected = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        dist = ddim_step_distribution(scheduler, eps, t, x, eta=1.0)
        torch.testing.assert_close(dist.mean + dist.std * noise, expected, atol=1e-5, rtol=1e-5)
        x = expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_per_sample_timesteps_equal_scalar_calls(prediction_type):
    scheduler = make_scheduler(set_alpha_to_one=True, prediction_type=prediction_type)
    x = torch.randn(3, 4, 8, 8)
    out = torch.randn(3, 4, 8, 8)
    prev = torch.randn(3, 4, 8, 8)
    timesteps = scheduler.timesteps[[0, 4, 9]]
    _, batched = ddim_step_with_logprob(scheduler, out, timesteps, x, prev_sample=prev)
    for i, t in enumerate(timesteps):
        _, single = ddim_step_with_logprob(scheduler, out[i : i + 1], t, x[i : i + 1], prev_sample=prev[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single)


def test_given_prev_sample_is_not_resampled_and_is_scored():
    scheduler = make_scheduler(set_alpha_to_one=False)
    x, out, prev = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    returned, log_prob = ddim_step_with_logprob(scheduler, out, scheduler.timesteps[3], x, prev_sample=prev)
    assert returned is prev
    dist = ddim_step_distribution(scheduler, out, scheduler.timesteps[3], x)
    torch.testing.assert_close(log_prob, gaussian_log_prob(prev, dist.mean, dist.std))


def test_half_precision_inputs_give_float32_log_probs():
    scheduler = make_scheduler(set_alpha_to_one=False)
    x, out = torch.randn(2, 4, 4, 4).bfloat16(), torch.randn(2, 4, 4, 4).bfloat16()
    prev, log_prob = ddim_step_with_logprob(scheduler, out, scheduler.timesteps[2], x)
    assert prev.dtype == torch.bfloat16 and log_prob.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    scheduler = make_scheduler(set_alpha_to_one=False)
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="eta=0"):
        ddim_step_with_logprob(scheduler, x, 500, x, eta=0.0)
    with pytest.raises(ValueError, match="expected a scalar or shape \\[2\\]"):
        ddim_step_with_logprob(scheduler, x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError, match="prev_sample has shape"):
        ddim_step_with_logprob(scheduler, x, 500, x, prev_sample=torch.randn(1, 4, 4, 4))
    unset = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(unset, x, 500, x)
    one_train_step = DDIMScheduler(num_train_timesteps=1)
    one_train_step.set_timesteps(1)
    with pytest.raises(ValueError, match="num_train_timesteps=1; expected at least 2"):
        ddim_step_with_logprob(one_train_step, x, 0, x)


def test_kl_of_same_std_gaussians_matches_torch_distributions():
    mean_p, mean_q, std = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.full((2, 1, 1), 0.7)
    p, q = torch.distributions.Normal(mean_p, std), torch.distributions.Normal(mean_q, std)
    expected = torch.distributions.kl_divergence(p, q).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_kl_same_std(mean_p, mean_q, std), expected)
