"""DiffusionPolicy.generate: final samples with the kernel (= sample()) or diffusers' ODE solvers."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from lightning_sdrl.policies import (
    Conditioning,
    LoRASettings,
    RandomStableDiffusion3Policy,
    Samples,
    SD3Policy,
    TextToImagePolicy,
    solver_scheduler,
)
from lightning_sdrl.policies.solvers import denoiser_timesteps
from tests.conftest import randomize_lora

PROMPTS = ["a cat", "a red dog"]
T5_LENGTH = 12
SOLVERS = {"dpmsolver++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def sd3_policy(lora: LoRASettings | None = LoRASettings(rank=2), sampler: str = "sde") -> SD3Policy:  # noqa: B008
    policy = RandomStableDiffusion3Policy("sd3-tiny", lora=lora, max_sequence_length=T5_LENGTH, sampler=sampler)
    if lora is not None:
        randomize_lora(policy.transformer)
    return policy


def initial_noise(policy, batch: int = len(PROMPTS)) -> torch.Tensor:
    """The x_T that generate / sample draw first from Generator().manual_seed(0)."""
    generator = torch.Generator().manual_seed(0)
    return randn_tensor((batch, *policy.sample_shape), generator=generator, dtype=torch.float32)


# ----------------------------------------------------------------------------- the kernel: sample()'s final step
@pytest.mark.parametrize(
    ("model", "eta", "guidance_scale"),
    [("ddim", 0.0, 1.0), ("ddim", 1.0, 3.0), ("sd3", 0.0, 3.0), ("sd3", 0.7, 1.0), ("cps", 0.5, 2.0)],
)
def test_the_kernel_gives_exactly_the_final_samples_of_sample(model, eta, guidance_scale, tiny_policy):
    if model == "ddim":
        policy = tiny_policy
        randomize_lora(policy.unet)
    else:
        policy = sd3_policy(sampler="sde" if model == "sd3" else "cps")
    common = {"num_steps": 3, "eta": eta, "guidance_scale": guidance_scale, "prompt_ids": torch.tensor([7, 3])}
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0), **common)
    samples = policy.generate(PROMPTS, generator=torch.Generator().manual_seed(0), solver="kernel", **common)
    assert isinstance(samples, Samples) and len(samples) == 2
    assert torch.equal(samples.samples, trajectory.latents[:, -1])
    assert torch.equal(samples.images, trajectory.images)
    assert torch.equal(samples.prompt_ids, trajectory.prompt_ids) and samples.prompt_ids.tolist() == [7, 3]
    assert samples.prompts == PROMPTS
    for name in trajectory.conditions:
        assert torch.equal(samples.conditions[name], trajectory.conditions[name])
    assert (samples.samples - trajectory.latents[:, 0]).abs().max() > 0.1  # the sampler moved


# ----------------------------------------------------------------------------- ODE solvers, DDPM family
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_solvers_equal_the_stable_diffusion_pipeline_with_that_scheduler(solver, guidance_scale, tiny_components):
    policy = TextToImagePolicy(tiny_components, lora=LoRASettings(rank=4))
    randomize_lora(policy.unet)
    samples = policy.generate(
        PROMPTS, num_steps=5, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0), solver=solver
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_components.vae,
        text_encoder=tiny_components.text_encoder,
        tokenizer=tiny_components.tokenizer,
        unet=policy.unet,  # with the LoRA adapters
        scheduler=SOLVERS[solver].from_config(policy.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    common = {
        "prompt_embeds": policy.encode_prompts(PROMPTS)["encoder_hidden_states"],
        "negative_prompt_embeds": policy.null_condition(2)["encoder_hidden_states"],
        "latents": initial_noise(policy),
        "num_inference_steps": 5,
        "guidance_scale": guidance_scale,
    }
    latents = pipe(**common, output_type="latent").images
    images = pipe(**common, output_type="pt").images
    assert (latents - common["latents"]).abs().max() > 0.1  # the solver moved
    assert torch.equal(samples.samples, latents)
    assert torch.equal(samples.images, images)


def test_a_solver_keeps_the_noise_schedule_and_prediction_type(tiny_components):
    config = tiny_components.scheduler.config
    for name in SOLVERS:
        solver = solver_scheduler(tiny_components.scheduler, name)
        assert isinstance(solver, SOLVERS[name])
        assert solver.config.prediction_type == config.prediction_type
        assert (solver.config.beta_schedule, solver.config.beta_start, solver.config.beta_end) == (
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
        )
        assert solver.config.steps_offset == config.steps_offset
    assert solver_scheduler(tiny_components.scheduler, "dpmsolver++").config.algorithm_type == "dpmsolver++"


# ----------------------------------------------------------------------------- ODE solvers, flow matching
class ExactTimesteps:
    """A solver scheduler whose ``timesteps`` are the exact ``1000 sigma`` the policy hands the transformer.

    diffusers' flow solvers truncate their timesteps to integers; with this, the pipeline calls the
    transformer as the policy does, and the two must agree exactly.
    """

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        self.timesteps = denoiser_timesteps(self)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_flow_solvers_equal_the_sd3_pipeline_at_exact_timesteps(solver, guidance_scale):
    policy = sd3_policy()
    samples = policy.generate(
        PROMPTS, num_steps=6, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0), solver=solver
    )
    reference = solver_scheduler(policy.scheduler, solver)
    exact = type("Exact", (ExactTimesteps, type(reference)), {}).from_config(reference.config)
    pipe = StableDiffusion3Pipeline(**{**vars(policy.components()), "scheduler": exact})
    pipe.set_progress_bar_config(disable=True)
    conditions, null = policy.encode_prompts(PROMPTS), policy.null_condition(2)
    common = {
        "prompt_embeds": conditions["encoder_hidden_states"],
        "pooled_prompt_embeds": conditions["pooled_projections"],
        "negative_prompt_embeds": null["encoder_hidden_states"],
        "negative_pooled_prompt_embeds": null["pooled_projections"],
        "latents": initial_noise(policy),
        "num_inference_steps": 6,
        "guidance_scale": guidance_scale,
    }
    latents = pipe(**common, output_type="latent").images
    images = pipe(**common, output_type="pt").images
    assert (latents - common["latents"]).abs().max() > 0.1
    assert torch.equal(samples.samples, latents)
    assert torch.equal(samples.images, images)


def test_the_transformer_gets_1000_sigma_as_float_timesteps():
    policy = sd3_policy()
    seen = []
    denoise = policy.denoise

    def recording(sample, timesteps, conditions):
        seen.append(timesteps)
        return denoise(sample, timesteps, conditions)

    policy.denoise = recording
    policy.generate(["a"], num_steps=4, solver="dpmsolver++")
    solver = solver_scheduler(policy.scheduler, "dpmsolver++")
    solver.set_timesteps(4)
    expected = solver.sigmas[:-1] * 1000  # the flow scheduler's units: FlowMatchEulerDiscreteScheduler.timesteps
    assert torch.equal(torch.stack([t[0] for t in seen]), expected)
    assert seen[0].dtype == torch.float32 and expected[0] > 999 and not torch.equal(expected, expected.floor())


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_flow_solvers_at_20_steps_are_close_to_the_200_step_kernel_ode(solver):
    # Measured on this CPU (sd3-tiny, random LoRA, guidance 3, latents of max |x| 5.2), max |difference|
    # from the 200-step kernel ODE: latents 0.021 (dpmsolver++, unipc) at 20 steps, 0.049 for the kernel's
    # own Euler ODE at 20 steps; images 0.003. (200 vs 400 kernel steps: 0.0035.) A random transformer's
    # velocity oscillates in t (sinusoidal timestep embedding), so neither solver shows its full order here.
    policy = sd3_policy()
    common = {"guidance_scale": 3.0}
    ode = policy.generate(PROMPTS, num_steps=200, generator=torch.Generator().manual_seed(0), **common)
    euler = policy.generate(PROMPTS, num_steps=20, generator=torch.Generator().manual_seed(0), **common)
    fast = policy.generate(PROMPTS, num_steps=20, generator=torch.Generator().manual_seed(0), solver=solver, **common)
    error = (fast.samples - ode.samples).abs().max()
    assert error < 0.04
    assert error < 0.75 * (euler.samples - ode.samples).abs().max()  # more accurate than Euler at equal cost
    torch.testing.assert_close(fast.images, ode.images, rtol=0, atol=0.01)


# ----------------------------------------------------------------------------- errors
def test_eta_with_an_ode_solver_is_an_error(tiny_policy):
    with pytest.raises(ValueError, match=r"eta=0.5 with solver='unipc'.*deterministic.*eta=0"):
        tiny_policy.generate(["a"], eta=0.5, solver="unipc")


def test_an_unknown_solver_is_an_error(tiny_policy):
    with pytest.raises(ValueError, match=r"solver='euler'; expected one of \['kernel', 'dpmsolver\+\+', 'unipc'\]"):
        tiny_policy.generate(["a"], solver="euler")
    with pytest.raises(ValueError, match=r"solver='kernel'; expected one of"):
        solver_scheduler(tiny_policy.scheduler, "kernel")


def test_dynamic_shifting_is_refused_with_the_fix():
    dynamic = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=True.*use_dynamic_shifting=False and a fixed shift"):
        solver_scheduler(dynamic, "dpmsolver++")
    policy = sd3_policy()
    policy.kernel.scheduler = dynamic  # FlowSDEStep refuses it too; a policy that got one anyway
    with pytest.raises(ValueError, match=r"use_dynamic_shifting"):
        policy.generate(["a"], solver="unipc")


def test_other_flow_schedule_options_and_other_schedulers_are_refused():
    with pytest.raises(ValueError, match=r"'use_karras_sigmas': True.*without them"):
        solver_scheduler(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), "unipc")
    with pytest.raises(ValueError, match=r"DDPM-family scheduler.*object: use solver='kernel'"):
        solver_scheduler(object(), "dpmsolver++")


def test_empty_prompts_and_zero_steps_are_errors(tiny_policy):
    with pytest.raises(ValueError, match="prompts is empty"):
        tiny_policy.generate([], solver="dpmsolver++")
    with pytest.raises(ValueError, match="num_steps=0"):
        tiny_policy.generate(["a"], num_steps=0, solver="dpmsolver++")
    with pytest.raises(ValueError, match="num_steps=0"):
        tiny_policy.generate(["a"], num_steps=0)


# ----------------------------------------------------------------------------- what forward-process RL reads
def test_parameterization_noise_level_and_training_timesteps(tiny_policy):
    flow = sd3_policy()
    assert tiny_policy.parameterization == "epsilon" and flow.parameterization == "flow"

    timesteps = tiny_policy.training_timesteps(4)
    trajectory = tiny_policy.sample(["a"], num_steps=4)
    assert torch.equal(timesteps, trajectory.timesteps[0]) and timesteps.dtype == torch.long
    timesteps[0] = -1  # a copy: the kernel's schedule is untouched
    assert tiny_policy.kernel.scheduler.timesteps[0] != -1
    levels = tiny_policy.noise_level(trajectory.timesteps[0])
    assert torch.equal(levels, tiny_policy.scheduler.alphas_cumprod[trajectory.timesteps[0]])

    flow_timesteps = flow.training_timesteps(3)
    assert torch.equal(flow_timesteps, flow.sample(["a"], num_steps=3, eta=0.0).timesteps[0])
    torch.testing.assert_close(flow.noise_level(flow_timesteps), flow.kernel.scheduler.sigmas[:-1])


# ----------------------------------------------------------------------------- the Samples container
def make_samples(prompts: list[str], offset: float = 0.0) -> Samples:
    batch = len(prompts)
    return Samples(
        samples=torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 4, 2, 2) + offset,
        conditions=Conditioning(encoder_hidden_states=torch.randn(batch, 3, 5)),
        prompt_ids=torch.arange(batch) + int(offset),
        prompts=prompts,
        images=torch.rand(batch, 3, 4, 4),
    )


def test_samples_select_and_cat_keep_rows_together():
    first, second = make_samples(["a", "b", "c"]), make_samples(["d"], offset=10.0)
    both = Samples.cat([first, second])
    assert len(both) == 4 and both.prompts == ["a", "b", "c", "d"]
    assert both.prompt_ids.tolist() == [0, 1, 2, 10]
    picked = both.select(torch.tensor([3, 1]))
    assert picked.prompts == ["d", "b"] and picked.prompt_ids.tolist() == [10, 1]
    assert torch.equal(picked.samples, both.samples[[3, 1]])
    assert torch.equal(picked.images, both.images[[3, 1]])
    assert torch.equal(picked.conditions["encoder_hidden_states"], both.conditions["encoder_hidden_states"][[3, 1]])


def test_samples_with_unequal_rows_and_an_empty_cat_are_errors():
    samples = make_samples(["a", "b"])
    with pytest.raises(ValueError, match=r"'prompts': 1.*same batch size"):
        Samples(samples.samples, samples.conditions, samples.prompt_ids, ["a"], samples.images)
    with pytest.raises(ValueError, match="empty list"):
        Samples.cat([])
