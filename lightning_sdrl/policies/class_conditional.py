"""Class-conditional pixel-space diffusion (``UNet2DModel`` with class embeddings).

The class-conditional experiments of the diversity paper fine-tune such a model. Prompts
are class names; the UNet has one extra class embedding, the null class, used for
classifier-free guidance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch import Tensor

from lightning_sdrl.policies.base import CompileMode, DiffusionPolicy
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.decoding import unit_range_images
from lightning_sdrl.policies.kernels import DDIMStep
from lightning_sdrl.policies.loading import check_source, load_component, resolve_dtype
from lightning_sdrl.policies.lora import LoRASettings

CLASS_NAMES_FILE = "class_names.json"


class ClassConditionalPolicy(DiffusionPolicy):
    """A class-conditional pixel diffusion policy.

    Args:
        unet: ``UNet2DModel`` with ``num_class_embeds = len(class_names) + 1``.
        scheduler: its noise schedule (used as DDIM).
        class_names: the prompt of each class, in class-index order.
        lora: LoRA settings; ``None`` fine-tunes the whole UNet.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        compile: ``torch.compile`` the UNet call (``True`` or a mode; see :class:`DiffusionPolicy`).
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        class_names: list[str],
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(lora=lora, gradient_checkpointing=gradient_checkpointing, compile=compile)
        if not class_names:
            raise ValueError("class_names is empty; expected one name (prompt) per class")
        if unet.config.num_class_embeds != len(class_names) + 1:
            raise ValueError(
                f"unet has num_class_embeds={unet.config.num_class_embeds} but {len(class_names)} class "
                f"names were given; expected num_class_embeds = {len(class_names) + 1} (the extra one "
                "is the null class for classifier-free guidance)"
            )
        self.unet = unet
        self.kernel = DDIMStep(scheduler)
        self.class_names = list(class_names)
        self._class_index = {name: i for i, name in enumerate(self.class_names)}
        self._setup_trainable()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
        local_files_only: bool | None = None,
        torch_dtype: str | torch.dtype | None = None,
        compile: bool | CompileMode = False,
    ) -> ClassConditionalPolicy:
        """Load ``unet/``, ``scheduler/`` and ``class_names.json`` written by :meth:`save_pretrained`.

        ``torch_dtype`` (a dtype or its name; ``None``: as saved) is the UNet's base weights' dtype;
        LoRA (or the whole UNet under full fine-tuning) is trained in float32.
        """
        check_source(pretrained_model_name_or_path, ["unet", "scheduler"])
        kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
        torch_dtype = resolve_dtype(torch_dtype)
        weights = kwargs if torch_dtype is None else {**kwargs, "torch_dtype": torch_dtype}
        names_file = Path(pretrained_model_name_or_path) / CLASS_NAMES_FILE
        if not names_file.is_file():
            raise FileNotFoundError(f"'{names_file}' is missing; save the model with save_pretrained")
        return cls(
            load_component(UNet2DModel, pretrained_model_name_or_path, "unet", **weights),
            load_component(DDIMScheduler, pretrained_model_name_or_path, "scheduler", **kwargs),
            json.loads(names_file.read_text()),
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
        )

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write ``unet/``, ``scheduler/`` and ``class_names.json`` (the UNet holding ``state_dict`` if given)."""
        directory = Path(directory)
        self.denoiser_with(state_dict).save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")
        (directory / CLASS_NAMES_FILE).write_text(json.dumps(self.class_names))
        return directory

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Class labels ``[B]`` of the prompts (each must be one of ``class_names``)."""
        unknown = sorted({p for p in prompts if p not in self._class_index})
        if unknown:
            raise ValueError(f"prompts {unknown} are not class names; expected one of {self.class_names}")
        return Conditioning(class_labels=torch.tensor([self._class_index[p] for p in prompts], device=self.device))

    def null_condition(self, batch_size: int) -> Conditioning:
        """The null class label, ``[B]``."""
        return Conditioning(class_labels=torch.full((batch_size,), len(self.class_names), device=self.device))

    def denoise(self, sample: Tensor, timesteps: Tensor, conditions: Conditioning) -> Tensor:
        """UNet output for the class labels of ``conditions``."""
        labels = conditions["class_labels"].long()
        return self.run_denoiser(sample, timesteps, class_labels=labels, return_dict=False)[0]

    def decode(self, sample: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from pixel samples in ``[-1, 1]``."""
        return unit_range_images(sample)

    def save_trained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Save the LoRA adapter as every policy does, or the full model via :meth:`save_pretrained`.

        The full model (``unet/``, ``scheduler/``, ``class_names.json``) loads with
        :meth:`from_pretrained` or, into a policy with ``lora=None``, with :meth:`load_trained`.
        A sharded model's gathered ``state_dict`` (see the base class) is what is written.
        """
        if self.lora is None:
            return self.save_pretrained(directory, state_dict=state_dict)
        return super().save_trained(directory, state_dict=state_dict)
