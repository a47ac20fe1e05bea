"""Stable Diffusion XL as a policy: the UNet family's most fine-tuned model.

The policy computes what diffusers' ``StableDiffusionXLPipeline`` does (its ``encode_prompt``: the
penultimate hidden states of both CLIPs side by side and the second one's projected pooled
embedding; the added ``time_ids`` of original size, crop corner and target size; zero unconditional
embeddings under ``force_zeros_for_empty_prompt``; VAE decoding), and samples with DDIM, whose
steps are Gaussian (:class:`~lightning_sdrl.policies.kernels.DDIMStep`), so DDPO, GRPO, ReFL,
DiffusionNFT and AWM train it as they train Stable Diffusion 1.5. LoRA files carry
``unet.``-prefixed keys that ``StableDiffusionXLPipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lightning_sdrl.policies.architectures import SDXLArchitectureName, sdxl_components
from lightning_sdrl.policies.base import CompileMode, DiffusionPolicy
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.decoding import decode_to_images
from lightning_sdrl.policies.image_size import checked_image_size, vae_scale_factor
from lightning_sdrl.policies.kernels import DDIMStep
from lightning_sdrl.policies.loading import check_source, hub_kwargs, load_clip_tokenizer, load_component, resolve_dtype
from lightning_sdrl.policies.lora import LoRASettings
from lightning_sdrl.policies.sdxl_components import SDXLComponents
from lightning_sdrl.policies.text_to_image import upcast_vae
from lightning_sdrl.policies.tokenizers import token_ids

SDXL_SUBFOLDERS = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
"""The subfolders of a Stable Diffusion XL model directory in the diffusers layout."""


def _force_zeros(path: str, kwargs: dict) -> bool:
    """``force_zeros_for_empty_prompt`` of a model's ``model_index.json`` (local or on the hub), default ``True``."""
    local = Path(path).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        return (
            bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)) if index.is_file() else True
        )
    from diffusers import DiffusionPipeline

    return bool(DiffusionPipeline.load_config(path, **kwargs).get("force_zeros_for_empty_prompt", True))


def load_sdxl_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    torch_dtype: str | torch.dtype | None = None,
) -> SDXLComponents:
    """Load a Stable Diffusion XL model's components (the scheduler's config as a DDIM scheduler).

    Args:
        pretrained_model_name_or_path: hub id (``stabilityai/stable-diffusion-xl-base-1.0``) or a
            local directory in the diffusers layout (:data:`SDXL_SUBFOLDERS`).
        revision: hub revision.
        variant: weights variant, e.g. ``"fp16"``.
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        torch_dtype: dtype of the networks (``None``: as saved); a ``force_upcast`` VAE stays in
            float32 under float16, as the pipeline decodes with it.

    Raises:
        FileNotFoundError: the directory or one of its subfolders is missing.
        OSError: a component cannot be loaded, or a tokenizer has no vocabulary.
    """
    check_source(pretrained_model_name_or_path, SDXL_SUBFOLDERS)
    kwargs = hub_kwargs(revision, local_files_only)
    diffusers_weights, transformers_weights = {**kwargs, "variant": variant}, {**kwargs, "variant": variant}
    torch_dtype = resolve_dtype(torch_dtype)
    if torch_dtype is not None:  # diffusers names the argument torch_dtype, transformers 5 dtype
        diffusers_weights["torch_dtype"] = transformers_weights["dtype"] = torch_dtype
    path = pretrained_model_name_or_path
    return SDXLComponents(
        unet=load_component(UNet2DConditionModel, path, "unet", **diffusers_weights),
        vae=upcast_vae(load_component(AutoencoderKL, path, "vae", **diffusers_weights), torch_dtype),
        text_encoder=load_component(CLIPTextModel, path, "text_encoder", **transformers_weights),
        text_encoder_2=load_component(CLIPTextModelWithProjection, path, "text_encoder_2", **transformers_weights),
        tokenizer=load_clip_tokenizer(path, "tokenizer", **kwargs),
        tokenizer_2=load_clip_tokenizer(path, "tokenizer_2", **kwargs),
        scheduler=load_component(DDIMScheduler, path, "scheduler", **kwargs),
        force_zeros_for_empty_prompt=_force_zeros(path, kwargs),
    )


