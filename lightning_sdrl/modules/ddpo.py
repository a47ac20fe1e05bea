"""DDPO (Black et al. 2023): policy-gradient fine-tuning of a diffusion model on a reward.

One Lightning epoch is one DDPO epoch (the loop of :mod:`lightning_sdrl.modules.online`):

1. every training step samples one batch of trajectories with their step log-probs (no
   gradients) and scores it;
2. at the epoch's last step, rewards are gathered from all processes and turned into
   advantages (per-prompt statistics), then ``num_inner_epochs`` passes over the shuffled samples
   and a ``timestep_fraction`` of their shuffled steps update the policy with PPO clipping (or
   the Truly-PPO trust region of section III-F of the debiasing paper).

The math lives in :mod:`lightning_sdrl.functional`; this file only orchestrates it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.functional.advantages import AdvantageRule, PerPromptAdvantages
from lightning_sdrl.functional.gaussian import gaussian_kl_same_std
from lightning_sdrl.functional.ppo import PolicyLoss, clip_advantages, ppo_clip_loss, truly_ppo_loss
from lightning_sdrl.functional.seeding import derive_seed
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.modules.hyperparameters import record_arguments
from lightning_sdrl.modules.online import EpochSamples, OnlineRLModule
from lightning_sdrl.policies.base import DiffusionPolicy, Trajectory
from lightning_sdrl.rewards.base import RewardModule
from lightning_sdrl.validation import check_positive_ints

__all__ = ["DDPOModule", "EpochSamples", "check_ddpo_arguments", "ddpo_adamw"]

SDE_WINDOW_KEY = 5
"""Key mixed into a batch's seed for the draw of its SDE window (see :meth:`DDPOModule.sde_steps`)."""


