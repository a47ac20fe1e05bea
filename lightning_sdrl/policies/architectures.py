"""Randomly initialised model architectures built from configs.

Tiny ones serve CPU tests; Stable Diffusion 1.5's serves benchmarks (no download: time does not
depend on weight values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel

from lightning_sdrl.policies.components import TextToImageComponents
from lightning_sdrl.policies.pixel import PixelTextToImageArchitecture, pixel_text_to_image_components
from lightning_sdrl.policies.text_encoders import clip_text_encoder
from lightning_sdrl.policies.tokenizers import char_clip_tokenizer, clip_tokenizer

ArchitectureName = Literal["tiny", "tiny-pixel", "sd15", "digits"]
"""The names of :data:`ARCHITECTURES`."""


def stable_diffusion_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule (scaled-linear betas, ``set_alpha_to_one=False``)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _sd_style_components(architecture: str, seed: int) -> TextToImageComponents:
    """``"tiny"``, ``"tiny-pixel"`` or ``"sd15"`` (see :data:`ARCHITECTURES`), seeded."""
    torch.manual_seed(seed)
    if architecture in ("tiny", "tiny-pixel"):
        pixel = architecture == "tiny-pixel"
        tokenizer = char_clip_tokenizer(max_length=16)
        unet = UNet2DConditionModel(
            sample_size=16 if pixel else 8,
            in_channels=3 if pixel else 4,
            out_channels=3 if pixel else 4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = (
            AutoencoderKL(
                block_out_channels=(8, 16),
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                latent_channels=4,
                norm_num_groups=8,
                sample_size=16,
            )
            if not pixel
            else None
        )
        text_encoder = clip_text_encoder(len(tokenizer), 32, 2, 4, 37, 16)
    else:
        tokenizer = clip_tokenizer(max_length=77)
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = clip_text_encoder(len(tokenizer), 768, 12, 12, 3072, 77)
    return TextToImageComponents(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=stable_diffusion_scheduler(), vae=vae
    )


@dataclass(frozen=True)
class NamedArchitecture:
    """One entry of :data:`ARCHITECTURES`: what it is and how to build it with random weights.

    Attributes:
        description: what the architecture is and what it is for.
        build: ``seed -> components`` (all weights drawn after ``torch.manual_seed(seed)``).
    """

    description: str
    build: Callable[[int], TextToImageComponents]


ARCHITECTURES: dict[str, NamedArchitecture] = {
    "tiny": NamedArchitecture(
        "latent UNet with channels (16, 32) and one cross-attention block on 8x8 latents, a 2-layer "
        "width-32 CLIP text encoder over a character-level tokenizer, a 2-block VAE (16x16 images); CPU tests",
        lambda seed: _sd_style_components("tiny", seed),
    ),
    "tiny-pixel": NamedArchitecture(
        "the tiny UNet and text encoder diffusing 3x16x16 pixels, no VAE; CPU tests",
        lambda seed: _sd_style_components("tiny-pixel", seed),
    ),
    "sd15": NamedArchitecture(
        "Stable Diffusion 1.5's exact UNet, VAE (512x512 images) and CLIP ViT-L/14 text encoder with the "
        "real CLIP tokenizer; benchmarks (time does not depend on weight values)",
        lambda seed: _sd_style_components("sd15", seed),
    ),
    "digits": NamedArchitecture(
        "the digits miniature's 16x16 pixel model (PixelTextToImageArchitecture defaults), untrained",
        lambda seed: pixel_text_to_image_components(PixelTextToImageArchitecture(), seed),
    ),
}
"""Every named text-to-image architecture, by the names :data:`ArchitectureName` allows."""


def text_to_image_components(architecture: ArchitectureName = "tiny", seed: int = 0) -> TextToImageComponents:
    """Randomly initialised components of a named architecture (:data:`ARCHITECTURES`).

    Example:
        >>> text_to_image_components("tiny-pixel").vae is None
        True
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture].build(seed)


def tiny_class_conditional_unet(
    num_classes: int, sample_size: int = 8, channels: int = 1, seed: int = 0
) -> UNet2DModel:
    """A small pixel-space ``UNet2DModel`` with ``num_classes + 1`` class embeddings.

    The last embedding is the null class used for classifier-free guidance.
    """
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=num_classes + 1,
    )
