"""The parts of a Stable Diffusion 3 model, as diffusers/transformers components."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast


@dataclass
class SD3Components:
    """The parts of a Stable Diffusion 3 (or 3.5) model, under ``StableDiffusion3Pipeline``'s names.

    Attributes:
        transformer: the MMDiT denoiser (predicts the flow velocity).
        vae: the autoencoder (latents are ``(z - shift_factor) * scaling_factor``), or ``None``
            for a pixel-space model (the transformer denoises images in ``[-1, 1]``).
        text_encoder: CLIP ViT-L/14 with its text projection.
        text_encoder_2: OpenCLIP bigG/14 with its text projection.
        tokenizer: the CLIP tokenizer of ``text_encoder`` (its max length is both CLIPs').
        tokenizer_2: the CLIP tokenizer of ``text_encoder_2``.
        scheduler: the flow-matching noise schedule.
        text_encoder_3: the T5 encoder, or ``None`` to run without T5 (its embeddings are zeros).
        tokenizer_3: the T5 tokenizer (``None`` exactly when ``text_encoder_3`` is).
    """

    transformer: SD3Transformer2DModel
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: FlowMatchEulerDiscreteScheduler
    text_encoder_3: T5EncoderModel | None = None
    tokenizer_3: T5TokenizerFast | None = None

    def __post_init__(self) -> None:
        if (self.text_encoder_3 is None) != (self.tokenizer_3 is None):
            given, missing = ("text_encoder_3", "tokenizer_3")
            if self.text_encoder_3 is None:
                given, missing = missing, given
            raise ValueError(f"SD3Components got {given} without {missing}; pass both (T5) or neither (no T5)")

    def models(self) -> list[nn.Module]:
        """The neural networks (T5 only if present)."""
        modules = [self.transformer, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3]
        return [module for module in modules if module is not None]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SD3Components:
        """Move/cast every network in place (``nn.Module.to``); returns ``self``."""
        for module in self.models():
            module.to(device=device, dtype=dtype)
        return self

    def pipeline(self) -> StableDiffusion3Pipeline:
        """A diffusers ``StableDiffusion3Pipeline`` over these very components (no copy)."""
        return StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model in the diffusers layout that ``StableDiffusion3Pipeline.from_pretrained`` loads.

        Each component goes to its subfolder, with ``model_index.json`` (written by the pipeline's
        own ``save_pretrained``); without T5 there is no ``text_encoder_3/`` or ``tokenizer_3/``.

        Returns:
            ``directory``.
        """
        directory = Path(directory)
        self.pipeline().save_pretrained(directory)
        return directory
