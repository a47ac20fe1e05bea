"""The parts of a Stable Diffusion 3 model, as diffusers/transformers components."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from lightning_sdrl.policies.pipeline_parts import PipelineParts, check_encoder_pair


@dataclass
class SD3Components(PipelineParts):
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
        check_encoder_pair("SD3Components", self.text_encoder_3, self.tokenizer_3, "text_encoder_3", "tokenizer_3")

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
