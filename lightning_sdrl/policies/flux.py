"""FLUX.1 as a flow-matching policy (Flow-GRPO's FLUX setting).

The policy computes what diffusers' ``FluxPipeline`` does: CLIP-L's pooled embedding and T5's
hidden states as the prompt, the latents packed into 2x2 patches (tokens of ``4 C`` channels) with
their image position ids and zero text ids, the transformer called at ``t = sigma`` with FLUX.1-dev's
guidance embedding, the resolution-dependent time shift ``mu`` of the schedule
(:func:`~lightning_sdrl.functional.flow_schedule.resolution_shift` of the image's token count) and
VAE decoding with ``shift_factor``. Samples are kept unpacked (``[B, C, H / 8, W / 8]``); the
packing happens inside :meth:`FluxPolicy.denoise`, so the step kernels, trajectories and
forward-process RL see ordinary latents. Sampling uses
:class:`~lightning_sdrl.policies.flow_kernels.FlowSDEStep` (Flow-GRPO's SDE or CPS), whose
tiny-noise limit is the pipeline's Euler ODE.

FLUX.1-dev is guidance-distilled: ``guidance_scale`` is the value of its guidance embedding
(3.5 in Flow-GRPO), with one transformer call per step and no unconditional branch. A transformer
without the embedding (schnell) takes ``guidance_scale`` as classifier-free guidance against the
empty prompt. LoRA files carry ``transformer.``-prefixed keys that ``FluxPipeline.load_lora_weights``
reads.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from torch import Tensor
from transformers import CLIPTextModel, T5EncoderModel

from lightning_sdrl.functional.flow_schedule import resolution_shift
from lightning_sdrl.policies.architectures import FluxArchitectureName, flux_components
from lightning_sdrl.policies.base import CompileMode, DiffusionPolicy
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.decoding import decode_to_images
from lightning_sdrl.policies.flow_kernels import FlowSDEStep, FlowSDEVariant
from lightning_sdrl.policies.flux_components import FluxComponents
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
from lightning_sdrl.policies.tokenizers import token_ids

FLUX_SUBFOLDERS = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
"""The subfolders of a FLUX.1 model directory in the diffusers layout."""

FLOW_GRPO_FLUX_LORA_TARGET_MODULES = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
"""Flow-GRPO's LoRA targets on FLUX.1 (its SD3 list): the double-stream blocks' image and text
projections and, through ``attn.to_q/k/v``, the single-stream blocks' attention."""


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` latents as ``[B, (H / 2) (W / 2), 4 C]`` tokens of 2x2 patches (``FluxPipeline._pack_latents``).

    Example:
        >>> pack_latents(torch.arange(16.0).view(1, 1, 4, 4))[0, 0].tolist()  # the top-left 2x2 patch
        [0.0, 1.0, 4.0, 5.0]
    """
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents`: ``[B, (H / 2) (W / 2), 4 C]`` -> ``[B, C, H, W]`` (``H``, ``W`` latent).

    Example:
        >>> x = torch.randn(2, 3, 4, 6)
        >>> torch.equal(unpack_latents(pack_latents(x), 4, 6), x)
        True
    """
    batch, _, channels = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels // 4, height, width)


def latent_image_ids(height: int, width: int) -> Tensor:
    """``[(H / 2) (W / 2), 3]`` position ids of the packed tokens: ``(0, row, column)`` (``H``, ``W`` latent)."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


def load_flux_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    torch_dtype: str | torch.dtype | None = None,
    use_t5: bool = True,
) -> FluxComponents:
    """Load a FLUX.1 model's components.

    Args:
        pretrained_model_name_or_path: hub id (``black-forest-labs/FLUX.1-dev``) or a local
            directory in the diffusers layout (:data:`FLUX_SUBFOLDERS`).
        revision: hub revision.
        variant: weights variant.
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        torch_dtype: dtype of the networks (``None``: as saved), e.g. ``"bfloat16"``.
        use_t5: load ``text_encoder_2`` / ``tokenizer_2``; ``False`` never reads them (zero T5
            embeddings).

    Raises:
        FileNotFoundError: the directory or one of its subfolders is missing.
        OSError: a component cannot be loaded, or a tokenizer has no vocabulary.
    """
    t5 = ("text_encoder_2", "tokenizer_2")
    check_source(pretrained_model_name_or_path, [sub for sub in FLUX_SUBFOLDERS if use_t5 or sub not in t5])
    kwargs = hub_kwargs(revision, local_files_only)
    diffusers_weights, transformers_weights = {**kwargs, "variant": variant}, {**kwargs, "variant": variant}
    torch_dtype = resolve_dtype(torch_dtype)
    if torch_dtype is not None:  # diffusers names the argument torch_dtype, transformers 5 dtype
        diffusers_weights["torch_dtype"] = transformers_weights["dtype"] = torch_dtype
    path = pretrained_model_name_or_path
    text_encoder_2 = tokenizer_2 = None
    if use_t5:
        text_encoder_2 = load_component(T5EncoderModel, path, "text_encoder_2", **transformers_weights)
        tokenizer_2 = load_t5_tokenizer(path, "tokenizer_2", **kwargs)
    return FluxComponents(
        transformer=load_component(FluxTransformer2DModel, path, "transformer", **diffusers_weights),
        vae=load_component(AutoencoderKL, path, "vae", **diffusers_weights),
        text_encoder=load_component(CLIPTextModel, path, "text_encoder", **transformers_weights),
        text_encoder_2=text_encoder_2,
        tokenizer=load_clip_tokenizer(path, "tokenizer", **kwargs),
        tokenizer_2=tokenizer_2,
        scheduler=load_component(FlowMatchEulerDiscreteScheduler, path, "scheduler", **kwargs),
    )


