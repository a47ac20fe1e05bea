"""KL divergence between the predicted attribute distribution and a target distribution."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sdrl.functional.metrics import attribute_kl
from lightning_sdrl.metrics.attribute_counts import AttributeCounts

__all__ = ["AttributeKL"]


class AttributeKL(AttributeCounts):
    """``KL(P_gen || P_target)`` of the attribute predicted for each generated image.

    The debiasing evaluation of the diversity reward RL paper (section 5.3): each image gets
    the attribute of highest probability (e.g. from CLIP zero-shot), the counts are summed
    across batches and processes, and ``compute`` returns the KL divergence of their
    distribution to ``target`` (uniform by default), as ``scipy.stats.entropy`` computes it.

    With ``prompts`` the counts are kept per prompt (``update(probs, prompts)``, see
    :class:`~lightning_sdrl.metrics.attribute_counts.AttributeCounts`) and ``compute`` returns the KL
    divergence of each prompt's distribution to the target, ``[P]`` in the order of ``prompts`` (NaN
    for a prompt with no image yet); ``mean`` and ``max`` of it are the average over prompts and the
    worst prompt (:meth:`compute_mean`, :meth:`compute_worst`).
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

    target: Tensor

    def __init__(
        self,
        num_classes: int,
        target: Tensor | Sequence[float] | None = None,
        prompts: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, prompts, **kwargs)
        target = torch.ones(num_classes) if target is None else torch.as_tensor(target, dtype=torch.float64)
        if target.shape != (num_classes,) or (target < 0).any() or target.sum() <= 0:
            raise ValueError(f"target={target.tolist()}; expected {num_classes} non-negative values, not all 0")
        self.register_buffer("target", target.double() / target.sum(), persistent=False)

    def compute(self) -> Tensor:
        """KL divergence (nats, float64) of the counted distribution to the target; ``[P]`` per prompt.

        Raises:
            RuntimeError: If no image was counted.
        """
        return self._per_prompt(lambda counts: attribute_kl(counts, self.target))
