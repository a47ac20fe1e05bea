"""The flow-matching digits model shipped with the package, as a Stable Diffusion 3 policy.

The flow digits model is a pixel-space Stable Diffusion 3: the same ``SD3Transformer2DModel``
(MMDiT), two ``CLIPTextModelWithProjection`` encoders with their ``CLIPTokenizer`` s, no T5 and
no VAE, and a ``FlowMatchEulerDiscreteScheduler``. It denoises ``[1, 16, 16]`` digits in
``[-1, 1]``, trained with the rectified-flow objective on the captions of
:mod:`lightning_sdrl.digits.captions` (:class:`~lightning_sdrl.digits.pretrain.DigitsFlowPretrainModule`,
architecture :class:`~lightning_sdrl.policies.pixel_flow.PixelFlowArchitecture`).
:class:`DigitsFlowPolicy` loads the weights shipped in ``lightning_sdrl/digits/assets/flow_diffusion``
through :class:`~lightning_sdrl.policies.sd3.StableDiffusion3Policy` - the class that loads SD3.
"""

from __future__ import annotations

from pathlib import Path

from lightning_sdrl.digits.policy import explain_load_errors
from lightning_sdrl.policies.flow_kernels import FlowSDEVariant
from lightning_sdrl.policies.lora import LoRASettings
from lightning_sdrl.policies.sd3 import StableDiffusion3Policy

DIGITS_FLOW_DIFFUSION_DIR = Path(__file__).resolve().parent / "assets" / "flow_diffusion"
"""Where the shipped flow-matching digits model lives (diffusers layout, no ``vae/``, no T5)."""

FLOW_PRETRAIN_COMMAND = "OMP_NUM_THREADS=1 python -m lightning_sdrl fit -c configs/digits/pretrain_flow.yaml"
"""The command that trains the shipped model (it exports to ``runs/digits_pretrain_flow/diffusion``)."""


class DigitsFlowPolicy(StableDiffusion3Policy):
    """The pretrained flow-matching digits model, loaded like Stable Diffusion 3 (offline, without T5).

    Prompts are the captions of :mod:`lightning_sdrl.digits.captions`; images are
    ``[B, 3, 16, 16]`` in ``[0, 1]`` (the grayscale digit repeated on three channels).

    Args:
        pretrained_model_name_or_path: directory of a flow digits model in the diffusers layout;
            ``None`` loads the one shipped with the package (:data:`DIGITS_FLOW_DIFFUSION_DIR`).
        lora: LoRA settings for the transformer; ``None`` fine-tunes the whole transformer.
        gradient_checkpointing: recompute transformer activations in the backward pass.
        sampler: ``"sde"`` (Flow-GRPO's SDE) or ``"cps"`` (coefficients-preserving sampling).

    Raises:
        FileNotFoundError: the directory or one of its components is missing.
        OSError: a file is corrupt. Both errors name the fix (retrain with
            :data:`FLOW_PRETRAIN_COMMAND`).

    Example:
        >>> policy = DigitsFlowPolicy(lora=None)
        >>> policy.sample_shape
        (1, 16, 16)
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008 - an immutable-by-use default
        gradient_checkpointing: bool = False,
        sampler: FlowSDEVariant = "sde",
    ) -> None:
        path = str(
            DIGITS_FLOW_DIFFUSION_DIR if pretrained_model_name_or_path is None else pretrained_model_name_or_path
        )
        with explain_load_errors(
            "DigitsFlowPolicy", path, FLOW_PRETRAIN_COMMAND, "runs/digits_pretrain_flow/diffusion"
        ):
            super().__init__(
                path,
                local_files_only=True,
                use_t5=False,
                lora=lora,
                gradient_checkpointing=gradient_checkpointing,
                max_sequence_length=1,
                sampler=sampler,
            )
            for name in ("text_encoder", "text_encoder_2"):
                positions = getattr(self, name).config.max_position_embeddings
                folder = name.replace("text_encoder", "tokenizer")
                if getattr(self, folder).model_max_length != positions:
                    raise OSError(
                        f"{folder}/ pads prompts to {getattr(self, folder).model_max_length} tokens but {name}/ "
                        f"has {positions} positions (is {folder}/tokenizer_config.json missing?)"
                    )
