"""The reward interface every DDPO/ReFL reward follows, and the check applied to its output."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """A reward: ``reward(images, prompts, **metadata) -> Tensor[B]``.

    ``images`` are ``[B, 3, H, W]`` floats in ``[0, 1]``; ``prompts`` is the list of ``B`` prompts
    they were generated from. A reward whose value depends on the whole batch (for example the
    balance reward) sets the attribute ``batch_level = True``: under DDP it then receives the
    images of all processes at once.
    """

    def __call__(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Score a batch of images."""
        ...


def check_reward_output(rewards: Any, batch_size: int, name: str = "reward") -> Tensor:
    """Raise a clear error unless ``rewards`` is a float tensor of shape ``[batch_size]``.

    NaN or infinite values are not an error here: the training loop counts and skips them.

    Example:
        >>> check_reward_output(torch.ones(2, 1), 2)
        Traceback (most recent call last):
        ...
        ValueError: reward returned shape [2, 1]; expected [2] (one scalar per image)
    """
    if not isinstance(rewards, Tensor):
        raise TypeError(f"{name} returned {type(rewards).__name__}; expected a torch.Tensor of shape [{batch_size}]")
    if rewards.shape != (batch_size,):
        raise ValueError(f"{name} returned shape {list(rewards.shape)}; expected [{batch_size}] (one scalar per image)")
    if not torch.is_floating_point(rewards):
        rewards = rewards.float()
    return rewards
