import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from lightning_sdrl.policies import ClassConditionalPolicy, LoRASettings, StableDiffusionPolicy, TextToImagePolicy
from lightning_sdrl.policies.architectures import stable_diffusion_scheduler, tiny_class_conditional_unet
from tests.conftest import randomize_lora


def all_steps(trajectory, step):
    return torch.full((len(trajectory),), step, dtype=torch.long)


def test_trajectory_shapes_and_ranges(tiny_policy):
    trajectory = tiny_policy.sample(
        ["a cat", "a dog", "a cow"], num_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    )
    assert trajectory.latents.shape == (3, 4, 4, 8, 8)
    assert trajectory.timesteps.shape == trajectory.log_probs.shape == (3, 3)
    assert trajectory.images.shape == (3, 3, 16, 16)
    assert 0 <= trajectory.images.min() and trajectory.images.max() <= 1
    assert torch.isfinite(trajectory.log_probs).all()


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_restoring_stored_steps_gives_ratio_one(tiny_policy, guidance_scale):
    randomize_lora(tiny_policy.unet)
    trajectory = tiny_policy.sample(
        ["a cat", "a dog"], num_steps=4, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0)
    )
    for step in range(trajectory.num_steps):
        log_prob, _ = tiny_policy.step_log_prob(trajectory, all_steps(trajectory, step), 1.0, guidance_scale)
        ratio = torch.exp(log_prob - trajectory.log_probs[:, step])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)


def test_mixed_steps_in_one_batch_match_per_step_scores(tiny_policy):
    trajectory = tiny_policy.sample(
        ["a", "b", "c"], num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1)
    )
    mixed, _ = tiny_policy.step_log_prob(trajectory, torch.tensor([2, 0, 1]), 1.0, 2.0)
    torch.testing.assert_close(mixed, trajectory.log_probs[[0, 1, 2], [2, 0, 1]], atol=1e-6, rtol=0)


def test_guidance_in_one_call_equals_two_calls(tiny_policy):
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 300])
    cond = tiny_policy.encode_prompts(["a", "b"])
    guided = tiny_policy.guided_prediction(x, t, cond, 3.0)
    uncond_out = tiny_policy.denoise(x, t, tiny_policy.null_condition(2))
    cond_out = tiny_policy.denoise(x, t, cond)
    torch.testing.assert_close(guided, uncond_out + 3.0 * (cond_out - uncond_out), atol=1e-5, rtol=1e-5)


