"""Single-image rewards that need no model: JPEG compressibility and brightness."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_sdrl.functional.image_rewards import jpeg_compressibility, mean_brightness
from lightning_sdrl.rewards.base import RewardModule, check_images, score_finite_images


class JpegCompressibility(RewardModule):
    """DDPO's compressibility reward: minus the JPEG size of each image in kB.

    Args:
        quality: JPEG quality used to encode.
    """

    batch_level = False

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"quality={quality}; expected 1..100")
        self.quality = quality

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Score ``[B, 3, H, W]`` images in ``[0, 1]``; returns ``[B]`` (NaN for non-finite images)."""
        finite = check_images(images, type(self).__name__)
        return score_finite_images(lambda x: jpeg_compressibility(x, self.quality), images, finite)


class Brightness(RewardModule):
    """Mean pixel value of each image (a simple, smooth reward for tests and demos)."""

    batch_level = False

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Score ``[B, 3, H, W]`` images in ``[0, 1]``; returns ``[B]`` (NaN for non-finite images)."""
        finite = check_images(images, type(self).__name__)
        return score_finite_images(mean_brightness, images, finite)
