"""The digits miniature of Stable Diffusion: the pretrained model shipped with the package, as a policy.

The digits model takes the same code path as Stable Diffusion (prompt -> ``CLIPTokenizer`` ->
``CLIPTextModel`` -> ``UNet2DConditionModel`` with cross-attention -> ``DDIMScheduler``), in pixel
space: it denoises ``[1, 16, 16]`` images in ``[-1, 1]`` directly, without a VAE. Its
architecture is :class:`~lightning_sdrl.policies.pixel.PixelTextToImageArchitecture` (trained by
:class:`~lightning_sdrl.digits.pretrain.DigitsPretrainModule`); :class:`DigitsPolicy` loads the
pretrained weights shipped in ``lightning_sdrl/digits/assets/diffusion`` with
``from_pretrained``, exactly as :class:`StableDiffusionPolicy` loads Stable Diffusion.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from lightning_sdrl.policies.lora import LoRASettings
from lightning_sdrl.policies.text_to_image import StableDiffusionPolicy

DIGITS_DIFFUSION_DIR = Path(__file__).resolve().parent / "assets" / "diffusion"
"""Where the shipped digits diffusion model lives (diffusers layout, no ``vae/``)."""

PRETRAIN_COMMAND = "python -m lightning_sdrl fit -c configs/digits/pretrain.yaml"
"""The command that trains the shipped model (it exports to ``runs/digits_pretrain/diffusion``)."""


@contextmanager
def explain_load_errors(owner: str, path: str, command: str, export_dir: str) -> Iterator[None]:
    """Turn a failed load of a shipped digits model into one error that names the fix.

    Args:
        owner: the loading class, for the message.
        path: the directory being loaded.
        command: the command that retrains the model.
        export_dir: where ``command`` writes the model.

    Raises:
        FileNotFoundError: the load raised one (a missing directory or component).
        OSError: any other load failure (a corrupt or inconsistent file).
    """
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        kind = FileNotFoundError if isinstance(error, FileNotFoundError) else OSError
        raise kind(
            f"{owner} could not load the digits diffusion model from '{path}' ({type(error).__name__}: "
            f"{error}). Fix: re-install lightning_sdrl to restore the shipped files, or retrain the model "
            f"with `{command}` and pass its export directory ({export_dir}) as pretrained_model_name_or_path."
        ) from error


class DigitsPolicy(StableDiffusionPolicy):
    """The pretrained digits text-to-image model, loaded like Stable Diffusion.

    Prompts are the captions of :mod:`lightning_sdrl.digits.captions` ("a handwritten
    seven", "the digit 7", the biased ``BALANCE_PROMPT`` ...); images are ``[B, 3, 16, 16]`` in
    ``[0, 1]`` (the grayscale digit repeated on three channels).

    Args:
        pretrained_model_name_or_path: directory of a digits model in the diffusers layout;
            ``None`` loads the one shipped with the package (:data:`DIGITS_DIFFUSION_DIR`).
        lora: LoRA settings; ``None`` fine-tunes the whole UNet.
        gradient_checkpointing: recompute UNet activations in the backward pass.

    Raises:
        FileNotFoundError: the directory or one of its components is missing.
        OSError: a file is corrupt. Both errors name the fix (retrain with
            :data:`PRETRAIN_COMMAND`).

    Example:
        >>> policy = DigitsPolicy(lora=None)
        >>> policy.sample_shape
        (1, 16, 16)
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008 - an immutable-by-use default
        gradient_checkpointing: bool = False,
    ) -> None:
        path = str(DIGITS_DIFFUSION_DIR if pretrained_model_name_or_path is None else pretrained_model_name_or_path)
        with explain_load_errors("DigitsPolicy", path, PRETRAIN_COMMAND, "runs/digits_pretrain/diffusion"):
            super().__init__(path, local_files_only=True, lora=lora, gradient_checkpointing=gradient_checkpointing)
            positions = self.text_encoder.config.max_position_embeddings
            if self.tokenizer.model_max_length != positions:
                raise OSError(
                    f"tokenizer/ pads prompts to {self.tokenizer.model_max_length} tokens but the text "
                    f"encoder has {positions} positions (is tokenizer/tokenizer_config.json missing?)"
                )