def encode_sdxl_prompts(components: SDXLComponents, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """SDXL's prompt embeddings, as ``StableDiffusionXLPipeline.encode_prompt`` computes them.

    Each prompt is padded to each tokenizer's max length; the text encoders' penultimate hidden
    states are concatenated along the width, and the pooled embedding is the second encoder's
    projected one.

    Returns:
        ``([B, L, D_1 + D_2] prompt embeddings, [B, P] pooled embeddings)``.

    Raises:
        ValueError: ``prompts`` is empty.
    """
    if not prompts:
        raise ValueError("prompts is empty; expected at least one prompt")
    first, second = (
        encoder(token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
        for tokenizer, encoder in (
            (components.tokenizer, components.text_encoder),
            (components.tokenizer_2, components.text_encoder_2),
        )
    )
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden.to(components.text_encoder_2.dtype), second.text_embeds


def sdxl_time_ids(height: int, width: int, batch_size: int) -> Tensor:
    """``[B, 6]`` SDXL's added time ids: original size, crop top-left ``(0, 0)``, target size (all ``(H, W)``).

    Example:
        >>> sdxl_time_ids(1024, 768, 2).tolist()
        [[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0], [1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0]]
    """
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch_size, 6)


class SDXLPolicy(DiffusionPolicy):
    """A Stable Diffusion XL policy over given components, sampled with DDIM.

    Use :class:`StableDiffusionXLPolicy` to load one, or :class:`RandomStableDiffusionXLPolicy` for
    randomly initialised architectures (tests, benchmarks).

    Args:
        components: the model's parts.
        lora: LoRA settings for the UNet; ``None`` fine-tunes the whole UNet.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        height: image height in pixels (default ``unet.config.sample_size`` times the VAE's
            downsampling factor; SDXL base: 1024); a multiple of that factor times the UNet's
            downsampling. Also the original and target size of the added time ids.
        width: image width in pixels (same default and constraint).
        compile: ``torch.compile`` the UNet call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        components: SDXLComponents,
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(lora=lora, gradient_checkpointing=gradient_checkpointing, compile=compile)
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.force_zeros_for_empty_prompt = components.force_zeros_for_empty_prompt
        self.kernel = DDIMStep(components.scheduler)
        self.height, self.width = self._image_size("height", height), self._image_size("width", width)
        self._null_cache: dict[tuple[torch.device, torch.dtype], Conditioning] = {}
        self._setup_trainable()
        for module in (self.vae, self.text_encoder, self.text_encoder_2):
            module.eval()

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (:func:`~lightning_sdrl.policies.image_size.vae_scale_factor`)."""
        return vae_scale_factor(self.vae)

    def _image_size(self, name: str, value: int | None) -> int:
        """``value`` (or the UNet's default size in pixels), checked against the UNet's downsampling."""
        factor, unet = self.vae_scale_factor, 2 ** (len(self.unet.config.block_out_channels) - 1)
        why = f"the VAE's downsampling {factor} times the UNet's {unet}"
        return checked_image_size(name, value, self.unet.config.sample_size * factor, factor * unet, why)

    def components(self) -> SDXLComponents:
        """The current parts (LoRA layers, if any, stay inside the UNet)."""
        return SDXLComponents(
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            scheduler=self.scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
        )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents: the UNet's input channels, the image size over the VAE factor."""
        factor = self.vae_scale_factor
        return (self.unet.config.in_channels, self.height // factor, self.width // factor)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``encoder_hidden_states``, pooled ``text_embeds`` and ``time_ids`` (:func:`encode_sdxl_prompts`)."""
        with torch.no_grad():
            hidden, pooled = encode_sdxl_prompts(self.components(), prompts)
        time_ids = sdxl_time_ids(self.height, self.width, len(prompts)).to(hidden.device)
        return Conditioning(encoder_hidden_states=hidden, text_embeds=pooled, time_ids=time_ids)

    def null_condition(self, batch_size: int) -> Conditioning:
        """The unconditional embeddings: zeros under ``force_zeros_for_empty_prompt``, else the empty prompt's."""
        key = (self.text_encoder.device, self.text_encoder.dtype)
        if key not in self._null_cache:
            empty = self.encode_prompts([""])
            if self.force_zeros_for_empty_prompt:
                empty = Conditioning(
                    encoder_hidden_states=torch.zeros_like(empty["encoder_hidden_states"]),
                    text_embeds=torch.zeros_like(empty["text_embeds"]),
                    time_ids=empty["time_ids"],
                )
            self._null_cache = {key: empty}
        return self._null_cache[key].expand(batch_size)

    def denoise(self, sample: Tensor, timesteps: Tensor, conditions: Conditioning) -> Tensor:
        """The UNet's noise prediction with SDXL's added conditioning (pooled text and time ids)."""
        dtype = self.dtype
        added = {"text_embeds": conditions["text_embeds"].to(dtype), "time_ids": conditions["time_ids"].to(dtype)}
        hidden = conditions["encoder_hidden_states"].to(dtype)
        return self.run_denoiser(
            sample.to(dtype), timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False
        )[0]

    def decode(self, sample: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``: VAE decoding of ``latents / scaling_factor``."""
        return decode_to_images(self.vae, sample)


class StableDiffusionXLPolicy(SDXLPolicy):
    """Stable Diffusion XL loaded with ``from_pretrained``.

    Args:
        pretrained_model_name_or_path: hub id (``stabilityai/stable-diffusion-xl-base-1.0``) or a
            local directory in the diffusers layout (:data:`SDXL_SUBFOLDERS`).
        revision: hub revision.
        variant: weights variant, e.g. ``"fp16"``.
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        torch_dtype: dtype of the frozen networks (``None``: as saved), e.g. ``"float16"``; LoRA
            (or, under full fine-tuning, the whole UNet) is trained in float32, and SDXL's VAE
            decodes in float32.
        lora: LoRA settings; ``None`` fine-tunes the whole UNet.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        height: image height in pixels (default: the UNet's sample size times 8, i.e. 1024).
        width: image width in pixels.
        compile: ``torch.compile`` the UNet call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool | None = None,
        torch_dtype: str | torch.dtype | None = None,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008 - an immutable-by-use default
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        components = load_sdxl_components(
            pretrained_model_name_or_path, revision, variant, local_files_only, torch_dtype
        )
        super().__init__(
            components,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            height=height,
            width=width,
            compile=compile,
        )
        self.pretrained_model_name_or_path = pretrained_model_name_or_path


class RandomStableDiffusionXLPolicy(SDXLPolicy):
    """A randomly initialised Stable Diffusion XL model of a named architecture.

    ``"sdxl-tiny"`` is a CPU-test model; ``"sdxl"`` has SDXL base 1.0's exact architecture (for
    benchmarks: time does not depend on weight values); see
    :data:`~lightning_sdrl.policies.architectures.ARCHITECTURES`.

    Args:
        architecture: ``"sdxl-tiny"`` or ``"sdxl"``.
        seed: initialisation seed.
        lora: LoRA settings; ``None`` fine-tunes the whole UNet.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        height: image height in pixels (default: the UNet's sample size times the VAE factor).
        width: image width in pixels.
        torch_dtype: cast the networks to it (a ``force_upcast`` VAE stays float32 under float16);
            ``None`` keeps float32.
        device: build the networks there (e.g. ``"cuda"``: initialised on the GPU).
        compile: ``torch.compile`` the UNet call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        architecture: SDXLArchitectureName = "sdxl-tiny",
        seed: int = 0,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        dtype = resolve_dtype(torch_dtype)
        components = sdxl_components(architecture, seed, dtype=dtype, device=device)
        upcast_vae(components.vae, dtype)
        super().__init__(
            components,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            height=height,
            width=width,
            compile=compile,
        )
