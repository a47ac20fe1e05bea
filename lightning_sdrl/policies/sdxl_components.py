"""The parts of a Stable Diffusion XL model, as diffusers/transformers components."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightning_sdrl.policies.pipeline_parts import PipelineParts


@dataclass
class SDXLComponents(PipelineParts):
    """The parts of a Stable Diffusion XL model, under ``StableDiffusionXLPipeline``'s names.

    Attributes:
        unet: the UNet with SDXL's added conditioning (``addition_embed_type="text_time"``: the
            pooled text embedding and six size / crop numbers enter the time embedding).
        vae: the autoencoder (latents are ``z * scaling_factor``; SDXL's ``force_upcast`` VAE
            decodes in float32 under float16).
        text_encoder: CLIP ViT-L/14 (its penultimate hidden states).
        text_encoder_2: OpenCLIP bigG/14 with its text projection (penultimate hidden states and
            the projected pooled embedding).
        tokenizer: the CLIP tokenizer of ``text_encoder``.
        tokenizer_2: the CLIP tokenizer of ``text_encoder_2`` (SDXL's pads with ``"!"``).
        scheduler: the noise schedule, as a DDIM scheduler (the policy's sampler).
        force_zeros_for_empty_prompt: the unconditional embeddings of classifier-free guidance are
            zeros (SDXL base's pipeline setting) instead of the empty prompt's.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: DDIMScheduler
    force_zeros_for_empty_prompt: bool = True

    def pipeline(self) -> StableDiffusionXLPipeline:
        """A diffusers ``StableDiffusionXLPipeline`` over these very components (no copy, no watermark)."""
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=self.scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
