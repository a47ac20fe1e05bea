"""DDPO (Black et al. 2023): policy-gradient fine-tuning of a diffusion model on a reward.

One Lightning epoch is one DDPO epoch:

1. every training step samples one batch of trajectories (no gradients) and scores it;
2. at the epoch's last step, rewards are gathered from all processes and turned into
   advantages (per-prompt statistics), then ``num_inner_epochs`` passes over the shuffled samples
   and a ``timestep_fraction`` of their shuffled steps update the policy with PPO clipping (or
   the Truly-PPO trust region of section III-F of the debiasing paper).

The math lives in :mod:`lightning_sdrl.functional`; this file only orchestrates it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_sdrl.data.sampling import PromptBatch, derive_seed
from lightning_sdrl.functional.ddim import gaussian_kl_same_std
from lightning_sdrl.functional.ppo import PolicyLoss, clip_advantages, ppo_clip_loss, truly_ppo_loss
from lightning_sdrl.functional.stat_tracking import PerPromptStatTracker, batch_advantages
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.modules.generation import GenerationModule
from lightning_sdrl.policies.base import DiffusionPolicy, Trajectory
from lightning_sdrl.rewards.base import check_reward_output
from lightning_sdrl.validation import check_positive_ints


@dataclass
class EpochSamples:
    """What one DDPO epoch sampled and how it was scored (``DDPOModule.last_update``, for callbacks).

    Attributes:
        rewards: ``[W * B]`` rewards of all processes, in rank order.
        advantages: ``[W * B]`` advantages of all processes (``None`` if the update was skipped).
        prompt_ids: ``[W * B]`` prompt ids of all processes.
        images: ``[B, 3, H, W]`` this process's images.
        prompts: this process's ``B`` prompts.
    """

    rewards: Tensor
    advantages: Tensor | None
    prompt_ids: Tensor
    images: Tensor
    prompts: list[str]


def ddpo_adamw(params: Any) -> torch.optim.Optimizer:
    """DDPO's optimiser: AdamW, lr 3e-4, betas (0.9, 0.999), weight decay 1e-4, eps 1e-8."""
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


