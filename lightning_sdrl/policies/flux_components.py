"""The parts of a FLUX.1 model, as diffusers/transformers components."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from lightning_sdrl.policies.pipeline_parts import PipelineParts, check_encoder_pair


@dataclass
class FluxComponents(PipelineParts):
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
        check_encoder_pair("FluxComponents", self.text_encoder_2, self.tokenizer_2, "text_encoder_2", "tokenizer_2")

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
