"""Sample grids a person can read: small images upscaled (nearest neighbour) and captioned."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from torch import Tensor
from torch.nn import functional as F

MIN_IMAGE_PIXELS = 128
"""Images smaller than this (height) are upscaled by an integer factor to at least this size."""


def upscale_nearest(images: Tensor, min_pixels: int = MIN_IMAGE_PIXELS) -> Tensor:
    """Upscale ``[B, C, H, W]`` images by the smallest integer factor that makes ``H >= min_pixels``.

    Nearest-neighbour, so every generated pixel stays one visible block (no smoothing that would
    hide what the model drew).

    Example:
        >>> import torch
        >>> upscale_nearest(torch.zeros(2, 3, 16, 16)).shape
        torch.Size([2, 3, 128, 128])
        >>> upscale_nearest(torch.zeros(1, 3, 512, 512)).shape
        torch.Size([1, 3, 512, 512])
    """
    factor = max(1, math.ceil(min_pixels / images.shape[-2]))
    return images if factor == 1 else F.interpolate(images.float(), scale_factor=factor, mode="nearest")


def save_captioned_grid(images: Tensor, path: str | Path, caption: str, nrow: int | None = None) -> Path:
    """Save ``[B, 3, H, W]`` images in ``[0, 1]`` as one PNG grid with a caption above it.

    Args:
        images: the images, in ``[0, 1]``.
        path: the PNG to write (folders are created).
        caption: text shown above the grid (prompt, epoch, attribute shares ...); may hold newlines.
        nrow: images per row (default: about the square root of the count).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, round(math.sqrt(len(images))))
    grid = make_grid(upscale_nearest(images.detach().float().cpu().clamp(0, 1)), nrow=nrow, padding=4, pad_value=1.0)
    height, width = grid.shape[1:]
    # wrap the caption to the grid's width (about 7 px per character at 9 pt and 100 dpi)
    caption = "\n".join(textwrap.fill(line, max(20, width // 7)) for line in caption.splitlines())
    lines = caption.count("\n") + 1
    dpi = 100
    caption_inches = 0.22 * lines + 0.15
    fig = plt.figure(figsize=(width / dpi, height / dpi + caption_inches), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height / (height + caption_inches * dpi)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    fig.text(
        0.5, 1 - 0.05 * caption_inches / (caption_inches + height / dpi), caption, ha="center", va="top", fontsize=9
    )
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def shares_caption(shares: dict[str, float]) -> str:
    """``"0 85.2% | 6+8+9 12.5% | None 2.3%"`` from shares by column name.

    Example:
        >>> shares_caption({"0": 0.852, "None": 0.148})
        '0 85.2% | None 14.8%'
    """
    return " | ".join(f"{name} {100 * share:.1f}%" for name, share in shares.items())
