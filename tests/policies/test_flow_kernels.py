import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from lightning_sdrl.functional.flow_sde import cps_step_distribution, flow_sde_step_distribution
from lightning_sdrl.functional.gaussian import sample_step
from lightning_sdrl.policies.flow_kernels import FlowSDEStep
from lightning_sdrl.policies.kernels import StepKernel


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


@pytest.mark.parametrize("variant", ["sde", "cps"])
def test_flow_sde_step_is_a_step_kernel_with_a_private_scheduler(variant):
    given = sd3_scheduler()
    given.set_timesteps(5)
    kernel = FlowSDEStep(given, variant=variant)
    assert isinstance(kernel, StepKernel)
    assert kernel.scheduler is not given and kernel.scheduler.config == given.config
    timesteps = kernel.set_timesteps(10)
    assert timesteps.device.type == "cpu" and len(timesteps) == 10
    assert given.num_inference_steps == 5 and len(given.timesteps) == 5  # the given scheduler is untouched
    # the SD3 schedule in diffusers' own words: sigmas shifted by 3, times 1000
    reference = sd3_scheduler()
    reference.set_timesteps(10)
    assert torch.equal(timesteps, reference.timesteps) and torch.equal(kernel.scheduler.sigmas, reference.sigmas)
    assert kernel.set_timesteps(10) is timesteps  # unchanged step count: no recomputation
    assert len(kernel.set_timesteps(4)) == 4


@pytest.mark.parametrize(
    ("variant", "functional"), [("sde", flow_sde_step_distribution), ("cps", cps_step_distribution)]
)
def test_distribution_is_the_functional_step(variant, functional):
    kernel = FlowSDEStep(sd3_scheduler(), variant=variant)
    timesteps = kernel.set_timesteps(10)
    reference = sd3_scheduler()
    reference.set_timesteps(10)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for timestep in (timesteps[0], timesteps[6], timesteps[[1, 4, 8]]):
        dist = kernel.distribution(v, timestep, x, eta=0.7)
        expected = functional(reference, v, timestep, x, noise_level=0.7)
        for got, want in zip(dist, expected, strict=True):
            assert torch.equal(got, want)


def test_variants_differ_as_their_formulas_say():
    sde, cps = FlowSDEStep(sd3_scheduler(), "sde"), FlowSDEStep(sd3_scheduler(), variant="cps")
    timesteps = sde.set_timesteps(10)
    cps.set_timesteps(10)
    sigmas = sde.scheduler.sigmas.double()
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = timesteps[3]
    t_i, s = sigmas[3].item(), sigmas[4].item()
    # Flow-GRPO: std a sqrt(t / (1 - t)) sqrt(t - s); CPS: std s sin(a pi / 2)
    assert sde.distribution(v, t, x, eta=0.7).std.item() == pytest.approx(0.7 * math.sqrt(t_i / (1 - t_i) * (t_i - s)))
    assert cps.distribution(v, t, x, eta=0.7).std.item() == pytest.approx(s * math.sin(0.7 * math.pi / 2))
    # both are the Euler ODE step at eta = 0
    euler = x + (s - t_i) * v
    torch.testing.assert_close(sde.distribution(v, t, x, eta=0.0).mean, euler)
    torch.testing.assert_close(cps.distribution(v, t, x, eta=0.0).mean, euler)


