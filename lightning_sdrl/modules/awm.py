"""Advantage Weighted Matching (Xue et al. 2025): policy gradients through the flow-matching loss.

AWM reads the pretraining loss as a likelihood: at a training timestep the matching error
``l = mean (v_theta - (eps - x_0))^2`` (for DDPM models the error of the output against its
training target) gives ``log p = -w(t) l`` with a time weighting (uniform, ``t``, ``t^2`` or the
generalised Huber of the reference), and the policy gradient is PPO's clipped surrogate on
``exp(log p_theta - log p_old)`` with the clipped advantages
(:func:`~lightning_sdrl.functional.awm.awm_loss`). Rollouts come from the trained policy
(on-policy: the ratio is 1 at the first optimiser step of an epoch; with more steps per epoch the
sampling weights are kept for the ratio), and the old policy is an EMA that the loss stays close
to (``ema_kl_coef``), next to the pretrained reference (``kl_reference_coef``). The machinery is
:class:`~lightning_sdrl.modules.forward_process.ForwardProcessModule`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_sdrl.functional.advantages import AdvantageRule
from lightning_sdrl.functional.awm import AWMWeighting, awm_log_prob, awm_loss
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.modules.forward_process import (
    ForwardProcessModule,
    stratified_training_steps,
)
from lightning_sdrl.policies.base import DiffusionPolicy
from lightning_sdrl.policies.old_policy import ParameterCopy
from lightning_sdrl.policies.samples import Samples
from lightning_sdrl.policies.solvers import Solver
from lightning_sdrl.rewards.base import RewardModule
from lightning_sdrl.validation import check_positive_ints


def awm_adamw(params: Any) -> torch.optim.Optimizer:
    """AWM's optimiser: AdamW, lr 3e-4, betas (0.9, 0.999), weight decay 1e-4, eps 1e-8."""
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