class DDPOModule(GenerationModule):
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
        clip_range: PPO ratio clip range ``epsilon``.
        adv_clip_max: advantages are clamped to ``[-adv_clip_max, adv_clip_max]``.
        max_grad_norm: gradient-norm clip before each step (``None`` disables).
        per_prompt_stat_tracking: normalise rewards per prompt (else over the whole batch).
        scale_advantages: divide batch-normalised advantages by the batch's reward std. ``False``
            only centres them, so a reward whose size carries meaning (R_balance shrinks to 0 at
            balance) keeps it and updates fade near the goal. Ignored with per-prompt tracking.
        stat_buffer_size: rewards kept per prompt by the tracker.
        stat_min_count: rewards a prompt needs before its own statistics are used.
        trust_region: ``"clip"`` (PPO) or ``"truly"`` (Truly PPO: rollback when the exact step
            KL to the sampling policy exceeds ``kl_threshold``).
        kl_threshold: trust-region radius ``delta`` (per-dimension KL of one step).
        rollback_coef: rollback strength ``alpha``.
        kl_reference_coef: weight of a KL penalty to the pretrained policy (0 disables).
        sample_grid_every_n_epochs: save a PNG grid of samples every n epochs (0 disables).
        save_trained_on_end: write the trained LoRA/UNet to ``<log_dir>/trained`` after fit.
        checkpoint_trainable_only: checkpoints hold only trainable weights (the frozen base model
            is reloaded from its source).
        evaluation: FID / precision-recall / attribute-KL of validation samples against a
            reference set (``None``: only the mean reward is validated).
    """

    def __init__(
        self,
        policy: DiffusionPolicy,
        reward: nn.Module,
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
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        max_grad_norm: float | None = 1.0,
        per_prompt_stat_tracking: bool = True,
        scale_advantages: bool = True,
        stat_buffer_size: int = 16,
        stat_min_count: int = 16,
        trust_region: Literal["clip", "truly"] = "clip",
        kl_threshold: float = 1e-4,
        rollback_coef: float = 10.0,
        kl_reference_coef: float = 0.0,
        sample_grid_every_n_epochs: int = 1,
        save_trained_on_end: bool = True,
        checkpoint_trainable_only: bool = True,
        evaluation: GenerationMetrics | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction={timestep_fraction}; expected 0 < fraction <= 1")
        check_positive_ints(
            train_batch_size=train_batch_size,
            num_inner_epochs=num_inner_epochs,
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
        if trust_region not in ("clip", "truly"):
            raise ValueError(f"trust_region={trust_region!r}; expected 'clip' or 'truly'")
        self.save_hyperparameters(ignore=["policy", "reward", "optimizer", "lr_scheduler", "evaluation"])
        self.keep_step_means = trust_region == "truly"
        self.evaluation = evaluation
        self.automatic_optimization = False
        self.strict_loading = not checkpoint_trainable_only
        self.policy, self.reward, self.optimizer_factory = policy, reward, optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)
        self._epoch_samples: list[tuple[Trajectory, Tensor]] = []
        self.skipped_epochs = 0
        self.last_update: EpochSamples | None = None
        self.reward_history: list[Tensor] = []

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self) -> Any:
        """The optimiser over the policy's trainable parameters (LoRA or the whole UNet), and its schedule."""
        params = self.policy.trainable_parameters()
        if not params:
            raise ValueError("the policy has no trainable parameters; check its lora settings")
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def on_fit_start(self) -> None:
        """Keep a frozen copy of the denoiser if a reference KL is asked for under full fine-tuning."""
        if self.hparams.kl_reference_coef > 0:
            self.policy.keep_reference()

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Sample and score one batch; on the epoch's last batch, run the policy update."""
        trajectory = self.sample(batch)
        self._epoch_samples.append((trajectory, self.score(trajectory)))
        if batch_idx + 1 >= self.trainer.num_training_batches:
            samples, self._epoch_samples = self._epoch_samples, []
            trajectory = Trajectory.cat([t for t, _ in samples])
            self.update(trajectory, torch.cat([r for _, r in samples]))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the tracker's buffers; drop frozen weights when ``checkpoint_trainable_only``."""
        checkpoint["stat_tracker"] = self.tracker.state_dict()
        checkpoint["skipped_epochs"] = self.skipped_epochs
        if self.hparams.checkpoint_trainable_only:
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the tracker's buffers."""
        if "stat_tracker" in checkpoint:
            self.tracker.load_state_dict(checkpoint["stat_tracker"])
        self.skipped_epochs = checkpoint.get("skipped_epochs", 0)

    def on_train_end(self) -> None:
        """Write the trained weights in diffusers format to ``<log_dir>/trained``."""
        if self.hparams.save_trained_on_end:
            directory = Path(self._log_dir()) / "trained"  # every rank: log_dir is a collective call
            if self.trainer.is_global_zero:
                self.policy.save_trained(directory)

    # ------------------------------------------------------------------ sampling and rewards
    @torch.no_grad()
    def score(self, trajectory: Trajectory) -> Tensor:
        """Rewards ``[B]`` of sampled trajectories (batch-level rewards see all processes)."""
        images, prompts = trajectory.images, trajectory.prompts
        world = self.trainer.world_size if self._trainer is not None else 1
        batch_level = getattr(self.reward, "batch_level", False) and world > 1
        if batch_level:
            images = self.all_gather(images).flatten(0, 1)
            gathered: list[list[str]] = [[] for _ in range(world)]
            torch.distributed.all_gather_object(gathered, prompts)
            prompts = sum(gathered, [])
        rewards = check_reward_output(self.reward(images, prompts), len(prompts), type(self.reward).__name__)
        if batch_level:
            rewards = rewards.view(world, -1)[self.global_rank]
        return rewards.to(self.device, torch.float32)

    # ------------------------------------------------------------------ the policy update
    def _gather(self, tensor: Tensor) -> Tensor:
        """``[B]`` per process -> ``[world * B]`` in rank order (identity on one process)."""
        gathered = self.all_gather(tensor)
        return gathered.flatten() if self.trainer.world_size > 1 else gathered

    def update(self, trajectory: Trajectory, rewards: Tensor) -> None:
        """Advantages from the epoch's rewards, then ``num_inner_epochs`` of PPO updates."""
        all_rewards = self._gather(rewards)
        all_ids = self._gather(trajectory.prompt_ids)
        self.last_update = EpochSamples(all_rewards, None, all_ids, trajectory.images, trajectory.prompts)
        if not torch.isfinite(all_rewards).all():
            # A NaN/inf reward would poison the advantages of every sample: skip the update.
            self.skipped_epochs += 1
            self.log("train/skipped_epochs", float(self.skipped_epochs))
            return
        if self.hparams.per_prompt_stat_tracking:
            all_advantages = self.tracker.update(all_ids.tolist(), all_rewards)
        elif self.hparams.scale_advantages:
            all_advantages = batch_advantages(all_rewards)
        else:
            all_advantages = all_rewards - all_rewards.mean()
        self.last_update.advantages = all_advantages
        self.reward_history.append(all_rewards.mean().detach().cpu())
        advantages = all_advantages.view(self.trainer.world_size, -1)[self.global_rank]
        stats = [self._inner_epoch(trajectory, advantages, k) for k in range(self.hparams.num_inner_epochs)]
        self.log_dict(
            {
                "train/reward_mean": all_rewards.mean(),
                "train/reward_std": all_rewards.std(unbiased=False),
                "train/skipped_epochs": float(self.skipped_epochs),
                **{key: torch.stack([s[key] for s in stats]).mean() for key in stats[0]},
            },
            prog_bar=False,
        )
        self.log("reward", all_rewards.mean(), prog_bar=True, logger=False)
        self._maybe_save_grid(trajectory)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            self.log("train/lr", scheduler.get_last_lr()[0])
            scheduler.step()

    def _inner_epoch(self, trajectory: Trajectory, advantages: Tensor, inner: int) -> dict[str, Tensor]:
        """One pass over shuffled samples and shuffled timesteps; returns mean statistics."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(derive_seed(self.current_epoch, inner, self.global_rank))
        num_samples, num_steps = len(trajectory), trajectory.num_steps
        order = torch.randperm(num_samples, generator=generator)
        trajectory, advantages = trajectory.select(order), advantages[order.to(advantages.device)]
        # Each sample gets its own random order of timesteps (as in ddpo-pytorch).
        step_order = torch.argsort(torch.rand(num_samples, num_steps, generator=generator), dim=1)
        train_steps = max(1, math.ceil(num_steps * hp.timestep_fraction))
        batches = list(range(0, num_samples, hp.train_batch_size))
        optimizer = self.optimizers()
        totals: dict[str, list[Tensor]] = {}
        for index, start in enumerate(batches):
            rows = torch.arange(start, min(start + hp.train_batch_size, num_samples))
            window_end = (index + 1) % hp.gradient_accumulation_steps == 0 or index + 1 == len(batches)
            for j in range(train_steps):
                last_backward = window_end and j + 1 == train_steps
                with self._gradient_sync(last_backward):
                    out, extra = self._step_loss(
                        trajectory.select(rows), advantages[rows.to(advantages.device)], step_order[rows, j]
                    )
                    loss = out.loss + extra.get("train/kl_reference_loss", 0.0)
                    self.manual_backward(loss / (train_steps * hp.gradient_accumulation_steps))
                for key, value in {
                    "train/loss": loss.detach(),
                    "train/approx_kl": out.approx_kl.detach(),
                    "train/clip_fraction": out.clip_fraction.detach(),
                    **extra,
                }.items():
                    totals.setdefault(key, []).append(value.detach())
            if window_end:
                if hp.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return {key: torch.stack(values).mean() for key, values in totals.items()}

    def _step_loss(
        self, trajectory: Trajectory, advantages: Tensor, step: Tensor
    ) -> tuple[PolicyLoss, dict[str, Tensor]]:
        """Policy loss of one stored step per sample (and the optional reference KL)."""
        hp = self.hparams
        guidance = hp.guidance_scale if hp.cfg_during_training else 1.0
        log_prob, dist = self.policy.step_log_prob(trajectory, step, hp.eta, guidance)
        rows = torch.arange(len(trajectory), device=log_prob.device)
        step = step.to(log_prob.device)
        old_log_prob = trajectory.log_probs[rows, step]
        advantages = clip_advantages(advantages, hp.adv_clip_max)
        if hp.trust_region == "clip":
            out = ppo_clip_loss(log_prob, old_log_prob, advantages, hp.clip_range)
        else:
            kl_old = gaussian_kl_same_std(trajectory.means[rows, step].to(dist.mean.dtype), dist.mean, dist.std)
            out = truly_ppo_loss(log_prob, old_log_prob, advantages, kl_old, hp.kl_threshold, hp.rollback_coef)
        extra: dict[str, Tensor] = {}
        if hp.kl_reference_coef > 0:
            with torch.no_grad(), self.policy.reference():
                reference = self.policy.step_distribution(
                    trajectory.latents[rows, step],
                    trajectory.timesteps[rows, step],
                    trajectory.conditions,
                    hp.eta,
                    guidance,
                )
            kl_reference = gaussian_kl_same_std(dist.mean, reference.mean, dist.std).mean()
            extra = {
                "train/kl_reference": kl_reference.detach(),
                "train/kl_reference_loss": hp.kl_reference_coef * kl_reference,
            }
        return out, extra

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        """Under DDP, all-reduce gradients only on the last backward of an accumulation window."""
        model = self.trainer.strategy.model if self._trainer is not None else None
        if sync or not isinstance(model, DistributedDataParallel):
            yield
        else:
            with model.no_sync():
                yield

    # ------------------------------------------------------------------ outputs
    def _log_dir(self) -> str:
        """The run's log directory (a collective call under DDP: every rank must call it)."""
        return self.trainer.log_dir or self.trainer.default_root_dir

    def _maybe_save_grid(self, trajectory: Trajectory) -> None:
        every = self.hparams.sample_grid_every_n_epochs
        if not every or self.current_epoch % every:
            return
        path = Path(self._log_dir()) / "samples" / f"epoch_{self.current_epoch:04d}.png"  # collective
        if not self.trainer.is_global_zero:
            return
        from torchvision.utils import save_image

        path.parent.mkdir(parents=True, exist_ok=True)
        images = trajectory.images[:16].float().cpu()
        save_image(images, path, nrow=max(1, int(math.sqrt(len(images)))))
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_images"):  # TensorBoard
            experiment.add_images("train/samples", images, self.current_epoch)
