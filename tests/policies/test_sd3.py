"""Stable Diffusion 3 as a flow-matching policy, checked against diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import dataclasses
import shutil
from typing import get_args

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy, TextToImageComponents
from lightning_sdrl.policies.architectures import (
    ARCHITECTURES,
    FluxArchitectureName,
    SD3ArchitectureName,
    SDXLArchitectureName,
    TextToImageArchitectureName,
    sd3_components,
)
from lightning_sdrl.policies.flow_kernels import FlowSDEStep
from lightning_sdrl.policies.flux_components import FluxComponents
from lightning_sdrl.policies.lora import LORA_WEIGHTS_FILE
from lightning_sdrl.policies.sd3 import (
    FLOW_GRPO_LORA_TARGET_MODULES,
    RandomStableDiffusion3Policy,
    SD3Policy,
    StableDiffusion3Policy,
)
from lightning_sdrl.policies.sd3_components import SD3Components
from lightning_sdrl.policies.sdxl_components import SDXLComponents
from lightning_sdrl.policies.tokenizers import unigram_t5_tokenizer
from tests.conftest import randomize_lora

PROMPTS = ["a photo of a cat", "a red dog", "7"]
T5_LENGTH = 12  # short T5 prompts keep the tiny model fast; the policy must pass it on


def tiny(use_t5: bool = True) -> SD3Components:
    components = sd3_components("sd3-tiny", seed=0)
    return components if use_t5 else dataclasses.replace(components, text_encoder_3=None, tokenizer_3=None)


def policy_over(components: SD3Components, lora: LoRASettings | None = None) -> SD3Policy:
    return SD3Policy(components, lora=lora, max_sequence_length=T5_LENGTH)


def call_transformer(transformer, sample, timesteps, embeddings, pooled):
    with torch.no_grad():
        return transformer(
            hidden_states=sample, timestep=timesteps, encoder_hidden_states=embeddings, pooled_projections=pooled
        ).sample


def random_inputs(policy: SD3Policy, batch: int):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(batch, *policy.sample_shape, generator=generator)
    timesteps = policy.set_num_steps(5)[torch.arange(batch) % 5]
    return sample, timesteps


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("use_t5", [True, False])
def test_encode_prompts_is_the_pipelines_encode_prompt(use_t5):
    components = tiny(use_t5)
    policy = policy_over(components)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = components.pipeline().encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=T5_LENGTH
        )
    conditions = policy.encode_prompts(PROMPTS)
    null = policy.null_condition(len(PROMPTS))
    # 16 CLIP tokens then 12 T5 tokens, at T5's width 32
    assert conditions["encoder_hidden_states"].shape == (3, 16 + T5_LENGTH, 32)
    assert conditions["pooled_projections"].shape == (3, 8 + 16)
    torch.testing.assert_close(conditions["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditions["pooled_projections"], pooled, rtol=0, atol=0)
    # the null condition is encoded as one row (then expanded): equal up to batched rounding
    torch.testing.assert_close(null["encoder_hidden_states"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(null["pooled_projections"], negative_pooled, rtol=0, atol=1e-6)
    clip_rows = conditions["encoder_hidden_states"][:, :16]
    assert clip_rows[..., 24:].abs().max() == 0 and clip_rows[..., :24].abs().min() > 0  # CLIP widths 8 + 16, padded
    t5_rows = conditions["encoder_hidden_states"][:, 16:]
    assert (t5_rows.abs().max() > 0) == use_t5  # without T5: zeros


def test_the_clip_tokenizers_pad_as_sd3s():
    components = tiny()
    assert components.tokenizer.pad_token == "<|endoftext|>" and components.tokenizer_2.pad_token_id == 0  # "!"


def test_unigram_t5_tokenizer_tokenizes_like_t5_and_survives_save_pretrained(tmp_path):
    tokenizer = unigram_t5_tokenizer()
    ids = tokenizer("a cat sat").input_ids
    # whole words where known, else "▁" and one piece per character; "</s>" (id 1) ends it
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁cat", "▁", "s", "a", "t", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(tmp_path)
    loaded = type(tokenizer).from_pretrained(tmp_path)
    text = ["a photo of the digit 7", "Zebra!? ~"]
    assert (
        loaded(text, padding="max_length", max_length=40).input_ids
        == tokenizer(text, padding="max_length", max_length=40).input_ids
    )


# ----------------------------------------------------------------------------- denoiser and guidance
def test_guided_prediction_is_two_transformer_calls_combined():
    policy = policy_over(tiny(), lora=LoRASettings(rank=2))
    randomize_lora(policy.transformer)
    sample, timesteps = random_inputs(policy, 3)
    conditions, null = policy.encode_prompts(PROMPTS), policy.null_condition(3)
    with torch.no_grad():
        guided = policy.guided_prediction(sample, timesteps, conditions, guidance_scale=4.5)
        unguided = policy.guided_prediction(sample, timesteps, conditions, guidance_scale=1.0)
    cond = call_transformer(policy.transformer, sample, timesteps, *conditions.values())
    uncond = call_transformer(policy.transformer, sample, timesteps, *null.values())
    torch.testing.assert_close(guided, uncond + 4.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unguided, cond, rtol=1e-6, atol=1e-6)
    assert (cond - uncond).abs().max() > 1e-3  # the prompt matters, so the test can fail


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sampling_with_tiny_noise_is_the_pipelines_euler_ode(guidance_scale):
    components = tiny()
    policy = policy_over(components)
    generator = torch.Generator().manual_seed(0)
    trajectory = policy.sample(PROMPTS, num_steps=6, eta=1e-6, guidance_scale=guidance_scale, generator=generator)
    pipe = components.pipeline()
    common = {
        "prompt": PROMPTS,
        "latents": trajectory.latents[:, 0],
        "num_inference_steps": 6,
        "guidance_scale": guidance_scale,
        "max_sequence_length": T5_LENGTH,
    }
    latents = pipe(**common, output_type="latent").images
    images = pipe(**common, output_type="pt").images
    assert (latents - trajectory.latents[:, 0]).abs().max() > 0.1  # the sampler moved
    torch.testing.assert_close(trajectory.latents[:, -1], latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(trajectory.images, images, rtol=0, atol=1e-4)


def test_decode_applies_scaling_and_shift_factor():
    components = tiny()
    policy = policy_over(components)
    latents = torch.randn(2, *policy.sample_shape)
    config = components.vae.config
    assert config.shift_factor != 0 and config.scaling_factor != 1
    with torch.no_grad():
        expected = components.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
        unshifted = components.vae.decode(latents / config.scaling_factor).sample
        images = policy.decode(latents)
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1))
    assert (images - (unshifted / 2 + 0.5).clamp(0, 1)).abs().max() > 1e-3  # a missing shift would show


def test_trajectory_shapes_and_stored_steps_rescore_to_ratio_one():
    policy = policy_over(tiny(), lora=LoRASettings(rank=2))
    randomize_lora(policy.transformer)
    trajectory = policy.sample(PROMPTS, num_steps=4, eta=0.7, guidance_scale=4.5, generator=torch.Generator())
    assert trajectory.latents.shape == (3, 5, 16, 8, 8)
    assert trajectory.log_probs.shape == trajectory.timesteps.shape == (3, 4)
    assert trajectory.images.shape == (3, 3, 16, 16)
    assert 0 <= trajectory.images.min() and trajectory.images.max() <= 1
    torch.testing.assert_close(trajectory.timesteps[0], FlowSDEStep(policy.scheduler).set_timesteps(4))
    for step in (torch.full((3,), 0), torch.full((3,), 3), torch.tensor([0, 2, 3])):
        with torch.no_grad():
            log_prob, _ = policy.step_log_prob(trajectory, step, eta=0.7, guidance_scale=4.5)
        stored = trajectory.log_probs[torch.arange(3), step]
        torch.testing.assert_close((log_prob - stored).exp(), torch.ones(3), rtol=0, atol=1e-6)


def test_gradients_reach_only_the_lora_weights():
    policy = policy_over(tiny(), lora=LoRASettings(rank=2, target_modules=FLOW_GRPO_LORA_TARGET_MODULES))
    randomize_lora(policy.transformer)
    trajectory = policy.sample(PROMPTS[:2], num_steps=3, eta=0.7, guidance_scale=2.0, generator=torch.Generator())
    log_prob, _ = policy.step_log_prob(trajectory, torch.tensor([0, 1]), eta=0.7, guidance_scale=2.0)
    log_prob.sum().backward()
    trainable = policy.trainable_parameters()
    names = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert names and all("lora_" in name for name in names)
    parts = {part for name in names for part in _module_parts(name)}
    # the text stream's projections are adapted; MMDiT-X's second attention (attn2) is not: the
    # targets are "attn."-qualified, so they stop at the joint attention
    assert {"attn.add_q_proj", "attn.to_add_out", "attn.to_q"} <= parts and "attn2" not in parts
    # the last block's text-stream output is dropped (context_pre_only), so its text queries get no gradient
    unused = {name for name in names if name.startswith("transformer.transformer_blocks.1.attn.add_q_proj.")}
    used = [p for name, p in policy.named_parameters() if name in names - unused]
    assert len(unused) == 2 and len(used) == len(trainable) - 2
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in used)


def _module_parts(name: str) -> set[str]:
    parts = name.split(".")
    return set(parts) | {".".join(parts[i : i + 2]) for i in range(len(parts) - 1)}


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="height=10; expected a positive multiple of 4"):
        SD3Policy(tiny(), height=10)
    with pytest.raises(ValueError, match="max_sequence_length=0"):
        SD3Policy(tiny(), max_sequence_length=0)
    with pytest.raises(ValueError, match="text_encoder_3 without tokenizer_3"):
        dataclasses.replace(tiny(), tokenizer_3=None)
    assert SD3Policy(tiny(), height=24, width=32).sample_shape == (16, 12, 16)


# ----------------------------------------------------------------------------- loading
@pytest.fixture
def saved(tmp_path):
    components = tiny()
    path = components.save_pretrained(tmp_path / "sd3")
    return components, path


def test_from_pretrained_of_a_saved_model_computes_the_same(saved):
    components, path = saved
    loaded = StableDiffusion3Policy(str(path), local_files_only=True, lora=None, max_sequence_length=T5_LENGTH)
    original = policy_over(components)
    a = original.sample(PROMPTS, num_steps=3, eta=0.7, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(PROMPTS, num_steps=3, eta=0.7, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0)
    torch.testing.assert_close(a.conditions["encoder_hidden_states"], b.conditions["encoder_hidden_states"])
    assert loaded.kernel.scheduler.config.shift == 3.0


def test_the_pipeline_loads_the_saved_directory(saved):
    components, path = saved
    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        expected, got = getattr(components, name).state_dict(), getattr(pipe, name).state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name
    assert pipe.tokenizer_3("a cat").input_ids == components.tokenizer_3("a cat").input_ids


def test_missing_t5_is_a_clear_error_and_use_t5_false_runs_without_it(tmp_path):
    path = tiny(use_t5=False).save_pretrained(tmp_path / "no-t5")
    assert not (path / "text_encoder_3").exists()
    with pytest.raises(FileNotFoundError, match="text_encoder_3.*pass use_t5=False"):
        StableDiffusion3Policy(str(path), local_files_only=True)
    loaded = StableDiffusion3Policy(str(path), use_t5=False, lora=None, max_sequence_length=T5_LENGTH)
    expected = policy_over(tiny(use_t5=False)).encode_prompts(PROMPTS)
    assert loaded.text_encoder_3 is None
    for name in expected:
        torch.testing.assert_close(loaded.encode_prompts(PROMPTS)[name], expected[name], rtol=0, atol=0)


def test_use_t5_false_never_reads_t5(saved):
    _, path = saved
    for file in (path / "text_encoder_3").iterdir():
        file.unlink()  # a broken T5 must not matter
    loaded = StableDiffusion3Policy(str(path), use_t5=False, lora=None)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    with pytest.raises(OSError, match="T5EncoderModel"):
        StableDiffusion3Policy(str(path), use_t5=True)


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_2", "tokenizer_3"])
def test_an_empty_tokenizer_is_refused(saved, subfolder):
    _, path = saved
    shutil.rmtree(path / subfolder)
    (path / subfolder).mkdir()
    with pytest.raises(OSError, match=f"{subfolder}' has no vocabulary"):
        StableDiffusion3Policy(str(path), local_files_only=True)


def test_missing_directories_are_clear_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusion3Policy(str(tmp_path / "nowhere"))
    shutil.rmtree(path / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        StableDiffusion3Policy(str(path))


# ----------------------------------------------------------------------------- trained weights
@pytest.mark.parametrize("targets", [None, FLOW_GRPO_LORA_TARGET_MODULES])
def test_lora_export_loads_into_the_diffusers_pipeline_and_back(tmp_path, targets):
    lora = LoRASettings(rank=2, alpha=4) if targets is None else LoRASettings(rank=2, target_modules=targets)
    trained = policy_over(tiny(), lora=lora)
    randomize_lora(trained.transformer)
    trained.save_trained(tmp_path)
    assert (tmp_path / LORA_WEIGHTS_FILE).is_file()
    sample, timesteps = random_inputs(trained, 3)
    conditions = trained.encode_prompts(PROMPTS)
    with torch.no_grad():
        expected = trained.denoise(sample, timesteps, conditions)
    base = call_transformer(tiny().transformer, sample, timesteps, *conditions.values())
    assert (expected - base).abs().max() > 1e-3  # the adapters change the output

    pipe = tiny().pipeline()
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(
        call_transformer(pipe.transformer, sample, timesteps, *conditions.values()), expected, rtol=1e-5, atol=1e-6
    )
    fresh = policy_over(tiny(), lora=lora)
    fresh.load_trained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise(sample, timesteps, conditions), expected, rtol=0, atol=0)


def test_full_fine_tuning_saves_and_reloads_the_transformer(tmp_path):
    trained = policy_over(tiny(), lora=None)
    with torch.no_grad():
        for parameter in trained.transformer.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    trained.save_trained(tmp_path)
    sample, timesteps = random_inputs(trained, 2)
    conditions = trained.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        expected = trained.denoise(sample, timesteps, conditions)
    saved = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer")
    torch.testing.assert_close(call_transformer(saved, sample, timesteps, *conditions.values()), expected)
    fresh = policy_over(tiny(), lora=None)
    fresh.load_trained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise(sample, timesteps, conditions), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- named architectures
def test_sd35_medium_has_the_published_size():
    with torch.device("meta"):
        components = sd3_components("sd35-medium")
    transformer = components.transformer
    assert next(transformer.parameters()).device.type == "meta"
    weights = sum(p.numel() for p in transformer.parameters())
    # The checkpoint also stores the 384 x 384 grid of 1536-wide position embeddings (a buffer here).
    positions = transformer.pos_embed.pos_embed.numel()
    assert positions == 384 * 384 * 1536
    # Stability AI's model card: "2.5 billion parameters" (two significant digits, so within 2%)
    assert abs(weights + positions - 2.5e9) / 2.5e9 < 0.02, weights + positions
    assert weights == 2_243_171_520
    assert components.transformer.config.dual_attention_layers == tuple(range(13))
    assert (components.vae.config.scaling_factor, components.vae.config.shift_factor) == (1.5305, 0.0609)
    t5 = components.text_encoder_3.config
    assert (t5.d_model, t5.d_ff, t5.num_layers, t5.num_heads, t5.vocab_size) == (4096, 10240, 24, 64, 32128)
    assert components.text_encoder_2.config.projection_dim + components.text_encoder.config.projection_dim == 2048
    assert len(components.tokenizer) == 49408 and components.tokenizer_2.pad_token == "!"


def test_sd3_tiny_is_tiny_and_buildable_in_another_dtype():
    components = sd3_components("sd3-tiny", dtype=torch.float64)
    assert sum(p.numel() for p in components.transformer.parameters()) < 30_000
    assert all(p.dtype == torch.float64 for module in components.models() for p in module.parameters())
    assert ARCHITECTURES["sd3-tiny"].components is SD3Components


def test_the_typed_names_split_the_registry_by_what_they_build():
    kinds = {
        TextToImageArchitectureName: TextToImageComponents,
        SD3ArchitectureName: SD3Components,
        SDXLArchitectureName: SDXLComponents,
        FluxArchitectureName: FluxComponents,
    }
    for names, components in kinds.items():
        assert sorted(get_args(names)) == sorted(n for n, e in ARCHITECTURES.items() if e.components is components)


def test_an_architecture_of_the_other_kind_names_the_right_class():
    with pytest.raises(ValueError, match=r"builds SD3Components.*use RandomStableDiffusion3Policy\('sd3-tiny'\)"):
        RandomTextToImagePolicy("sd3-tiny")
    with pytest.raises(ValueError, match=r"builds TextToImageComponents.*use RandomTextToImagePolicy\('tiny'\)"):
        RandomStableDiffusion3Policy("tiny")
    with pytest.raises(ValueError, match="expected one of"):
        RandomStableDiffusion3Policy("sd3")