class FluxPolicy(DiffusionPolicy):
    """A FLUX.1 policy over given components.

    Use :class:`FluxPretrainedPolicy` to load one, or :class:`RandomFluxPolicy` for randomly
    initialised architectures (tests, benchmarks).

    Args:
        components: the model's parts.
        lora: LoRA settings for the transformer; ``None`` fine-tunes the whole transformer
            (Flow-GRPO's targets: :data:`FLOW_GRPO_FLUX_LORA_TARGET_MODULES`).
        gradient_checkpointing: recompute transformer activations in the backward pass.
        height: image height in pixels (default: the VAE's ``sample_size``); a multiple of the
            VAE's downsampling times 2 (the packing).
        width: image width in pixels (same default and constraint).
        max_sequence_length: T5 tokens per prompt (the pipeline's default 512).
        sampler: ``"sde"`` (Flow-GRPO's SDE) or ``"cps"`` (coefficients-preserving sampling).
        compile: ``torch.compile`` the transformer call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    denoiser_name = "transformer"

    def __init__(
        self,
        components: FluxComponents,
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 512,
        sampler: FlowSDEVariant = "sde",
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(lora=lora, gradient_checkpointing=gradient_checkpointing, compile=compile)
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length={max_sequence_length}; expected 1..512 T5 tokens (FLUX.1-dev: 512)")
        self.transformer = components.transformer
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.max_sequence_length = max_sequence_length
        factor = self.vae_scale_factor
        why = f"the VAE's downsampling {factor} times the 2x2 packing"
        self.height = checked_image_size("height", height, self.vae.config.sample_size, 2 * factor, why)
        self.width = checked_image_size("width", width, self.vae.config.sample_size, 2 * factor, why)
        tokens = (self.height // factor // 2) * (self.width // factor // 2)
        mu = resolution_shift(tokens, components.scheduler.config)
        dynamic = components.scheduler.config.get("use_dynamic_shifting", False)
        self.kernel = FlowSDEStep(components.scheduler, variant=sampler, mu=mu if dynamic else None)
        self._null_cache: dict[tuple[torch.device, torch.dtype], Conditioning] = {}
        self._setup_trainable()
        for module in components.models()[1:]:
            module.eval()

    @property
    def embeds_guidance(self) -> bool:
        """Whether the transformer has FLUX.1-dev's guidance embedding (then guidance is one input, not CFG)."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (:func:`~lightning_sdrl.policies.image_size.vae_scale_factor`)."""
        return vae_scale_factor(self.vae)

    def components(self) -> FluxComponents:
        """The current parts (LoRA layers, if any, stay inside the transformer)."""
        return FluxComponents(
            transformer=self.transformer,
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            scheduler=self.scheduler,
        )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the unpacked latents: the VAE's latent channels, the image size over its factor."""
        factor = self.vae_scale_factor
        return (self.vae.config.latent_channels, self.height // factor, self.width // factor)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """T5's last hidden states ``encoder_hidden_states`` and CLIP-L's ``pooled_projections``, as the pipeline's."""
        if not prompts:
            raise ValueError("prompts is empty; expected at least one prompt")
        with torch.no_grad():
            clip_ids = token_ids(self.tokenizer, prompts, self.text_encoder.device)
            pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
            if self.text_encoder_2 is None:  # without T5: zero embeddings of the transformer's text width
                width = self.transformer.config.joint_attention_dim
                shape = (len(prompts), self.max_sequence_length, width)
                hidden = torch.zeros(shape, device=pooled.device, dtype=self.text_encoder.dtype)
            else:
                encoder = self.text_encoder_2
                t5_ids = token_ids(self.tokenizer_2, prompts, encoder.device, self.max_sequence_length)
                hidden = encoder(t5_ids, output_hidden_states=False)[0].to(encoder.dtype)
        return Conditioning(encoder_hidden_states=hidden, pooled_projections=pooled.to(self.text_encoder.dtype))

    def null_condition(self, batch_size: int) -> Conditioning:
        """Embeddings of the empty prompt (classifier-free guidance of a transformer without the guidance embedding)."""
        key = (self.text_encoder.device, self.text_encoder.dtype)
        if key not in self._null_cache:
            self._null_cache = {key: self.encode_prompts([""])}
        return self._null_cache[key].expand(batch_size)

    def training_guidance(self, guidance_scale: float) -> float:
        """FLUX.1-dev trains at the embedded guidance it samples with; without the embedding, 1 (no CFG)."""
        return float(guidance_scale) if self.embeds_guidance else 1.0

    def _guidance_conditions(self, conditions: Conditioning, guidance_scale: float) -> Conditioning:
        """FLUX.1-dev: ``conditions`` with the guidance value per sample; otherwise classifier-free guidance's."""
        if not self.embeds_guidance:
            return super()._guidance_conditions(conditions, guidance_scale)
        tensors = {name: conditions[name] for name in conditions.names}
        device = tensors["pooled_projections"].device
        guidance = torch.full((conditions.batch_size,), float(guidance_scale), device=device)
        return Conditioning(**tensors, guidance=guidance)

    def _guided(self, sample: Tensor, timesteps: Tensor, both: Conditioning, guidance_scale: float) -> Tensor:
        """FLUX.1-dev: one transformer call with the guidance embedding; otherwise classifier-free guidance."""
        if not self.embeds_guidance:
            return super()._guided(sample, timesteps, both, guidance_scale)
        return self.denoise(sample, timesteps, both)

    def denoise(self, sample: Tensor, timesteps: Tensor, conditions: Conditioning) -> Tensor:
        """The velocity at unpacked latents ``sample`` (``timesteps`` are ``1000 sigma``; the transformer reads sigma).

        A guidance-embedding transformer reads ``conditions["guidance"]`` (1 when absent).
        """
        dtype, (batch, _, height, width) = self.dtype, sample.shape
        hidden = conditions["encoder_hidden_states"]
        guidance = None
        if self.embeds_guidance:
            given = "guidance" in conditions.names
            guidance = conditions["guidance"] if given else torch.ones(batch, device=sample.device)
        output = self.run_denoiser(
            hidden_states=pack_latents(sample.to(dtype)),
            timestep=timesteps.to(dtype) / 1000,
            guidance=guidance.float() if guidance is not None else None,
            pooled_projections=conditions["pooled_projections"].to(dtype),
            encoder_hidden_states=hidden.to(dtype),
            txt_ids=torch.zeros(hidden.shape[1], 3, device=sample.device, dtype=dtype),
            img_ids=latent_image_ids(height, width).to(sample.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def decode(self, sample: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``: VAE decoding of ``latents / scaling_factor + shift_factor``."""
        return decode_to_images(self.vae, sample)


class FluxPretrainedPolicy(FluxPolicy):
    """FLUX.1 loaded with ``from_pretrained``.

    Args:
        pretrained_model_name_or_path: hub id (``black-forest-labs/FLUX.1-dev``) or a local
            directory in the diffusers layout (:data:`FLUX_SUBFOLDERS`).
        revision: hub revision.
        variant: weights variant.
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        torch_dtype: dtype of the frozen networks (``None``: as saved), e.g. ``"bfloat16"``; LoRA
            (or, under full fine-tuning, the transformer) trains in float32.
        use_t5: load and use the T5 encoder; ``False`` runs without it (zero T5 embeddings).
        lora: LoRA settings; ``None`` fine-tunes the whole transformer.
        gradient_checkpointing: recompute transformer activations in the backward pass.
        height: image height in pixels (default: the VAE's sample size, 1024 for FLUX.1).
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
        torch_dtype: str | torch.dtype | None = None,
        use_t5: bool = True,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008 - an immutable-by-use default
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 512,
        sampler: FlowSDEVariant = "sde",
        compile: bool | CompileMode = False,
    ) -> None:
        components = load_flux_components(
            pretrained_model_name_or_path, revision, variant, local_files_only, torch_dtype, use_t5
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


class RandomFluxPolicy(FluxPolicy):
    """A randomly initialised FLUX.1 model of a named architecture (``"flux-tiny"``, ``"flux-dev"``).

    Args:
        architecture: a FLUX name of :data:`~lightning_sdrl.policies.architectures.ARCHITECTURES`.
        seed: initialisation seed.
        lora: LoRA settings; ``None`` fine-tunes the whole transformer.
        gradient_checkpointing: recompute transformer activations in the backward pass.
        height: image height in pixels (default: the VAE's sample size).
        width: image width in pixels.
        max_sequence_length: T5 tokens per prompt.
        sampler: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving sampling).
        torch_dtype: cast the networks to it; ``None`` keeps float32.
        device: build the networks there (e.g. ``"cuda"``).
        compile: ``torch.compile`` the transformer call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        architecture: FluxArchitectureName = "flux-tiny",
        seed: int = 0,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008
        gradient_checkpointing: bool = False,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 512,
        sampler: FlowSDEVariant = "sde",
        torch_dtype: str | torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(
            flux_components(architecture, seed, dtype=resolve_dtype(torch_dtype), device=device),
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            sampler=sampler,
            compile=compile,
        )
