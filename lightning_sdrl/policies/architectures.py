"""Randomly initialised model architectures built from configs.

Tiny ones serve CPU tests; Stable Diffusion 1.5's serves benchmarks (no download: time does not
depend on weight values).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextConfig, CLIPTextModel

from lightning_sdrl.policies.text_to_image import TextToImageComponents
from lightning_sdrl.policies.tokenizers import char_clip_tokenizer, clip_tokenizer

ARCHITECTURES = ("tiny", "tiny-pixel", "sd15")


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


def _text_encoder(tokenizer_len: int, hidden: int, layers: int, heads: int, ffn: int, max_length: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=tokenizer_len,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        projection_dim=hidden,
        bos_token_id=tokenizer_len - 2,
        eos_token_id=tokenizer_len - 1,
        pad_token_id=tokenizer_len - 1,
    )
    return CLIPTextModel(config).eval()


def text_to_image_components(architecture: str = "tiny", seed: int = 0) -> TextToImageComponents:
    """Randomly initialised components of a named architecture.

    - ``"tiny"``: latent UNet with channels (16, 32) and one cross-attention block on 8x8
      latents, a 2-layer width-32 CLIP text encoder over a character-level tokenizer, and a
      2-block VAE (16x16 images).
    - ``"tiny-pixel"``: the same UNet and text encoder diffusing 3x16x16 pixels, no VAE.
    - ``"sd15"``: Stable Diffusion 1.5's UNet, VAE (512x512 images) and CLIP ViT-L/14 text
      encoder, with the real CLIP tokenizer.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; expected one of {ARCHITECTURES}")
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
        text_encoder = _text_encoder(len(tokenizer), 32, 2, 4, 37, 16)
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
        text_encoder = _text_encoder(len(tokenizer), 768, 12, 12, 3072, 77)
    return TextToImageComponents(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=stable_diffusion_scheduler(), vae=vae
    )


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
