"""The parts of a FLUX.1 model, as diffusers/transformers components."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast


@dataclass
class FluxComponents:
    """The parts of a FLUX.1 model (dev or schnell), under ``FluxPipeline``'s names.

    Attributes:
        transformer: the MMDiT + single-stream transformer over 2x2-packed latent tokens (with a
            guidance embedding in FLUX.1-dev, none in schnell).
        vae: the autoencoder (latents are ``(z - shift_factor) * scaling_factor``).
        text_encoder: CLIP ViT-L/14 (its pooled output).
        text_encoder_2: the T5 encoder (its last hidden states are the prompt embeddings), or
            ``None`` to run without T5 (zero prompt embeddings; ``FluxPipeline`` itself needs T5).
        tokenizer: the CLIP tokenizer.
        tokenizer_2: the T5 tokenizer (``None`` exactly when ``text_encoder_2`` is).
        scheduler: the flow-matching schedule (FLUX.1: resolution-dependent shift).
    """

    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel | None
    tokenizer: CLIPTokenizer
    tokenizer_2: T5TokenizerFast | None
    scheduler: FlowMatchEulerDiscreteScheduler

    def __post_init__(self) -> None:
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            given = "text_encoder_2" if self.text_encoder_2 is not None else "tokenizer_2"
            missing = "tokenizer_2" if given == "text_encoder_2" else "text_encoder_2"
            raise ValueError(f"FluxComponents got {given} without {missing}; pass both (T5) or neither (no T5)")

    def models(self) -> list[nn.Module]:
        """The neural networks (T5 only if present)."""
        modules = [self.transformer, self.vae, self.text_encoder, self.text_encoder_2]
        return [module for module in modules if module is not None]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FluxComponents:
        """Move/cast every network in place (``nn.Module.to``); returns ``self``."""
        for module in self.models():
            module.to(device=device, dtype=dtype)
        return self

    def pipeline(self) -> FluxPipeline:
        """A diffusers ``FluxPipeline`` over these very components (no copy)."""
        return FluxPipeline(
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the diffusers layout that ``FluxPipeline.from_pretrained`` loads; returns ``directory``."""
        directory = Path(directory)
        self.pipeline().save_pretrained(directory)
        return directory
