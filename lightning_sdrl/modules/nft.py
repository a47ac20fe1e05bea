"""DiffusionNFT (Zheng et al. 2025): online diffusion RL on the forward process, negative-aware.

Rollouts come from the old policy, deterministically and without guidance by default (the
reference: a 10-step ODE). For each sample at a training timestep the trained output
``v_theta`` and the old one ``v_old`` define two implicit policies,
``v+ = (1 - beta) v_old + beta v_theta`` and ``v- = (1 + beta) v_old - beta v_theta``; the loss
pulls ``v+``'s clean-sample estimate towards the sample with weight ``r`` (the optimality
probability, ``0.5 + A / (2 c)`` clipped) and ``v-``'s with weight ``1 - r``, each squared error
normalised by its own mean absolute error (:func:`~lightning_sdrl.functional.nft.nft_loss`). A
good sample (``r`` near 1) moves ``v_theta`` towards it, a bad one (``r`` near 0) away; equal
rewards give no gradient at ``v_theta = v_old``. The machinery (rollouts, noising, the old
policy's EMA, checkpoints) is :class:`~lightning_sdrl.modules.forward_process.ForwardProcessModule`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_sdrl.functional.advantages import AdvantageRule
from lightning_sdrl.functional.nft import nft_loss
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.modules.forward_process import (
    ForwardProcessModule,
    nft_training_steps,
)
from lightning_sdrl.policies.base import DiffusionPolicy
from lightning_sdrl.policies.samples import Samples
from lightning_sdrl.policies.solvers import Solver
from lightning_sdrl.rewards.base import RewardModule


def nft_adamw(params: Any) -> torch.optim.Optimizer:
    """DiffusionNFT's optimiser: AdamW, lr 3e-4, betas (0.9, 0.999), weight decay 1e-4, eps 1e-8."""
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


class NFTModule(ForwardProcessModule):
    """DiffusionNFT for any :class:`DiffusionPolicy` (flow-matching or DDPM/DDIM) and reward.

    The defaults are the reference's SD3.5 settings (10 ODE rollout steps without guidance, 99% of
    the steps trained, beta 1, advantage clip 5, old-policy decay ``min(0.001 step, 0.5)``,
    per-prompt advantages over the global std); group size is the DataModule's ``group_size``
    (the reference: 24).

    Args:
        policy: the model to fine-tune.
        reward: ``reward(images, prompts) -> [B]``.
        optimizer: optimiser factory (default AdamW, lr 3e-4, weight decay 1e-4).
        lr_scheduler: optional learning-rate schedule factory, stepped once per epoch.
        num_steps: sampling steps of the rollouts (also the timesteps training draws from).
        eta: the rollout sampler's noise (0: the deterministic ODE; DDIM's eta or the flow SDE's level).
        solver: ``"kernel"`` (the policy's own sampler), ``"dpmsolver++"`` or ``"unipc"`` (ODE only).
        guidance_scale: classifier-free guidance of the rollouts (1: none, the reference's choice).
        train_batch_size: samples per gradient computation, per device.
        gradient_accumulation_steps: train batches per optimiser step.
        num_inner_epochs: passes over each epoch's samples.
        timestep_fraction: share of the sampler's timesteps each sample trains on (0.99: all but one
            of 10), drawn per sample, each with fresh noise.
        beta: ``> 0``, the implicit policies' step from the old policy (reference: 1; 0.1 for OCR).
        adv_clip_max: ``c > 0``: advantages clipped to ``[-c, c]`` before ``r = 0.5 + A / (2c)``.
        kl_reference_coef: weight of ``||v_theta - v_ref||^2`` to the pretrained model (reference: 1e-4).
        decay_rate: the old policy's decay grows by this per optimiser step ...
        max_decay: ... up to this (``eta(step) = min(decay_rate * step, max_decay)``; 0 and 0:
            the old policy is the trained one after every epoch).
        advantages: the advantage rule (default: group-relative over the global std, eps 1e-4).
        max_grad_norm: gradient-norm clip (``None`` disables).
        val_num_steps: sampling steps for validation (default ``num_steps``).
        val_eta: noise for validation (default ``eta``).
        sample_grid_every_n_epochs: save a PNG grid of samples every n epochs (0 disables).
        save_trained_on_end: write the trained LoRA / denoiser to ``<log_dir>/trained``.
        checkpoint_trainable_only: checkpoints hold only trainable weights (and the old policy).
        max_consecutive_skips: skipped optimiser steps in a row before the run stops with an error.
        evaluation: FID / precision-recall / attribute-KL of validation samples.
    """

    algorithm_name = "NFT"
    sample_with_old_policy = True

    def __init__(
        self,
        policy: DiffusionPolicy,
        reward: RewardModule,
        optimizer: OptimizerCallable = nft_adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_steps: int = 10,
        eta: float = 0.0,
        solver: Solver = "kernel",
        guidance_scale: float = 1.0,
        train_batch_size: int = 4,
        gradient_accumulation_steps: int = 1,
        num_inner_epochs: int = 1,
        timestep_fraction: float = 0.99,
        beta: float = 1.0,
        adv_clip_max: float = 5.0,
        kl_reference_coef: float = 0.0,
        decay_rate: float = 0.001,
        max_decay: float = 0.5,
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
        if not beta > 0:
            raise ValueError(f"beta={beta}; expected beta > 0 (the implicit policies' step; DiffusionNFT: 1)")
        if not adv_clip_max > 0:
            raise ValueError(f"adv_clip_max={adv_clip_max}; expected a positive advantage clip (DiffusionNFT: 5)")

    def training_steps(self, num_samples: int, num_steps: int, generator: torch.Generator) -> Tensor:
        """Per sample a random ``timestep_fraction`` of the sampler's steps."""
        return nft_training_steps(num_samples, num_steps, self.settings.timestep_fraction, generator)

    def fixed_outputs(self, x_t: Tensor, timesteps: Tensor, samples: Samples) -> dict[str, Tensor]:
        """The old policy's output (and the reference's, for the KL)."""
        old = self.output_with(self.old_policy.swapped_into(self.policy), x_t, timesteps, samples)
        return {"old": old, **self.reference_outputs(x_t, timesteps, samples)}

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
        """DiffusionNFT's loss against the old policy's output (plus the weighted reference KL)."""
        hp = self.settings
        out = nft_loss(
            output,
            fixed["old"],
            x_t,
            samples.samples.float(),
            level,
            advantages,
            beta=hp.beta,
            adv_clip_max=hp.adv_clip_max,
            parameterization=self.policy.parameterization,
            reference_output=fixed.get("reference"),
        )
        stats = {
            "train/policy_loss": out.loss.detach(),
            "train/optimality_mean": out.optimality.mean(),
            "train/positive_loss": out.positive_loss.mean().detach(),
            "train/negative_loss": out.negative_loss.mean().detach(),
        }
        loss = out.loss
        if out.kl is not None:
            loss = loss + hp.kl_reference_coef * out.kl.mean()
            stats["train/kl_reference"] = out.kl.mean().detach()
        return loss, stats
