"""What the parts of every pipeline-shaped model share: their networks, moving them, saving them.

:class:`~lightning_sdrl.policies.sd3_components.SD3Components`,
:class:`~lightning_sdrl.policies.sdxl_components.SDXLComponents` and
:class:`~lightning_sdrl.policies.flux_components.FluxComponents` are dataclasses of diffusers /
transformers components under their pipeline's names; each says how to build its pipeline, and
this base gives the rest.
"""

from __future__ import annotations

import abc
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["PipelineParts", "check_encoder_pair"]


class PipelineParts(abc.ABC):
    """Base of the component dataclasses: :meth:`models`, :meth:`to`, :meth:`save_pretrained` (via :meth:`pipeline`)."""

    def models(self) -> list[nn.Module]:
        """The neural networks, in field order (an optional encoder left out when ``None``)."""
        values = (getattr(self, field.name) for field in fields(self))  # type: ignore[arg-type]
        return [value for value in values if isinstance(value, nn.Module)]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
        """Move/cast every network in place (``nn.Module.to``); returns ``self``."""
        for module in self.models():
            module.to(device=device, dtype=dtype)
        return self

    @abc.abstractmethod
    def pipeline(self) -> Any:
        """The diffusers pipeline over these very components (no copy)."""

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model in the diffusers layout its pipeline's ``from_pretrained`` loads; returns ``directory``.

        Each component goes to its subfolder, with ``model_index.json`` (written by the pipeline's
        own ``save_pretrained``); an optional encoder that is ``None`` has no subfolder.
        """
        directory = Path(directory)
        self.pipeline().save_pretrained(directory)
        return directory


def check_encoder_pair(owner: str, encoder: Any, tokenizer: Any, encoder_name: str, tokenizer_name: str) -> None:
    """An optional text encoder comes with its tokenizer or not at all (a clear error otherwise).

    Example:
        >>> check_encoder_pair("SD3Components", None, None, "text_encoder_3", "tokenizer_3")
        >>> check_encoder_pair("SD3Components", object(), None, "text_encoder_3", "tokenizer_3")
        Traceback (most recent call last):
        ...
        ValueError: SD3Components got text_encoder_3 without tokenizer_3; pass both (T5) or neither (no T5)
    """
    if (encoder is None) != (tokenizer is None):
        given, missing = (encoder_name, tokenizer_name) if encoder is not None else (tokenizer_name, encoder_name)
        raise ValueError(f"{owner} got {given} without {missing}; pass both (T5) or neither (no T5)")