def check_ddpo_arguments(
    num_steps: int,
    eta: float,
    guidance_scale: float,
    timestep_fraction: float,
    clip_range: float,
    adv_clip_max: float,
    max_grad_norm: float | None,
    trust_region: str,
    kl_threshold: float,
    rollback_coef: float,
    kl_reference_coef: float,
    sample_grid_every_n_epochs: int,
    sde_window_size: int = 0,
    sde_window_range: tuple[int, int] | None = None,
    val_num_steps: int | None = None,
    val_eta: float | None = None,
) -> None:
    """Reject DDPO settings that could only fail (or silently do nothing) later, naming the fix.

    Example:
        >>> check_ddpo_arguments(20, 0.0, 5.0, 1.0, 1e-4, 5.0, 1.0, "clip", 1e-4, 10.0, 0.0, 1)
        Traceback (most recent call last):
        ...
        ValueError: eta=0.0; expected 0 < eta <= 1 (eta = 0 is deterministic DDIM: its steps have no log-prob)
    """
    check_positive_ints(num_steps=num_steps)
    lo, hi = sde_window_range if sde_window_range is not None else (0, num_steps)
    checks = [
        (
            0.0 < eta <= 1.0,
            f"eta={eta}; expected 0 < eta <= 1 (eta = 0 is deterministic DDIM: its steps have no log-prob)",
        ),
        (
            isinstance(sde_window_size, int) and 0 <= sde_window_size <= num_steps,
            f"sde_window_size={sde_window_size!r}; expected 0 (every step stochastic) to num_steps={num_steps}",
        ),
        (
            not sde_window_size or 0 <= lo and lo + sde_window_size <= hi <= num_steps,
            f"sde_window_range={sde_window_range}; expected [lo, hi) with 0 <= lo, lo + sde_window_size "
            f"({sde_window_size}) <= hi <= num_steps ({num_steps})",
        ),
        (
            val_num_steps is None or isinstance(val_num_steps, int) and val_num_steps >= 1,
            f"val_num_steps={val_num_steps!r}; expected a positive number of steps, or null to use num_steps",
        ),
        (
            val_eta is None or 0.0 <= val_eta <= 1.0,
            f"val_eta={val_eta}; expected 0 <= val_eta <= 1 (0 validates with the deterministic sampler), or null",
        ),
        (guidance_scale >= 0, f"guidance_scale={guidance_scale}; expected >= 0 (1 disables guidance)"),
        (0.0 < timestep_fraction <= 1.0, f"timestep_fraction={timestep_fraction}; expected 0 < fraction <= 1"),
        (clip_range > 0, f"clip_range={clip_range}; expected a positive PPO clip range such as 1e-4"),
        (adv_clip_max > 0, f"adv_clip_max={adv_clip_max}; expected a positive advantage bound such as 5"),
        (
            max_grad_norm is None or max_grad_norm > 0,
            f"max_grad_norm={max_grad_norm}; expected a positive norm, or null to disable clipping",
        ),
        (trust_region in ("clip", "truly"), f"trust_region={trust_region!r}; expected 'clip' or 'truly'"),
        (kl_threshold > 0, f"kl_threshold={kl_threshold}; expected a positive trust-region radius"),
        (rollback_coef >= 0, f"rollback_coef={rollback_coef}; expected >= 0"),
        (kl_reference_coef >= 0, f"kl_reference_coef={kl_reference_coef}; expected >= 0 (0 disables the KL)"),
        (
            isinstance(sample_grid_every_n_epochs, int) and sample_grid_every_n_epochs >= 0,
            f"sample_grid_every_n_epochs={sample_grid_every_n_epochs!r}; expected an integer >= 0 (0 disables)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def ddpo_adamw(params: Any) -> torch.optim.Optimizer:
    """DDPO's optimiser: AdamW, lr 3e-4, betas (0.9, 0.999), weight decay 1e-4, eps 1e-8."""
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


class DDPOModule(OnlineRLModule):
    """DDPO with PPO clipping or a KL trust region, for any :class:`DiffusionPolicy` and reward.

    Args:
        policy: the diffusion model to fine-tune.
        reward: ``reward(images [B,3,H,W] in [0,1], prompts, **metadata) -> Tensor[B]``. A reward
            with ``batch_level = True`` is called on the batch of all processes at once.
        optimizer: optimiser factory for the trainable parameters.
        lr_scheduler: optional learning-rate schedule factory (e.g. ``torch.optim.lr_scheduler.ExponentialLR``),
            stepped once per DDPO epoch, after the policy update; its state is checkpointed.
        num_steps: DDIM sampling steps ``T``.
        eta: DDIM noise weight in ``(0, 1]``.
        guidance_scale: classifier-free guidance weight for sampling.
        cfg_during_training: recompute log-probs with guidance (as sampled); ``False`` uses the
            conditional branch only.
        train_batch_size: trajectories per gradient computation, per device.
        gradient_accumulation_steps: train batches per optimiser step.
        num_inner_epochs: passes over each epoch's samples (``K``).
        timestep_fraction: fraction of each trajectory's (shuffled) steps trained on.
        timestep_batch: trained steps of the same trajectories scored in one denoiser call (its
            batch is ``train_batch_size x timestep_batch``, times 2 with guidance): fewer, larger
            kernels, the same gradients as one step per call (1, the default).
        clip_range: PPO ratio clip range ``epsilon``.
        adv_clip_max: advantages are clamped to ``[-adv_clip_max, adv_clip_max]``.
        max_grad_norm: gradient-norm clip before each step (``None`` disables).
        advantages: the rule turning an epoch's rewards into advantages
            (:mod:`lightning_sdrl.functional.advantages`): ``PerPromptAdvantages`` (DDPO's per-prompt
            statistics), ``BatchNormalizedAdvantages`` or ``CenteredAdvantages`` (for a reward whose
            size carries meaning, as R_balance's). ``None``: ``PerPromptAdvantages(16, 16)``.
        trust_region: ``"clip"`` (PPO) or ``"truly"`` (Truly PPO: rollback when the exact step
            KL to the sampling policy exceeds ``kl_threshold``).
        kl_threshold: trust-region radius ``delta`` (per-dimension KL of one step).
        rollback_coef: rollback strength ``alpha``.
        kl_reference_coef: weight of a KL penalty to the pretrained policy (0 disables).
        sample_grid_every_n_epochs: save a PNG grid of samples every n epochs (0 disables).
        save_trained_on_end: write the trained LoRA/UNet to ``<log_dir>/trained`` after fit.
        checkpoint_trainable_only: checkpoints hold only trainable weights (the frozen base model
            is reloaded from its source).
        max_consecutive_skips: optimiser steps skipped in a row (non-finite gradients, or an epoch
            with no finite reward) after which the run stops with an error.
        sde_window_size: sample only this many consecutive steps stochastically (and train only
            on them), the others deterministically (Flow-GRPO-Fast); 0 samples every step
            stochastically.
        sde_window_range: ``[lo, hi)``: each sampling batch draws its window uniformly inside
            these steps (default: all steps).
        val_num_steps: sampling steps for validation (default ``num_steps``), e.g. 10 for
            training and 40 for evaluation (Flow-GRPO's denoising reduction).
        val_eta: noise weight for validation (default ``eta``; 0 evaluates with the ODE).
        evaluation: FID / precision-recall / attribute-KL of validation samples against a
            reference set (``None``: only the mean reward is validated).
    """

    algorithm_name = "DDPO"

    def __init__(
        self,
        policy: DiffusionPolicy,
        reward: RewardModule,
        optimizer: OptimizerCallable = ddpo_adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        cfg_during_training: bool = True,
        train_batch_size: int = 4,
        gradient_accumulation_steps: int = 1,
        num_inner_epochs: int = 1,
        timestep_fraction: float = 1.0,
        timestep_batch: int = 1,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        max_grad_norm: float | None = 1.0,
        advantages: AdvantageRule | None = None,
        trust_region: Literal["clip", "truly"] = "clip",
        kl_threshold: float = 1e-4,
        rollback_coef: float = 10.0,
        kl_reference_coef: float = 0.0,
        sample_grid_every_n_epochs: int = 1,
        save_trained_on_end: bool = True,
        checkpoint_trainable_only: bool = True,
        max_consecutive_skips: int = 3,
        sde_window_size: int = 0,
        sde_window_range: tuple[int, int] | None = None,
        val_num_steps: int | None = None,
        val_eta: float | None = None,
        evaluation: GenerationMetrics | None = None,
    ) -> None:
        arguments = dict(locals())
        super().__init__(
            policy,
            reward,
            optimizer,
            lr_scheduler,
            PerPromptAdvantages(16, 16) if advantages is None else advantages,
            checkpoint_trainable_only,
            max_consecutive_skips,
            evaluation,
        )
        check_ddpo_arguments(
            num_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
            timestep_fraction=timestep_fraction,
            clip_range=clip_range,
            adv_clip_max=adv_clip_max,
            max_grad_norm=max_grad_norm,
            trust_region=trust_region,
            kl_threshold=kl_threshold,
            rollback_coef=rollback_coef,
            kl_reference_coef=kl_reference_coef,
            sample_grid_every_n_epochs=sample_grid_every_n_epochs,
            sde_window_size=sde_window_size,
            sde_window_range=sde_window_range,
            val_num_steps=val_num_steps,
            val_eta=val_eta,
        )
        check_positive_ints(
            train_batch_size=train_batch_size,
            num_inner_epochs=num_inner_epochs,
            gradient_accumulation_steps=gradient_accumulation_steps,
            timestep_batch=timestep_batch,
        )
        objects = ["policy", "reward", "optimizer", "lr_scheduler", "evaluation", "advantages"]
        self.settings = record_arguments(self, objects, arguments)
        self.keep_step_means = trust_region == "truly"

    def on_fit_start(self) -> None:
        """Keep a frozen copy of the denoiser if a reference KL is asked for under full fine-tuning."""
        super().on_fit_start()
        if self.settings.kl_reference_coef > 0:
            self.policy.keep_reference()

    # ------------------------------------------------------------------ sampling and the update
    def rollout(self, batch: PromptBatch) -> Trajectory:
        """Trajectories of ``batch`` with every latent and step log-prob (inside the SDE window)."""
        return self.sample(batch)

    def optimize(self, rollouts: Trajectory, advantages: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
        """``num_inner_epochs`` PPO passes over the epoch's trajectories; their mean statistics."""
        stats = [self._inner_epoch(rollouts, advantages, k, weights) for k in range(self.settings.num_inner_epochs)]
        return {key: torch.stack([s[key] for s in stats]).mean() for key in stats[0]}

    def sde_steps(self, batch: PromptBatch) -> Tensor | None:
        """The SDE window of ``batch`` (``sde_window_size`` consecutive steps), drawn from its seed.

        ``None`` (every step stochastic) when ``sde_window_size`` is 0.
        """
        hp = self.settings
        if not hp.sde_window_size:
            return None
        lo, hi = hp.sde_window_range if hp.sde_window_range is not None else (0, hp.num_steps)
        generator = torch.Generator().manual_seed(derive_seed(batch.seed, SDE_WINDOW_KEY))
        start = int(torch.randint(lo, hi - hp.sde_window_size + 1, (1,), generator=generator))
        steps = torch.zeros(hp.num_steps, dtype=torch.bool)
        steps[start : start + hp.sde_window_size] = True
        return steps

    def _inner_epoch(
        self, trajectory: Trajectory, advantages: Tensor, inner: int, weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        """One pass over shuffled samples and shuffled timesteps; returns mean statistics.

        ``weights`` (``[B]``, 1 or 0) marks padding rows (see :meth:`_kept_rows`) left out of the loss.
        """
        hp = self.settings
        generator = torch.Generator().manual_seed(derive_seed(self.current_epoch, inner, self.global_rank))
        num_samples, num_steps = len(trajectory), trajectory.num_steps
        order = torch.randperm(num_samples, generator=generator)
        trajectory, advantages = trajectory.select(order), advantages[order.to(advantages.device)]
        weights = weights[order] if weights is not None else None
        # Each sample gets its own random order of timesteps (as in ddpo-pytorch); deterministic
        # steps (outside an SDE window) sort last and are never trained on.
        scores = torch.rand(num_samples, num_steps, generator=generator)
        stochastic = trajectory.stochastic_mask().cpu()
        counts = stochastic.sum(dim=1)
        if int(counts.min()) != int(counts.max()) or int(counts.min()) == 0:
            raise ValueError(
                f"the epoch's trajectories have {sorted(set(counts.tolist()))} stochastic steps each; DDPO needs "
                "the same positive number in every trajectory (one sde_window_size for the run)"
            )
        step_order = torch.argsort(torch.where(stochastic, scores, 2.0), dim=1)
        train_steps = max(1, math.ceil(int(counts[0]) * hp.timestep_fraction))
        batches = list(range(0, num_samples, hp.train_batch_size))
        optimizer = self.optimizers()
        totals: dict[str, list[Tensor]] = {}
        for index, start in enumerate(batches):
            rows = torch.arange(start, min(start + hp.train_batch_size, num_samples))
            window_end = (index + 1) % hp.gradient_accumulation_steps == 0 or index + 1 == len(batches)
            # Chunks of timestep_batch steps, each scored in one denoiser call; a chunk's loss is the
            # mean over its steps, so weighting it by its size gives the per-step loop's gradient.
            for first in range(0, train_steps, hp.timestep_batch):
                steps = step_order[rows, first : min(first + hp.timestep_batch, train_steps)]
                last_backward = window_end and first + steps.shape[1] == train_steps
                with self._gradient_sync(last_backward):
                    out, extra = self._step_loss(
                        trajectory.select(rows),
                        advantages[rows.to(advantages.device)],
                        steps,
                        weights[rows] if weights is not None else None,
                    )
                    loss = out.loss + extra.get("train/kl_reference_loss", 0.0)
                    self.manual_backward(loss * steps.shape[1] / (train_steps * hp.gradient_accumulation_steps))
                for key, value in {
                    "train/loss": loss.detach(),
                    "train/approx_kl": out.approx_kl.detach(),
                    "train/clip_fraction": out.clip_fraction.detach(),
                    **extra,
                }.items():
                    totals.setdefault(key, []).append(value.detach())
            if window_end:
                self._optimizer_step(optimizer)
        return {key: torch.stack(values).mean() for key, values in totals.items()}

    def _step_loss(
        self, trajectory: Trajectory, advantages: Tensor, step: Tensor, weights: Tensor | None = None
    ) -> tuple[PolicyLoss, dict[str, Tensor]]:
        """Policy loss of stored steps (and the optional reference KL), averaged over every scored step.

        ``step`` is ``[B]`` (one step per sample) or ``[B, S]`` (``S`` steps per sample, scored in
        one denoiser call). With ``weights`` (1 or 0 per sample) only the weight-1 samples enter
        the loss; a batch of weight-0 samples gives a zero loss that still runs backward (for
        DDP's gradient sync).
        """
        hp = self.settings
        guidance = hp.guidance_scale if hp.cfg_during_training else 1.0
        steps = step.view(len(trajectory), -1)
        per_row = steps.shape[1]
        # one step per sample is scored as a [B] step (the policy's one-step call)
        log_prob, dist = self.policy.step_log_prob(trajectory, steps if per_row > 1 else steps[:, 0], hp.eta, guidance)
        log_prob = log_prob.view(len(trajectory), per_row)
        if weights is not None:
            kept = torch.nonzero(weights > 0).flatten()
            if len(kept) == 0:
                zero = 0.0 * log_prob.sum()
                return PolicyLoss(zero, torch.ones_like(log_prob.flatten()), zero.detach(), zero.detach()), {}
            # the distribution's rows are the samples' steps, row-major: sample i has rows i*S .. i*S+S-1
            entries = (kept.unsqueeze(1) * per_row + torch.arange(per_row)).flatten().to(log_prob.device)
            trajectory, advantages, steps = trajectory.select(kept), advantages[kept.to(advantages.device)], steps[kept]
            log_prob = log_prob[kept.to(log_prob.device)]
            rows_before = len(weights) * per_row
            dist = type(dist)(*(value[entries] if value.shape[0] == rows_before else value for value in dist))
        steps = steps.to(log_prob.device)
        log_prob = log_prob.flatten()
        old_log_prob = trajectory.log_probs.gather(1, steps).flatten()
        advantages = clip_advantages(advantages, hp.adv_clip_max).repeat_interleave(per_row)
        if hp.trust_region == "clip":
            out = ppo_clip_loss(log_prob, old_log_prob, advantages, hp.clip_range)
        else:
            rows = torch.arange(len(trajectory), device=steps.device).unsqueeze(1)
            old_mean = trajectory.means[rows, steps].flatten(0, 1).to(dist.mean.dtype)
            kl_old = gaussian_kl_same_std(old_mean, dist.mean, dist.std)
            out = truly_ppo_loss(log_prob, old_log_prob, advantages, kl_old, hp.kl_threshold, hp.rollback_coef)
        extra: dict[str, Tensor] = {}
        if hp.kl_reference_coef > 0:
            stored = self.policy.stored_steps(trajectory, steps)
            with torch.no_grad(), self.policy.reference():
                reference = self.policy.step_distribution(
                    stored.sample, stored.timesteps, stored.conditions, hp.eta, guidance
                )
            kl_reference = gaussian_kl_same_std(dist.mean, reference.mean, dist.std).mean()
            extra = {
                "train/kl_reference": kl_reference.detach(),
                "train/kl_reference_loss": hp.kl_reference_coef * kl_reference,
            }
        return out, extra
