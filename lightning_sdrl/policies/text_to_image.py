"""Text-conditional (latent or pixel) diffusion built from diffusers components: Stable Diffusion."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel

from lightning_sdrl.policies.architectures import ArchitectureName, text_to_image_components
from lightning_sdrl.policies.base import CompileMode, DiffusionPolicy, cast_frozen_weights
from lightning_sdrl.policies.components import TextToImageComponents
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.decoding import decode_to_images
from lightning_sdrl.policies.kernels import DDIMStep
from lightning_sdrl.policies.loading import check_source, hub_kwargs, load_clip_tokenizer, load_component, resolve_dtype
from lightning_sdrl.policies.lora import LoRASettings
from lightning_sdrl.policies.tokenizers import token_ids


def upcast_vae(vae: AutoencoderKL | None, dtype: torch.dtype | None) -> AutoencoderKL | None:
    """Keep a float16 VAE whose config says ``force_upcast`` in float32 (diffusers' rule for decoding).

    ``force_upcast`` marks VAEs whose activations overflow float16 (Stable Diffusion's, SDXL's);
    diffusers' pipelines decode them in float32. bfloat16 has float32's range and stays as it is.
    """
    if vae is not None and dtype == torch.float16 and vae.config.get("force_upcast", False):
        cast_frozen_weights(vae, torch.float32)
    return vae


def load_text_to_image_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    torch_dtype: str | torch.dtype | None = None,
) -> TextToImageComponents:
    """Load UNet, text encoder, tokenizer, DDIM scheduler and (if present) VAE.

    ``pretrained_model_name_or_path`` is a hub id such as ``runwayml/stable-diffusion-v1-5`` or a
    local directory in the diffusers layout. A local directory without a ``vae`` subfolder is a
    pixel-space model. Whatever scheduler the model ships, it is loaded as a ``DDIMScheduler``
    from the same configuration (DDPO's sampler). ``torch_dtype`` (a dtype or its name, ``None``:
    as saved) is the networks' dtype, with the modules each library keeps in float32 and a
    ``force_upcast`` VAE in float32 under float16 (:func:`upcast_vae`).
    """
    required = ["unet", "text_encoder", "tokenizer", "scheduler"]
    check_source(pretrained_model_name_or_path, required)
    kwargs = hub_kwargs(revision, local_files_only)
    local = Path(pretrained_model_name_or_path).expanduser()
    has_vae = not local.is_dir() or (local / "vae").is_dir()
    diffusers_weights, transformers_weights = {**kwargs, "variant": variant}, {**kwargs, "variant": variant}
    torch_dtype = resolve_dtype(torch_dtype)
    if torch_dtype is not None:  # diffusers names the argument torch_dtype, transformers 5 dtype
        diffusers_weights["torch_dtype"] = transformers_weights["dtype"] = torch_dtype
    path = pretrained_model_name_or_path
    vae = load_component(AutoencoderKL, path, "vae", **diffusers_weights) if has_vae else None
    return TextToImageComponents(
        unet=load_component(UNet2DConditionModel, path, "unet", **diffusers_weights),
        text_encoder=load_component(CLIPTextModel, path, "text_encoder", **transformers_weights),
        tokenizer=load_clip_tokenizer(path, "tokenizer", **kwargs),
        scheduler=load_component(DDIMScheduler, path, "scheduler", **kwargs),
        vae=upcast_vae(vae, torch_dtype),
    )


def cast_text_to_image_components(
    components: TextToImageComponents, torch_dtype: str | torch.dtype | None
) -> TextToImageComponents:
    """Cast the networks of ``components`` in place as :func:`load_text_to_image_components` loads them.

    ``None`` leaves them unchanged.
    """
    dtype = resolve_dtype(torch_dtype)
    for network in (components.unet, components.text_encoder, components.vae):
        if network is not None:
            cast_frozen_weights(network, dtype)
    upcast_vae(components.vae, dtype)
    return components


class TextToImagePolicy(DiffusionPolicy):
    """A text-conditional diffusion policy over given components.

    Use :class:`StableDiffusionPolicy` to load one, or :class:`RandomTextToImagePolicy` for
    randomly initialised architectures (tests, benchmarks).

    Args:
        components: the model's parts (in the dtype they are run in; trained parameters become float32).
        lora: LoRA settings for the UNet; ``None`` fine-tunes the whole UNet.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        compile: ``torch.compile`` the UNet call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        components: TextToImageComponents,
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(lora=lora, gradient_checkpointing=gradient_checkpointing, compile=compile)
        self.unet = components.unet
        self.text_encoder = components.text_encoder
        self.vae = components.vae
        self.tokenizer = components.tokenizer
        self.kernel = DDIMStep(components.scheduler)
        self._null_cache: dict[tuple[torch.device, torch.dtype], Conditioning] = {}
        self._setup_trainable()
        self.text_encoder.eval()
        if self.vae is not None:
            self.vae.eval()

    def components(self) -> TextToImageComponents:
        """The current parts (LoRA layers, if any, stay inside the UNet)."""
        return TextToImageComponents(self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.vae)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the UNet's input (latents, or pixels without a VAE)."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """CLIP text embeddings ``encoder_hidden_states`` ``[B, L, D]`` (padded to the tokenizer's max length)."""
        ids = token_ids(self.tokenizer, prompts, self.text_encoder.device)
        with torch.no_grad():
            return Conditioning(encoder_hidden_states=self.text_encoder(ids)[0])

    def null_condition(self, batch_size: int) -> Conditioning:
        """Embedding of the empty prompt, ``[B, L, D]`` (computed once per device)."""
        key = (self.text_encoder.device, self.text_encoder.dtype)
        if key not in self._null_cache:
            self._null_cache = {key: self.encode_prompts([""])}
        return self._null_cache[key].expand(batch_size)

    def denoise(self, sample: Tensor, timesteps: Tensor, conditions: Conditioning) -> Tensor:
        """UNet output given the text embeddings of ``conditions``."""
        hidden = conditions["encoder_hidden_states"].to(self.dtype)
        return self.run_denoiser(sample, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]

    def decode(self, sample: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` (VAE decode, or pixels directly)."""
        return decode_to_images(self.vae, sample)


