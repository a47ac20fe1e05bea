"""Stable Diffusion 3 / 3.5 as a flow-matching policy (Flow-GRPO's setting).

The policy computes what diffusers' ``StableDiffusion3Pipeline`` does (its ``encode_prompt``, its
transformer call, its VAE decoding with ``shift_factor``), but samples with a stochastic step
kernel: :class:`~lightning_sdrl.policies.flow_kernels.FlowSDEStep`, Flow-GRPO's reverse SDE,
whose tiny-noise limit is the pipeline's Euler ODE. Classifier-free guidance, trajectories, step
log-probs, LoRA and ``save_trained`` come from :class:`~lightning_sdrl.policies.base.DiffusionPolicy`;
LoRA files carry ``transformer.``-prefixed keys that ``StableDiffusion3Pipeline.load_lora_weights``
reads.

A model without a VAE (a local directory without ``vae/``, or ``SD3Components(vae=None)``) is a
pixel-space flow model: the transformer denoises images in ``[-1, 1]`` directly (the flow-matching
digits architecture, :mod:`~lightning_sdrl.policies.pixel_flow`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from lightning_sdrl.policies.architectures import SD3ArchitectureName, sd3_components
from lightning_sdrl.policies.base import CompileMode, DiffusionPolicy
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.decoding import decode_to_images
from lightning_sdrl.policies.flow_kernels import FlowSDEStep, FlowSDEVariant
from lightning_sdrl.policies.image_size import checked_image_size, vae_scale_factor
from lightning_sdrl.policies.loading import (
    check_source,
    hub_kwargs,
    load_clip_tokenizer,
    load_component,
    load_t5_tokenizer,
    resolve_dtype,
)
from lightning_sdrl.policies.lora import LoRASettings
from lightning_sdrl.policies.sd3_components import SD3Components
from lightning_sdrl.policies.tokenizers import token_ids

FLOW_GRPO_LORA_TARGET_MODULES = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
"""Flow-GRPO's LoRA targets on SD3 (``LoRASettings(rank=32, alpha=64, target_modules=...)`` there):
the joint attention's image projections and its text-stream ``add_*`` ones. Being
``attn.``-qualified, they leave the second (image-only) attention ``attn2`` of SD3.5's MMDiT-X
dual-attention layers unadapted. The default ``LoRASettings()`` targets (``to_q``, ``to_k``,
``to_v``, ``to_out.0``) adapt the image projections of both ``attn`` and ``attn2``, not the text
stream's."""

MAX_SEQUENCE_LENGTH = 512
"""The longest T5 prompt ``StableDiffusion3Pipeline`` accepts."""


