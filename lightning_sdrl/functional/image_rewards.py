"""Simple single-image rewards: JPEG compressibility (as in DDPO) and brightness."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images have shape {list(images.shape)}; expected [B, 3, H, W] (or [B, 1, H, W]) floats in [0, 1]"
        )


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB of each image saved as JPEG at ``quality``; ``[B]`` float32.

    Images are ``[B, 3, H, W]`` floats in ``[0, 1]``; they are quantised to 8 bits first, as a
    saved image would be. An image with a NaN or infinite pixel has no 8-bit version: its size is
    NaN.
    """
    _check_images(images)
    finite = torch.isfinite(images.detach()).flatten(1).all(dim=1)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(
            buffer, format="JPEG", quality=quality
        )
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device).masked_fill(~finite, float("nan"))


def jpeg_compressibility(images: Tensor, quality: int = 95) -> Tensor:
    """DDPO's compressibility reward: minus the JPEG size in kB, ``[B]``.

    Example:
        >>> flat, noisy = torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32)
        >>> bool(jpeg_compressibility(flat) > jpeg_compressibility(noisy))
        True
        >>> jpeg_compressibility(torch.full((1, 3, 8, 8), float("nan")))
        tensor([nan])
    """
    return -jpeg_size_kb(images, quality)


def mean_brightness(images: Tensor) -> Tensor:
    """Mean pixel value of each image in ``[0, 1]``, ``[B]``.

    Example:
        >>> mean_brightness(torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)]))
        tensor([0., 1.])
    """
    _check_images(images)
    return images.float().mean(dim=(1, 2, 3))
