import math

import pytest
import torch
from diffusers import DDIMScheduler

from lightning_sdrl.functional.ddim import (
    ddim_step_distribution,
    ddim_step_with_logprob,
    gaussian_kl_same_std,
    gaussian_log_prob,
)


def make_scheduler(set_alpha_to_one: bool, prediction_type: str = "epsilon", steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def independent_log_prob(scheduler, eps, t, x_t, x_prev, eta):
    """Gaussian density of x_prev from the scheduler's alphas, written out step by step."""
    acp = scheduler.alphas_cumprod.double()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = acp[t]
    a_prev = acp[prev_t] if prev_t >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod).double()
    # documented floor: sigma from alphas_cumprod[0] when the final alpha is exactly one
    a_var = acp[0] if (prev_t < 0 and a_prev >= 1) else a_prev
    sigma = eta * math.sqrt((1 - a_var) / (1 - a_t) * (1 - a_t / a_var))
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


def test_kl_of_same_std_gaussians_matches_torch_distributions():
    mean_p, mean_q, std = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.full((2, 1, 1), 0.7)
    p, q = torch.distributions.Normal(mean_p, std), torch.distributions.Normal(mean_q, std)
    expected = torch.distributions.kl_divergence(p, q).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_kl_same_std(mean_p, mean_q, std), expected)
