"""Rectified-flow pretraining of a pixel-space SD3-layout model, and loading what it exports."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lightning_sdrl.digits.captions import DigitsCaptionDataModule
from lightning_sdrl.digits.pretrain import DigitsFlowPretrainModule
from lightning_sdrl.functional.rectified_flow import flow_interpolation, sample_flow_sigmas, velocity_loss
from lightning_sdrl.modules.flow_pretrain import FlowMatchingPretrainModule
from lightning_sdrl.policies.pixel_flow import PixelFlowArchitecture, pixel_flow_components
from lightning_sdrl.policies.sd3 import StableDiffusion3Policy, encode_sd3_prompts

TINY = PixelFlowArchitecture(
    num_layers=1,
    attention_heads=2,
    attention_head_dim=8,
    text_hidden_size=16,
    text_layers=2,
    text_heads=2,
    text_intermediate_size=32,
    max_length=24,
)


def trainer(tmp_path, **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return pl.Trainer(**{**options, **kwargs})


# ------------------------------------------------------------------------------ the math
def test_interpolation_and_velocity_are_the_straight_line_in_numpy():
    generator = torch.Generator().manual_seed(0)
    images, noise = torch.rand(5, 1, 4, 4) * 2 - 1, torch.randn(5, 1, 4, 4, generator=generator)
    sigmas = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    noised = flow_interpolation(images, noise, sigmas)
    x, e, s = images.numpy(), noise.numpy(), sigmas.numpy()[:, None, None, None]
    np.testing.assert_allclose(noised.noisy.numpy(), (1 - s) * x + s * e, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(noised.velocity.numpy(), e - x, rtol=1e-6, atol=1e-6)
    assert velocity_loss(noised.velocity, noised.velocity).item() == 0.0
    with pytest.raises(ValueError, match="one per image"):
        flow_interpolation(images, noise, sigmas[:2])


def test_euler_step_along_the_true_velocity_is_the_schedulers_step():
    # x_sigma on the line, v = eps - x0 exactly: one diffusers Euler step lands on x_{sigma_next} of the same line
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(4)
    images, noise = torch.rand(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    sigma, following = scheduler.sigmas[1], scheduler.sigmas[2]
    here = flow_interpolation(images, noise, sigma.repeat(3))
    stepped = scheduler.step(here.velocity, scheduler.timesteps[1], here.noisy, return_dict=False)[0]
    torch.testing.assert_close(stepped, flow_interpolation(images, noise, following.repeat(3)).noisy)


def test_time_sampling_distributions():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_flow_sigmas(20000, "uniform", generator=generator).double()
    assert abs(uniform.mean() - 0.5) < 3 * (1 / 12) ** 0.5 / 20000**0.5
    logit = sample_flow_sigmas(20000, "logit_normal", mean=0.5, std=0.8, generator=generator).double()
    z = torch.log(logit / (1 - logit))  # the logits are N(0.5, 0.8^2)
    assert abs(z.mean() - 0.5) < 3 * 0.8 / 20000**0.5 and abs(z.std() - 0.8) < 0.02
    with pytest.raises(ValueError, match="'logit_normal' or 'uniform'"):
        sample_flow_sigmas(2, "cosine")


# ------------------------------------------------------------------------------ the module
def fixed_loss(module, batch):
    """The velocity loss on a fixed batch with fixed noise levels and noise."""
    generator = torch.Generator().manual_seed(0)
    sigmas = sample_flow_sigmas(len(batch), generator=generator)
    noised = flow_interpolation(batch.images, torch.randn(batch.images.shape, generator=generator), sigmas)
    with torch.no_grad():
        conditions = encode_sd3_prompts(module.components(), batch.captions, 1)
        predicted = module.transformer(
            hidden_states=noised.noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=conditions["encoder_hidden_states"],
            pooled_projections=conditions["pooled_projections"],
            return_dict=False,
        )[0]
    return velocity_loss(predicted, noised.velocity).item()


def test_short_fit_lowers_the_loss_and_exports_a_model_the_sd3_policy_loads(tmp_path):
    pl.seed_everything(0)
    export = tmp_path / "export"
    module = FlowMatchingPretrainModule(TINY, lr=1e-2, warmup_steps=0, export_dir=str(export))
    data = DigitsCaptionDataModule(batch_size=32)
    batch = next(iter(data.train_dataloader()))
    text_before = [p.detach().clone() for p in module.text_encoder_2.parameters()]
    before = fixed_loss(module, batch)
    trainer(tmp_path, max_steps=4).fit(module, data)
    assert fixed_loss(module, batch) < before
    assert any(not torch.equal(a, b) for a, b in zip(text_before, module.text_encoder_2.parameters(), strict=True))
    names = {p.name for p in export.iterdir()}
    assert names == {
        "transformer",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
        "model_index.json",
    }
    policy = StableDiffusion3Policy(str(export), use_t5=False, max_sequence_length=1, lora=None).eval()
    assert policy.vae is None and policy.vae_scale_factor == 1 and policy.sample_shape == (1, 16, 16)
    for name, parameter in module.transformer.state_dict().items():
        torch.testing.assert_close(policy.transformer.state_dict()[name], parameter)
    # the policy's prompt embeddings are the ones training saw
    with torch.no_grad():
        expected = encode_sd3_prompts(module.components(), ["the digit 7"], 1)
    got = policy.encode_prompts(["the digit 7"])
    torch.testing.assert_close(got["encoder_hidden_states"], expected["encoder_hidden_states"])
    torch.testing.assert_close(got["pooled_projections"], expected["pooled_projections"])
    trajectory = policy.sample(["a handwritten two", ""], num_steps=3, eta=0.7, generator=torch.Generator())
    assert trajectory.images.shape == (2, 3, 16, 16)
    # pixels: the images are the last sample, mapped from [-1, 1] and repeated on three channels
    pixels = (trajectory.latents[:, -1].clamp(-1, 1) / 2 + 0.5).expand(-1, 3, -1, -1)
    torch.testing.assert_close(trajectory.images, pixels)


def test_digits_flow_module_validates_with_the_classifier(tmp_path):
    module = DigitsFlowPretrainModule(TINY, val_num_steps=2, export_dir=str(tmp_path / "export"))
    data = DigitsCaptionDataModule(val_samples_per_prompt=1, val_batch_size=5)
    metrics = trainer(tmp_path, limit_val_batches=None).validate(module, data, verbose=False)[0]
    assert 0.0 <= metrics["val/digit_agreement"] <= 1.0 and 0.1 <= metrics["val/confidence"] <= 1.0
    assert all(not p.requires_grad for p in module.classifier.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"time_sampling": "cosine"}, "time_sampling='cosine'"),
        ({"logit_std": 0.0}, "logit_std=0.0"),
        ({"max_sequence_length": 0}, "max_sequence_length=0"),
        ({"caption_dropout": 1.5}, "caption_dropout=1.5"),
    ],
)
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowMatchingPretrainModule(TINY, **kwargs)


def test_architecture_errors_name_the_argument():
    with pytest.raises(ValueError, match="patch_size=3"):
        PixelFlowArchitecture(patch_size=3)
    with pytest.raises(ValueError, match="text_layers=1"):
        PixelFlowArchitecture(text_layers=1)
    assert pixel_flow_components(TINY).transformer.config.pos_embed_max_size == 8