def test_only_lora_weights_train_and_reference_switches_them_off(tiny_policy):
    names = [n for n, p in tiny_policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    randomize_lora(tiny_policy.unet)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([400]), tiny_policy.encode_prompts(["a"])
    adapted = tiny_policy.denoise(x, t, cond)
    with tiny_policy.reference():
        reference = tiny_policy.denoise(x, t, cond)
    assert not torch.allclose(adapted, reference)
    assert [n for n, p in tiny_policy.named_parameters() if p.requires_grad] == names
    torch.testing.assert_close(tiny_policy.denoise(x, t, cond), adapted)


def test_full_fine_tuning_reference_is_a_frozen_copy(tiny_components):
    policy = TextToImagePolicy(tiny_components, lora=None)
    assert all(p.requires_grad for p in policy.unet.parameters())
    policy.keep_reference()
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([400]), policy.encode_prompts(["a"])
    with torch.no_grad():
        next(policy.unet.parameters()).add_(1.0)
        with policy.reference():
            reference = policy.denoise(x, t, cond)
    assert not torch.allclose(policy.denoise(x, t, cond), reference)
    assert all("_reference" not in key for key in policy.state_dict())


def test_from_pretrained_loads_a_saved_pipeline_directory(tiny_sd_dir, tiny_components):
    policy = StableDiffusionPolicy(str(tiny_sd_dir), lora=None)
    reference = TextToImagePolicy(tiny_components, lora=None)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    cond = reference.encode_prompts(["a red cube", "x"])
    torch.testing.assert_close(policy.encode_prompts(["a red cube", "x"]), cond)
    torch.testing.assert_close(policy.denoise(x, t, cond), reference.denoise(x, t, cond))
    assert isinstance(policy.scheduler, DDIMScheduler)


def test_lora_export_loads_in_stable_diffusion_pipeline(tmp_path, tiny_sd_dir):
    policy = StableDiffusionPolicy(str(tiny_sd_dir), lora=LoRASettings(rank=4, alpha=8))
    randomize_lora(policy.unet)
    policy.save_trained(tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    cond = policy.encode_prompts(["a", "b"])
    base = pipe.unet(x, t, **cond).sample
    pipe.load_lora_weights(tmp_path / "lora")
    loaded = pipe.unet(x, t, **cond).sample
    ours = policy.denoise(x, t, cond)
    assert not torch.allclose(base, ours, atol=1e-4)
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-5)


def test_full_unet_export_round_trip(tmp_path, tiny_components):
    policy = TextToImagePolicy(tiny_components, lora=None)
    policy.save_trained(tmp_path / "out")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet")
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([3]), policy.encode_prompts(["a"])
    torch.testing.assert_close(unet(x, t, **cond).sample, policy.denoise(x, t, cond))


def test_missing_local_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionPolicy(str(tmp_path / "nope"))


def test_incomplete_directory_names_the_missing_subfolder(tiny_sd_dir):
    import shutil

    shutil.rmtree(tiny_sd_dir / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        StableDiffusionPolicy(str(tiny_sd_dir))


def test_hub_id_while_offline_names_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        StableDiffusionPolicy("runwayml/stable-diffusion-v1-5")


def test_tokenizer_without_vocabulary_is_refused(tiny_sd_dir):
    for path in (tiny_sd_dir / "tokenizer").iterdir():
        if path.name != "tokenizer_config.json":
            path.unlink()
    with pytest.raises(OSError, match="no vocabulary"):
        StableDiffusionPolicy(str(tiny_sd_dir))


def test_empty_prompt_list_is_refused(tiny_policy):
    with pytest.raises(ValueError, match="prompts is empty"):
        tiny_policy.sample([], num_steps=2)


def make_class_policy(lora=None):
    names = ["zero", "one", "two"]
    return ClassConditionalPolicy(
        tiny_class_conditional_unet(len(names)), stable_diffusion_scheduler(), names, lora=lora
    )


def test_class_conditional_policy_samples_and_rescores():
    policy = make_class_policy(LoRASettings(rank=2))
    randomize_lora(policy.unet)
    trajectory = policy.sample(
        ["one", "two"], num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert trajectory.images.shape == (2, 3, 8, 8)
    log_prob, _ = policy.step_log_prob(trajectory, torch.tensor([0, 2]), 1.0, 2.0)
    torch.testing.assert_close(log_prob, trajectory.log_probs[[0, 1], [0, 2]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not class names"):
        policy.encode_prompts(["seven"])


def test_class_conditional_save_and_load(tmp_path):
    policy = make_class_policy()
    policy.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "class_names.json").read_text()) == ["zero", "one", "two"]
    loaded = ClassConditionalPolicy.from_pretrained(str(tmp_path / "model"), lora=LoRASettings(rank=2))
    randomize_lora(loaded.unet)
    loaded.save_trained(tmp_path / "lora")
    fresh = ClassConditionalPolicy.from_pretrained(str(tmp_path / "model"), lora=LoRASettings(rank=2))
    fresh.load_trained(tmp_path / "lora")
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([5, 700]), loaded.encode_prompts(["zero", "two"])
    torch.testing.assert_close(fresh.denoise(x, t, c), loaded.denoise(x, t, c))
    with pytest.raises(ValueError, match="num_class_embeds"):
        ClassConditionalPolicy(tiny_class_conditional_unet(3), stable_diffusion_scheduler(), ["a", "b"])
