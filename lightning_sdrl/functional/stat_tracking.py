"""Per-prompt reward normalisation (DDPO's advantage estimate)."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor


class PerPromptStatTracker:
    """Normalises rewards by the running statistics of their own prompt.

    Each prompt keeps a buffer of its last ``buffer_size`` rewards. A reward's advantage is
    ``(r - mean) / (std + eps)`` over its prompt's buffer once that buffer holds at least
    ``min_count`` rewards, and over the whole batch before that.

    Args:
        buffer_size: rewards kept per prompt.
        min_count: buffer length from which a prompt's own statistics are used.
        eps: added to the standard deviation.

    Example:
        >>> tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
        >>> tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 10.0, 10.0]))
        tensor([-1.0000,  1.0000,  0.0000,  0.0000])
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"buffer_size={buffer_size}, min_count={min_count}; expected 1 <= min_count <= buffer_size"
            )
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[Hashable, deque[float]] = {}

    def update(self, keys: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """Add ``rewards`` to their prompts' buffers and return their advantages ``[B]``."""
        if rewards.ndim != 1 or len(keys) != rewards.shape[0]:
            raise ValueError(
                f"got {len(keys)} keys and rewards of shape {list(rewards.shape)}; expected one "
                "key per reward and rewards of shape [B]"
            )
        values = rewards.detach().double().cpu()
        advantages = torch.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        for key in dict.fromkeys(keys):
            mask = torch.tensor([k == key for k in keys])
            buffer = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                stats = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = stats.mean(), stats.std(unbiased=False)
            advantages[mask] = (values[mask] - mean) / (std + self.eps)
        return advantages.to(device=rewards.device, dtype=rewards.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The buffers, for checkpoints."""
        return {"buffers": {key: list(buf) for key, buf in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore buffers saved by :meth:`state_dict`."""
        self.buffers = {key: deque(values, maxlen=self.buffer_size) for key, values in state["buffers"].items()}


def batch_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Rewards normalised by the whole batch's mean and standard deviation.

    Example:
        >>> batch_advantages(torch.tensor([1.0, 3.0]))
        tensor([-1.0000,  1.0000])
    """
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
