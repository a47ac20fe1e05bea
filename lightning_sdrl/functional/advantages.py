"""Advantage rules: how a policy-gradient epoch turns the rewards of its samples into advantages.

DDPOModule is given one rule (``advantages:`` in YAML). Each is called once per epoch with the
prompt ids and the finite rewards of the samples of all processes, and returns their advantages;
rules that keep statistics across epochs checkpoint them through ``state_dict``. A new rule (for
example a new normalisation) is one more subclass of :class:`AdvantageRule`.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sdrl.functional.stat_tracking import PerPromptStatTracker, batch_advantages


class AdvantageRule(abc.ABC):
    """Rewards ``[N]`` (with their prompts' keys) -> advantages ``[N]``."""

    @abc.abstractmethod
    def __call__(self, keys: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """Advantages of one epoch's rewards; ``keys`` names each reward's prompt."""

    def state_dict(self) -> dict[str, Any]:
        """Statistics kept across epochs (none by default), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - nothing to restore by default
        """Restore what :meth:`state_dict` returned."""

    def statistics(self) -> dict[str, float]:
        """Statistics of the last call, logged by the training module as ``train/<name>`` (none by default)."""
        return {}


class PerPromptAdvantages(PerPromptStatTracker, AdvantageRule):
    """DDPO's rule: rewards normalised by the running mean and std of their own prompt.

    See :class:`~lightning_sdrl.functional.stat_tracking.PerPromptStatTracker` (before a prompt has
    ``min_count`` rewards, the whole batch's statistics are used).

    Args:
        buffer_size: rewards kept per prompt (DDPO: 16).
        min_count: rewards a prompt needs before its own statistics are used (DDPO: 16).
        eps: added to the standard deviation.

    Example:
        >>> import torch
        >>> PerPromptAdvantages(buffer_size=4, min_count=2)(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 5.0, 5.0]))
        tensor([-1.0000,  1.0000,  0.0000,  0.0000])
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6) -> None:
        super().__init__(buffer_size, min_count, eps)

    def __call__(self, keys: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """Add the rewards to their prompts' buffers; returns their advantages."""
        return self.update(keys, rewards)


class BatchNormalizedAdvantages(AdvantageRule):
    """``(r - mean) / (std + eps)`` over the epoch's whole batch (every prompt together).

    Example:
        >>> import torch
        >>> BatchNormalizedAdvantages()(["a", "b"], torch.tensor([1.0, 3.0]))
        tensor([-1.0000,  1.0000])
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def __call__(self, keys: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """The batch-normalised rewards."""
        return batch_advantages(rewards, self.eps)


class CenteredAdvantages(AdvantageRule):
    """``r - mean`` over the epoch's batch, not divided by the std.

    A reward whose size carries meaning keeps it: R_balance shrinks to 0 at balance, so the
    updates fade near the goal instead of being rescaled back to unit size.

    Example:
        >>> import torch
        >>> CenteredAdvantages()(["a", "b"], torch.tensor([1.0, 3.0]))
        tensor([-1.,  1.])
    """

    def __call__(self, keys: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """The centred rewards."""
        return rewards - rewards.mean()


class GroupRelativeAdvantages(AdvantageRule):
    """GRPO's rule (Shao et al. 2024; Flow-GRPO, Liu et al. 2025): normalise within each prompt's group.

    Every epoch samples each prompt ``group_size`` times (``SamplingDataModule(group_size=...)``);
    the advantage of a sample is ``(r - mean_group) / (std_group + eps)`` with the population
    statistics of the rewards of its own prompt in this epoch (nothing is kept across epochs).
    With ``global_std`` the std is that of all the epoch's rewards (Flow-GRPO's option). A
    group of one sample gets advantage 0: it carries no relative information.

    Args:
        eps: added to the standard deviation (Flow-GRPO: 1e-4).
        global_std: divide by the std of the whole epoch instead of the group's.

    Example:
        >>> import torch
        >>> GroupRelativeAdvantages(eps=0.0)(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 5.0, 9.0]))
        tensor([-1.,  1., -1.,  1.])
    """

    def __init__(self, eps: float = 1e-4, global_std: bool = False) -> None:
        if eps < 0:
            raise ValueError(f"eps={eps}; expected >= 0")
        self.eps, self.global_std = eps, global_std
        self._statistics: dict[str, float] = {}

    def __call__(self, keys: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """The group-relative advantages of the epoch's rewards."""
        if len(keys) != len(rewards):
            raise ValueError(f"got {len(keys)} keys for {len(rewards)} rewards; expected one key per reward")
        groups: dict[Hashable, int] = {}
        index = torch.tensor([groups.setdefault(key, len(groups)) for key in keys], device=rewards.device)
        values = rewards.to(torch.float64)
        count = torch.zeros(len(groups), dtype=torch.float64, device=rewards.device).index_add_(
            0, index, torch.ones_like(values)
        )
        mean = torch.zeros_like(count).index_add_(0, index, values) / count
        variance = torch.zeros_like(count).index_add_(0, index, (values - mean[index]) ** 2) / count
        group_std = variance.sqrt()
        std = values.std(unbiased=False).expand(len(groups)) if self.global_std else group_std
        scale = std[index] + self.eps
        # a group whose rewards are all equal (std 0, eps 0) has nothing to prefer: advantage 0
        advantages = torch.where(
            scale > 0, (values - mean[index]) / scale.clamp(min=torch.finfo(scale.dtype).tiny), 0.0
        )
        self._statistics = {
            "group_reward_std": float(group_std.mean()),
            "group_size_min": float(count.min()),
            "zero_std_groups": float((group_std == 0).sum()),
        }
        return advantages.to(rewards.dtype)

    def statistics(self) -> dict[str, float]:
        """``group_reward_std`` (mean within-group std), ``group_size_min``, ``zero_std_groups`` of the last call."""
        return dict(self._statistics)
