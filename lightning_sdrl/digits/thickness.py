"""A second attribute judge for the digits miniature: stroke thickness, thin vs bold.

The hidden rule of the preference data (:func:`~lightning_sdrl.digits.preferences.stroke_thickness`:
the share of the canonical 16x16 digit's pixels brighter than 0.5) becomes a two-class
classifier, so that a debiasing run can balance two attributes jointly (digit class x
thickness, :class:`~lightning_sdrl.rewards.attribute.JointBalanceReward`), as the debiasing
paper's section V asks for gender x age. Like an AI judge it returns class probabilities
``[B, 2]``, ``P(bold) = sigmoid((thickness - boundary) / temperature)``, so digits near the
boundary are unsure and fall under a confidence threshold ("None").
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sdrl.digits.preferences import stroke_thickness
from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.rewards.classifiers import _check_images

__all__ = ["THICKNESS_BOUNDARY", "StrokeThicknessClassifier"]

THICKNESS_BOUNDARY = 0.38
"""Median stroke thickness of the shipped model's samples of the group prompts (guidance 1.5;
0.379-0.381 on 256 samples each of "a digit with a loop", "a round digit", "an even digit")."""


class StrokeThicknessClassifier(FrozenModule):
    """Thin vs bold digits: probabilities ``[B, 2]`` from the stroke thickness (no weights).

    Args:
        boundary: Thickness at which both classes are equally likely.
        temperature: Width of the sigmoid; at the 0.7 threshold a digit within
            ``0.85 * temperature`` of ``boundary`` is "None".

    Raises:
        ValueError: If ``boundary`` is not in ``(0, 1)`` or ``temperature`` is not positive.

    Example:
        >>> image = torch.zeros(1, 3, 16, 16)
        >>> image[..., 2:14, 4:12] = 1.0  # 96 of 256 pixels: thickness 0.375
        >>> StrokeThicknessClassifier(boundary=0.3, temperature=0.05)(image)
        tensor([[0.1824, 0.8176]])
    """

    def __init__(self, boundary: float = THICKNESS_BOUNDARY, temperature: float = 0.02) -> None:
        super().__init__()
        if not 0.0 < boundary < 1.0:
            raise ValueError(f"boundary={boundary}; expected a stroke thickness in (0, 1), e.g. {THICKNESS_BOUNDARY}")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}; expected a positive width, e.g. 0.02")
        self.boundary, self.temperature = float(boundary), float(temperature)
        self.labels: list[str] = ["thin", "bold"]

    def forward(self, images: Tensor) -> Tensor:
        """``[P(thin), P(bold)]`` of each image ``[B, 3, H, W]`` in ``[0, 1]``."""
        _check_images(images)
        bold = torch.sigmoid((stroke_thickness(images) - self.boundary) / self.temperature)
        return torch.stack([1.0 - bold, bold], dim=1)