class StableDiffusionPolicy(TextToImagePolicy):
    """Stable Diffusion (or any diffusers text-to-image model) loaded with ``from_pretrained``.

    Args:
        pretrained_model_name_or_path: hub id (``runwayml/stable-diffusion-v1-5``) or a local
            directory in the diffusers layout (``unet/``, ``text_encoder/``, ``tokenizer/``,
            ``scheduler/`` and, for latent models, ``vae/``).
        revision: hub revision.
        variant: weights variant, e.g. ``"fp16"``.
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        lora: LoRA settings; ``None`` fine-tunes the whole UNet.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        torch_dtype: dtype of the frozen networks (UNet base weights, text encoder, VAE), e.g.
            ``"bfloat16"`` on GPUs; ``None`` keeps them as saved. LoRA (or, under full
            fine-tuning, the whole UNet) is trained in float32.
        compile: ``torch.compile`` the UNet call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool | None = None,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008 - an immutable-by-use default
        gradient_checkpointing: bool = False,
        torch_dtype: str | torch.dtype | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        components = load_text_to_image_components(
            pretrained_model_name_or_path, revision, variant, local_files_only, torch_dtype
        )
        super().__init__(components, lora=lora, gradient_checkpointing=gradient_checkpointing, compile=compile)
        self.pretrained_model_name_or_path = pretrained_model_name_or_path


class RandomTextToImagePolicy(TextToImagePolicy):
    """A randomly initialised text-to-image model of a named architecture.

    ``"tiny"`` is a few-thousand-parameter latent model for CPU tests; ``"sd15"`` has Stable
    Diffusion 1.5's exact architecture (for benchmarks: time does not depend on weight values);
    every name is in :data:`~lightning_sdrl.policies.architectures.ARCHITECTURES`.

    Args:
        architecture: a name of :data:`~lightning_sdrl.policies.architectures.ARCHITECTURES`.
        seed: initialisation seed.
        lora: LoRA settings; ``None`` fine-tunes the whole UNet.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        torch_dtype: cast the networks to it after initialising them in float32 (as
            :class:`StableDiffusionPolicy` loads them); ``None`` keeps float32.
        compile: ``torch.compile`` the UNet call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        architecture: ArchitectureName = "tiny",
        seed: int = 0,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008
        gradient_checkpointing: bool = False,
        torch_dtype: str | torch.dtype | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        components = cast_text_to_image_components(text_to_image_components(architecture, seed), torch_dtype)
        super().__init__(components, lora=lora, gradient_checkpointing=gradient_checkpointing, compile=compile)
