"""KL divergence between the predicted attribute distribution and a target distribution."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_sdrl.functional.metrics import attribute_kl

__all__ = ["AttributeKL"]


class AttributeKL(Metric):
    """``KL(P_gen || P_target)`` of the attribute predicted for each generated image.

    The debiasing evaluation of the diversity reward RL paper (section 5.3): each image gets
    the attribute of highest probability (e.g. from CLIP zero-shot), the counts are summed
    across batches and processes, and ``compute`` returns the KL divergence of their
    distribution to ``target`` (uniform by default), as ``scipy.stats.entropy`` computes it.

    Args:
        num_classes: Number ``K`` of attribute values.
        target: ``[K]`` non-negative target distribution (normalised to sum to 1); ``None``
            for the uniform one.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = AttributeKL(num_classes=2)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]))
        >>> metric.compute()
        tensor(0.1308, dtype=torch.float64)
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    counts: Tensor
    target: Tensor

    def __init__(
        self,
        num_classes: int,
        target: Tensor | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes}; expected an int >= 2 attribute values")
        target = torch.ones(num_classes) if target is None else torch.as_tensor(target)
        if target.shape != (num_classes,) or (target < 0).any() or target.sum() <= 0:
            raise ValueError(f"target={target.tolist()}; expected {num_classes} non-negative values, not all 0")
        self.num_classes = num_classes
        self.register_buffer("target", target.double() / target.sum(), persistent=False)
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor) -> None:
        """Count the most probable attribute of each image.

        Args:
            probs: ``[B, K]`` attribute probabilities (or logits) per image.

        Raises:
            ValueError: If ``probs`` is not ``[B, num_classes]``.
        """
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"probs has shape {list(probs.shape)}; expected [B, {self.num_classes}] "
                "(one row of attribute probabilities per image)"
            )
        self.counts += torch.bincount(probs.argmax(dim=1), minlength=self.num_classes)

    def compute(self) -> Tensor:
        """KL divergence (nats, float64 scalar) of the counted distribution to the target.

        Raises:
            RuntimeError: If no image was counted.
        """
        if self.counts.sum() == 0:
            raise RuntimeError("AttributeKL.compute() called before any update with images")
        return attribute_kl(self.counts, self.target)
