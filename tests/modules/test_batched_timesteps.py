"""Batched timesteps in DDPO training: several steps per denoiser call, the per-step loop's gradients (float64)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.functional.advantages import BatchNormalizedAdvantages
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness
from tests.conftest import randomize_lora

NUM_STEPS, GUIDANCE, CLIP_RANGE = 4, 2.0, 0.1


def float64_policy():
    policy = RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4))
    randomize_lora(policy)  # lora_B starts at zero, which would leave lora_A without gradient
    return policy.double()


def module_for(policy, **options):
    return DDPOModule(
        policy,
        Brightness(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        num_steps=NUM_STEPS,
        guidance_scale=GUIDANCE,
        clip_range=CLIP_RANGE,
        max_grad_norm=None,
        advantages=BatchNormalizedAdvantages(),
        sample_grid_every_n_epochs=0,
        save_trained_on_end=False,
        **options,
    )


@pytest.fixture(scope="module")
def trajectory():
    torch.manual_seed(0)
    policy = float64_policy()
    trajectory = policy.sample(
        ["a", "b", "c"], num_steps=NUM_STEPS, guidance_scale=GUIDANCE, keep_means=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    # Sampling-policy log-probs off by -0.3..0.3: ratios land inside and outside the clip range.
    shift = torch.tensor([-0.3, -0.05, 0.05, 0.3], dtype=torch.float64)
    trajectory.log_probs = trajectory.log_probs + shift[torch.arange(3 * NUM_STEPS) % 4].view(3, NUM_STEPS)
    # and the stored means off a little, so the trust region's KL to the sampling policy is not zero
    trajectory.means = trajectory.means + 0.01 * torch.randn_like(trajectory.means)
    return trajectory


ADVANTAGES = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64)
STEPS = torch.tensor([[3, 0, 2], [1, 2, 0], [0, 3, 1]])  # 3 trained steps of each sample, in its own order


def gradients(module, loss):
    params = module.policy.trainable_parameters()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def total_loss(module, trajectory, steps, weights):
    out, extra = module._step_loss(trajectory, ADVANTAGES, steps, weights)
    return out.loss + extra.get("train/kl_reference_loss", 0.0)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"trust_region": "truly", "kl_threshold": 1e-6},
        {"kl_reference_coef": 0.5},
    ],
    ids=["ppo-clip", "truly-ppo", "reference-kl"],
)
@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 0.0, 1.0])], ids=["all", "padding-row"])
def test_batched_step_loss_has_the_per_step_loops_gradient(trajectory, options, weights):
    module = module_for(float64_policy(), **options)
    per_step = sum(total_loss(module, trajectory, STEPS[:, j], weights) for j in range(3)) / 3
    batched = total_loss(module, trajectory, STEPS, weights)
    torch.testing.assert_close(batched, per_step, rtol=1e-10, atol=0)
    expected, got = gradients(module, per_step), gradients(module, batched)
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_batched_log_probs_equal_per_step_and_the_hand_computed_clip_loss(trajectory):
    policy = float64_policy()
    log_prob, dist = policy.step_log_prob(trajectory, STEPS, 1.0, GUIDANCE)
    assert log_prob.shape == (3, 3) and dist.mean.shape[0] == 9  # one denoiser batch of 3 x 3 (x 2 with CFG)
    columns = torch.stack([policy.step_log_prob(trajectory, STEPS[:, j], 1.0, GUIDANCE)[0] for j in range(3)], 1)
    torch.testing.assert_close(log_prob, columns, rtol=1e-12, atol=1e-12)
    # independent: PPO's clipped surrogate from torch.distributions.Normal, one step at a time
    terms = []
    for j in range(3):
        rows = torch.arange(3)
        step = STEPS[:, j]
        d = policy.step_distribution(
            trajectory.latents[rows, step], trajectory.timesteps[rows, step], trajectory.conditions, 1.0, GUIDANCE
        )
        new = torch.distributions.Normal(d.mean, d.std).log_prob(trajectory.latents[rows, step + 1]).flatten(1).mean(1)
        ratio = torch.exp(new - trajectory.log_probs[rows, step])
        clipped = ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE)
        terms.append(torch.maximum(-ADVANTAGES * ratio, -ADVANTAGES * clipped))
    hand = torch.stack(terms).mean()
    module = module_for(policy)
    batched = total_loss(module, trajectory, STEPS, None)
    torch.testing.assert_close(batched, hand, rtol=1e-10, atol=0)
    torch.testing.assert_close(gradients(module, batched), gradients(module, hand), rtol=1e-8, atol=1e-12)


def train_one_epoch(tmp_path, timestep_batch):
    """One DDPO epoch (4 samples, train batches of 2, accumulation 2, 3 of 4 steps), its weights and sync flags."""
    torch.manual_seed(0)
    module = module_for(
        float64_policy(),
        train_batch_size=2,
        gradient_accumulation_steps=2,
        timestep_fraction=0.75,
        timestep_batch=timestep_batch,
    )
    syncs = []
    gradient_sync = module._gradient_sync

    def recording_sync(sync):
        syncs.append(sync)
        return gradient_sync(sync)

    module._gradient_sync = recording_sync
    pl.seed_everything(0)
    pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    ).fit(module, SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=1))
    return [p.detach().clone() for p in module.policy.trainable_parameters()], syncs


def test_training_epoch_with_batched_timesteps_updates_as_the_per_step_loop(tmp_path):
    before = [p.detach().clone() for p in float64_policy().trainable_parameters()]
    per_step, per_step_syncs = train_one_epoch(tmp_path / "a", timestep_batch=1)
    batched, batched_syncs = train_one_epoch(tmp_path / "b", timestep_batch=2)
    moved = torch.cat([(p - q).flatten() for p, q in zip(per_step, before, strict=True)])
    assert moved.abs().max() > 1e-6  # the SGD step moved the weights
    for p, q in zip(batched, per_step, strict=True):
        torch.testing.assert_close(p - q, torch.zeros_like(p), rtol=0, atol=1e-5 * moved.abs().max().item())
    # DDP's gradient all-reduce only on the last backward of the accumulation window (2 train batches):
    # 3 steps one at a time = 6 backward passes; in chunks of 2 + 1 steps = 4.
    assert per_step_syncs == [False] * 5 + [True]
    assert batched_syncs == [False] * 3 + [True]


def test_timestep_batch_must_be_positive():
    with pytest.raises(ValueError, match="timestep_batch=0; expected a positive integer"):
        module_for(float64_policy(), timestep_batch=0)
