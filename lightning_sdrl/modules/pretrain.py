"""Denoising pretraining of a pixel-space text-to-image model (DDPM's objective), exported in the diffusers layout.

DDPM's simple objective (Ho et al. 2020, eq. 14): noise a training image to a random timestep with
the forward process (eq. 4) and regress the noise with the UNet, conditioned on the caption's CLIP
embedding. The UNet and the (randomly initialised) text encoder train together; a fraction of the
captions is replaced by the empty prompt so that the model also learns the unconditional score
that classifier-free guidance needs (Ho & Salimans 2022).

Exponential moving averages of the weights are Lightning's ``EMAWeightAveraging`` callback (see
``configs/digits/pretrain.yaml``): it swaps the averaged weights in for validation and copies them
into the model before :meth:`DiffusionPretrainModule.on_train_end` exports it.

The digits miniature's pretraining (its captions, and a digit classifier judging validation
samples) is :class:`~lightning_sdrl.digits.pretrain.DigitsPretrainModule`, a subclass. A subclass
changes the model and its objective by overriding :meth:`DiffusionPretrainModule.build`,
``networks``, ``denoising_loss``, ``components`` and ``sampling_policy``: the rectified-flow
pretraining of an SD3-layout model is
:class:`~lightning_sdrl.modules.flow_pretrain.FlowMatchingPretrainModule`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.modules.hyperparameters import record_arguments
from lightning_sdrl.policies.base import DiffusionPolicy, Trajectory
from lightning_sdrl.policies.components import TextToImageComponents
from lightning_sdrl.policies.pixel import PixelTextToImageArchitecture, pixel_text_to_image_components
from lightning_sdrl.policies.text_to_image import TextToImagePolicy


class CaptionedImages(Protocol):
    """A training batch of :class:`DiffusionPretrainModule`: images and their captions.

    Attributes:
        images: ``[B, C, H, W]`` floats in ``[-1, 1]`` (the model's pixel range).
        captions: the ``B`` captions.
    """

    images: Tensor
    captions: list[str]

    def __len__(self) -> int:
        """The batch size ``B``."""
        ...


# ---------------------------------------------------------------------- the math, in small functions
def drop_captions(captions: list[str], probability: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty prompt with ``probability`` (classifier-free guidance).

    Example:
        >>> drop_captions(["a", "b", "c"], 1.0)
        ['', '', '']
    """
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist(), strict=True)]


def encode_captions(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str]) -> Tensor:
    """CLIP text embeddings ``[B, L, D]`` of captions padded to the tokenizer's length, with gradients.

    The same tokenisation as :meth:`TextToImagePolicy.encode_prompts`, so that sampling sees the
    conditioning the model was trained on.
    """
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


@dataclass
class NoisedImages:
    """Images noised by the forward process.

    Attributes:
        noisy: ``[B, C, H, W]`` the samples ``x_t``.
        noise: ``[B, C, H, W]`` the noise ``epsilon`` the UNet must predict.
        timesteps: ``[B]`` the timestep ``t`` of each sample.
    """

    noisy: Tensor
    noise: Tensor
    timesteps: Tensor


def forward_diffusion(
    scheduler: DDIMScheduler, images: Tensor, generator: torch.Generator | None = None
) -> NoisedImages:
    """Noise each image to a uniformly drawn timestep: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``.

    Eq. (4) of DDPM, with ``a_t`` the cumulative product of ``1 - beta`` (``alphas_cumprod``).
    """
    # 1. t ~ Uniform{0, ..., T - 1} and eps ~ N(0, I)
    timesteps = torch.randint(
        scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator, device=images.device
    )
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    # 2. q(x_t | x_0), eq. (4)
    return NoisedImages(scheduler.add_noise(images, noise, timesteps), noise, timesteps)


def epsilon_loss(predicted_noise: Tensor, noise: Tensor) -> Tensor:
    """DDPM's simple loss, eq. (14): mean squared error between predicted and true noise."""
    return F.mse_loss(predicted_noise.float(), noise.float())


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_fraction: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to ``final_fraction`` at ``total_steps``.

    Example:
        >>> [round(warmup_cosine(s, 10, 110), 2) for s in (0, 5, 10, 60, 110)]
        [0.1, 0.6, 1.0, 0.55, 0.1]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- the LightningModule
