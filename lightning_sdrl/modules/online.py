"""The loop every online RL algorithm shares: sample -> score -> advantages -> update.

One Lightning epoch is one RL epoch:

1. every training step draws one batch of rollouts (:meth:`OnlineRLModule.rollout`, no gradients)
   and scores it with the reward (batch-level rewards see the images of all processes);
2. at the epoch's last step, rewards are gathered from all processes, samples with a non-finite
   reward are dropped, the advantage rule turns the rest into advantages, and
   :meth:`OnlineRLModule.optimize` updates the policy; then the epoch is logged (one row), a grid
   of samples saved and the learning-rate schedule stepped.

What differs between DDPO / GRPO (trajectories with step log-probs, PPO on the reverse process)
and DiffusionNFT / AWM (final samples only, losses on the forward process) is ``rollout`` and
``optimize`` alone. The optimiser step (non-finite guard, gradient clipping), gradient sync under
DDP, checkpoints of the trainable weights and the advantage rule's state are here once.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.figures import save_captioned_grid
from lightning_sdrl.functional.advantages import AdvantageRule, GroupRelativeAdvantages
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.modules.generation import GenerationModule
from lightning_sdrl.modules.guards import NonFiniteGuard, all_finite, check_checkpoint_keys, check_finite_state
from lightning_sdrl.modules.optimizers import build_optimizer
from lightning_sdrl.policies.base import DiffusionPolicy
from lightning_sdrl.rewards.base import RewardModule, check_reward_output
from lightning_sdrl.rewards.combination import MultiReward

log = logging.getLogger("lightning_sdrl")


class Rollouts(Protocol):
    """What the shared loop reads of an epoch's rollouts (``Trajectory``, ``Samples``)."""

    images: Tensor
    prompts: list[str]
    prompt_ids: Tensor

    def __len__(self) -> int: ...  # noqa: D105

    def select(self, index: Tensor) -> Rollouts: ...  # noqa: D102


@dataclass
class EpochSamples:
    """What one epoch sampled and how it was scored (``OnlineRLModule.last_update``, for callbacks).

    Attributes:
        rewards: ``[W * B]`` rewards of all processes, in rank order (non-finite ones included).
        advantages: ``[W * B]`` advantages of all processes, NaN for the dropped samples (``None`` if
            the update was skipped).
        prompt_ids: ``[W * B]`` prompt ids of all processes.
        images: ``[B, 3, H, W]`` this process's images.
        prompts: this process's ``B`` prompts.
        components: ``[W * B, K]`` the components of a :class:`MultiReward` whose combination is
            ``rewards`` (``None`` for a single reward).
    """

    rewards: Tensor
    advantages: Tensor | None
    prompt_ids: Tensor
    images: Tensor
    prompts: list[str]
    components: Tensor | None = None


