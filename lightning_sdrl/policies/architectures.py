"""Randomly initialised model architectures built from configs.

Tiny ones serve CPU tests; Stable Diffusion 1.5's and 3.5 Medium's serve benchmarks (no download:
time does not depend on weight values). One registry, :data:`ARCHITECTURES`, holds them all; each
entry says which components it builds (Stable Diffusion 1.x-style :class:`TextToImageComponents`
, :class:`SD3Components` or :class:`SDXLComponents`) and which policy class takes its name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from lightning_sdrl.policies.components import TextToImageComponents
from lightning_sdrl.policies.flux_components import FluxComponents
from lightning_sdrl.policies.pixel import PixelTextToImageArchitecture, pixel_text_to_image_components
from lightning_sdrl.policies.sd3_components import SD3Components
from lightning_sdrl.policies.sdxl_components import SDXLComponents
from lightning_sdrl.policies.text_encoders import clip_text_encoder, clip_text_encoder_with_projection, t5_encoder
from lightning_sdrl.policies.tokenizers import char_clip_tokenizer, clip_tokenizer, unigram_t5_tokenizer

TextToImageArchitectureName = Literal["tiny", "tiny-pixel", "sd15", "digits"]
"""The names of :data:`ARCHITECTURES` that build :class:`TextToImageComponents` (``RandomTextToImagePolicy``)."""
SD3ArchitectureName = Literal["sd3-tiny", "sd35-medium"]
"""The names of :data:`ARCHITECTURES` that build :class:`SD3Components` (``RandomStableDiffusion3Policy``)."""
SDXLArchitectureName = Literal["sdxl-tiny", "sdxl"]
"""The names of :data:`ARCHITECTURES` that build :class:`SDXLComponents` (``RandomStableDiffusionXLPolicy``)."""
FluxArchitectureName = Literal["flux-tiny", "flux-dev"]
"""The names of :data:`ARCHITECTURES` that build :class:`FluxComponents` (``RandomFluxPolicy``)."""
ArchitectureName = Literal[TextToImageArchitectureName, SD3ArchitectureName, SDXLArchitectureName, FluxArchitectureName]
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


SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
"""``SD3Transformer2DModel`` config of ``stabilityai/stable-diffusion-3.5-medium`` (MMDiT-X: dual
attention in layers 0..12, RMS QK-norm)."""

SD3_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""``AutoencoderKL`` config of Stable Diffusion 3 / 3.5 (16 latent channels, no quant convs)."""