def load_sd3_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    use_t5: bool = True,
    torch_dtype: str | torch.dtype | None = None,
) -> SD3Components:
    """Load a Stable Diffusion 3 model's components (without T5 when ``use_t5=False``).

    A local directory without a ``vae`` subfolder is a pixel-space model (``vae=None``), as for
    :func:`~lightning_sdrl.policies.text_to_image.load_text_to_image_components`.

    Args:
        pretrained_model_name_or_path: hub id (``stabilityai/stable-diffusion-3.5-medium``) or a
            local directory in the diffusers layout.
        revision: hub revision.
        variant: weights variant, e.g. ``"fp16"``.
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        use_t5: load ``text_encoder_3`` / ``tokenizer_3``; ``False`` never touches them (the T5
            embeddings are then zeros, as in the pipeline without T5).
        torch_dtype: dtype of the networks (``None``: as saved).

    Raises:
        FileNotFoundError: the directory, one of its subfolders, or (with ``use_t5=True``) its
            ``text_encoder_3/`` is missing.
        OSError: a component cannot be loaded, or a tokenizer has no vocabulary.
    """
    required = ["transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
    check_source(pretrained_model_name_or_path, required)
    local = Path(pretrained_model_name_or_path).expanduser()
    has_vae = not local.is_dir() or (local / "vae").is_dir()
    if use_t5 and local.is_dir():
        missing = [sub for sub in ("text_encoder_3", "tokenizer_3") if not (local / sub).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"model directory '{local}' has no {missing} subfolder(s) (the T5 text encoder); pass use_t5=False "
                "to run without T5 (zero T5 embeddings, as StableDiffusion3Pipeline with text_encoder_3=None), or "
                "point to a directory that has it"
            )
    kwargs = hub_kwargs(revision, local_files_only)
    diffusers_weights, transformers_weights = {**kwargs, "variant": variant}, {**kwargs, "variant": variant}
    torch_dtype = resolve_dtype(torch_dtype)
    if torch_dtype is not None:  # diffusers names the argument torch_dtype, transformers 5 dtype
        diffusers_weights["torch_dtype"] = transformers_weights["dtype"] = torch_dtype
    path = pretrained_model_name_or_path
    text_encoder_3 = tokenizer_3 = None
    if use_t5:
        text_encoder_3 = load_component(T5EncoderModel, path, "text_encoder_3", **transformers_weights)
        tokenizer_3 = load_t5_tokenizer(path, "tokenizer_3", **kwargs)
    return SD3Components(
        transformer=load_component(SD3Transformer2DModel, path, "transformer", **diffusers_weights),
        vae=load_component(AutoencoderKL, path, "vae", **diffusers_weights) if has_vae else None,
        text_encoder=load_component(CLIPTextModelWithProjection, path, "text_encoder", **transformers_weights),
        text_encoder_2=load_component(CLIPTextModelWithProjection, path, "text_encoder_2", **transformers_weights),
        tokenizer=load_clip_tokenizer(path, "tokenizer", **kwargs),
        tokenizer_2=load_clip_tokenizer(path, "tokenizer_2", **kwargs),
        scheduler=load_component(FlowMatchEulerDiscreteScheduler, path, "scheduler", **kwargs),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _clip_embeddings(
    text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, prompts: list[str], max_length: int
) -> tuple[Tensor, Tensor]:
    """Penultimate hidden states ``[B, L, D]`` and projected pooled embedding ``[B, P]`` of one CLIP."""
    ids = token_ids(tokenizer, prompts, text_encoder.device, max_length=max_length)
    output = text_encoder(ids, output_hidden_states=True)
    return output.hidden_states[-2], output.text_embeds


def encode_sd3_prompts(components: SD3Components, prompts: list[str], max_sequence_length: int) -> Conditioning:
    """SD3's prompt embeddings, as ``StableDiffusion3Pipeline.encode_prompt`` computes them.

    Differentiable in the text encoders' weights (pretraining trains them; the policy calls it
    under ``torch.no_grad``). Both CLIPs read ``tokenizer``'s max length (the pipeline's
    ``tokenizer_max_length``).

    Args:
        components: the model (its text encoders, tokenizers and transformer config are read).
        prompts: the ``B`` prompts.
        max_sequence_length: T5 tokens per prompt (without T5: that many zero embeddings).

    Returns:
        ``encoder_hidden_states`` ``[B, L + max_sequence_length, D_T5]``: CLIP-L's and CLIP-G's
        penultimate hidden states side by side, zero-padded to T5's width (the transformer's
        ``joint_attention_dim``), followed by T5's last hidden state; ``pooled_projections``
        ``[B, P_L + P_G]``: both CLIPs' projected pooled embeddings side by side.

    Raises:
        ValueError: ``prompts`` is empty.
    """
    if not prompts:
        raise ValueError("prompts is empty; expected at least one prompt")
    first = components.text_encoder
    length = components.tokenizer.model_max_length
    clip_l, pooled_l = _clip_embeddings(first, components.tokenizer, prompts, length)
    clip_g, pooled_g = _clip_embeddings(components.text_encoder_2, components.tokenizer_2, prompts, length)
    clip = torch.cat([clip_l.to(first.dtype), clip_g.to(first.dtype)], dim=-1)
    if components.text_encoder_3 is None:
        shape = (len(prompts), max_sequence_length, components.transformer.config.joint_attention_dim)
        t5 = torch.zeros(shape, device=first.device, dtype=first.dtype)
    else:
        encoder = components.text_encoder_3
        ids = token_ids(components.tokenizer_3, prompts, encoder.device, max_length=max_sequence_length)
        t5 = encoder(ids)[0]
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return Conditioning(
        encoder_hidden_states=torch.cat([clip, t5], dim=-2),
        pooled_projections=torch.cat([pooled_l, pooled_g], dim=-1),
    )


class SD3Policy(DiffusionPolicy):
    """A Stable Diffusion 3 (MMDiT, flow-matching) policy over given components.

    Use :class:`StableDiffusion3Policy` to load one, or :class:`RandomStableDiffusion3Policy` for
    randomly initialised architectures (tests, benchmarks). The kernel is Flow-GRPO's SDE step
    (:class:`~lightning_sdrl.policies.flow_kernels.FlowSDEStep`); ``eta`` of :meth:`sample` is its
    noise level (Flow-GRPO: 0.7).

    Args:
        components: the model's parts.
        lora: LoRA settings for the transformer; ``None`` fine-tunes the whole transformer
            (Flow-GRPO's targets are :data:`FLOW_GRPO_LORA_TARGET_MODULES`).
        gradient_checkpointing: recompute transformer activations in the backward pass.
        height: image height in pixels (default ``transformer.config.sample_size`` times the VAE's
            downsampling factor); a multiple of that factor times the patch size.
        width: image width in pixels (same default and constraint).
        sampler: the stochastic sampler: ``"sde"`` (Flow-GRPO's SDE) or ``"cps"``
            (coefficients-preserving sampling, Wang & Yu 2025; its last step is deterministic).
        max_sequence_length: T5 tokens per prompt (the pipeline's default 256; at most 512). The
            prompt embeddings have ``tokenizer.model_max_length + max_sequence_length`` tokens.
        compile: ``torch.compile`` the transformer call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    denoiser_name = "transformer"

    def __init__(
        self,
        components: SD3Components,
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        sampler: FlowSDEVariant = "sde",
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(lora=lora, gradient_checkpointing=gradient_checkpointing, compile=compile)
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length={max_sequence_length}; expected 1..{MAX_SEQUENCE_LENGTH} T5 tokens (SD3 uses 256)"
            )
        self.transformer = components.transformer
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.text_encoder_3 = components.text_encoder_3
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.tokenizer_3 = components.tokenizer_3
        self.max_sequence_length = max_sequence_length
        self.kernel = FlowSDEStep(components.scheduler, variant=sampler)
        self.height, self.width = self._image_size("height", height), self._image_size("width", width)
        self._null_cache: dict[tuple[torch.device, torch.dtype], Conditioning] = {}
        self._setup_trainable()
        for module in (self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if module is not None:
                module.eval()

    def _image_size(self, name: str, value: int | None) -> int:
        """``value`` (or the transformer's default size in pixels), checked against the latent grid."""
        factor, patch = self.vae_scale_factor, self.transformer.config.patch_size
        why = f"the VAE's downsampling {factor} times the patch size {patch}"
        return checked_image_size(name, value, self.transformer.config.sample_size * factor, factor * patch, why)

    def components(self) -> SD3Components:
        """The current parts (LoRA layers, if any, stay inside the transformer)."""
        return SD3Components(
            transformer=self.transformer,
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            scheduler=self.scheduler,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (:func:`~lightning_sdrl.policies.image_size.vae_scale_factor`)."""
        return vae_scale_factor(self.vae)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents: the transformer's input channels, the image size over the VAE factor."""
        factor = self.vae_scale_factor
        return (self.transformer.config.in_channels, self.height // factor, self.width // factor)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """SD3's prompt embeddings (:func:`encode_sd3_prompts`), without gradients."""
        with torch.no_grad():
            return encode_sd3_prompts(self.components(), prompts, self.max_sequence_length)

    def null_condition(self, batch_size: int) -> Conditioning:
        """Embeddings of the empty prompt (the pipeline's default negative prompt), computed once per device/dtype."""
        key = (self.text_encoder.device, self.text_encoder.dtype)
        if key not in self._null_cache:
            self._null_cache = {key: self.encode_prompts([""])}
        return self._null_cache[key].expand(batch_size)

    def denoise(self, sample: Tensor, timesteps: Tensor, conditions: Conditioning) -> Tensor:
        """The transformer's velocity prediction at latents ``sample`` (``timesteps`` are ``1000 sigma``)."""
        dtype = self.dtype
        return self.run_denoiser(
            hidden_states=sample.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=conditions["encoder_hidden_states"].to(dtype),
            pooled_projections=conditions["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]

    def decode(self, sample: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``: VAE decoding of ``latents / scaling_factor + shift_factor``.

        Without a VAE the sample is the image in ``[-1, 1]`` (one channel is repeated on three).
        """
        return decode_to_images(self.vae, sample)


class StableDiffusion3Policy(SD3Policy):
    """Stable Diffusion 3 / 3.5 loaded with ``from_pretrained``.

    Args:
        pretrained_model_name_or_path: hub id (``stabilityai/stable-diffusion-3.5-medium``) or a
            local directory in the diffusers layout (``transformer/``, ``vae/``, ``text_encoder/``,
            ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/`` and, with
            ``use_t5=True``, ``text_encoder_3/`` and ``tokenizer_3/``).
        revision: hub revision.
        variant: weights variant, e.g. ``"fp16"``.
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        use_t5: load and use the T5 encoder; ``False`` runs without it (zero T5 embeddings).
        torch_dtype: dtype of the networks (``None``: as saved), e.g. ``torch.bfloat16``.
        lora: LoRA settings; ``None`` fine-tunes the whole transformer.
        gradient_checkpointing: recompute transformer activations in the backward pass.
        height: image height in pixels (default: the transformer's sample size times 8).
        width: image width in pixels.
        max_sequence_length: T5 tokens per prompt.
        sampler: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving sampling).
        compile: ``torch.compile`` the transformer call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool | None = None,
        use_t5: bool = True,
        torch_dtype: str | torch.dtype | None = None,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008 - an immutable-by-use default
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        sampler: FlowSDEVariant = "sde",
        compile: bool | CompileMode = False,
    ) -> None:
        components = load_sd3_components(
            pretrained_model_name_or_path, revision, variant, local_files_only, use_t5, torch_dtype
        )
        super().__init__(
            components,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            sampler=sampler,
            compile=compile,
        )
        self.pretrained_model_name_or_path = pretrained_model_name_or_path


class RandomStableDiffusion3Policy(SD3Policy):
    """A randomly initialised Stable Diffusion 3 model of a named architecture.

    ``"sd3-tiny"`` is a ten-thousand-parameter model for CPU tests; ``"sd35-medium"`` has Stable
    Diffusion 3.5 Medium's exact architecture (for benchmarks: time does not depend on weight
    values); see :data:`~lightning_sdrl.policies.architectures.ARCHITECTURES`.

    Args:
        architecture: ``"sd3-tiny"`` or ``"sd35-medium"``.
        seed: initialisation seed.
        lora: LoRA settings; ``None`` fine-tunes the whole transformer.
        gradient_checkpointing: recompute transformer activations in the backward pass.
        height: image height in pixels (default: the transformer's sample size times the VAE factor).
        width: image width in pixels.
        max_sequence_length: T5 tokens per prompt.
        sampler: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving sampling).
        torch_dtype: cast the networks to it (e.g. ``torch.bfloat16``); ``None`` keeps float32.
        device: build the networks there (e.g. ``"cuda"``: initialised on the GPU).
        compile: ``torch.compile`` the transformer call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        architecture: SD3ArchitectureName = "sd3-tiny",
        seed: int = 0,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        sampler: FlowSDEVariant = "sde",
        torch_dtype: str | torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(
            sd3_components(architecture, seed, dtype=resolve_dtype(torch_dtype), device=device),
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            sampler=sampler,
            compile=compile,
        )
