"""A small pixel-space text-to-image architecture: character-level CLIP text encoder + conditional UNet.

The same code path as Stable Diffusion (prompt -> ``CLIPTokenizer`` -> ``CLIPTextModel`` ->
``UNet2DConditionModel`` with cross-attention -> ``DDIMScheduler``), in pixel space: the UNet
denoises images in ``[-1, 1]`` directly, without a VAE. :class:`PixelTextToImageArchitecture`
describes such a model (its defaults are the digits miniature's shipped model);
:func:`pixel_text_to_image_components` builds it with random weights, for denoising pretraining
(:class:`~lightning_sdrl.modules.pretrain.DiffusionPretrainModule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from lightning_sdrl.policies.components import TextToImageComponents
from lightning_sdrl.policies.text_encoders import clip_text_encoder
from lightning_sdrl.policies.tokenizers import char_clip_tokenizer

__all__ = ["PixelTextToImageArchitecture", "pixel_noise_scheduler", "pixel_text_to_image_components"]


@dataclass
class PixelTextToImageArchitecture:
    """A small pixel-space text-to-image model: character-level CLIP text encoder + conditional UNet.

    The defaults are the shipped digits model. The UNet is a ``UNet2DConditionModel`` whose
    levels work at 16x16, 8x8 and 4x4 pixels: the 16x16 level only has 8 channels and no down
    resnet (the digits are bilinear upsamplings of 8x8 images, so little happens at full
    resolution), and cross-attention to the text sits at 4x4 and in the middle block, where the
    digit's shape is decided. This keeps one forward pass of 64 images to about 1 GFLOP.

    Attributes:
        sample_size: image side in pixels.
        in_channels: image channels (1: grayscale).
        block_out_channels: UNet channels of each resolution level, finest first.
        layers_per_block: down resnets of each level (the up path has one more).
        cross_attention_levels: whether each level has cross-attention transformer blocks.
        attention_heads: heads of every UNet attention layer.
        norm_num_groups: GroupNorm groups (must divide every channel count).
        text_hidden_size: width of the text encoder (the UNet's ``cross_attention_dim``).
        text_layers: transformer layers of the text encoder.
        text_heads: attention heads of the text encoder.
        text_intermediate_size: MLP width of the text encoder.
        max_length: tokenizer length (one token per character, plus start and end tokens).
        beta_schedule: noise schedule over 1000 training steps. ``"squaredcos_cap_v2"`` (the
            cosine schedule of Nichol & Dhariwal 2021) destroys small images more gradually than
            DDPM's ``"linear"`` one (betas 1e-4 to 0.02), and unlike Stable Diffusion's
            ``"scaled_linear"`` it reaches pure noise at ``t = T`` in pixel space.
    """

    sample_size: int = 16
    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (8, 16, 32)
    layers_per_block: tuple[int, ...] = (0, 1, 1)
    cross_attention_levels: tuple[bool, ...] = (False, False, True)
    attention_heads: int = 4
    norm_num_groups: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 128
    max_length: int = 32
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        for name in ("layers_per_block", "cross_attention_levels"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"{name}={getattr(self, name)} has {len(getattr(self, name))} entries; expected "
                    f"{levels}, one per level of block_out_channels={self.block_out_channels}"
                )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels="
                f"{self.block_out_channels}; pick a common divisor"
            )
        if self.sample_size % 2 ** (levels - 1):
            raise ValueError(
                f"sample_size={self.sample_size} cannot be halved {levels - 1} times; use a multiple of 2**(levels - 1)"
            )


def pixel_noise_scheduler(beta_schedule: str = "squaredcos_cap_v2") -> DDIMScheduler:
    """DDIM over 1000 training steps, epsilon prediction, ``set_alpha_to_one=False`` like SD.

    Unlike Stable Diffusion's latents, pixels have a known range: the predicted ``x_0`` of every
    step is clipped to ``[-1, 1]`` (``clip_sample``, as in DDPM's sampler). Without it, small
    errors of the predicted noise in the image's mean brightness at high noise levels grow into
    all-white or all-black samples (measured on the digits model after 1140 steps: 43% of
    samples show the prompt's digit without clipping, 73% with it).
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule=beta_schedule,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def pixel_text_to_image_components(
    architecture: PixelTextToImageArchitecture | None = None, seed: int = 0
) -> TextToImageComponents:
    """Randomly initialised components of ``architecture`` (default: the digits model).

    Example:
        >>> components = pixel_text_to_image_components()
        >>> components.vae is None, components.unet.config.sample_size
        (True, 16)
    """
    arch = architecture or PixelTextToImageArchitecture()
    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(max_length=arch.max_length)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.cross_attention_levels))
    unet = UNet2DConditionModel(
        sample_size=arch.sample_size,
        in_channels=arch.in_channels,
        out_channels=arch.in_channels,
        block_out_channels=tuple(arch.block_out_channels),
        layers_per_block=tuple(arch.layers_per_block),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=arch.text_hidden_size,
        attention_head_dim=arch.attention_heads,  # diffusers reads it as the number of heads
        norm_num_groups=arch.norm_num_groups,
    )
    text_encoder = clip_text_encoder(
        len(tokenizer),
        arch.text_hidden_size,
        arch.text_layers,
        arch.text_heads,
        arch.text_intermediate_size,
        arch.max_length,
    )
    return TextToImageComponents(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=pixel_noise_scheduler(arch.beta_schedule),
        vae=None,
    )
