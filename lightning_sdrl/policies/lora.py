"""LoRA adapters on a denoiser through peft, and their export in diffusers format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@dataclass
class LoRASettings:
    """LoRA on the denoiser's attention projections (Hu et al. 2021).

    Attributes:
        rank: LoRA rank ``r`` (the ReFL paper and DDPO use 4).
        alpha: LoRA scale numerator; the update is scaled by ``alpha / rank``. ``None`` uses ``rank``.
        target_modules: names of the linear/conv layers that get adapters.
        dropout: dropout on the adapter input.
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank={self.rank}; expected >= 1 (or lora: null for full fine-tuning)")
        if not self.target_modules:
            raise ValueError("lora target_modules is empty; name at least one layer, e.g. ['to_q', 'to_v']")

    def config(self) -> LoraConfig:
        """The peft ``LoraConfig``; adapters start at zero so the policy starts pretrained."""
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights=True,
        )

    def apply(self, unet: nn.Module) -> None:
        """Add the adapters to ``unet`` and make only them trainable."""
        try:
            if hasattr(unet, "add_adapter"):  # diffusers models with PeftAdapterMixin
                unet.add_adapter(self.config())
            else:
                inject_adapter_in_model(self.config(), unet)
        except ValueError as error:
            raise ValueError(
                f"LoRA target_modules={self.target_modules} matched no layer of {type(unet).__name__}: {error}"
            ) from error
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_("lora_" in name)


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Switch every LoRA adapter inside ``module`` off for the block (the pretrained model)."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    states = [layer.disable_adapters for layer in layers]
    # peft toggles requires_grad along with the adapters; keep the trainable set as it was.
    trainable = {name: p.requires_grad for name, p in module.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_disabled in zip(layers, states, strict=True):
            layer.enable_adapters(not was_disabled)
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(trainable[name])