def stable_diffusion_3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Stable Diffusion 3's flow-matching schedule: 1000 training steps, time shift 3 (no dynamic shifting)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _sd3_style_components(architecture: str, seed: int) -> SD3Components:
    """``"sd3-tiny"`` or ``"sd35-medium"`` (see :data:`ARCHITECTURES`), seeded."""
    torch.manual_seed(seed)
    if architecture == "sd3-tiny":
        tokenizer, tokenizer_2 = char_clip_tokenizer(max_length=16), char_clip_tokenizer(max_length=16, pad_token="!")
        tokenizer_3 = unigram_t5_tokenizer()
        # CLIP widths 8 + 16 < T5's 32, so the concatenated CLIP embeddings are zero-padded as in SD3
        text_encoder = clip_text_encoder_with_projection(len(tokenizer), 8, 2, 2, 16, 16, projection_dim=8)
        text_encoder_2 = clip_text_encoder_with_projection(len(tokenizer), 16, 2, 2, 32, 16, 16, "gelu")
        text_encoder_3 = t5_encoder(len(tokenizer_3), d_model=32, d_ff=32, layers=2, heads=2, d_kv=8)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=8 + 16,
            pos_embed_max_size=8,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        vae_config = {
            **SD3_VAE,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "block_out_channels": (8, 16),
            "layers_per_block": 1,
            # one normalisation group: a random decoder with per-channel groups normalises away every
            # image's mean, so brightness would hardly depend on the latents (measured: its std over
            # random latents 0.0015); with one group the latent channels' means survive and shift it
            "norm_num_groups": 1,
            "sample_size": 16,
            "scaling_factor": 1.5,
            "shift_factor": 0.25,
        }
    else:
        tokenizer, tokenizer_2 = clip_tokenizer(max_length=77), clip_tokenizer(max_length=77, pad_token="!")
        tokenizer_3 = unigram_t5_tokenizer(max_length=512)
        # CLIP ViT-L/14 and OpenCLIP bigG/14 text towers, T5 v1.1 XXL encoder
        text_encoder = clip_text_encoder_with_projection(len(tokenizer), 768, 12, 12, 3072, 77, 768, "quick_gelu")
        text_encoder_2 = clip_text_encoder_with_projection(len(tokenizer), 1280, 32, 20, 5120, 77, 1280, "gelu")
        text_encoder_3 = t5_encoder(32128, d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64)
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
        vae_config = SD3_VAE
    return SD3Components(
        transformer=transformer,
        vae=AutoencoderKL(**vae_config),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=stable_diffusion_3_scheduler(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
"""``UNet2DConditionModel`` config of ``stabilityai/stable-diffusion-xl-base-1.0``: three levels,
10 transformer layers at the lowest, cross-attention to CLIP-L + bigG (768 + 1280 = 2048 wide), the
added time embedding of the pooled bigG embedding (1280) and six size numbers (6 x 256)."""

SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
"""``AutoencoderKL`` config of Stable Diffusion XL (Stable Diffusion's layout, scaling 0.13025, float32
decoding under float16)."""


def _sdxl_style_components(architecture: str, seed: int) -> SDXLComponents:
    """``"sdxl-tiny"`` or ``"sdxl"`` (see :data:`ARCHITECTURES`), seeded."""
    torch.manual_seed(seed)
    if architecture == "sdxl-tiny":
        tokenizer, tokenizer_2 = char_clip_tokenizer(max_length=16), char_clip_tokenizer(max_length=16, pad_token="!")
        text_encoder = clip_text_encoder(len(tokenizer), 16, 2, 2, 32, 16)
        text_encoder_2 = clip_text_encoder_with_projection(len(tokenizer), 16, 2, 2, 32, 16, 16, "gelu")
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            cross_attention_dim=16 + 16,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,
        )
        vae_config = {
            **SDXL_VAE,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "block_out_channels": (8, 16),
            "layers_per_block": 1,
            "norm_num_groups": 1,  # as sd3-tiny's: per-channel groups would normalise brightness away
            "sample_size": 16,
            "scaling_factor": 0.5,  # SDXL's 0.13025 would saturate this random decoder's images
        }
    else:
        tokenizer, tokenizer_2 = clip_tokenizer(max_length=77), clip_tokenizer(max_length=77, pad_token="!")
        # CLIP ViT-L/14 (no projection: SDXL reads its hidden states only) and OpenCLIP bigG/14
        text_encoder = clip_text_encoder(len(tokenizer), 768, 12, 12, 3072, 77)
        text_encoder_2 = clip_text_encoder_with_projection(len(tokenizer), 1280, 32, 20, 5120, 77, 1280, "gelu")
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae_config = SDXL_VAE
    return SDXLComponents(
        unet=unet,
        vae=AutoencoderKL(**vae_config),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=stable_diffusion_scheduler(),
    )


FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""``FluxTransformer2DModel`` config of ``black-forest-labs/FLUX.1-dev``: 19 double- and 38 single-stream
blocks of width 3072 over 2x2-packed 16-channel latents, with the guidance embedding."""

FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""``AutoencoderKL`` config of FLUX.1 (16 latent channels, scaling 0.3611, shift 0.1159)."""


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's schedule: 1000 training steps, the time shift of the image's token count (0.5 at 256, 1.15 at 4096)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _flux_style_components(architecture: str, seed: int) -> FluxComponents:
    """``"flux-tiny"`` or ``"flux-dev"`` (see :data:`ARCHITECTURES`), seeded (the VAE drawn first)."""
    torch.manual_seed(seed)
    if architecture == "flux-tiny":
        # one normalisation group, as sd3-tiny's (per-channel groups would normalise brightness away); drawn
        # first, this random decoder's brightness follows the latents (+0.03 for a +0.5 shift of them)
        vae = AutoencoderKL(
            **{
                **FLUX_VAE,
                "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2,
                "block_out_channels": (8, 16),
                "layers_per_block": 1,
                "latent_channels": 4,
                "norm_num_groups": 1,
                "sample_size": 16,
                "scaling_factor": 1.5,
                "shift_factor": 0.25,
            }
        )
        tokenizer, tokenizer_2 = char_clip_tokenizer(max_length=16), unigram_t5_tokenizer()
        text_encoder = clip_text_encoder(len(tokenizer), 16, 2, 2, 32, 16)
        text_encoder_2 = t5_encoder(len(tokenizer_2), d_model=32, d_ff=32, layers=2, heads=2, d_kv=8)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )
    else:
        vae = AutoencoderKL(**FLUX_VAE)
        tokenizer, tokenizer_2 = clip_tokenizer(max_length=77), unigram_t5_tokenizer(max_length=512)
        text_encoder = clip_text_encoder(len(tokenizer), 768, 12, 12, 3072, 77)  # CLIP ViT-L/14
        text_encoder_2 = t5_encoder(32128, d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64)  # T5 v1.1 XXL
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    return FluxComponents(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=flux_scheduler(),
    )


