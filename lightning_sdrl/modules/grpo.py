"""GRPO for diffusion and flow models (Flow-GRPO, Liu et al. 2025): group-relative policy gradients.

Flow-GRPO samples every prompt ``group_size`` times per epoch, normalises each reward within its
prompt's group, and updates the policy with PPO's clipped ratio plus ``beta`` times the exact KL
of each step's Gaussian to the reference (pretrained) policy's. The sampler of a flow-matching
model is its SDE (:class:`~lightning_sdrl.policies.flow_kernels.FlowSDEStep`), whose steps are
Gaussian like DDIM's, so GRPO is DDPO's update with three choices changed:

- the advantage rule: :class:`~lightning_sdrl.functional.advantages.GroupRelativeAdvantages`;
- the prompts: ``SamplingDataModule(group_size=...)`` repeats each drawn prompt ``group_size``
  times (a group may span batches and processes; advantages are computed on the rewards of all
  processes, so every process sees the same groups' statistics);
- the KL to the reference policy with weight ``beta``.

It also trains on fewer sampling steps than it evaluates with (``num_steps`` vs
``val_num_steps``), optionally only inside an SDE window of ``sde_window_size`` steps (the
"Fast" variant; the ODE runs elsewhere), and optionally without classifier-free guidance
(``guidance_scale: 1``). It is not tied to flow models: with a DDIM policy ``noise_level`` is
DDIM's ``eta``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_sdrl.functional.advantages import GroupRelativeAdvantages
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.modules.ddpo import DDPOModule, ddpo_adamw
from lightning_sdrl.policies.base import DiffusionPolicy
from lightning_sdrl.rewards.base import RewardModule


class GRPOModule(DDPOModule):
    """Flow-GRPO: group-relative advantages, PPO clipping and a ``beta``-weighted KL to the reference.

    The defaults are Flow-GRPO's SD3.5 settings (10 training steps, noise level 0.7, guidance 4.5,
    clip range 1e-4, ``beta`` 0.04); group size is the DataModule's ``group_size`` (Flow-GRPO: 24).

    Args:
        policy: the model to fine-tune (a flow-matching policy such as
            :class:`~lightning_sdrl.policies.sd3.StableDiffusion3Policy`, or a DDIM one).
        reward: ``reward(images, prompts) -> [B]``.
        optimizer: optimiser factory (default AdamW, lr 3e-4, weight decay 1e-4).
        lr_scheduler: optional learning-rate schedule factory, stepped once per epoch.
        num_steps: sampling steps for training samples.
        noise_level: the SDE's noise level ``a`` (``sigma_t = a sqrt(t / (1 - t))``), or DDIM's ``eta``.
        guidance_scale: classifier-free guidance for sampling (1: train and sample without CFG).
        cfg_during_training: recompute log-probs with guidance, as sampled.
        train_batch_size: trajectories per gradient computation, per device.
        gradient_accumulation_steps: train batches per optimiser step.
        num_inner_epochs: passes over each epoch's samples.
        timestep_fraction: fraction of each trajectory's stochastic steps trained on.
        timestep_batch: trained steps of the same trajectories scored in one denoiser call (1: one
            step per call; the gradients are the same).
        clip_range: PPO ratio clip range.
        adv_clip_max: advantages are clamped to ``[-adv_clip_max, adv_clip_max]``.
        max_grad_norm: gradient-norm clip (``None`` disables).
        beta: weight of the exact per-step KL to the reference policy (0 disables).
        global_std: normalise by the std of all the epoch's rewards instead of each group's.
        sde_window_size: train only a window of this many stochastic steps (0: every step).
        sde_window_range: ``[lo, hi)`` inside which each batch draws its window.
        val_num_steps: sampling steps for validation (Flow-GRPO evaluates with 40).
        val_eta: noise level for validation (0: the deterministic ODE).
        sample_grid_every_n_epochs: save a PNG grid of samples every n epochs (0 disables).
        save_trained_on_end: write the trained LoRA / transformer to ``<log_dir>/trained``.
        checkpoint_trainable_only: checkpoints hold only trainable weights.
        max_consecutive_skips: skipped optimiser steps in a row before the run stops with an error.
        evaluation: FID / precision-recall / attribute-KL of validation samples.
    """

    algorithm_name = "GRPO"

    def __init__(
        self,
        policy: DiffusionPolicy,
        reward: RewardModule,
        optimizer: OptimizerCallable = ddpo_adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_steps: int = 10,
        noise_level: float = 0.7,
        guidance_scale: float = 4.5,
        cfg_during_training: bool = True,
        train_batch_size: int = 4,
        gradient_accumulation_steps: int = 1,
        num_inner_epochs: int = 1,
        timestep_fraction: float = 1.0,
        timestep_batch: int = 1,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        max_grad_norm: float | None = 1.0,
        beta: float = 0.04,
        global_std: bool = False,
        sde_window_size: int = 0,
        sde_window_range: tuple[int, int] | None = None,
        val_num_steps: int | None = None,
        val_eta: float | None = None,
        sample_grid_every_n_epochs: int = 1,
        save_trained_on_end: bool = True,
        checkpoint_trainable_only: bool = True,
        max_consecutive_skips: int = 3,
        evaluation: GenerationMetrics | None = None,
    ) -> None:
        super().__init__(
            policy,
            reward,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            num_steps=num_steps,
            eta=noise_level,
            guidance_scale=guidance_scale,
            cfg_during_training=cfg_during_training,
            train_batch_size=train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            num_inner_epochs=num_inner_epochs,
            timestep_fraction=timestep_fraction,
            timestep_batch=timestep_batch,
            clip_range=clip_range,
            adv_clip_max=adv_clip_max,
            max_grad_norm=max_grad_norm,
            advantages=GroupRelativeAdvantages(global_std=global_std),
            trust_region="clip",
            kl_reference_coef=beta,
            sample_grid_every_n_epochs=sample_grid_every_n_epochs,
            save_trained_on_end=save_trained_on_end,
            checkpoint_trainable_only=checkpoint_trainable_only,
            max_consecutive_skips=max_consecutive_skips,
            sde_window_size=sde_window_size,
            sde_window_range=sde_window_range,
            val_num_steps=val_num_steps,
            val_eta=val_eta,
            evaluation=evaluation,
        )
