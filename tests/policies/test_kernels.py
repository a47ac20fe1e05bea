"""A new step kernel is one class: a toy fixed-variance Gaussian step samples, scores and trains."""

import json
from typing import get_args

import lightning.pytorch as pl
import pytest
import torch

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.digits.policy import DIGITS_DIFFUSION_DIR
from lightning_sdrl.functional.advantages import BatchNormalizedAdvantages
from lightning_sdrl.functional.gaussian import StepDistribution
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.policies import DDIMStep, LoRASettings, RandomTextToImagePolicy, StepKernel
from lightning_sdrl.policies.architectures import ARCHITECTURES, ArchitectureName, text_to_image_components
from lightning_sdrl.rewards.simple import Brightness

STD = 0.3


class FixedVarianceStep:
    """x_prev ~ N(x - 0.1 * model_output, STD^2): a sampler nobody ships, to prove the interface."""

    def __init__(self, scheduler):
        self.scheduler = DDIMStep(scheduler).scheduler  # only its timesteps are used

    def set_timesteps(self, num_steps):
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.timesteps

    def is_stochastic(self, step, eta):
        return True

    def distribution(self, model_output, timestep, sample, eta):
        mean = sample.float() - 0.1 * model_output.float()
        std = torch.full((sample.shape[0], *([1] * (sample.ndim - 1))), STD)
        return StepDistribution(mean=mean, std=std, pred_original_sample=mean)


def toy_policy():
    policy = RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4))
    policy.kernel = FixedVarianceStep(policy.scheduler)
    return policy


def test_toy_kernel_is_a_step_kernel_and_its_log_probs_are_normal_densities():
    policy = toy_policy()
    assert isinstance(policy.kernel, StepKernel) and isinstance(DDIMStep(policy.scheduler), StepKernel)
    trajectory = policy.sample(["a", "b"], num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    for j in range(3):
        x, t = trajectory.latents[:, j], trajectory.timesteps[:, j]
        with torch.no_grad():
            mean = x - 0.1 * policy.guided_prediction(x, t, trajectory.conditions, 2.0)
        expected = torch.distributions.Normal(mean, STD).log_prob(trajectory.latents[:, j + 1]).mean(dim=(1, 2, 3))
        torch.testing.assert_close(trajectory.log_probs[:, j], expected, rtol=1e-5, atol=1e-5)
        # re-scoring the stored step under unchanged weights gives the sampled log-prob: ratio 1
        log_prob, _ = policy.step_log_prob(trajectory, torch.full((2,), j), guidance_scale=2.0)
        torch.testing.assert_close(log_prob, trajectory.log_probs[:, j], rtol=0, atol=1e-6)


def test_toy_kernel_trains_through_ddpo_without_touching_the_module(tmp_path):
    module = DDPOModule(
        toy_policy(),
        Brightness(),
        num_steps=3,
        guidance_scale=2.0,
        train_batch_size=4,
        clip_range=0.5,
        advantages=BatchNormalizedAdvantages(),
        sample_grid_every_n_epochs=0,
        save_trained_on_end=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
    )
    before = {k: v.clone() for k, v in module.policy.named_parameters() if v.requires_grad}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=1))
    assert len(module.reward_history) == 2
    after = dict(module.policy.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(after[k]).all() for k in before)
    assert isinstance(module.policy.kernel, FixedVarianceStep)


def test_every_named_architecture_is_in_the_typed_table():
    assert sorted(get_args(ArchitectureName)) == sorted(ARCHITECTURES)
    # "digits" is the shipped digits model's architecture, with random weights
    built = RandomTextToImagePolicy("digits", lora=None).unet.config
    saved = json.loads((DIGITS_DIFFUSION_DIR / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim", "sample_size"):
        assert (list(built[key]) if isinstance(saved[key], list) else built[key]) == saved[key], key
    with pytest.raises(ValueError, match="expected one of"):
        text_to_image_components("sd3")
