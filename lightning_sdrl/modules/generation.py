"""What DDPO and ReFL share: sampling a prompt batch with its seed, and validation on samples."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.policies.base import Trajectory
from lightning_sdrl.rewards.base import check_reward_output


class GenerationModule(pl.LightningModule):
    """Base of the fine-tuning modules: ``self.policy``, ``self.reward``, optional ``self.evaluation``.

    Subclasses save ``num_steps``, ``eta`` and ``guidance_scale`` as hyper-parameters.
    Validation samples every batch with its fixed seed, logs ``val/reward_mean`` and, with an
    ``evaluation`` (:class:`~lightning_sdrl.metrics.generation.GenerationMetrics`), ``val/fid``,
    ``val/precision``, ``val/recall`` and ``val/attribute_kl``.
    """

    keep_step_means = False

    @torch.no_grad()
    def sample(self, batch: PromptBatch) -> Trajectory:
        """Sample trajectories for a prompt batch with its seed (policy in eval mode)."""
        was_training = self.policy.training
        self.policy.eval()
        trajectory = self.policy.sample(
            batch.prompts,
            num_steps=self.hparams.num_steps,
            eta=self.hparams.eta,
            guidance_scale=self.hparams.guidance_scale,
            generator=torch.Generator(self.policy.device).manual_seed(batch.seed),
            prompt_ids=batch.prompt_ids,
            keep_means=self.keep_step_means,
        )
        self.policy.train(was_training)
        return trajectory

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Sample with fixed seeds; log the mean reward and update the evaluation metrics."""
        trajectory = self.sample(batch)
        with torch.no_grad():
            rewards = self.reward(trajectory.images, trajectory.prompts)
        rewards = check_reward_output(rewards, len(batch), type(self.reward).__name__)
        self.log("val/reward_mean", rewards.float().nanmean(), batch_size=len(batch), sync_dist=True)
        if getattr(self, "evaluation", None) is not None:
            self.evaluation.update(trajectory.images)

    def on_validation_epoch_end(self) -> None:
        """Log FID / precision / recall / attribute KL of the epoch's samples."""
        if getattr(self, "evaluation", None) is None:
            return
        values: dict[str, Tensor] = self.evaluation.compute()
        self.log_dict({f"val/{name}": value.to(self.device) for name, value in values.items()})
        self.evaluation.reset()
