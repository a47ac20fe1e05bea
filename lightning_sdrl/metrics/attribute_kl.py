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

    With ``prompts`` the counts are kept per prompt (``update(probs, prompts)``) and ``compute``
    returns the KL divergence of each prompt's distribution to the target, ``[P]`` in the order
    of ``prompts`` (NaN for a prompt with no image yet); ``mean`` and ``max`` of it are the
    average over prompts and the worst prompt (:meth:`compute_mean`, :meth:`compute_worst`).
    A batch can be balanced as a whole while each prompt is biased: only these see it.

    Args:
        num_classes: Number ``K`` of attribute values.
        target: ``[K]`` non-negative target distribution (normalised to sum to 1); ``None``
            for the uniform one.
        prompts: The prompts to count separately; ``None`` pools every image.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = AttributeKL(num_classes=2)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]))
        >>> metric.compute()
        tensor(0.1308, dtype=torch.float64)
        >>> per_prompt = AttributeKL(num_classes=2, prompts=["a", "b"])
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])
        >>> per_prompt.update(probs, ["a", "a", "b", "b"])  # 50/50 overall, each prompt 100/0
        >>> per_prompt.compute()
        tensor([0.6931, 0.6931], dtype=torch.float64)
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
        prompts: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes}; expected an int >= 2 attribute values")
        target = torch.ones(num_classes) if target is None else torch.as_tensor(target, dtype=torch.float64)
        if target.shape != (num_classes,) or (target < 0).any() or target.sum() <= 0:
            raise ValueError(f"target={target.tolist()}; expected {num_classes} non-negative values, not all 0")
        if prompts is not None and (len(prompts) == 0 or len(set(prompts)) != len(prompts)):
            raise ValueError(f"prompts={prompts}; expected a non-empty list of distinct prompts (or None)")
        self.num_classes = num_classes
        self.prompts = None if prompts is None else list(prompts)
        self.register_buffer("target", target.double() / target.sum(), persistent=False)
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
                f"AttributeKL(prompts={self.prompts}) needs the prompt of each of the {len(probs)} images, "
                f"one of those prompts; got {None if prompts is None else list(dict.fromkeys(prompts))}"
            )
        rows = torch.tensor([self.prompts.index(prompt) for prompt in prompts], device=classes.device)
        cells = torch.bincount(rows * self.num_classes + classes, minlength=self.counts.numel())
        self.counts += cells.view_as(self.counts)

    def compute(self) -> Tensor:
        """KL divergence (nats, float64) of the counted distribution to the target; ``[P]`` per prompt.

        Raises:
            RuntimeError: If no image was counted.
        """
        if self.counts.sum() == 0:
            raise RuntimeError("AttributeKL.compute() called before any update with images")
        if self.prompts is None:
            return attribute_kl(self.counts, self.target)
        seen = self.counts.sum(dim=1) > 0
        kl = torch.full((len(self.prompts),), float("nan"), dtype=torch.float64, device=self.counts.device)
        kl[seen] = attribute_kl(self.counts[seen], self.target)
        return kl

    def compute_mean(self) -> Tensor:
        """Mean over the prompts seen of their KL divergences (the pooled KL without prompts)."""
        return self.compute().nanmean()

    def compute_worst(self) -> Tensor:
        """The largest per-prompt KL divergence: the most biased prompt."""
        kl = self.compute()
        return kl[~kl.isnan()].max() if kl.ndim else kl
