"""Advantage rules: how a policy-gradient epoch turns the rewards of its samples into advantages.

DDPOModule is given one rule (``advantages:`` in YAML). Each is called once per epoch with the
prompt ids and the finite rewards of the samples of all processes, and returns their advantages;
rules that keep statistics across epochs checkpoint them through ``state_dict``. A new rule (for
example GRPO's group-relative one) is one more subclass of :class:`AdvantageRule`.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Sequence
from typing import Any

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
