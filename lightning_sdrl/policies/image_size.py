"""Image sizes in pixels and in the denoiser's grid: the VAE's downsampling and the sizes a model accepts."""

from __future__ import annotations

from diffusers import AutoencoderKL

__all__ = ["checked_image_size", "vae_scale_factor"]


def vae_scale_factor(vae: AutoencoderKL | None) -> int:
    """Pixels per latent along each side: ``2 ** (levels - 1)`` of the VAE, as in diffusers' pipelines (1: no VAE)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def checked_image_size(name: str, value: int | None, default: int, multiple: int, why: str) -> int:
    """``value`` in pixels (``None``: ``default``), which must be a positive multiple of ``multiple``.

    Args:
        name: the argument's name, for the error (``"height"``).
        value: the requested size, or ``None``.
        default: the model's own size in pixels.
        multiple: what the size must divide by (the VAE's downsampling times the denoiser's).
        why: what ``multiple`` is made of, for the error.

    Raises:
        ValueError: ``value`` is not a positive multiple of ``multiple``.

    Example:
        >>> checked_image_size("height", None, 1024, 32, "8 x 4"), checked_image_size("width", 768, 1024, 32, "8 x 4")
        (1024, 768)
    """
    if value is None:
        return default
    if value < multiple or value % multiple:
        raise ValueError(f"{name}={value}; expected a positive multiple of {multiple} ({why})")
    return value
