"""The slowly moving copies of a policy that forward-process RL keeps: the "old" (sampling) and EMA models.

DiffusionNFT samples with an old model that trails the trained one, updated after every epoch by
``theta_old <- eta theta_old + (1 - eta) theta`` with a decay that grows linearly from 0,
``eta = min(rate * step, max_decay)`` (``return_decay`` of ``scripts/train_nft_sd3.py`` in
github.com/NVlabs/DiffusionNFT, ``decay_type=1``: rate 0.001, at most 0.5; the OCR run's
``decay_type=2`` starts at step 75 with rate 0.0075 up to 0.999). Advantage Weighted Matching keeps
its EMA model (for a KL term) the same way with at most 0.3 (``kl_ema_decay`` in
``scripts/train_sd3_awm.py`` of github.com/scxue/advantage_weighted_matching). ``eta = 0`` copies the
trained model: fully on-policy sampling.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["ema_decay", "ema_update"]


def ema_decay(step: int, rate: float = 0.001, max_decay: float = 0.5) -> float:
    """``min(rate * step, max_decay)``: DiffusionNFT's decay schedule for the old model (its defaults).

    Args:
        step: optimiser steps taken so far (``>= 0``).
        rate: growth per step (``>= 0``).
        max_decay: the ceiling, in ``[0, 1)``.

    Example:
        >>> ema_decay(0), ema_decay(100), ema_decay(10_000)
        (0.0, 0.1, 0.5)
    """
    if step < 0:
        raise ValueError(f"step={step}; expected a number of optimiser steps >= 0")
    if not rate >= 0:
        raise ValueError(f"rate={rate}; expected rate >= 0 (the decay's growth per step)")
    _check_decay(max_decay, "max_decay")
    return min(rate * step, max_decay)


def _check_decay(decay: float, name: str) -> None:
    if not 0 <= decay < 1:
        raise ValueError(f"{name}={decay}; expected 0 <= {name} < 1 (1 would never move the old model)")


@torch.no_grad()
def ema_update(old: Tensor | Iterable[Tensor], new: Tensor | Iterable[Tensor], decay: float) -> None:
    """In place, without gradient: ``old <- decay * old + (1 - decay) * new`` for each pair of tensors.

    Args:
        old: the trailing copy's tensor(s) (e.g. ``old_model.parameters()``), updated in place.
        new: the trained tensor(s), in the same order and shapes (any device or dtype).
        decay: ``eta`` in ``[0, 1)``; 0 copies ``new``.

    Example:
        >>> old, new = torch.zeros(2), torch.ones(2)
        >>> ema_update(old, new, decay=0.75)
        >>> old
        tensor([0.2500, 0.2500])
    """
    _check_decay(decay, "decay")
    olds = [old] if isinstance(old, Tensor) else list(old)
    news = [new] if isinstance(new, Tensor) else list(new)
    if len(olds) != len(news):
        raise ValueError(f"old has {len(olds)} tensors and new {len(news)}; expected one new tensor per old one")
    for index, (target, source) in enumerate(zip(olds, news, strict=True)):
        if target.shape != source.shape:
            raise ValueError(
                f"tensor {index}: new has shape {list(source.shape)}; expected {list(target.shape)} (old's)"
            )
        target.mul_(decay).add_(source.to(device=target.device, dtype=target.dtype), alpha=1 - decay)