def test_sampling_through_the_kernel_with_the_exact_velocity_reaches_the_data():
    """20 CPS steps from pure noise with v = eps - x0 for a single data point x0 end at x0."""
    kernel = FlowSDEStep(sd3_scheduler(), variant="cps")
    timesteps = kernel.set_timesteps(20)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    x = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    for i, t in enumerate(timesteps):
        sigma = kernel.scheduler.sigmas[i].item()
        velocity = (x - x0) / sigma  # the exact velocity field of the one-point data distribution
        x, _ = sample_step(kernel.distribution(velocity, t, x, eta=0.7), torch.float64, generator)
    torch.testing.assert_close(x, x0, atol=1e-9, rtol=0)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"variant='ode'; expected one of \['sde', 'cps'\]"):
        FlowSDEStep(sd3_scheduler(), variant="ode")
    with pytest.raises(ValueError, match="use_dynamic_shifting=False"):
        FlowSDEStep(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    kernel = FlowSDEStep(sd3_scheduler(), variant="cps")
    kernel.set_timesteps(4)
    x = torch.randn(1, 2)
    with pytest.raises(ValueError, match="noise_level=1.5"):
        kernel.distribution(x, kernel.scheduler.timesteps[0], x, eta=1.5)


def test_any_scheduler_config_is_read_as_a_flow_match_scheduler_and_repr():
    kernel = FlowSDEStep(DDIMScheduler(num_train_timesteps=1000))
    assert isinstance(kernel.scheduler, FlowMatchEulerDiscreteScheduler)
    assert repr(FlowSDEStep(sd3_scheduler(), "cps")) == "FlowSDEStep(variant='cps', shift=3.0)"


def test_is_stochastic_marks_only_cps_last_step_and_eta_zero_deterministic():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sde, cps = FlowSDEStep(scheduler, "sde"), FlowSDEStep(scheduler, "cps")
    for kernel in (sde, cps):
        kernel.set_timesteps(5)
    assert [sde.is_stochastic(j, 0.7) for j in range(5)] == [True] * 5
    assert [cps.is_stochastic(j, 0.7) for j in range(5)] == [True] * 4 + [False]
    assert not any(kernel.is_stochastic(j, 0.0) for kernel in (sde, cps) for j in range(5))
    # and it agrees with the std the kernel computes
    x = torch.randn(2, 4)
    for kernel in (sde, cps):
        stds = [float(kernel.distribution(x, t, x, 0.7).std.max()) for t in kernel.scheduler.timesteps]
        assert [s > 0 for s in stds] == [kernel.is_stochastic(j, 0.7) for j in range(5)]


# ------------------------------------------------------------------ FLUX.1's resolution-dependent shift
def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config: dynamic (exponential) shifting between 0.5 and 1.15."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def test_resolution_shift_is_the_flux_pipelines_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from lightning_sdrl.functional.flow_schedule import resolution_shift

    config = flux_scheduler().config
    for tokens in (16, 256, 1024, 4096, 6000):
        assert resolution_shift(tokens, config) == pytest.approx(calculate_shift(tokens), abs=1e-12)
    other = {**config, "base_shift": 0.3, "max_shift": 2.0, "max_image_seq_len": 1024}
    assert resolution_shift(640, other) == pytest.approx(calculate_shift(640, 256, 1024, 0.3, 2.0), abs=1e-12)


@pytest.mark.parametrize("steps", [4, 28])
@pytest.mark.parametrize("variant", ["sde", "cps"])
def test_on_fluxs_shifted_schedule_the_steps_are_the_independent_float64_gaussians(steps, variant):
    """The kernel's schedule is FluxPipeline's (linspace(1, 1/n, n) shifted by mu), and every step's
    Gaussian is the float64 formula on those sigmas (its log-density too)."""
    from lightning_sdrl.functional.flow_schedule import flux_sigmas, resolution_shift
    from lightning_sdrl.functional.gaussian import gaussian_log_prob
    from tests.functional.test_flow_sde import reference_cps, reference_log_prob, reference_sde

    mu = resolution_shift(1024, flux_scheduler().config)  # a 1024x1024 image: 64 x 64 packed tokens / 4
    kernel = FlowSDEStep(flux_scheduler(), variant=variant, mu=mu)
    timesteps = kernel.set_timesteps(steps)
    pipeline = flux_scheduler()
    pipeline.set_timesteps(sigmas=flux_sigmas(steps).tolist(), mu=mu)  # what FluxPipeline passes
    torch.testing.assert_close(timesteps, pipeline.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(kernel.scheduler.sigmas, pipeline.sigmas, rtol=0, atol=0)
    unshifted = torch.tensor(flux_sigmas(steps), dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + 1 / unshifted - 1)
    torch.testing.assert_close(kernel.scheduler.sigmas[:-1].double(), shifted, rtol=0, atol=1e-6)
    reference = reference_sde if variant == "sde" else reference_cps
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=generator)
    for i, t in enumerate(timesteps):
        v = torch.randn(x.shape, generator=generator)
        dist = kernel.distribution(v, t, x, 0.7)
        mean, std = reference(kernel.scheduler, i, x, v, 0.7)
        torch.testing.assert_close(dist.mean.double(), mean, atol=2e-6, rtol=0)
        torch.testing.assert_close(dist.std.double().flatten()[0], torch.tensor(std, dtype=torch.float64))
        if not kernel.is_stochastic(i, 0.7):
            assert variant == "cps" and i == steps - 1 and std == 0  # CPS's step to sigma 0
            break
        prev, log_prob = sample_step(dist, x.dtype, generator)
        torch.testing.assert_close(log_prob.double(), reference_log_prob(prev, mean, std), atol=1e-5, rtol=0)
        assert torch.allclose(gaussian_log_prob(prev, dist.mean, dist.std), log_prob)
        x = prev


def test_mu_goes_with_dynamic_shifting_only():
    with pytest.raises(ValueError, match=r"pass mu=resolution_shift\(image_seq_len, scheduler.config\)"):
        FlowSDEStep(flux_scheduler())
    with pytest.raises(ValueError, match=r"mu=0.8 is read only by a scheduler with use_dynamic_shifting=True"):
        FlowSDEStep(sd3_scheduler(), mu=0.8)
    assert repr(FlowSDEStep(flux_scheduler(), mu=0.63)) == "FlowSDEStep(variant='sde', mu=0.63)"
