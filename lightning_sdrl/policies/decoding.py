"""From the denoiser's space to images: VAE decoding (or none, for pixel-space models) and ``[0, 1]``.

Every policy family decodes the same way: latents are divided by the VAE's ``scaling_factor``,
its ``shift_factor`` (Stable Diffusion 3, FLUX) added where it has one, decoded, and the decoder's
``[-1, 1]`` images mapped to ``[0, 1]``, as diffusers' pipelines and their image processor do.
A pixel-space model's samples are the images in ``[-1, 1]``; one channel is repeated on three.
"""

from __future__ import annotations

from diffusers import AutoencoderKL
from torch import Tensor

__all__ = ["decode_to_images", "unit_range_images"]


def unit_range_images(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` float images in ``[0, 1]`` from ``[-1, 1]`` (a single channel repeated on three).

    Example:
        >>> import torch
        >>> unit_range_images(torch.tensor([-1.0, 0.0, 3.0]).view(1, 1, 1, 3)).shape
        torch.Size([1, 3, 1, 3])
    """
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def decode_to_images(vae: AutoencoderKL | None, sample: Tensor) -> Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` of the denoiser's samples (``vae=None``: pixel space).

    The VAE decodes ``sample / scaling_factor + shift_factor`` (no shift when its config has none),
    in the VAE's dtype.
    """
    if vae is None:
        return unit_range_images(sample)
    latents = sample.to(vae.dtype) / vae.config.scaling_factor
    shift = vae.config.get("shift_factor")
    if shift:
        latents = latents + shift
    return unit_range_images(vae.decode(latents).sample)
