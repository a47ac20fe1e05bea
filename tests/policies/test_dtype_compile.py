"""Reduced-precision frozen weights (``torch_dtype``) and the compiled denoiser call (``compile``)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy, StableDiffusionPolicy
from lightning_sdrl.policies import base as policy_base
from lightning_sdrl.policies.architectures import (
    stable_diffusion_scheduler,
    text_to_image_components,
    tiny_class_conditional_unet,
)
from lightning_sdrl.policies.base import cast_frozen_weights
from lightning_sdrl.policies.class_conditional import ClassConditionalPolicy
from lightning_sdrl.policies.sd3 import RandomStableDiffusion3Policy
from tests.conftest import randomize_lora

PROMPTS = ["a cat", "a dog"]


def split_by_lora(module):
    lora = {name: p for name, p in module.named_parameters() if "lora_" in name}
    base = {name: p for name, p in module.named_parameters() if "lora_" not in name}
    return base, lora


def sample(policy, steps=3):
    return policy.sample(PROMPTS, num_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ torch_dtype
def test_bf16_weights_load_from_a_saved_pipeline_and_lora_stays_float32(tiny_sd_dir, tiny_components):
    policy = StableDiffusionPolicy(str(tiny_sd_dir), lora=LoRASettings(rank=4), torch_dtype="bfloat16")
    base, lora = split_by_lora(policy.unet)
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base.values())
    for network in (policy.text_encoder, policy.vae):
        assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    assert policy.dtype == torch.bfloat16
    # the frozen weights are the saved float32 ones rounded to bfloat16
    saved = tiny_components.unet.state_dict()
    for name, parameter in base.items():
        key = name.replace(".base_layer", "")
        torch.testing.assert_close(parameter, saved[key].to(torch.bfloat16), rtol=0, atol=0)
    # sampling runs in bf16 weights; the step log-probs are float32 and re-score to the sampled ones
    trajectory = sample(policy)
    assert trajectory.latents.dtype == torch.bfloat16 and trajectory.log_probs.dtype == torch.float32
    assert torch.isfinite(trajectory.images).all()
    steps = torch.tensor([[0, 2], [1, 0]])
    log_prob, _ = policy.step_log_prob(trajectory, steps, 1.0, 3.0)
    torch.testing.assert_close(log_prob, trajectory.log_probs.gather(1, steps), rtol=0, atol=1e-5)


def test_float16_keeps_a_force_upcast_vae_in_float32(tiny_sd_dir):
    policy = StableDiffusionPolicy(str(tiny_sd_dir), torch_dtype=torch.float16)
    assert policy.vae.config.force_upcast  # diffusers decodes such a VAE in float32
    assert {p.dtype for p in policy.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in policy.text_encoder.parameters()} == {torch.float16}
    assert policy.dtype == torch.float16


def test_random_policy_casts_as_the_loaded_one_and_full_fine_tuning_trains_float32():
    reference = text_to_image_components("tiny", seed=0)
    policy = RandomTextToImagePolicy("tiny", lora=None, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in policy.unet.parameters()} == {torch.float32}  # every UNet weight is trained
    assert all(p.requires_grad for p in policy.unet.parameters())
    assert {p.dtype for p in policy.text_encoder.parameters()} == {torch.bfloat16}
    expected = reference.text_encoder.state_dict()
    for name, value in policy.text_encoder.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[name].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_keeps_the_modules_transformers_keeps_in_float32(tmp_path, dtype):
    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    model = T5EncoderModel(config)
    model.save_pretrained(tmp_path / "t5")
    loaded = T5EncoderModel.from_pretrained(tmp_path / "t5", dtype=dtype)  # the reference library
    cast = cast_frozen_weights(model, dtype)
    dtypes = {name: p.dtype for name, p in cast.named_parameters()}
    assert dtypes == {name: p.dtype for name, p in loaded.named_parameters()}
    # transformers keeps T5's wo projections in float32 under float16 only
    assert {dtypes[name] for name in dtypes if ".wo." in name} == {torch.float32 if dtype == torch.float16 else dtype}
    assert dtype in dtypes.values()


def test_sd3_and_class_conditional_train_float32_lora_over_bf16_weights(tmp_path):
    sd3 = RandomStableDiffusion3Policy("sd3-tiny", torch_dtype="bfloat16")
    base, lora = split_by_lora(sd3.transformer)
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for p in base.values()} == {torch.bfloat16}
    unet, scheduler = tiny_class_conditional_unet(2), stable_diffusion_scheduler()
    ClassConditionalPolicy(unet, scheduler, ["a", "b"]).save_pretrained(tmp_path / "cc")
    policy = ClassConditionalPolicy.from_pretrained(
        str(tmp_path / "cc"), lora=LoRASettings(rank=2), torch_dtype="bfloat16"
    )
    base, lora = split_by_lora(policy.unet)
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for p in base.values()} == {torch.bfloat16}


def test_unknown_dtype_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"torch_dtype='bf16'; expected one of \['bfloat16', 'float16', 'float32'\]"):
        RandomTextToImagePolicy("tiny", torch_dtype="bf16")


# ------------------------------------------------------------------ compile
def eager_and_compiled(**kwargs):
    eager = RandomTextToImagePolicy("tiny", lora=LoRASettings(rank=4))
    compiled = RandomTextToImagePolicy("tiny", lora=LoRASettings(rank=4), **kwargs)
    for policy in (eager, compiled):
        randomize_lora(policy)
    return eager, compiled


def test_bad_compile_mode_is_a_clear_error():
    with pytest.raises(ValueError, match=r"compile='fast'; expected true, false or a torch.compile mode"):
        RandomTextToImagePolicy("tiny", compile="fast")


def test_without_dynamo_one_warning_and_eager_samples(monkeypatch, caplog):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    eager = RandomTextToImagePolicy("tiny")
    with caplog.at_level(logging.WARNING, logger="lightning_sdrl"):
        compiled = RandomTextToImagePolicy("tiny", compile=True)
    assert [r.getMessage() for r in caplog.records] == [
        "compile='default': torch.compile of the unet is unavailable (torch._dynamo is not supported on this "
        "platform); running it eagerly"
    ]
    assert compiled.compile_mode is None
    torch.testing.assert_close(sample(compiled).latents, sample(eager).latents, rtol=0, atol=0)


def test_a_failing_compiler_falls_back_to_eager_once(monkeypatch, caplog):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler")

    calls = []

    def compiled_call(mode):
        calls.append(mode)
        return torch.compile(policy_base._call_module, backend=failing_backend, dynamic=False)

    monkeypatch.setattr(policy_base, "compiled_module_call", compiled_call)
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(compile="max-autotune")
    with caplog.at_level(logging.WARNING, logger="lightning_sdrl"):
        got = sample(compiled)
    assert calls == ["max-autotune"]  # tried once, then eager for good
    assert len(caplog.records) == 1 and "BackendCompilerFailed" in caplog.records[0].getMessage()
    assert compiled.compile_mode is None
    torch.testing.assert_close(got.latents, sample(eager).latents, rtol=0, atol=0)


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_no_recompilation_across_steps_and_weights_keys_unchanged(monkeypatch, tmp_path):
    # dynamo decides recompilation whatever the backend; aot_eager traces forward and backward
    # through AOTAutograd without generating code, so this runs in seconds.
    def compiled_call(mode):
        return torch.compile(policy_base._call_module, backend="aot_eager", dynamic=False)

    monkeypatch.setattr(policy_base, "compiled_module_call", compiled_call)
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(compile=True)
    steps = torch.tensor([[0, 2], [1, 0]])
    start = graphs()
    trajectory = sample(compiled)  # warm-up: the sampling graph (batch 2 x CFG)
    compiled.step_log_prob(trajectory, steps, 1.0, 3.0)[0].sum().backward()  # the training graph (2 x 2 x CFG)
    warm = graphs()
    assert warm - start == 2
    again = sample(compiled, steps=5)  # other timesteps, more steps: no new graph
    log_prob, _ = compiled.step_log_prob(again, torch.tensor([[4, 3], [2, 1]]), 1.0, 3.0)
    log_prob.sum().backward()
    assert graphs() == warm
    assert compiled.compile_mode == "default"
    # the same numbers as eager (aot_eager runs the same kernels), and the same weights on disk
    reference = sample(eager, steps=5)
    torch.testing.assert_close(again.latents, reference.latents, rtol=0, atol=1e-6)
    expected, _ = eager.step_log_prob(reference, torch.tensor([[4, 3], [2, 1]]), 1.0, 3.0)
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-6)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.save_trained(tmp_path / "trained")
    fresh = RandomTextToImagePolicy("tiny", lora=LoRASettings(rank=4))
    fresh.load_trained(tmp_path / "trained")
    for (name, p), q in zip(compiled.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_inductor_compiled_denoiser_matches_eager():
    """The real ``torch.compile`` (inductor): same samples and log-probs as eager to 1e-4, one graph.

    Generated float32 kernels reorder sums, so results differ from eager by float32 rounding
    (observed: about 2e-5 in the latents after three steps).
    """
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(compile=True)
    start = graphs()
    got = sample(compiled)
    # CI machines have a C++ compiler, so inductor must really compile here (no silent eager fallback)
    assert compiled.compile_mode == "default", "torch.compile (inductor) fell back to eager on this machine"
    expected = sample(eager)
    torch.testing.assert_close(got.latents, expected.latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.log_probs, expected.log_probs, rtol=0, atol=1e-4)
    with torch.no_grad():  # re-scoring [B] steps: the sampling graph's shape, no recompilation
        for j in range(got.num_steps):
            step = torch.full((len(got),), j)
            log_prob, _ = compiled.step_log_prob(got, step, 1.0, 3.0)
            torch.testing.assert_close(log_prob, eager.step_log_prob(got, step, 1.0, 3.0)[0], rtol=0, atol=1e-4)
    assert graphs() - start == 1
