"""Stable Diffusion XL as a DDIM policy, checked against diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from lightning_sdrl.policies import (
    LoRASettings,
    RandomStableDiffusion3Policy,
    RandomStableDiffusionXLPolicy,
    SDXLComponents,
    SDXLPolicy,
    StableDiffusionXLPolicy,
)
from lightning_sdrl.policies.architectures import ARCHITECTURES, sdxl_components
from lightning_sdrl.policies.lora import LORA_WEIGHTS_FILE
from tests.conftest import randomize_lora

PROMPTS = ["a photo of a cat", "a red dog", "7"]


def tiny(force_zeros: bool = True) -> SDXLComponents:
    return dataclasses.replace(sdxl_components("sdxl-tiny", seed=0), force_zeros_for_empty_prompt=force_zeros)


def call_unet(unet, sample, timesteps, conditions):
    """The UNet as the pipeline calls it: the added conditioning under ``added_cond_kwargs``."""
    added = {"text_embeds": conditions["text_embeds"], "time_ids": conditions["time_ids"]}
    with torch.no_grad():
        return unet(
            sample, timesteps, encoder_hidden_states=conditions["encoder_hidden_states"], added_cond_kwargs=added
        ).sample


def random_inputs(policy: SDXLPolicy, batch: int):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(batch, *policy.sample_shape, generator=generator)
    timesteps = policy.set_num_steps(5)[torch.arange(batch) % 5]
    return sample, timesteps


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("force_zeros", [True, False])
def test_encode_prompts_is_the_pipelines_encode_prompt(force_zeros):
    components = tiny(force_zeros)
    policy = SDXLPolicy(components)
    conditions, null = policy.encode_prompts(PROMPTS), policy.null_condition(len(PROMPTS))
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = components.pipeline().encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True
        )
    torch.testing.assert_close(conditions["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditions["text_embeds"], pooled, rtol=0, atol=0)
    # the empty prompt once vs three times in a batch: equal up to float rounding
    torch.testing.assert_close(null["encoder_hidden_states"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(null["text_embeds"], negative_pooled, rtol=0, atol=1e-6)
    assert embeds.shape == (3, 16, 16 + 16) and pooled.shape == (3, 16)
    assert bool((negative == 0).all()) is force_zeros  # SDXL base: zero unconditional embeddings
    expected_ids = torch.tensor([16.0, 16, 0, 0, 16, 16]).expand(3, 6)
    torch.testing.assert_close(conditions["time_ids"], expected_ids)
    torch.testing.assert_close(null["time_ids"], expected_ids)


def test_guided_prediction_is_two_unet_calls_combined():
    policy = SDXLPolicy(tiny(), lora=LoRASettings(rank=2))
    randomize_lora(policy.unet)
    sample, timesteps = random_inputs(policy, 3)
    conditions, null = policy.encode_prompts(PROMPTS), policy.null_condition(3)
    with torch.no_grad():
        guided = policy.guided_prediction(sample, timesteps, conditions, guidance_scale=5.0)
    cond, uncond = (call_unet(policy.unet, sample, timesteps, c) for c in (conditions, null))
    torch.testing.assert_close(guided, uncond + 5.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert (cond - uncond).abs().max() > 1e-3  # the prompt matters, so the test can fail


def test_time_ids_follow_the_image_size_and_bad_sizes_are_errors():
    policy = SDXLPolicy(tiny(), height=32, width=16)
    assert policy.sample_shape == (4, 16, 8)
    assert policy.encode_prompts(["a"])["time_ids"].tolist() == [[32.0, 16.0, 0.0, 0.0, 32.0, 16.0]]
    with pytest.raises(ValueError, match="height=18; expected a positive multiple of 4"):
        SDXLPolicy(tiny(), height=18)
    with pytest.raises(ValueError, match="prompts is empty"):
        policy.encode_prompts([])


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_deterministic_sampling_is_the_pipelines(guidance_scale):
    components = tiny()
    policy = SDXLPolicy(components)
    generator = torch.Generator().manual_seed(0)
    trajectory = policy.sample(PROMPTS, num_steps=5, eta=0.0, guidance_scale=guidance_scale, generator=generator)
    pipe = components.pipeline()
    common = {"prompt": PROMPTS, "latents": trajectory.latents[:, 0], "num_inference_steps": 5}
    common["guidance_scale"] = guidance_scale
    latents = pipe(**common, output_type="latent").images
    images = pipe(**common, output_type="pt").images
    assert (latents - trajectory.latents[:, 0]).abs().max() > 0.1  # the sampler moved
    torch.testing.assert_close(trajectory.latents[:, -1], latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(trajectory.images, images, rtol=0, atol=1e-4)


def test_trajectory_shapes_and_stored_steps_rescore_to_ratio_one():
    policy = SDXLPolicy(tiny(), lora=LoRASettings(rank=2))
    randomize_lora(policy.unet)
    trajectory = policy.sample(PROMPTS, num_steps=4, eta=1.0, guidance_scale=4.0, generator=torch.Generator())
    assert trajectory.latents.shape == (3, 5, 4, 8, 8)
    assert trajectory.images.shape == (3, 3, 16, 16)
    assert 0 <= trajectory.images.min() and trajectory.images.max() <= 1
    for step in (torch.full((3,), 0), torch.full((3,), 3), torch.tensor([0, 2, 3])):
        with torch.no_grad():
            log_prob, _ = policy.step_log_prob(trajectory, step, eta=1.0, guidance_scale=4.0)
        stored = trajectory.log_probs[torch.arange(3), step]
        torch.testing.assert_close((log_prob - stored).exp(), torch.ones(3), rtol=0, atol=1e-6)


def test_decode_divides_by_the_scaling_factor_and_float16_keeps_the_vae_in_float32():
    components = tiny()
    policy = SDXLPolicy(components)
    latents = torch.randn(2, *policy.sample_shape)
    with torch.no_grad():
        expected = components.vae.decode(latents / components.vae.config.scaling_factor).sample
        torch.testing.assert_close(policy.decode(latents), (expected / 2 + 0.5).clamp(0, 1))
    half = RandomStableDiffusionXLPolicy(lora=LoRASettings(rank=2), torch_dtype="float16")
    assert half.vae.dtype == torch.float32 and half.text_encoder_2.dtype == torch.float16  # force_upcast
    assert half.dtype == torch.float16 and all(p.dtype == torch.float32 for p in half.trainable_parameters())


def test_gradients_reach_only_the_lora_weights():
    policy = SDXLPolicy(tiny(), lora=LoRASettings(rank=2))
    randomize_lora(policy.unet)
    sample, timesteps = random_inputs(policy, 2)
    policy.guided_prediction(sample, timesteps, policy.encode_prompts(PROMPTS[:2]), 3.0).square().mean().backward()
    trained = {name for name, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in name for name in trained)


# ----------------------------------------------------------------------------- loading
@pytest.fixture
def saved(tmp_path):
    components = tiny()
    return components, components.save_pretrained(tmp_path / "sdxl")


def test_from_pretrained_of_a_saved_model_computes_the_same(saved):
    components, path = saved
    loaded = StableDiffusionXLPolicy(str(path), local_files_only=True, lora=None)
    original = SDXLPolicy(components)
    a = original.sample(PROMPTS, num_steps=3, eta=1.0, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(PROMPTS, num_steps=3, eta=1.0, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0)
    assert loaded.force_zeros_for_empty_prompt and type(loaded.scheduler).__name__ == "DDIMScheduler"


def test_the_pipeline_loads_the_saved_directory_and_its_empty_prompt_setting_survives(saved, tmp_path):
    components, path = saved
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, add_watermarker=False)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, got = getattr(components, name).state_dict(), getattr(pipe, name).state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name
    other = tiny(force_zeros=False).save_pretrained(tmp_path / "no-zeros")
    assert json.loads((other / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False
    loaded = StableDiffusionXLPolicy(str(other), lora=None)
    assert not loaded.force_zeros_for_empty_prompt
    assert loaded.null_condition(1)["encoder_hidden_states"].abs().sum() > 0  # the empty prompt's embeddings


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_2"])
def test_an_empty_tokenizer_is_refused(saved, subfolder):
    _, path = saved
    shutil.rmtree(path / subfolder)
    (path / subfolder).mkdir()
    with pytest.raises(OSError, match=f"{subfolder}' has no vocabulary"):
        StableDiffusionXLPolicy(str(path), local_files_only=True)


def test_missing_directories_are_clear_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionXLPolicy(str(tmp_path / "nowhere"))
    shutil.rmtree(path / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"no \['text_encoder_2'\] subfolder"):
        StableDiffusionXLPolicy(str(path))


# ----------------------------------------------------------------------------- trained weights
def test_lora_export_loads_into_the_diffusers_pipeline_and_back(tmp_path):
    lora = LoRASettings(rank=2, alpha=4)
    trained = SDXLPolicy(tiny(), lora=lora)
    randomize_lora(trained.unet)
    trained.save_trained(tmp_path)
    assert (tmp_path / LORA_WEIGHTS_FILE).is_file()
    sample, timesteps = random_inputs(trained, 3)
    conditions = trained.encode_prompts(PROMPTS)
    with torch.no_grad():
        expected = trained.denoise(sample, timesteps, conditions)
    assert (expected - call_unet(tiny().unet, sample, timesteps, conditions)).abs().max() > 1e-3
    pipe = tiny().pipeline()
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(call_unet(pipe.unet, sample, timesteps, conditions), expected, rtol=1e-5, atol=1e-6)
    fresh = SDXLPolicy(tiny(), lora=lora)
    fresh.load_trained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise(sample, timesteps, conditions), expected, rtol=0, atol=0)


def test_full_fine_tuning_saves_a_loadable_unet(tmp_path):
    trained = SDXLPolicy(tiny(), lora=None)
    with torch.no_grad():
        for parameter in trained.unet.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    trained.save_trained(tmp_path)
    sample, timesteps = random_inputs(trained, 2)
    conditions = trained.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        expected = trained.denoise(sample, timesteps, conditions)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(call_unet(unet, sample, timesteps, conditions), expected)
    fresh = SDXLPolicy(tiny(), lora=None)
    fresh.load_trained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise(sample, timesteps, conditions), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- named architectures
def test_sdxl_has_the_published_size():
    with torch.device("meta"):
        components = sdxl_components("sdxl")
    count = {name: sum(p.numel() for p in getattr(components, name).parameters()) for name in ("unet", "vae")}
    # SDXL base 1.0's UNet: 2.57B (diffusers counts 2,567,463,684); its VAE 83.65M
    assert count == {"unet": 2_567_463_684, "vae": 83_653_863}
    assert sum(p.numel() for p in components.text_encoder.parameters()) == 123_060_480  # CLIP ViT-L/14
    assert sum(p.numel() for p in components.text_encoder_2.parameters()) == 694_659_840  # OpenCLIP bigG/14
    assert components.vae.config.scaling_factor == 0.13025 and components.vae.config.force_upcast
    assert len(components.tokenizer) == 49408 and components.tokenizer_2.pad_token == "!"
    assert ARCHITECTURES["sdxl"].components is SDXLComponents


def test_an_architecture_of_another_kind_names_the_right_class():
    with pytest.raises(ValueError, match=r"builds SDXLComponents.*use RandomStableDiffusionXLPolicy\('sdxl-tiny'\)"):
        RandomStableDiffusion3Policy("sdxl-tiny")
    with pytest.raises(ValueError, match=r"builds SD3Components.*use RandomStableDiffusion3Policy\('sd3-tiny'\)"):
        RandomStableDiffusionXLPolicy("sd3-tiny")


def test_a_compiled_unet_samples_and_scores_as_the_eager_one(monkeypatch):
    """``compile=True`` passes SDXL's added conditioning through the compiled call (aot_eager: same kernels)."""
    from lightning_sdrl.policies import base as policy_base

    monkeypatch.setattr(
        policy_base,
        "compiled_module_call",
        lambda mode: torch.compile(policy_base._call_module, backend="aot_eager", dynamic=False),
    )
    torch._dynamo.reset()
    eager, compiled = (SDXLPolicy(tiny(), lora=LoRASettings(rank=2), compile=flag) for flag in (False, True))
    for policy in (eager, compiled):
        randomize_lora(policy.unet)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    runs = [
        p.sample(PROMPTS[:2], num_steps=3, eta=1.0, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        for p in (eager, compiled)
    ]
    torch.testing.assert_close(runs[1].latents, runs[0].latents, rtol=0, atol=1e-6)
    steps = torch.tensor([[0, 2], [1, 0]])
    scores = [p.step_log_prob(run, steps, 1.0, 3.0)[0] for p, run in zip((eager, compiled), runs, strict=True)]
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=1e-6)
    assert compiled.compile_mode == "default"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the compiled call did run
