"""FLUX.1 as a flow-matching policy, checked against diffusers' FluxPipeline."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel

from lightning_sdrl.functional.flow_schedule import resolution_shift
from lightning_sdrl.policies.architectures import ARCHITECTURES, flux_components
from lightning_sdrl.policies.flux import (
    FLOW_GRPO_FLUX_LORA_TARGET_MODULES,
    FluxPolicy,
    FluxPretrainedPolicy,
    RandomFluxPolicy,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from lightning_sdrl.policies.flux_components import FluxComponents
from lightning_sdrl.policies.lora import LORA_WEIGHTS_FILE, LoRASettings
from tests.conftest import randomize_lora

PROMPTS = ["a photo of a cat", "a red dog", "7"]
T5_LENGTH = 12  # short T5 prompts keep the tiny model fast; the policy must pass it on


def tiny() -> FluxComponents:
    return flux_components("flux-tiny", seed=0)


def policy_over(components: FluxComponents, lora: LoRASettings | None = None) -> FluxPolicy:
    return FluxPolicy(components, lora=lora, max_sequence_length=T5_LENGTH)


def call_transformer(transformer, sample, timesteps, conditions, guidance):
    """The transformer as FluxPipeline calls it: packed latents, sigma times, position ids."""
    batch, _, height, width = sample.shape
    hidden = conditions["encoder_hidden_states"]
    with torch.no_grad():
        output = transformer(
            hidden_states=pack_latents(sample),
            timestep=timesteps / 1000,
            guidance=torch.full((batch,), guidance),
            pooled_projections=conditions["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3),
            img_ids=latent_image_ids(height, width),
        ).sample
    return unpack_latents(output, height, width)


def random_inputs(policy: FluxPolicy, batch: int):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(batch, *policy.sample_shape, generator=generator)
    timesteps = policy.set_num_steps(5)[torch.arange(batch) % 5]
    return sample, timesteps


def test_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 4, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(pack_latents(latents), 8, 6), latents, rtol=0, atol=0)
    expected = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(8, 6), expected, rtol=0, atol=0)


def test_encode_prompts_is_the_pipelines_encode_prompt():
    components = tiny()
    conditions = policy_over(components).encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = components.pipeline().encode_prompt(
            PROMPTS, prompt_2=None, device="cpu", max_sequence_length=T5_LENGTH
        )
    torch.testing.assert_close(conditions["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditions["pooled_projections"], pooled, rtol=0, atol=0)
    assert embeds.shape == (3, T5_LENGTH, 32) and pooled.shape == (3, 16) and not text_ids.any()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_sampling_with_tiny_noise_is_the_pipelines_euler_ode_on_its_shifted_schedule(guidance_scale):
    components = tiny()
    policy = policy_over(components)
    assert policy.kernel.mu == pytest.approx(resolution_shift(16, components.scheduler.config))  # 4 x 4 tokens
    generator = torch.Generator().manual_seed(0)
    trajectory = policy.sample(PROMPTS, num_steps=6, eta=1e-6, guidance_scale=guidance_scale, generator=generator)
    pipe = components.pipeline()
    common = {
        "prompt": PROMPTS,
        "latents": pack_latents(trajectory.latents[:, 0]),
        "num_inference_steps": 6,
        "guidance_scale": guidance_scale,
        "max_sequence_length": T5_LENGTH,
        "height": 16,
        "width": 16,
    }
    latents = unpack_latents(pipe(**common, output_type="latent").images, 8, 8)
    images = pipe(**common, output_type="pt").images
    assert (latents - trajectory.latents[:, 0]).abs().max() > 0.1  # the sampler moved
    torch.testing.assert_close(trajectory.latents[:, -1], latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(trajectory.images, images, rtol=0, atol=1e-4)
    torch.testing.assert_close(trajectory.timesteps[0], pipe.scheduler.timesteps)  # the pipeline's shifted times


def test_the_guidance_embedding_is_one_call_and_changes_the_output():
    policy = policy_over(tiny(), lora=LoRASettings(rank=2))
    randomize_lora(policy.transformer)
    sample, timesteps = random_inputs(policy, 3)
    conditions = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        guided = policy.guided_prediction(sample, timesteps, conditions, guidance_scale=3.5)
        plain = policy.guided_prediction(sample, timesteps, conditions, guidance_scale=1.0)
    torch.testing.assert_close(guided, call_transformer(policy.transformer, sample, timesteps, conditions, 3.5))
    assert (guided - plain).abs().max() > 1e-4  # the embedding is read


def test_trajectory_shapes_and_stored_steps_rescore_to_ratio_one():
    policy = policy_over(tiny(), lora=LoRASettings(rank=2, target_modules=FLOW_GRPO_FLUX_LORA_TARGET_MODULES))
    randomize_lora(policy.transformer)
    trajectory = policy.sample(PROMPTS, num_steps=4, eta=0.7, guidance_scale=3.5, generator=torch.Generator())
    assert trajectory.latents.shape == (3, 5, 4, 8, 8) and trajectory.images.shape == (3, 3, 16, 16)
    for step in (torch.full((3,), 0), torch.full((3,), 3), torch.tensor([0, 2, 3])):
        with torch.no_grad():
            log_prob, _ = policy.step_log_prob(trajectory, step, eta=0.7, guidance_scale=3.5)
        stored = trajectory.log_probs[torch.arange(3), step]
        torch.testing.assert_close((log_prob - stored).exp(), torch.ones(3), rtol=0, atol=1e-6)


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="height=18; expected a positive multiple of 4"):
        FluxPolicy(tiny(), height=18)
    with pytest.raises(ValueError, match="max_sequence_length=600"):
        FluxPolicy(tiny(), max_sequence_length=600)


# ----------------------------------------------------------------------------- loading and trained weights
@pytest.fixture
def saved(tmp_path):
    components = tiny()
    return components, components.save_pretrained(tmp_path / "flux")


def test_from_pretrained_of_a_saved_model_computes_the_same(saved):
    components, path = saved
    loaded = FluxPretrainedPolicy(str(path), local_files_only=True, lora=None, max_sequence_length=T5_LENGTH)
    settings = dict(num_steps=3, eta=0.7, guidance_scale=3.5)
    a = policy_over(components).sample(PROMPTS, **settings, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(PROMPTS, **settings, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0)


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_2"])
def test_an_empty_tokenizer_is_refused(saved, subfolder):
    _, path = saved
    shutil.rmtree(path / subfolder)
    (path / subfolder).mkdir()
    with pytest.raises(OSError, match=f"{subfolder}' has no vocabulary"):
        FluxPretrainedPolicy(str(path), local_files_only=True)


def test_missing_directories_are_clear_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FluxPretrainedPolicy(str(tmp_path / "nowhere"))
    shutil.rmtree(path / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"no \['text_encoder_2'\] subfolder"):
        FluxPretrainedPolicy(str(path))


@pytest.mark.parametrize("targets", [None, FLOW_GRPO_FLUX_LORA_TARGET_MODULES])
def test_lora_export_loads_into_the_flux_pipeline_and_back(tmp_path, targets):
    lora = LoRASettings(rank=2, alpha=4) if targets is None else LoRASettings(rank=2, target_modules=targets)
    trained = policy_over(tiny(), lora=lora)
    randomize_lora(trained.transformer)
    trained.save_trained(tmp_path)
    assert (tmp_path / LORA_WEIGHTS_FILE).is_file()
    sample, timesteps = random_inputs(trained, 3)
    conditions = trained.encode_prompts(PROMPTS)
    with torch.no_grad():
        expected = trained.denoise(sample, timesteps, conditions)
    assert (expected - call_transformer(tiny().transformer, sample, timesteps, conditions, 1.0)).abs().max() > 1e-3
    pipe = tiny().pipeline()
    pipe.load_lora_weights(tmp_path)
    loaded = call_transformer(pipe.transformer, sample, timesteps, conditions, 1.0)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)
    fresh = policy_over(tiny(), lora=lora)
    fresh.load_trained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise(sample, timesteps, conditions), expected, rtol=0, atol=0)


def test_full_fine_tuning_saves_a_loadable_transformer(tmp_path):
    trained = policy_over(tiny(), lora=None)
    with torch.no_grad():
        for parameter in trained.transformer.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    trained.save_trained(tmp_path)
    sample, timesteps = random_inputs(trained, 2)
    conditions = trained.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        expected = trained.denoise(sample, timesteps, conditions)
    saved = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    torch.testing.assert_close(call_transformer(saved, sample, timesteps, conditions, 1.0), expected)


# ----------------------------------------------------------------------------- named architectures
def test_flux_dev_has_the_published_size():
    with torch.device("meta"):
        components = flux_components("flux-dev")
    # FLUX.1-dev's model card: "a 12 billion parameter rectified flow transformer"; diffusers counts 11,901,408,320
    assert sum(p.numel() for p in components.transformer.parameters()) == 11_901_408_320
    assert components.transformer.config.guidance_embeds
    assert (components.vae.config.scaling_factor, components.vae.config.shift_factor) == (0.3611, 0.1159)
    assert components.scheduler.config.use_dynamic_shifting
    assert ARCHITECTURES["flux-dev"].components is FluxComponents
    with pytest.raises(ValueError, match=r"builds FluxComponents.*use RandomFluxPolicy\('flux-tiny'\)"):
        from lightning_sdrl.policies import RandomStableDiffusion3Policy

        RandomStableDiffusion3Policy("flux-tiny")
    assert RandomFluxPolicy("flux-tiny").sample_shape == (4, 8, 8)


def test_without_t5_the_prompt_embeddings_are_zeros_and_t5_is_never_read(saved):
    components, path = saved
    for file in (path / "text_encoder_2").iterdir():
        file.unlink()  # a broken T5 must not matter
    loaded = FluxPretrainedPolicy(str(path), use_t5=False, lora=None, max_sequence_length=T5_LENGTH)
    assert loaded.text_encoder_2 is None and loaded.tokenizer_2 is None
    conditions = loaded.encode_prompts(PROMPTS)
    assert conditions["encoder_hidden_states"].shape == (3, T5_LENGTH, 32)
    assert not conditions["encoder_hidden_states"].any()
    torch.testing.assert_close(
        conditions["pooled_projections"],
        policy_over(components).encode_prompts(PROMPTS)["pooled_projections"],
        rtol=0,
        atol=0,
    )
    trajectory = loaded.sample(PROMPTS, num_steps=4, eta=1e-6, guidance_scale=3.5, generator=torch.Generator())
    pipe = components.pipeline()  # given the embeddings, the pipeline never encodes
    latents = pipe(
        prompt_embeds=conditions["encoder_hidden_states"],
        pooled_prompt_embeds=conditions["pooled_projections"],
        latents=pack_latents(trajectory.latents[:, 0]),
        num_inference_steps=4,
        guidance_scale=3.5,
        height=16,
        width=16,
        output_type="latent",
    ).images
    torch.testing.assert_close(trajectory.latents[:, -1], unpack_latents(latents, 8, 8), rtol=0, atol=1e-4)
    with pytest.raises(OSError, match="T5EncoderModel"):
        FluxPretrainedPolicy(str(path), use_t5=True)
    with pytest.raises(ValueError, match="text_encoder_2 without tokenizer_2"):
        FluxComponents(**{**components.__dict__, "tokenizer_2": None})


def test_without_the_guidance_embedding_guidance_is_classifier_free_against_the_empty_prompt():
    """FLUX.1-schnell's transformer has no guidance embedding: guidance 1 is the pipeline's sampler,
    any other value the two-branch classifier-free combination with the empty prompt's embeddings."""
    components = tiny()
    torch.manual_seed(1)
    config = {**components.transformer.config, "guidance_embeds": False}
    components.transformer = FluxTransformer2DModel.from_config(config)
    policy = policy_over(components)
    assert not policy.embeds_guidance
    trajectory = policy.sample(PROMPTS, num_steps=4, eta=1e-6, guidance_scale=1.0, generator=torch.Generator())
    common = dict(prompt=PROMPTS, num_inference_steps=4, max_sequence_length=T5_LENGTH, height=16, width=16)
    latents = components.pipeline()(**common, latents=pack_latents(trajectory.latents[:, 0]), output_type="latent")
    torch.testing.assert_close(trajectory.latents[:, -1], unpack_latents(latents.images, 8, 8), rtol=0, atol=1e-4)
    sample, timesteps = random_inputs(policy, 3)
    conditions, null = policy.encode_prompts(PROMPTS), policy.null_condition(3)

    def plain(c):
        batch, _, height, width = sample.shape
        with torch.no_grad():
            output = components.transformer(
                hidden_states=pack_latents(sample),
                timestep=timesteps / 1000,
                pooled_projections=c["pooled_projections"],
                encoder_hidden_states=c["encoder_hidden_states"],
                txt_ids=torch.zeros(T5_LENGTH, 3),
                img_ids=latent_image_ids(height, width),
            ).sample
        return unpack_latents(output, height, width)

    with torch.no_grad():
        guided = policy.guided_prediction(sample, timesteps, conditions, 3.0)
    cond, uncond = plain(conditions), plain(null)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert (cond - uncond).abs().max() > 1e-4


