import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from lightning_sdrl.functional.forward_process import (
    clean_estimate,
    ddpm_clean_estimate,
    ddpm_noise,
    ddpm_target,
    flow_clean_estimate,
    flow_noise,
    noise_coefficient,
    noise_sample,
    output_kl,
    parameterization_of,
    timestep_to_level,
    training_target,
)

DDPM_TYPES = ["epsilon", "v_prediction", "sample"]
ALL_TYPES = ["flow", *DDPM_TYPES]
ATOL = 1e-6


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sd3_scheduler(steps=10):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


# -- flow matching against FlowMatchEulerDiscreteScheduler -------------------------------------------------------------


def test_flow_noise_equals_scale_noise_at_every_timestep():
    scheduler = sd3_scheduler()
    x0, noise = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    for timestep in scheduler.timesteps:
        timesteps = timestep.repeat(2)
        expected = scheduler.scale_noise(x0, timesteps, noise)
        actual = flow_noise(x0, noise, timestep_to_level(scheduler, timesteps))
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_flow_noise_with_one_timestep_per_sample_equals_scale_noise():
    scheduler = sd3_scheduler()
    timesteps = scheduler.timesteps[[0, 3, 7, 9]]
    x0, noise = randn(4, 3, 4, 4, seed=1), randn(4, 3, 4, 4, seed=2)
    expected = scheduler.scale_noise(x0, timesteps, noise)
    torch.testing.assert_close(
        noise_sample(x0, noise, timestep_to_level(scheduler, timesteps), "flow"), expected, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("sigma", [1.0, 0.8, 0.37, 0.05])
def test_flow_clean_estimate_equals_a_one_step_euler_step_to_zero(sigma):
    # a one-step schedule steps from sigma straight to 0: its prev_sample is the scheduler's x0 estimate
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=[sigma])
    x_t, v = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    timestep = scheduler.timesteps[0]
    expected = scheduler.step(v, timestep, x_t).prev_sample
    level = timestep_to_level(scheduler, timestep.repeat(2))
    torch.testing.assert_close(flow_clean_estimate(x_t, v, level), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(clean_estimate(x_t, v, level, "flow"), expected, atol=ATOL, rtol=0)


def test_flow_clean_estimate_is_x_t_minus_sigma_v_with_the_schedules_sigmas():
    scheduler = sd3_scheduler()
    x_t, v = randn(10, 3, 4, 4, seed=1), randn(10, 3, 4, 4, seed=2)
    level = timestep_to_level(scheduler, scheduler.timesteps)
    sigmas = scheduler.sigmas[:-1].double().view(-1, 1, 1, 1)
    expected = x_t.double() - sigmas * v.double()
    torch.testing.assert_close(flow_clean_estimate(x_t, v, level).double(), expected, atol=ATOL, rtol=0)


def test_flow_levels_are_the_schedules_sigmas():
    scheduler = sd3_scheduler()
    torch.testing.assert_close(
        timestep_to_level(scheduler, scheduler.timesteps), scheduler.sigmas[:-1], atol=1e-7, rtol=0
    )


# -- DDPM / DDIM against the diffusers schedulers ---------------------------------------------------------------------


def test_ddpm_noise_equals_add_noise():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 1, 250, 500, 999])
    x0, noise = randn(5, 4, 8, 8, seed=1), randn(5, 4, 8, 8, seed=2)
    expected = scheduler.add_noise(x0, noise, timesteps)
    level = timestep_to_level(scheduler, timesteps)
    torch.testing.assert_close(ddpm_noise(x0, noise, level), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(noise_sample(x0, noise, level, "epsilon"), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prediction_type", DDPM_TYPES)
def test_ddpm_clean_estimate_equals_ddpm_step_pred_original_sample(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(50)
    x_t, output = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    for timestep in scheduler.timesteps[::7]:
        expected = scheduler.step(output, timestep, x_t, generator=torch.Generator().manual_seed(0))
        level = timestep_to_level(scheduler, timestep.repeat(2))
        actual = clean_estimate(x_t, output, level, prediction_type)
        torch.testing.assert_close(actual, expected.pred_original_sample, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prediction_type", DDPM_TYPES)
def test_ddpm_clean_estimate_equals_ddim_step_pred_original_sample(prediction_type):
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    x_t, output = randn(3, 4, 8, 8, seed=1), randn(3, 4, 8, 8, seed=2)
    for timestep in scheduler.timesteps:
        expected = scheduler.step(output, timestep, x_t, eta=0.0).pred_original_sample
        level = timestep_to_level(scheduler, timestep)
        torch.testing.assert_close(
            ddpm_clean_estimate(x_t, output, level, prediction_type), expected, atol=ATOL, rtol=0
        )


def test_v_prediction_target_equals_get_velocity():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    timesteps = torch.tensor([3, 400, 999])
    x0, noise = randn(3, 4, 8, 8, seed=1), randn(3, 4, 8, 8, seed=2)
    expected = scheduler.get_velocity(x0, noise, timesteps)
    level = timestep_to_level(scheduler, timesteps)
    torch.testing.assert_close(ddpm_target(x0, noise, level, "v_prediction"), expected, atol=ATOL, rtol=0)


def test_epsilon_sample_and_flow_targets():
    x0, noise = randn(2, 3, seed=1), randn(2, 3, seed=2)
    level = torch.tensor([0.3, 0.9])
    assert torch.equal(training_target(x0, noise, level, "epsilon"), noise)
    assert torch.equal(training_target(x0, noise, level, "sample"), x0)
    assert torch.equal(training_target(x0, noise, level, "flow"), noise - x0)


# -- one entry point for all four parameterizations --------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", ALL_TYPES)
def test_the_training_target_at_x_t_gives_back_x0(parameterization):
    x0, noise = randn(4, 3, 5, 5, seed=1, dtype=torch.float64), randn(4, 3, 5, 5, seed=2, dtype=torch.float64)
    level = torch.tensor([0.02, 0.3, 0.7, 0.98], dtype=torch.float64)
    x_t = noise_sample(x0, noise, level, parameterization)
    target = training_target(x0, noise, level, parameterization)
    torch.testing.assert_close(clean_estimate(x_t, target, level, parameterization), x0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("parameterization", ALL_TYPES)
def test_clean_estimate_is_affine_in_the_output(parameterization):
    # DiffusionNFT combines model outputs linearly: x0_hat of the combination is the combination of x0_hats
    x_t, a, b = (randn(2, 3, 4, seed=s, dtype=torch.float64) for s in (1, 2, 3))
    level = torch.tensor([0.4, 0.8], dtype=torch.float64)

    def estimate(output):
        return clean_estimate(x_t, output, level, parameterization)

    torch.testing.assert_close(estimate(1.7 * a - 0.7 * b), 1.7 * estimate(a) - 0.7 * estimate(b), atol=1e-12, rtol=0)


@pytest.mark.parametrize("parameterization", ALL_TYPES)
def test_half_precision_inputs_are_computed_in_float32_and_float64_stays(parameterization):
    x0, noise = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)
    level = torch.tensor([0.3, 0.6])
    x_t = noise_sample(x0.bfloat16(), noise.bfloat16(), level, parameterization)
    assert x_t.dtype == torch.float32
    assert clean_estimate(x_t.bfloat16(), noise.bfloat16(), level, parameterization).dtype == torch.float32
    assert training_target(x0.bfloat16(), noise.bfloat16(), level, parameterization).dtype == torch.float32
    assert noise_sample(x0.double(), noise.double(), level, parameterization).dtype == torch.float64


def test_a_scalar_level_applies_to_every_sample():
    x0, noise = randn(3, 2, seed=1), randn(3, 2, seed=2)
    torch.testing.assert_close(flow_noise(x0, noise, 0.4), flow_noise(x0, noise, torch.full((3,), 0.4)))
    torch.testing.assert_close(ddpm_noise(x0, noise, 0.4), ddpm_noise(x0, noise, torch.tensor(0.4)))


def test_noise_coefficient_is_sigma_or_the_ddpm_noise_std():
    level = torch.tensor([0.19, 0.64])
    assert torch.equal(noise_coefficient(level, "flow"), level)
    torch.testing.assert_close(noise_coefficient(level, "v_prediction"), torch.tensor([0.9, 0.6]))


def test_output_kl_is_the_mean_squared_difference_per_sample():
    a, b = randn(3, 2, 4, seed=1), randn(3, 2, 4, seed=2)
    expected = ((a.double() - b.double()) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(output_kl(a, b).double(), expected, atol=ATOL, rtol=0)


def test_parameterization_of_reads_the_scheduler():
    assert parameterization_of(sd3_scheduler()) == "flow"
    assert parameterization_of(DDPMScheduler(prediction_type="v_prediction")) == "v_prediction"
    assert parameterization_of(DDIMScheduler(prediction_type="sample")) == "sample"


# -- argument errors ---------------------------------------------------------------------------------------------------


def test_an_unknown_parameterization_lists_the_valid_ones():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"parameterization='velocity'; expected one of \['flow', 'epsilon'"):
        clean_estimate(x, x, 0.5, "velocity")
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        ddpm_clean_estimate(x, x, 0.5, "flow")


def test_shape_errors_name_the_argument():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"level has shape \[3\]; expected a scalar or shape \[2\]"):
        flow_noise(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"noise has shape \[2, 4\]; expected \[2, 3\]"):
        ddpm_noise(x, torch.zeros(2, 4), 0.5)


def test_timestep_to_level_rejects_what_does_not_index_alphas_cumprod():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(ValueError, match=r"expected integers in \[0, 1000\)"):
        timestep_to_level(scheduler, torch.tensor([1000]))
    with pytest.raises(ValueError, match="not whole numbers"):
        timestep_to_level(scheduler, torch.tensor([10.5]))
    with pytest.raises(ValueError, match="neither a FlowMatchEulerDiscreteScheduler"):
        timestep_to_level(object(), torch.tensor([1]))
