"""Counting the attribute of each generated image, pooled or per prompt: what attribute metrics share."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["AttributeCounts"]


class AttributeCounts(Metric):
    """Counts of the most probable attribute of each image, summed over batches and processes.

    Subclasses turn the counts into a number (:class:`~lightning_sdrl.metrics.attribute_kl.AttributeKL`,
    :class:`~lightning_sdrl.metrics.attribute_bias.AttributeBias`) through :meth:`_from_counts`. With
    ``prompts`` the counts are kept per prompt (``update(probs, prompts)``) and ``compute`` returns one
    value per prompt, ``[P]`` in the order of ``prompts`` (NaN for a prompt with no image yet); their
    mean and maximum are :meth:`compute_mean` and :meth:`compute_worst` (the most biased prompt).

    Args:
        num_classes: Number ``K`` of attribute values (joint attributes: the number of joint classes).
        prompts: The prompts to count separately; ``None`` pools every image.
        kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    counts: Tensor

    def __init__(self, num_classes: int, prompts: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes}; expected an int >= 2 attribute values")
        if prompts is not None and (len(prompts) == 0 or len(set(prompts)) != len(prompts)):
            raise ValueError(f"prompts={prompts}; expected a non-empty list of distinct prompts (or None)")
        self.num_classes = num_classes
        self.prompts = None if prompts is None else list(prompts)
        shape = (num_classes,) if prompts is None else (len(prompts), num_classes)
        self.add_state("counts", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, prompts: Sequence[str] | None = None) -> None:
        """Count the most probable attribute of each image (under its prompt, with ``prompts``).

        Args:
            probs: ``[B, K]`` attribute probabilities (or logits) per image.
            prompts: The ``B`` images' prompts; required if the metric was built with prompts.

        Raises:
            ValueError: If ``probs`` is not ``[B, num_classes]`` or the prompts do not match.
        """
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"probs has shape {list(probs.shape)}; expected [B, {self.num_classes}] "
                "(one row of attribute probabilities per image)"
            )
        classes = probs.argmax(dim=1)
        if self.prompts is None:
            self.counts += torch.bincount(classes, minlength=self.num_classes)
            return
        if prompts is None or len(prompts) != len(probs) or not set(prompts) <= set(self.prompts):
            raise ValueError(
                f"{type(self).__name__}(prompts={self.prompts}) needs the prompt of each of the {len(probs)} images, "
                f"one of those prompts; got {None if prompts is None else list(dict.fromkeys(prompts))}"
            )
        rows = torch.tensor([self.prompts.index(prompt) for prompt in prompts], device=classes.device)
        cells = torch.bincount(rows * self.num_classes + classes, minlength=self.counts.numel())
        self.counts += cells.view_as(self.counts)

    def _per_prompt(self, measure: Callable[[Tensor], Tensor]) -> Tensor:
        """``measure`` of the pooled counts, or of each prompt's (``[P]``, NaN where a prompt has no image).

        Raises:
            RuntimeError: If no image was counted.
        """
        if self.counts.sum() == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update with images")
        if self.prompts is None:
            return measure(self.counts)
        seen = self.counts.sum(dim=1) > 0
        values = torch.full((len(self.prompts),), float("nan"), dtype=torch.float64, device=self.counts.device)
        values[seen] = measure(self.counts[seen])
        return values

    def compute_mean(self) -> Tensor:
        """Mean over the prompts seen of their values (the pooled value without prompts)."""
        return self.compute().nanmean()

    def compute_worst(self) -> Tensor:
        """The largest per-prompt value: the most biased prompt."""
        values = self.compute()
        return values[~values.isnan()].max() if values.ndim else values
