"""Rectified-flow pretraining of a pixel-space SD3-layout text-to-image model, exported in the diffusers layout.

The objective is SD3's (:mod:`lightning_sdrl.functional.rectified_flow`): move a training image a
random ``sigma`` along the straight line to Gaussian noise and regress the line's velocity with
the transformer, conditioned on both CLIP text encoders' embeddings exactly as
:class:`~lightning_sdrl.policies.sd3.SD3Policy` computes them for sampling
(:func:`~lightning_sdrl.policies.sd3.encode_sd3_prompts`). Transformer and text encoders train
together; caption dropout, the learning-rate schedule, EMA (Lightning's ``EMAWeightAveraging``)
and the export are :class:`~lightning_sdrl.modules.pretrain.DiffusionPretrainModule`'s.

The exported directory (``transformer/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
``tokenizer_2/``, ``scheduler/``, ``model_index.json``; no ``vae/``, no T5) loads with
``StableDiffusion3Policy(dir, use_t5=False, max_sequence_length=...)``.
"""

from __future__ import annotations

import copy

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection

from lightning_sdrl.functional.rectified_flow import TimeSampling, flow_interpolation, sample_flow_sigmas, velocity_loss
from lightning_sdrl.modules.pretrain import CaptionedImages, DiffusionPretrainModule, drop_captions
from lightning_sdrl.policies.pixel_flow import PixelFlowArchitecture, pixel_flow_components
from lightning_sdrl.policies.sd3 import MAX_SEQUENCE_LENGTH, SD3Policy, encode_sd3_prompts
from lightning_sdrl.policies.sd3_components import SD3Components


class FlowMatchingPretrainModule(DiffusionPretrainModule):
    """Rectified-flow pretraining of a pixel-space SD3-layout model (no VAE, no T5).

    Args:
        architecture: the model to build (default: the shipped flow-matching digits model).
        seed: initialisation seed of the weights.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: optimiser steps of linear warm-up, before a cosine decay to a tenth of ``lr``.
        caption_dropout: probability of training on the empty caption (for classifier-free guidance).
        time_sampling: distribution of the training ``sigma``: ``"logit_normal"`` (SD3's) or ``"uniform"``.
        logit_mean: mean of the logit-normal's Gaussian.
        logit_std: standard deviation of the logit-normal's Gaussian.
        max_sequence_length: zero "T5" embeddings appended to the CLIP tokens (SD3 without T5);
            sampling must use the same number (``SD3Policy(max_sequence_length=...)``).
        val_num_steps: sampling steps of validation samples.
        val_guidance_scale: classifier-free guidance of validation samples.
        val_noise_level: the SDE's noise level for validation samples (0: the Euler ODE).
        export_dir: where ``on_train_end`` writes the model; ``None`` writes ``<log_dir>/diffusion``.
    """

    def __init__(
        self,
        architecture: PixelFlowArchitecture = PixelFlowArchitecture(),  # noqa: B008 - frozen by use
        seed: int = 0,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        caption_dropout: float = 0.1,
        time_sampling: TimeSampling = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        max_sequence_length: int = 1,
        val_num_steps: int = 10,
        val_guidance_scale: float = 3.0,
        val_noise_level: float = 0.7,
        export_dir: str | None = None,
    ) -> None:
        if time_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"time_sampling={time_sampling!r}; expected 'logit_normal' or 'uniform'")
        if logit_std <= 0:
            raise ValueError(f"logit_std={logit_std}; expected a positive standard deviation")
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length={max_sequence_length}; expected 1..{MAX_SEQUENCE_LENGTH}")
        super().__init__(
            architecture,  # type: ignore[arg-type]  # build() takes this module's architecture
            seed,
            lr,
            weight_decay,
            warmup_steps,
            caption_dropout,
            val_num_steps,
            val_guidance_scale,
            val_noise_level,
            export_dir,
        )

    def build(self, architecture: PixelFlowArchitecture, seed: int) -> None:  # type: ignore[override]
        """Create the randomly initialised transformer, text encoders, tokenizers and schedule."""
        if not isinstance(architecture, PixelFlowArchitecture):
            raise TypeError(
                f"architecture is a {type(architecture).__name__}; FlowMatchingPretrainModule builds a "
                "PixelFlowArchitecture (DiffusionPretrainModule takes a PixelTextToImageArchitecture)"
            )
        components = pixel_flow_components(architecture, seed)
        self.transformer: SD3Transformer2DModel = components.transformer
        self.text_encoder: CLIPTextModelWithProjection = components.text_encoder.train()  # they train too
        self.text_encoder_2: CLIPTextModelWithProjection = components.text_encoder_2.train()
        self.tokenizer, self.tokenizer_2 = components.tokenizer, components.tokenizer_2
        self.scheduler: FlowMatchEulerDiscreteScheduler = components.scheduler

    def networks(self) -> list[nn.Module]:
        """Transformer and both text encoders, in the optimiser's parameter order."""
        return [self.transformer, self.text_encoder, self.text_encoder_2]

    def denoising_loss(self, batch: CaptionedImages) -> Tensor:
        """The rectified-flow velocity loss of one batch, with caption dropout."""
        captions = drop_captions(batch.captions, self.hparams.caption_dropout)
        conditions = encode_sd3_prompts(self.components(), captions, self.hparams.max_sequence_length)
        images = batch.images
        hparams = self.hparams
        sigmas = sample_flow_sigmas(
            len(captions), hparams.time_sampling, hparams.logit_mean, hparams.logit_std, device=self.device
        )
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype)
        noised = flow_interpolation(images, noise, sigmas)
        predicted = self.transformer(
            hidden_states=noised.noisy,
            timestep=sigmas * self.scheduler.config.num_train_timesteps,  # the schedule's timesteps are 1000 sigma
            encoder_hidden_states=conditions["encoder_hidden_states"],
            pooled_projections=conditions["pooled_projections"],
            return_dict=False,
        )[0]
        return velocity_loss(predicted, noised.velocity)

    @property
    def validation_eta(self) -> float:
        """The SDE's noise level for validation samples (``val_noise_level``)."""
        return self.hparams.val_noise_level

    def components(self) -> SD3Components:  # type: ignore[override]
        """The model being trained (pixel space: no VAE; no T5)."""
        return SD3Components(
            transformer=self.transformer,
            vae=None,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            scheduler=self.scheduler,
        )

    def sampling_policy(self) -> SD3Policy:
        """A frozen copy of the current model as a flow policy (Flow-GRPO's SDE sampler), to sample from."""
        components = copy.deepcopy(self.components())
        return SD3Policy(components, lora=None, max_sequence_length=self.hparams.max_sequence_length).eval()