@dataclass(frozen=True)
class _AutocastState:
    """A thread's autocast setting for one device type, to re-enter in a worker thread (autocast is per thread)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device_type: str) -> _AutocastState:
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def applied(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class OnlineRLModule(GenerationModule, abc.ABC):
    """Sampling, scoring, advantages, guards, checkpoints and logs of online RL; subclasses add the update.

    A subclass implements :meth:`rollout` and :meth:`optimize`, records its arguments with
    :func:`~lightning_sdrl.modules.hyperparameters.record_arguments` (its :attr:`settings` must hold
    ``num_steps``, ``eta``, ``guidance_scale``, ``max_grad_norm``, ``sample_grid_every_n_epochs``,
    ``save_trained_on_end`` and ``checkpoint_trainable_only``), and may override ``on_fit_start``.

    Args:
        policy: the diffusion model to fine-tune.
        reward: ``reward(images, prompts) -> [B]``; ``batch_level`` rewards see all processes.
        optimizer: optimiser factory for the trainable parameters.
        lr_scheduler: optional learning-rate schedule factory, stepped once per epoch.
        advantages: the rule turning an epoch's rewards into advantages.
        checkpoint_trainable_only: checkpoints hold only trainable weights.
        max_consecutive_skips: skipped optimiser steps in a row before the run stops with an error.
        evaluation: FID / precision-recall / attribute-KL of validation samples.
    """

    algorithm_name = "RL"
    """Name in captions and messages."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        reward: RewardModule,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        advantages: AdvantageRule,
        checkpoint_trainable_only: bool,
        max_consecutive_skips: int,
        evaluation: GenerationMetrics | None,
    ) -> None:
        super().__init__()
        self.evaluation = evaluation
        self.automatic_optimization = False
        self.strict_loading = not checkpoint_trainable_only
        self.policy, self.reward, self.optimizer_factory = policy, reward, optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.advantage_rule = advantages
        self._epoch_samples: list[tuple[Rollouts, Tensor]] = []
        self.skipped_epochs = 0
        self.dropped_samples = 0
        self.guard = NonFiniteGuard(max_consecutive_skips, self.algorithm_name)
        self.last_update: EpochSamples | None = None
        self.reward_history: list[Tensor] = []
        self._reward_worker: ThreadPoolExecutor | None = None

    def on_fit_start(self) -> None:
        """Refuse group-relative advantages without groups (each prompt sampled once gets advantage 0)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        group_size = getattr(datamodule, "group_size", None)
        if isinstance(self.advantage_rule, GroupRelativeAdvantages) and group_size is not None and group_size < 2:
            raise ValueError(
                f"{self.algorithm_name} normalises each reward within its prompt's group, but the data module has "
                f"group_size={group_size}; set data.init_args.group_size >= 2 (Flow-GRPO, DiffusionNFT: 24)"
            )

    # ------------------------------------------------------------------ what an algorithm adds
    @abc.abstractmethod
    def rollout(self, batch: PromptBatch) -> Rollouts:
        """Sample one prompt batch with its seed, without gradients."""

    @abc.abstractmethod
    def optimize(self, rollouts: Rollouts, advantages: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
        """Update the policy on this process's kept rollouts and their advantages.

        Args:
            rollouts: this process's rollouts whose reward is finite (padded under DDP, see
                :meth:`_kept_rows`).
            advantages: ``[B]`` their advantages.
            weights: ``[B]`` 1 for real rows, 0 for padding rows (``None``: every row is real).

        Returns:
            Mean statistics of the update, logged as they are (``"train/loss"``, ...).
        """

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self) -> Any:
        """The optimiser over the policy's trainable parameters (LoRA or the whole UNet), and its schedule."""
        optimizer = build_optimizer(self.optimizer_factory, self.policy.parameter_groups())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Sample and score one batch; on the epoch's last batch, run the policy update.

        A ``background`` reward scores a batch in a worker thread while the next batch is sampled;
        the epoch's rewards are collected, in order, before the update.
        """
        rollouts = self.rollout(batch)
        self._epoch_samples.append((rollouts, self.score(rollouts)))
        if batch_idx + 1 >= self.trainer.num_training_batches:
            samples, self._epoch_samples = self._epoch_samples, []
            rollouts = type(rollouts).cat([t for t, _ in samples])
            scores = [r.result() if isinstance(r, Future) else r for _, r in samples]
            self.update(rollouts, torch.cat(scores))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the tracker's buffers and fault counters; drop frozen weights when ``checkpoint_trainable_only``.

        Non-finite weights are never written (``FloatingPointError``).
        """
        checkpoint["stat_tracker"] = self.advantage_rule.state_dict()
        checkpoint["skipped_epochs"] = self.skipped_epochs
        checkpoint["fault_counters"] = {**self.guard.state_dict(), "dropped_samples": self.dropped_samples}
        if self.settings.checkpoint_trainable_only:
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        check_finite_state(checkpoint["state_dict"], "checkpoint")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint holds every trainable weight (and nothing else); restore the tracker."""
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        check_checkpoint_keys(checkpoint.get("state_dict", {}), trainable, self.state_dict().keys())
        if "stat_tracker" in checkpoint:
            self.advantage_rule.load_state_dict(checkpoint["stat_tracker"])
        self.skipped_epochs = checkpoint.get("skipped_epochs", 0)
        counters = checkpoint.get("fault_counters", {})
        self.guard.load_state_dict(counters)
        self.dropped_samples = int(counters.get("dropped_samples", 0))

    def on_train_end(self) -> None:
        """Write the trained weights in diffusers format to ``<log_dir>/trained`` (never non-finite ones)."""
        self._stop_reward_worker()
        self.write_trained()

    def on_exception(self, exception: BaseException) -> None:
        """Drop the background reward work still queued when the run fails (without waiting for it)."""
        self._stop_reward_worker(wait=False)

    @torch.no_grad()
    def score(self, trajectory: Rollouts) -> Tensor | Future[Tensor]:
        """Rewards of sampled trajectories (batch-level rewards see all processes).

        Returns ``[B]`` rewards, or ``[B, K]`` component rewards for a :class:`MultiReward` (combined
        over the epoch in :meth:`update`); a :class:`~concurrent.futures.Future` of them for a
        ``background`` reward. Gathering the images of all processes (a collective) is always done
        here, on the training thread; only the reward's own computation moves to the worker.
        """
        images, prompts = trajectory.images, trajectory.prompts
        world = self.trainer.world_size if self._trainer is not None else 1
        batch_level = getattr(self.reward, "batch_level", False) and world > 1
        if batch_level:
            images = self.all_gather(images).flatten(0, 1)
            gathered: list[list[str]] = [[] for _ in range(world)]
            torch.distributed.all_gather_object(gathered, prompts)
            prompts = sum(gathered, [])
        rank = self.global_rank if batch_level else None
        if not getattr(self.reward, "background", False):
            return self._reward_rows(images, prompts, world, rank)
        if self._reward_worker is None:
            self._reward_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        # grad mode and autocast are per thread: the worker re-enters no_grad and this thread's autocast
        autocast = _AutocastState.capture(self.device.type)
        return self._reward_worker.submit(self._reward_rows, images, prompts, world, rank, autocast)

    def _reward_rows(
        self, images: Tensor, prompts: list[str], world: int, rank: int | None, autocast: _AutocastState | None = None
    ) -> Tensor:
        """The reward of ``images`` (this process's rows of them when ``rank`` is given)."""
        with torch.no_grad(), autocast.applied() if autocast is not None else contextlib.nullcontext():
            if isinstance(self.reward, MultiReward):
                rewards = self.reward.score_components(images, prompts)
            else:
                rewards = check_reward_output(self.reward(images, prompts), len(prompts), type(self.reward).__name__)
        if rank is not None:
            rewards = rewards.unflatten(0, (world, -1))[rank]
        return rewards.to(self.device, torch.float32)

    def _stop_reward_worker(self, wait: bool = True) -> None:
        if self._reward_worker is not None:
            self._reward_worker.shutdown(wait=wait, cancel_futures=True)
            self._reward_worker = None

    # ------------------------------------------------------------------ the policy update
    def _gather(self, tensor: Tensor) -> Tensor:
        """``[B, ...]`` per process -> ``[world * B, ...]`` in rank order (identity on one process)."""
        gathered = self.all_gather(tensor)
        return gathered.flatten(0, 1) if self.trainer.world_size > 1 else gathered

    @property
    def tracker(self) -> AdvantageRule:
        """The advantage rule (with its per-prompt buffers, for ``PerPromptAdvantages``)."""
        return self.advantage_rule

    def update(self, trajectory: Rollouts, rewards: Tensor) -> None:
        """Advantages from the epoch's finite rewards, then ``num_inner_epochs`` of PPO updates.

        Samples whose reward is NaN or infinite (e.g. images a diverged policy drew as NaN) are
        dropped: they take no part in the advantage statistics and are not trained on. An epoch
        with no finite reward is skipped and counts as a skipped step of :attr:`guard`.
        """
        all_rewards = self._gather(rewards)
        all_ids = self._gather(trajectory.prompt_ids)
        components, component_means = None, {}
        if all_rewards.ndim == 2:  # a MultiReward's components, combined over the whole epoch
            components, all_rewards = all_rewards, self.reward.combine(all_rewards, all_ids.tolist())
            kept = components[torch.isfinite(all_rewards)]
            component_means = {f"train/reward/{n}": kept[:, k].mean() for k, n in enumerate(self.reward.names)}
        self.last_update = EpochSamples(all_rewards, None, all_ids, trajectory.images, trajectory.prompts, components)
        finite = torch.isfinite(all_rewards)
        dropped = int((~finite).sum())
        self.dropped_samples += dropped
        local = finite.view(self.trainer.world_size, -1)
        if not local.any(dim=1).all():
            # No finite reward (on some process): nothing to learn from this epoch.
            self.skipped_epochs += 1
            self._log_epoch(
                {"train/skipped_epochs": float(self.skipped_epochs), "train/dropped_samples": float(dropped)}
            )
            self.guard.record_skip(
                f"epoch {self.current_epoch}: {dropped} of {len(all_rewards)} rewards are not finite",
                "Check the reward for NaN, and lower the learning rate if the images became NaN.",
            )
            return
        if dropped:
            log.warning(
                "%s epoch %d: dropped %d of %d samples with a non-finite reward (%d dropped in all)",
                self.algorithm_name,
                self.current_epoch,
                dropped,
                len(all_rewards),
                self.dropped_samples,
            )
        all_advantages = torch.full_like(all_rewards, float("nan"))
        all_advantages[finite] = self.advantage_rule(all_ids[finite].tolist(), all_rewards[finite])
        self.last_update.advantages = all_advantages
        kept_rewards = all_rewards[finite]
        self.reward_history.append(kept_rewards.mean().detach().cpu())
        advantages = all_advantages.view(self.trainer.world_size, -1)[self.global_rank]
        keep, weights = self._kept_rows(local)
        if keep is not None:
            trajectory, advantages = trajectory.select(keep), advantages[keep.to(advantages.device)]
        stats = self.optimize(trajectory, advantages, weights)
        self._log_epoch(
            {
                "train/reward_mean": kept_rewards.mean(),
                "train/reward_std": kept_rewards.std(unbiased=False),
                "train/skipped_epochs": float(self.skipped_epochs),
                "train/skipped_steps": float(self.guard.skipped_steps),
                "train/dropped_samples": float(dropped),
                **{f"train/{key}": value for key, value in self.advantage_rule.statistics().items()},
                **component_means,
                **stats,
            }
        )
        self.log("reward", kept_rewards.mean(), prog_bar=True, logger=False)
        self._maybe_save_grid(trajectory, kept_rewards)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            self._log_epoch({"train/lr": scheduler.get_last_lr()[0]})
            scheduler.step()

    def _log_epoch(self, values: dict[str, Any]) -> None:
        """Log once per DDPO epoch (whatever ``log_every_n_steps``): one metrics row per epoch."""
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=1)

    def _kept_rows(self, finite: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """This process's rows to train on, and their loss weights, given ``finite [W, B]``.

        ``(None, None)`` when every sample is kept. On one process the kept rows are the finite
        ones. Under DDP every process must run the same number of backward passes, so each pads
        its finite rows up to the largest count of any process with repeats of its own finite rows
        of weight 0 (they add nothing to the gradient).
        """
        if bool(finite.all()):
            return None, None
        rows = torch.nonzero(finite[self.global_rank].cpu()).flatten()
        target = int(finite.sum(dim=1).max())
        padding = rows[torch.arange(target - len(rows)) % len(rows)]
        weights = torch.cat([torch.ones(len(rows)), torch.zeros(len(padding))])
        return torch.cat([rows, padding]), weights

    def _optimizer_step(self, optimizer: Any) -> None:
        """Clip and apply the accumulated gradients, unless they are not finite (then skip and count)."""
        hp = self.settings
        fix = "Lower the learning rate (or set max_grad_norm)."
        if self.guard.check_gradients(self.policy.trainable_parameters(), fix):
            if hp.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            if not all_finite(self.policy.trainable_parameters()):
                raise FloatingPointError(
                    f"{self.algorithm_name} epoch {self.current_epoch}: the optimiser step made the weights non-finite "
                    "from finite gradients; the learning rate is far too large. Lower it."
                )
        optimizer.zero_grad(set_to_none=True)

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
    def _maybe_save_grid(self, trajectory: Rollouts, rewards: Tensor) -> None:
        every = self.settings.sample_grid_every_n_epochs
        if not every or self.current_epoch % every:
            return
        path = Path(self._log_dir()) / "samples" / f"epoch_{self.current_epoch:04d}.png"  # collective
        if not self.trainer.is_global_zero:
            return
        images = trajectory.images[:16].float().cpu()
        prompts = list(dict.fromkeys(trajectory.prompts[:16]))
        shown = "; ".join(f'"{p}"' for p in prompts[:3]) + (f" and {len(prompts) - 3} more" if len(prompts) > 3 else "")
        caption = (
            f"{self.algorithm_name} epoch {self.current_epoch}: {len(images)} samples, "
            f"mean reward {float(rewards.nanmean()):+.4f}"
            f"\n{shown}"
        )
        save_captioned_grid(images, path, caption)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_images"):  # TensorBoard
            experiment.add_images("train/samples", images, self.current_epoch)