class DiffusionPretrainModule(pl.LightningModule):
    """Denoising pretraining of a pixel-space text-to-image model, exported in the diffusers layout.

    Training batches are :class:`CaptionedImages` (images in ``[-1, 1]``, e.g. the digits
    miniature's :class:`~lightning_sdrl.digits.captions.CaptionBatch` es). This module has no
    validation step of its own; :meth:`sample_validation_batch` samples a
    :class:`~lightning_sdrl.data.sampling.PromptBatch` with the ``val_*`` settings for a subclass
    to judge (:class:`~lightning_sdrl.digits.pretrain.DigitsPretrainModule` classifies the digits).

    Args:
        architecture: the model to build (default: the shipped digits model).
        seed: initialisation seed of the weights.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: optimiser steps of linear learning-rate warm-up, before a cosine decay to
            a tenth of ``lr`` at the end of training.
        caption_dropout: probability of training on the empty caption instead of the real one
            (the unconditional model for classifier-free guidance).
        val_num_steps: DDIM steps of validation samples (:meth:`sample_validation_batch`).
        val_guidance_scale: classifier-free guidance of validation samples.
        val_eta: DDIM noise weight of validation samples.
        export_dir: where :meth:`on_train_end` writes the model (``save_pretrained`` layout);
            ``None`` writes ``<log_dir>/diffusion``.
    """

    def __init__(
        self,
        architecture: PixelTextToImageArchitecture = PixelTextToImageArchitecture(),  # noqa: B008 - frozen by use
        seed: int = 0,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        caption_dropout: float = 0.1,
        val_num_steps: int = 20,
        val_guidance_scale: float = 3.0,
        val_eta: float = 1.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={caption_dropout}; expected a probability in [0, 1)")
        if lr <= 0 or warmup_steps < 0:
            raise ValueError(f"lr={lr}, warmup_steps={warmup_steps}; expected lr > 0 and warmup_steps >= 0")
        record_arguments(self)
        self.build(architecture, seed)

    # ------------------------------------------------------------------ what a subclass changes
    def build(self, architecture: PixelTextToImageArchitecture, seed: int) -> None:
        """Create the randomly initialised networks of ``architecture`` as attributes."""
        components = pixel_text_to_image_components(architecture, seed)
        self.unet: UNet2DConditionModel = components.unet
        self.text_encoder: CLIPTextModel = components.text_encoder.train()  # it trains too
        self.tokenizer, self.scheduler = components.tokenizer, components.scheduler

    def networks(self) -> list[nn.Module]:
        """The networks that train, in the optimiser's parameter order."""
        return [self.unet, self.text_encoder]

    def denoising_loss(self, batch: CaptionedImages) -> Tensor:
        """DDPM's epsilon-prediction loss of one batch, with caption dropout."""
        captions = drop_captions(batch.captions, self.hparams.caption_dropout)
        conditions = encode_captions(self.text_encoder, self.tokenizer, captions)
        noised = forward_diffusion(self.scheduler, batch.images)
        predicted = self.unet(noised.noisy, noised.timesteps, encoder_hidden_states=conditions).sample
        return epsilon_loss(predicted, noised.noise)

    @property
    def validation_eta(self) -> float:
        """The sampler's noise weight for validation samples (``val_eta``)."""
        return self.hparams.val_eta

    def components(self) -> TextToImageComponents:
        """The model being trained (pixel space: no VAE)."""
        return TextToImageComponents(self.unet, self.text_encoder, self.tokenizer, self.scheduler, vae=None)

    def sampling_policy(self) -> DiffusionPolicy:
        """A frozen copy of the current model as a policy, to sample from."""
        return TextToImagePolicy(copy.deepcopy(self.components()), lora=None).eval()

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self) -> dict:
        """AdamW over the :meth:`networks`, warm-up then cosine decay per optimiser step."""
        params = [parameter for network in self.networks() for parameter in network.parameters()]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: CaptionedImages, batch_idx: int) -> Tensor:
        """The :meth:`denoising_loss` of one batch of captioned images."""
        loss = self.denoising_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def sample_validation_batch(self, batch: PromptBatch) -> Trajectory:
        """Sample the batch's prompts from the current model with the ``val_*`` settings and the batch's seed."""
        policy = self.sampling_policy()
        generator = torch.Generator(self.device).manual_seed(batch.seed)
        return policy.sample(
            batch.prompts, self.hparams.val_num_steps, self.validation_eta, self.hparams.val_guidance_scale, generator
        )

    def on_train_end(self) -> None:
        """Write the (EMA, if the callback is used) model with ``save_pretrained``."""
        directory = self.hparams.export_dir
        if directory is None:  # trainer.log_dir is a collective call under DDP: every rank asks
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "diffusion"
        if self.trainer.is_global_zero:
            self.components().save_pretrained(directory)