def test_bf16_weights_train_a_float32_lora_and_a_compiled_transformer_samples_as_the_eager_one(monkeypatch):
    from lightning_sdrl.policies import base as policy_base

    half = RandomFluxPolicy(lora=LoRASettings(rank=2), torch_dtype="bfloat16", max_sequence_length=T5_LENGTH)
    assert half.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.trainable_parameters())
    trajectory = half.sample(PROMPTS[:2], num_steps=2, eta=0.7, guidance_scale=3.5, generator=torch.Generator())
    assert torch.isfinite(trajectory.log_probs).all()

    monkeypatch.setattr(
        policy_base,
        "compiled_module_call",
        lambda mode: torch.compile(policy_base._call_module, backend="aot_eager", dynamic=False),
    )
    torch._dynamo.reset()
    eager, compiled = (
        FluxPolicy(tiny(), lora=LoRASettings(rank=2), max_sequence_length=T5_LENGTH, compile=flag)
        for flag in (False, True)
    )
    for policy in (eager, compiled):
        randomize_lora(policy.transformer)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    runs = [
        p.sample(PROMPTS[:2], num_steps=3, eta=0.7, guidance_scale=3.5, generator=torch.Generator().manual_seed(0))
        for p in (eager, compiled)
    ]
    torch.testing.assert_close(runs[1].latents, runs[0].latents, rtol=0, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the compiled call did run
