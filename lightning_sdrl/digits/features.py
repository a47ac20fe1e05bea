"""The digits miniature's feature extractor ``phi``: images -> the frozen feature network's ``[B, 64]``.

Diversity rewards (:mod:`lightning_sdrl.rewards.diversity`), FID and precision-recall
(:mod:`lightning_sdrl.metrics`) take any frozen ``nn.Module`` mapping images ``[B, 3, H, W]`` in
``[0, 1]`` to features ``[B, D]``; :class:`DigitsFeatures` is that module for the digits
miniature, over the :class:`~lightning_sdrl.digits.models.DigitFeatureNet` shipped with the
package (the miniature's InceptionV3 / CLIP image encoder).
"""

from __future__ import annotations

from torch import Tensor

from lightning_sdrl.digits.models import DigitFeatureNet
from lightning_sdrl.frozen import FrozenModule

__all__ = ["DigitsFeatures"]


class DigitsFeatures(FrozenModule):
    """The digits miniature's feature network (:class:`DigitFeatureNet`), ``[B, 64]``.

    The features are not normalised (see ``DiversityReward(normalize=True)`` of
    :mod:`lightning_sdrl.rewards.diversity`).

    Args:
        weights_dir: Folder written by ``DigitFeatureNet.save_pretrained``; ``None`` loads the
            weights shipped with the package.

    Example:
        >>> import torch
        >>> DigitsFeatures()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 64])
    """

    def __init__(self, weights_dir: str | None = None) -> None:
        super().__init__()
        self.model = DigitFeatureNet.from_pretrained(weights_dir).requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """Features ``[B, 64]`` of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        return self.model(images)
