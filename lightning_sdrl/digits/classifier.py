"""The digits miniature's classifier as a reward-side classifier: images -> probabilities of 0..9.

The attribute rewards of :mod:`lightning_sdrl.rewards.attribute` take any frozen classifier that
maps images ``[B, 3, H, W]`` in ``[0, 1]`` to class probabilities ``[B, K]`` and has a ``labels``
list (:mod:`lightning_sdrl.rewards.classifiers`); :class:`DigitsClassifier` is that classifier for
the digits miniature, over the :class:`~lightning_sdrl.digits.models.DigitClassifier` shipped
with the package.
"""

from __future__ import annotations

from torch import Tensor

from lightning_sdrl.digits.models import NUM_DIGIT_CLASSES, DigitClassifier
from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.rewards.classifiers import _check_images

__all__ = ["DigitsClassifier"]


class DigitsClassifier(FrozenModule):
    """The digits miniature's classifier (:class:`DigitClassifier`) returning probabilities.

    Args:
        weights_dir: Folder written by ``DigitClassifier.save_pretrained``; ``None`` loads the
            weights shipped with the package.

    Example:
        >>> import torch
        >>> classifier = DigitsClassifier()
        >>> classifier.labels[:3]
        ['0', '1', '2']
        >>> probs = classifier(torch.rand(2, 3, 32, 32))
        >>> probs.shape, bool(torch.allclose(probs.sum(dim=1), torch.ones(2)))
        (torch.Size([2, 10]), True)
    """

    def __init__(self, weights_dir: str | None = None) -> None:
        super().__init__()
        self.model = DigitClassifier.from_pretrained(weights_dir).requires_grad_(False)
        self.labels: list[str] = [str(digit) for digit in range(NUM_DIGIT_CLASSES)]
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """Probabilities ``[B, 10]`` of the digits ``0..9``."""
        _check_images(images)
        return self.model.predict_proba(images)
