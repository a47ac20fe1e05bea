"""A small pixel-space flow-matching text-to-image architecture in Stable Diffusion 3's layout.

The same parts as Stable Diffusion 3 (two ``CLIPTextModelWithProjection`` text encoders with
their tokenizers -> ``SD3Transformer2DModel``, an MMDiT, -> ``FlowMatchEulerDiscreteScheduler``),
without T5 and without a VAE: the transformer predicts the flow velocity of images in ``[-1, 1]``
directly. :class:`PixelFlowArchitecture` describes such a model (its defaults are the flow-matching
digits miniature's shipped model); :func:`pixel_flow_components` builds it with random weights
for rectified-flow pretraining (:class:`~lightning_sdrl.modules.flow_pretrain.FlowMatchingPretrainModule`).
Loaded with :class:`~lightning_sdrl.policies.sd3.StableDiffusion3Policy` (``use_t5=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from lightning_sdrl.policies.sd3_components import SD3Components
from lightning_sdrl.policies.text_encoders import clip_text_encoder_with_projection
from lightning_sdrl.policies.tokenizers import char_clip_tokenizer

__all__ = ["PixelFlowArchitecture", "pixel_flow_components", "pixel_flow_scheduler"]


@dataclass
class PixelFlowArchitecture:
    """A small pixel-space SD3-layout model: two character-level CLIP text encoders + an MMDiT.

    The defaults are the shipped flow-matching digits model. The transformer cuts the 16x16 image
    into 2x2 patches (an 8x8 grid: the digits are bilinear upsamplings of 8x8 images) and attends
    jointly to the 64 patches and the prompt's tokens in every layer, as SD3 does.

    Attributes:
        sample_size: image side in pixels.
        in_channels: image channels (1: grayscale).
        patch_size: side of the transformer's patches.
        num_layers: MMDiT (joint-attention) blocks.
        attention_heads: heads of every attention layer.
        attention_head_dim: width of each head (the transformer's width is their product).
        text_hidden_size: width of each of the two text encoders (their pooled projection too).
        text_layers: transformer layers of each text encoder.
        text_heads: attention heads of each text encoder.
        text_intermediate_size: MLP width of each text encoder.
        max_length: tokenizer length (one token per character, plus start and end tokens).
        shift: time shift of the sampling schedule (``FlowMatchEulerDiscreteScheduler(shift=...)``;
            SD3 uses 3 at 1024 pixels, 1 is the unshifted schedule).
    """

    sample_size: int = 16
    in_channels: int = 1
    patch_size: int = 2
    num_layers: int = 4
    attention_heads: int = 4
    attention_head_dim: int = 16
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 128
    max_length: int = 32
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"sample_size={self.sample_size} is not a multiple of patch_size={self.patch_size}; pick a divisor"
            )
        if self.text_layers < 2:
            raise ValueError(
                f"text_layers={self.text_layers}; SD3 reads the penultimate hidden state of each text encoder, "
                "so it needs at least 2 layers"
            )
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift}; expected a positive time shift (1: unshifted)")


def pixel_flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """Flow matching over 1000 training steps with a static time ``shift`` (no dynamic shifting).

    Unshifted, ``set_timesteps(n)`` spaces the sigmas evenly from 1 to ``1 / 1000`` (diffusers'
    smallest training sigma), then appends 0.

    Example:
        >>> scheduler = pixel_flow_scheduler()
        >>> scheduler.set_timesteps(4)
        >>> [round(sigma, 3) for sigma in scheduler.sigmas.tolist()]
        [1.0, 0.667, 0.334, 0.001, 0.0]
    """
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def pixel_flow_components(architecture: PixelFlowArchitecture | None = None, seed: int = 0) -> SD3Components:
    """Randomly initialised components of ``architecture`` (default: the flow-matching digits model).

    Both tokenizers are the same character-level CLIP tokenizer as the DDIM digits model's.

    Example:
        >>> components = pixel_flow_components()
        >>> components.vae is None, components.text_encoder_3 is None, components.transformer.config.in_channels
        (True, True, 1)
    """
    arch = architecture or PixelFlowArchitecture()
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = char_clip_tokenizer(arch.max_length), char_clip_tokenizer(arch.max_length)
    encoders = [
        clip_text_encoder_with_projection(
            len(tokenizer),
            arch.text_hidden_size,
            arch.text_layers,
            arch.text_heads,
            arch.text_intermediate_size,
            arch.max_length,
            projection_dim=arch.text_hidden_size,
        )
        for _ in range(2)
    ]
    width = arch.attention_heads * arch.attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=arch.sample_size,
        patch_size=arch.patch_size,
        in_channels=arch.in_channels,
        out_channels=arch.in_channels,
        num_layers=arch.num_layers,
        attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.attention_heads,
        joint_attention_dim=2 * arch.text_hidden_size,  # both CLIPs' hidden states side by side
        caption_projection_dim=width,
        pooled_projection_dim=2 * arch.text_hidden_size,
        pos_embed_max_size=arch.sample_size // arch.patch_size,
        qk_norm="rms_norm",
    )
    return SD3Components(
        transformer=transformer,
        vae=None,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=pixel_flow_scheduler(arch.shift),
    )