@dataclass(frozen=True)
class NamedArchitecture:
    """One entry of :data:`ARCHITECTURES`: what it is, what it builds, and how, with random weights.

    Attributes:
        description: what the architecture is and what it is for.
        build: ``seed -> components`` (all weights drawn after ``torch.manual_seed(seed)``).
        components: the class of what ``build`` returns.
        policy: the policy class that takes this name (``RandomTextToImagePolicy(name)``).
    """

    description: str
    build: Callable[[int], Any]
    components: type = TextToImageComponents
    policy: str = "RandomTextToImagePolicy"


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
    "sd3-tiny": NamedArchitecture(
        "an MMDiT-X transformer (2 layers, 2 heads of 8, dual attention in layer 0, RMS QK-norm) on 16x8x8 "
        "latents, a 2-block 16-channel VAE with one normalisation group, scaling 1.5 and shift 0.25 (16x16 "
        "images), two 2-layer CLIPs "
        "with projection (widths 8, 16) over a character-level tokenizer, a 2-layer width-32 T5 encoder over a "
        "small unigram tokenizer, shift-3 flow matching; CPU tests",
        lambda seed: _sd3_style_components("sd3-tiny", seed),
        SD3Components,
        "RandomStableDiffusion3Policy",
    ),
    "sd35-medium": NamedArchitecture(
        "Stable Diffusion 3.5 Medium's exact MMDiT-X transformer, VAE (1024x1024 images), CLIP-L/14 and OpenCLIP "
        "bigG/14 text towers with the real CLIP tokenizer and T5 v1.1 XXL encoder (over the small unigram "
        "tokenizer: the real SentencePiece vocabulary is not available offline); benchmarks",
        lambda seed: _sd3_style_components("sd35-medium", seed),
        SD3Components,
        "RandomStableDiffusion3Policy",
    ),
    "sdxl-tiny": NamedArchitecture(
        "an SDXL-layout UNet (channels 16, 32; 1 and 2 transformer layers; added text-time conditioning) on "
        "4x8x8 latents, a 2-block VAE with one normalisation group and scaling 0.5 (16x16 images), a 2-layer "
        "CLIP and a 2-layer CLIP with projection (widths 16) over a character-level tokenizer; CPU tests",
        lambda seed: _sdxl_style_components("sdxl-tiny", seed),
        SDXLComponents,
        "RandomStableDiffusionXLPolicy",
    ),
    "sdxl": NamedArchitecture(
        "Stable Diffusion XL base 1.0's exact UNet (2.57B), VAE (1024x1024 images), CLIP ViT-L/14 and OpenCLIP "
        "bigG/14 text towers with the real CLIP tokenizer; benchmarks",
        lambda seed: _sdxl_style_components("sdxl", seed),
        SDXLComponents,
        "RandomStableDiffusionXLPolicy",
    ),
    "flux-tiny": NamedArchitecture(
        "a FLUX.1-layout transformer (1 double- and 1 single-stream block, 2 heads of 8, guidance embedding) "
        "over 2x2-packed 4x8x8 latents, a 2-block VAE with one normalisation group, scaling 1.5 and shift 0.25 "
        "(16x16 images), a 2-layer width-16 CLIP over a character-level tokenizer, a 2-layer width-32 T5 over a "
        "small unigram tokenizer, resolution-shifted flow matching; CPU tests",
        lambda seed: _flux_style_components("flux-tiny", seed),
        FluxComponents,
        "RandomFluxPolicy",
    ),
    "flux-dev": NamedArchitecture(
        "FLUX.1-dev's exact transformer (11.9B, with the guidance embedding), VAE (1024x1024 images), CLIP-L/14 "
        "text tower with the real CLIP tokenizer and T5 v1.1 XXL encoder (over the small unigram tokenizer); "
        "benchmarks",
        lambda seed: _flux_style_components("flux-dev", seed),
        FluxComponents,
        "RandomFluxPolicy",
    ),
}
"""Every named architecture, by the names :data:`ArchitectureName` allows."""


