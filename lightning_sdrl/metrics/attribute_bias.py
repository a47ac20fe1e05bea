"""The fairness literature's bias of generated images: mean over class pairs of ``|freq_i - freq_j|``."""

from torch import Tensor

from lightning_sdrl.functional.metrics import pairwise_bias
from lightning_sdrl.metrics.attribute_counts import AttributeCounts

__all__ = ["AttributeBias"]


class AttributeBias(AttributeCounts):
    """Shen et al. (2024)'s bias of the attribute predicted for each generated image.

    Each image counts for its most probable attribute (summed over batches and processes, as
    :class:`~lightning_sdrl.metrics.attribute_kl.AttributeKL`); ``compute`` returns
    :func:`~lightning_sdrl.functional.metrics.pairwise_bias` of the counted frequencies: 0 when
    balanced, ``2 / K`` when one class takes every image. With ``prompts``, one bias per prompt
    (``[P]``), :meth:`compute_mean` the paper's average over prompts and :meth:`compute_worst` the
    most biased prompt. For joint attributes (digit x stroke, gender x race) update with the joint
    classes' probabilities.

    Example:
        >>> import torch
        >>> metric = AttributeBias(num_classes=2, prompts=["a", "b"])
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
        >>> metric.update(probs, ["a", "a", "b", "b", "b", "b"])  # a: 100/0, b: 25/75
        >>> metric.compute()
        tensor([1.0000, 0.5000], dtype=torch.float64)
        >>> float(metric.compute_mean()), float(metric.compute_worst())
        (0.75, 1.0)
    """

    def compute(self) -> Tensor:
        """Bias (float64) of the counted frequencies; ``[P]`` per prompt.

        Raises:
            RuntimeError: If no image was counted.
        """
        return self._per_prompt(pairwise_bias)
