"""LoRA adapters on a denoiser through peft, and their export in diffusers format.

The one file format, for every ``target_modules``: ``pytorch_lora_weights.safetensors`` holding
peft's adapter weights under peft's names, each prefixed with the pipeline component the denoiser
is (``unet.`` for Stable Diffusion 1.x, ``transformer.`` for SD3 and FLUX:
``unet.mid_block.resnets.0.time_emb_proj.lora_A.weight``), with the adapter's ``LoraConfig``
(rank, alpha, targets) as metadata. This is the layout diffusers itself writes and reads
(``StableDiffusionPipeline.load_lora_weights``, ``StableDiffusion3Pipeline.load_lora_weights``,
``unet.load_lora_adapter(..., prefix="unet")``).
Converting the names to diffusers' older style is what not to do: that renames only attention
projections, and a file mixing both styles is mis-loaded by diffusers, which guesses the style
from the first key.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

LORA_WEIGHTS_FILE = LORA_WEIGHT_NAME_SAFE
"""Name of the LoRA weights file in a ``save_trained`` directory (diffusers' default name)."""

UNET_PREFIX = "unet"
"""Prefix of every key of a UNet's LoRA file: the weights belong to the pipeline's ``unet``."""

TRANSFORMER_PREFIX = "transformer"
"""Prefix of every key of a diffusion transformer's LoRA file (SD3, FLUX: the pipeline's ``transformer``)."""

_SAVERS = {UNET_PREFIX: StableDiffusionLoraLoaderMixin, TRANSFORMER_PREFIX: SD3LoraLoaderMixin}


@dataclass
class LoRASettings:
    """LoRA on the denoiser's attention projections (Hu et al. 2021).

    Attributes:
        rank: LoRA rank ``r`` (the reward-model report and DDPO use 4).
        alpha: LoRA scale numerator; the update is scaled by ``alpha / rank``. ``None`` uses ``rank``.
        target_modules: names of the linear/conv layers that get adapters.
        dropout: dropout on the adapter input.
        lr_scales: multiplier of the optimiser's learning rate for the adapters of some of the
            ``target_modules`` (``{"conv1": 0.02, "conv2": 0.02}``); adapters not named keep the
            optimiser's rate. Layers that draw different things can need rates orders of magnitude
            apart (docs/digits_debias_multi.md: attention vs. convolutions of the digits UNet).
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    dropout: float = 0.0
    lr_scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank={self.rank}; expected >= 1 (or lora: null for full fine-tuning)")
        if not self.target_modules:
            raise ValueError("lora target_modules is empty; name at least one layer, e.g. ['to_q', 'to_v']")
        unknown = sorted(set(self.lr_scales) - set(self.target_modules))
        if unknown:
            raise ValueError(
                f"lora lr_scales names {unknown}, which are not in target_modules={self.target_modules}; "
                "scale only layers that get adapters (or add them to target_modules)"
            )
        bad = {name: scale for name, scale in self.lr_scales.items() if not (math.isfinite(scale) and scale > 0)}
        if bad:
            raise ValueError(f"lora lr_scales {bad}; each scale must be a finite number > 0")

    def lr_scale(self, parameter_name: str) -> float:
        """The learning-rate multiplier of one adapter parameter (1 for layers ``lr_scales`` does not name).

        The parameter's layer is its name up to ``.lora_`` (peft: ``<layer>.lora_A.<adapter>.weight``);
        a ``lr_scales`` key names it as peft's ``target_modules`` do: the whole name or its last dotted
        parts. When several keys match, the longest wins.
        """
        layer = parameter_name.split(".lora_", 1)[0]
        matches = [key for key in self.lr_scales if layer == key or layer.endswith("." + key)]
        return self.lr_scales[max(matches, key=len)] if matches else 1.0

    def parameter_groups(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[dict]:
        """Optimiser parameter groups ``{"params": [...], "lr_scale": s}``, one per distinct scale.

        Groups follow the order of each scale's first parameter; parameters keep their order.
        """
        groups: dict[float, list[nn.Parameter]] = {}
        for name, parameter in named_parameters:
            groups.setdefault(self.lr_scale(name), []).append(parameter)
        return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]

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


def save_lora_weights(
    unet: nn.Module,
    settings: LoRASettings,
    directory: str | Path,
    prefix: str = UNET_PREFIX,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write a denoiser's adapters to ``directory/pytorch_lora_weights.safetensors`` (the format above).

    Args:
        unet: the denoiser carrying the adapters (a UNet, or a transformer with ``prefix="transformer"``).
        settings: the settings the adapters were made from (stored as metadata).
        directory: output directory.
        prefix: the pipeline component the weights belong to: ``"unet"`` or ``"transformer"``.
        state_dict: the denoiser's weights to write instead of its own (at least the adapters', by
            their names in ``unet``), e.g. a sharded denoiser's gathered ones.

    Returns:
        The path of the written file.
    """
    if prefix not in _SAVERS:
        raise ValueError(f"LoRA prefix={prefix!r}; expected one of {sorted(_SAVERS)}")
    _SAVERS[prefix].save_lora_weights(
        directory,
        **{
            f"{prefix}_lora_layers": get_peft_model_state_dict(unet, state_dict=state_dict),
            f"{prefix}_lora_adapter_metadata": settings.config().to_dict(),
        },
    )
    return Path(directory) / LORA_WEIGHTS_FILE


def read_lora_weights(path: Path, prefix: str = UNET_PREFIX) -> tuple[dict[str, Tensor], dict | None]:
    """The ``prefix.`` weights of a LoRA file with the prefix removed, and its adapter metadata (if any).

    Raises:
        ValueError: the file cannot be read, or has keys without the ``prefix.`` prefix.
    """
    try:
        with safe_open(str(path), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
            header = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"could not read the LoRA file '{path}' ({error}); re-save it with save_trained") from error
    foreign = sorted(key for key in tensors if not key.startswith(f"{prefix}."))
    if foreign:
        raise ValueError(
            f"LoRA file '{path}' has {len(foreign)} key(s) without the '{prefix}.' prefix (e.g. "
            f"{foreign[0]!r}); expected {prefix} adapter weights as written by save_trained of this kind of "
            "policy. Re-save the adapter with save_trained"
        )
    weights = {key.removeprefix(f"{prefix}."): value for key, value in tensors.items()}
    if LORA_ADAPTER_METADATA_KEY not in header:
        return weights, None
    packed = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    metadata = {key.removeprefix(f"{prefix}."): v for key, v in packed.items() if key.startswith(f"{prefix}.")}
    return weights, metadata


def settings_hint(metadata: dict | None) -> str:
    """``LoRASettings(...)`` matching a file's metadata, for error messages."""
    if metadata is None:
        return "the LoRASettings it was trained with"
    targets = sorted(metadata.get("target_modules") or [])
    return f"lora=LoRASettings(rank={metadata.get('r')}, alpha={metadata.get('lora_alpha')}, target_modules={targets})"


def load_lora_weights(
    unet: nn.Module, settings: LoRASettings, directory: str | Path, prefix: str = UNET_PREFIX
) -> None:
    """Load the adapter weights written by :func:`save_lora_weights` into ``unet``'s adapters.

    ``unet`` must carry adapters made from ``settings`` (see :meth:`LoRASettings.apply`); the
    file must fit them exactly: same rank and alpha (the update's scale ``alpha / rank``) and
    one tensor of the right shape for every adapter weight, no more, no less.

    Raises:
        FileNotFoundError: ``directory`` has no LoRA weights file.
        ValueError: the file does not fit the adapters; the message gives the settings it fits.
    """
    path = Path(directory) / LORA_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"'{path}' does not exist; pass a directory written by save_trained of a policy with LoRA"
        )
    weights, metadata = read_lora_weights(path, prefix)
    hint = settings_hint(metadata)
    rank, alpha = settings.rank, settings.alpha if settings.alpha is not None else settings.rank
    if metadata is not None and (metadata.get("r"), metadata.get("lora_alpha")) != (rank, alpha):
        raise ValueError(
            f"LoRA file '{path}' has rank={metadata.get('r')}, alpha={metadata.get('lora_alpha')} but this "
            f"policy's adapters have rank={rank}, alpha={alpha}; build the policy with {hint}"
        )
    expected = get_peft_model_state_dict(unet)
    unmatched = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unmatched or missing:
        raise ValueError(
            f"LoRA file '{path}' does not fit this policy's adapters (target_modules={settings.target_modules}): "
            f"{len(unmatched)} of its {len(weights)} tensors match no adapter layer (e.g. {unmatched[:2]}) and "
            f"{len(missing)} adapter weights are not in the file (e.g. {missing[:2]}); build the policy with {hint}"
        )
    wrong = [key for key in expected if weights[key].shape != expected[key].shape]
    if wrong:
        key = wrong[0]
        raise ValueError(
            f"LoRA file '{path}' has {key} of shape {list(weights[key].shape)} but this policy's adapter has "
            f"{list(expected[key].shape)} (rank={rank}); build the policy with {hint}"
        )
    result = set_peft_model_state_dict(unet, weights)
    unexpected = [key for key in result.unexpected_keys if "lora_" in key]
    if unexpected:
        raise ValueError(f"LoRA file '{path}': peft could not load {unexpected[:2]}; build the policy with {hint}")