def _entry(architecture: str, components: type, caller: str) -> NamedArchitecture:
    """The registry entry ``architecture``, which must build ``components`` (else a clear error for ``caller``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    entry = ARCHITECTURES[architecture]
    if entry.components is not components:
        fitting = sorted(name for name, other in ARCHITECTURES.items() if other.components is components)
        raise ValueError(
            f"architecture={architecture!r} builds {entry.components.__name__}, not {components.__name__}: "
            f"use {entry.policy}({architecture!r}); {caller} takes one of {fitting}"
        )
    return entry


def _build(entry: NamedArchitecture, seed: int, dtype: torch.dtype | None, device: torch.device | str | None) -> Any:
    """``entry.build(seed)`` with the networks created on ``device`` (if given), then cast to ``dtype`` (if given)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        components = entry.build(seed)
    return components.to(dtype=dtype) if dtype is not None else components


def text_to_image_components(architecture: ArchitectureName = "tiny", seed: int = 0) -> TextToImageComponents:
    """Randomly initialised components of a named Stable Diffusion 1.x-style architecture (:data:`ARCHITECTURES`).

    Example:
        >>> text_to_image_components("tiny-pixel").vae is None
        True
    """
    return _entry(architecture, TextToImageComponents, "RandomTextToImagePolicy").build(seed)


def sd3_components(
    architecture: SD3ArchitectureName = "sd3-tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SD3Components:
    """Randomly initialised components of a named Stable Diffusion 3 architecture (:data:`ARCHITECTURES`).

    Args:
        architecture: ``"sd3-tiny"`` or ``"sd35-medium"``.
        seed: initialisation seed.
        dtype: cast every network to it after building (e.g. ``torch.bfloat16``); ``None`` keeps float32.
        device: build the networks there (``"cuda"`` initialises on the GPU; ``"meta"`` allocates
            nothing, e.g. to count parameters).

    Example:
        >>> with torch.device("meta"):
        ...     components = sd3_components("sd35-medium")
        >>> components.transformer.config.num_layers, components.vae.config.latent_channels
        (24, 16)
    """
    return _build(_entry(architecture, SD3Components, "RandomStableDiffusion3Policy"), seed, dtype, device)


def sdxl_components(
    architecture: SDXLArchitectureName = "sdxl-tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SDXLComponents:
    """Randomly initialised components of a named Stable Diffusion XL architecture (:data:`ARCHITECTURES`).

    Args:
        architecture: ``"sdxl-tiny"`` or ``"sdxl"``.
        seed: initialisation seed.
        dtype: cast every network to it after building (e.g. ``torch.float16``); ``None`` keeps float32.
        device: build the networks there (``"meta"`` allocates nothing, e.g. to count parameters).

    Example:
        >>> with torch.device("meta"):
        ...     components = sdxl_components("sdxl")
        >>> components.unet.config.cross_attention_dim, components.vae.config.scaling_factor
        (2048, 0.13025)
    """
    return _build(_entry(architecture, SDXLComponents, "RandomStableDiffusionXLPolicy"), seed, dtype, device)


def flux_components(
    architecture: FluxArchitectureName = "flux-tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> FluxComponents:
    """Randomly initialised components of a named FLUX.1 architecture (:data:`ARCHITECTURES`).

    Args:
        architecture: ``"flux-tiny"`` or ``"flux-dev"``.
        seed: initialisation seed.
        dtype: cast every network to it after building (e.g. ``torch.bfloat16``); ``None`` keeps float32.
        device: build the networks there (``"meta"`` allocates nothing, e.g. to count parameters).
    """
    return _build(_entry(architecture, FluxComponents, "RandomFluxPolicy"), seed, dtype, device)


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