class AWMModule(ForwardProcessModule):
    """Advantage Weighted Matching for any :class:`DiffusionPolicy` (flow-matching or DDPM/DDIM) and reward.

    The defaults are the reference's SD3.5 settings (14 ODE rollout steps without guidance, 6
    stratified training timesteps among the first 90% of the steps, the generalised-Huber
    weighting with ``p = 0.25``, clip range 1, advantages clipped to ``[-5, 5]`` and rescaled to
    ``[-1, 1]``, EMA KL weight 1 with decay ``min(0.001 step, 0.3)``).

    Args:
        policy: the model to fine-tune.
        reward: ``reward(images, prompts) -> [B]``.
        optimizer: optimiser factory (default AdamW, lr 3e-4, weight decay 1e-4).
        lr_scheduler: optional learning-rate schedule factory, stepped once per epoch.
        num_steps: sampling steps of the rollouts (also the timesteps training draws from).
        eta: the rollout sampler's noise (0: the deterministic ODE).
        solver: ``"kernel"`` (the policy's own sampler), ``"dpmsolver++"`` or ``"unipc"`` (ODE only).
        guidance_scale: classifier-free guidance of the rollouts (1: none, the reference's choice).
        train_batch_size: samples per gradient computation, per device.
        gradient_accumulation_steps: train batches per optimiser step.
        num_inner_epochs: passes over each epoch's samples.
        train_timesteps: training timesteps per sample, one in each of as many strata.
        timestep_fraction: the strata cover the step indices ``1 .. int(fraction * num_steps) - 1``.
        weighting: ``"uniform"``, ``"t"``, ``"t2"`` or ``"huber"`` (the generalised Huber).
        huber_power: ``p`` of the generalised Huber.
        clip_range: PPO's ratio clip range.
        adv_clip_max: advantages are clipped to ``[-adv_clip_max, adv_clip_max]`` ...
        advantage_max: ... then rescaled into ``[-advantage_max, advantage_max]`` (``None``: not rescaled).
        kl_reference_coef: weight of ``||v_theta - v_ref||^2`` to the pretrained model
            (reference: 1e-4 PickScore, 1e-3 GenEval, 3e-3 OCR).
        ema_kl_coef: weight of ``||v_theta - v_ema||^2`` to the EMA policy (reference: 1; 0 disables).
        decay_rate: the EMA's decay grows by this per optimiser step ...
        max_decay: ... up to this (``min(decay_rate * step, max_decay)``; reference 0.001, 0.3).
        advantages: the advantage rule (default: group-relative over the global std, eps 1e-4).
        max_grad_norm: gradient-norm clip (``None`` disables).
        val_num_steps: sampling steps for validation (default ``num_steps``).
        val_eta: noise for validation (default ``eta``).
        sample_grid_every_n_epochs: save a PNG grid of samples every n epochs (0 disables).
        save_trained_on_end: write the trained LoRA / denoiser to ``<log_dir>/trained``.
        checkpoint_trainable_only: checkpoints hold only trainable weights (and the EMA policy).
        max_consecutive_skips: skipped optimiser steps in a row before the run stops with an error.
        evaluation: FID / precision-recall / attribute-KL of validation samples.
    """

    algorithm_name = "AWM"

    def __init__(
        self,
        policy: DiffusionPolicy,
        reward: RewardModule,
        optimizer: OptimizerCallable = awm_adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_steps: int = 14,
        eta: float = 0.0,
        solver: Solver = "kernel",
        guidance_scale: float = 1.0,
        train_batch_size: int = 4,
        gradient_accumulation_steps: int = 1,
        num_inner_epochs: int = 1,
        train_timesteps: int = 6,
        timestep_fraction: float = 0.9,
        weighting: AWMWeighting = "huber",
        huber_power: float = 0.25,
        clip_range: float = 1.0,
        adv_clip_max: float = 5.0,
        advantage_max: float | None = 1.0,
        kl_reference_coef: float = 0.0,
        ema_kl_coef: float = 1.0,
        decay_rate: float = 0.001,
        max_decay: float = 0.3,
        advantages: AdvantageRule | None = None,
        max_grad_norm: float | None = 1.0,
        val_num_steps: int | None = None,
        val_eta: float | None = None,
        sample_grid_every_n_epochs: int = 1,
        save_trained_on_end: bool = True,
        checkpoint_trainable_only: bool = True,
        max_consecutive_skips: int = 3,
        evaluation: GenerationMetrics | None = None,
    ) -> None:
        super().__init__(dict(locals()))
        check_positive_ints(train_timesteps=train_timesteps)
        # the strata must fit (raises naming train_timesteps), the weighting must exist
        stratified_training_steps(1, num_steps, train_timesteps, timestep_fraction, torch.Generator())
        awm_log_prob(torch.zeros(1), 1.0, weighting, huber_power)
        checks = [
            (clip_range > 0, f"clip_range={clip_range}; expected a positive PPO clip range (AWM: 1)"),
            (adv_clip_max > 0, f"adv_clip_max={adv_clip_max}; expected a positive advantage clip (AWM: 5)"),
            (
                advantage_max is None or advantage_max > 0,
                f"advantage_max={advantage_max}; expected a positive bound (AWM: 1), or null",
            ),
            (ema_kl_coef >= 0, f"ema_kl_coef={ema_kl_coef}; expected >= 0 (0 disables the KL to the EMA)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._sampling_weights: ParameterCopy | None = None

    def training_steps(self, num_samples: int, num_steps: int, generator: torch.Generator) -> Tensor:
        """Per sample one index in each of ``train_timesteps`` strata of the sampler's steps."""
        hp = self.settings
        return stratified_training_steps(num_samples, num_steps, hp.train_timesteps, hp.timestep_fraction, generator)

    def optimize(self, rollouts: Samples, advantages: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
        """Keep the sampling weights for the ratio when the epoch takes more than one optimiser step."""
        hp = self.settings
        batches = -(-len(rollouts) // hp.train_batch_size)
        steps = hp.num_inner_epochs * -(-batches // hp.gradient_accumulation_steps)
        self._sampling_weights = ParameterCopy(self.policy) if steps > 1 else None
        try:
            return super().optimize(rollouts, advantages, weights)
        finally:
            self._sampling_weights = None

    def fixed_outputs(self, x_t: Tensor, timesteps: Tensor, samples: Samples) -> dict[str, Tensor]:
        """The sampling weights' output (after the epoch's first step), the EMA's and the reference's."""
        fixed = self.reference_outputs(x_t, timesteps, samples)
        if self._sampling_weights is not None:
            fixed["old"] = self.output_with(self._sampling_weights.swapped_into(self.policy), x_t, timesteps, samples)
        if self.settings.ema_kl_coef > 0:
            fixed["ema"] = self.output_with(self.old_policy.swapped_into(self.policy), x_t, timesteps, samples)
        return fixed

    def timestep_loss(
        self,
        output: Tensor,
        fixed: dict[str, Tensor],
        x_t: Tensor,
        samples: Samples,
        noise: Tensor,
        level: Tensor,
        advantages: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """AWM's clipped surrogate (plus the weighted reference and EMA KLs); on-policy without ``fixed["old"]``."""
        hp = self.settings
        out = awm_loss(
            output,
            samples.samples.float(),
            noise,
            level,
            advantages,
            old_output=fixed.get("old"),
            reference_output=fixed.get("reference"),
            ema_output=fixed.get("ema"),
            parameterization=self.policy.parameterization,
            weighting=hp.weighting,
            huber_power=hp.huber_power,
            clip_range=hp.clip_range,
            adv_clip_max=hp.adv_clip_max,
            advantage_max=hp.advantage_max,
        )
        stats = {
            "train/policy_loss": out.loss.detach(),
            "train/log_prob": out.log_prob.mean().detach(),
            "train/clip_fraction": out.clip_fraction.detach(),
            "train/approx_kl": out.approx_kl.detach(),
        }
        loss = out.loss
        if out.kl is not None:
            loss = loss + hp.kl_reference_coef * out.kl.mean()
            stats["train/kl_reference"] = out.kl.mean().detach()
        if out.ema_kl is not None:
            loss = loss + hp.ema_kl_coef * out.ema_kl.mean()
            stats["train/kl_ema"] = out.ema_kl.mean().detach()
        return loss, stats
