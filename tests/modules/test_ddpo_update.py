"""One DDPO update against a hand computation: batch-normalised advantages, PPO's clipped loss, one SGD step."""

import copy

import lightning.pytorch as pl
import pytest
import torch

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.functional.advantages import BatchNormalizedAdvantages
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness
from tests.conftest import randomize_lora

LR, CLIP_RANGE, GUIDANCE, NUM_STEPS, BATCH = 0.05, 0.1, 2.0, 3, 4


def hand_ppo_loss(policy, trajectory, advantages):
    """``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` over every sample and step, and the ratios ``r``."""
    policy.set_num_steps(NUM_STEPS)
    losses, ratios = [], []
    for t in range(NUM_STEPS):
        dist = policy.step_distribution(
            trajectory.latents[:, t], trajectory.timesteps[:, t], trajectory.conditions, 1.0, GUIDANCE
        )
        # log-density of the stored step, averaged over the latent's dimensions (as DDPO's log-probs are)
        log_prob = torch.distributions.Normal(dist.mean, dist.std).log_prob(trajectory.latents[:, t + 1])
        ratio = torch.exp(log_prob.flatten(1).mean(1) - trajectory.log_probs[:, t])
        clipped = ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE)
        losses.append(torch.maximum(-advantages * ratio, -advantages * clipped))
        ratios.append(ratio)
    return torch.stack(losses).mean(), torch.stack(ratios, dim=1).detach()


@pytest.mark.parametrize("old_log_prob_shift", [None, "mixed"])
def test_one_update_is_an_sgd_step_on_the_hand_computed_ppo_loss(tmp_path, old_log_prob_shift):
    policy = RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4))
    randomize_lora(policy)  # lora_B starts at zero, which would leave lora_A without gradient
    policy = policy.double()
    before = copy.deepcopy(policy)
    module = DDPOModule(
        policy,
        Brightness(),
        optimizer=lambda params: torch.optim.SGD(params, lr=LR),
        num_steps=NUM_STEPS,
        guidance_scale=GUIDANCE,
        train_batch_size=BATCH,
        num_inner_epochs=1,
        timestep_fraction=1.0,
        clip_range=CLIP_RANGE,
        max_grad_norm=None,
        advantages=BatchNormalizedAdvantages(),
        sample_grid_every_n_epochs=0,
        save_trained_on_end=False,
    )
    seen = {}
    update = module.update

    def recording_update(trajectory, rewards):
        if old_log_prob_shift == "mixed":
            # Sampling-policy log-probs off by -0.3..0.3: ratios 0.74..1.35 land inside and outside the clip range.
            shift = torch.tensor([-0.3, -0.05, 0.05, 0.3], dtype=trajectory.log_probs.dtype)
            trajectory.log_probs = trajectory.log_probs + shift[torch.arange(BATCH * NUM_STEPS) % 4].view(BATCH, -1)
        seen.update(trajectory=trajectory, rewards=rewards.clone())
        update(trajectory, rewards)

    module.update = recording_update
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
    ).fit(module, SamplingDataModule(prompts=["a", "b"], batch_size=BATCH, num_batches_per_epoch=1))

    trajectory, rewards = seen["trajectory"], seen["rewards"]
    assert trajectory.latents.dtype == torch.float64 and trajectory.log_probs.shape == (BATCH, NUM_STEPS)
    # 1. advantages: rewards normalised by the batch's mean and (population) std, clamped to +-5. The
    # rewards are float32 (as the module scores them) and close together, so this stays in float32 too.
    assert rewards.dtype == torch.float32 and rewards.std() > 0
    advantages = ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)).clamp(-5.0, 5.0)
    torch.testing.assert_close(module.last_update.advantages, advantages, rtol=1e-6, atol=1e-6)
    advantages = advantages.double()
    # 2. the clipped loss over all samples and steps, and its gradient at the sampling weights
    loss, ratios = hand_ppo_loss(before, trajectory, advantages)
    params = before.trainable_parameters()
    gradients = torch.autograd.grad(loss, params)
    if old_log_prob_shift is None:  # re-scoring the stored steps reproduces the sampling log-probs
        torch.testing.assert_close(ratios, torch.ones_like(ratios), rtol=0, atol=1e-9)
    else:  # some terms are clipped (no gradient), some are not
        sign = advantages.sign().unsqueeze(1)
        clipped = ((sign > 0) & (ratios > 1 + CLIP_RANGE)) | ((sign < 0) & (ratios < 1 - CLIP_RANGE))
        assert clipped.any() and not clipped.all()
    # 3. one plain SGD step: theta - lr * grad
    after = module.policy.trainable_parameters()
    assert len(after) == len(params) > 0
    moved = torch.cat([(new.detach() - old.detach()).flatten() for new, old in zip(after, params, strict=True)])
    expected = torch.cat([-LR * g.flatten() for g in gradients])
    assert expected.abs().max() > 1e-6  # the step is large enough to compare
    torch.testing.assert_close(moved, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
