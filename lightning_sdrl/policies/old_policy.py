"""The old / EMA policy of forward-process RL: a trailing copy of a policy's trained parameters.

DiffusionNFT samples with an "old" model that trails the trained one, and Advantage Weighted
Matching regularises towards an EMA model; both are the same network with other values of the
trained parameters (the LoRA adapters, or the whole denoiser under full fine-tuning). So only those
values are copied, :meth:`ParameterCopy.update` moves them with
:func:`~lightning_sdrl.functional.ema.ema_update`, and :meth:`ParameterCopy.swapped_into` runs
the policy itself with them, no second network built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_sdrl.functional.ema import ema_update
from lightning_sdrl.policies.base import DiffusionPolicy
from lightning_sdrl.policies.sharding import full_tensor, like_parameter

__all__ = ["ParameterCopy"]


def _trainable(policy: DiffusionPolicy) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in policy.named_parameters() if parameter.requires_grad}


class ParameterCopy:
    """A copy of a policy's trainable parameters: the old / EMA policy of DiffusionNFT and AWM.

    The copy keeps each parameter's dtype and follows it to its device (a copy made before
    Lightning moves the policy to the GPU moves there at the first :meth:`update` or
    :meth:`swapped_into`). It is not a module: the optimiser and the policy's ``state_dict`` never
    see it; checkpoint it through :meth:`state_dict` / :meth:`load_state_dict`.

    Args:
        policy: the policy whose trainable parameters (``requires_grad``) are copied, by their
            names in ``policy.named_parameters()``.

    Raises:
        ValueError: the policy has no trainable parameter.

    Example:
        >>> from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
        >>> policy = RandomTextToImagePolicy("tiny", lora=LoRASettings(rank=4))
        >>> old = ParameterCopy(policy)
        >>> old.update(policy, decay=0.5)
        >>> with old.swapped_into(policy):
        ...     samples = policy.generate(["a cat"], num_steps=2)
        >>> samples.images.shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self, policy: DiffusionPolicy) -> None:
        trainable = _trainable(policy)
        if not trainable:
            raise ValueError(
                f"{type(policy).__name__} has no trainable parameter to copy; build it with lora settings or "
                "lora=None (full fine-tuning)"
            )
        self._tensors = {name: parameter.detach().clone() for name, parameter in trainable.items()}

    def __len__(self) -> int:
        """The number of copied parameters."""
        return len(self._tensors)

    def _matching(self, policy: DiffusionPolicy) -> dict[str, nn.Parameter]:
        """The policy's trainable parameters, checked to be the copied ones; the copy follows their devices."""
        trainable = _trainable(policy)
        self._check_names_and_shapes({name: p.shape for name, p in trainable.items()}, "the policy's trainable")
        for name, parameter in trainable.items():
            # a policy sharded after the copy was made (FSDP2): the copy takes the parameter's layout
            self._tensors[name] = like_parameter(self._tensors[name], parameter)
            if self._tensors[name].device != parameter.device:
                self._tensors[name] = self._tensors[name].to(parameter.device)
        return trainable

    def _check_names_and_shapes(self, shapes: dict[str, torch.Size], source: str) -> None:
        missing = sorted(set(self._tensors) - set(shapes))
        unexpected = sorted(set(shapes) - set(self._tensors))
        if missing or unexpected:
            raise ValueError(
                f"{source} parameters do not match the copy: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                f" ({len(missing)}), unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                f" ({len(unexpected)}); use a copy made from a policy of the same architecture and LoRA settings"
            )
        for name, shape in shapes.items():
            if shape != self._tensors[name].shape:
                raise ValueError(
                    f"{source} parameter {name!r} has shape {list(shape)}; the copy's is "
                    f"{list(self._tensors[name].shape)} (use a policy of the same architecture and LoRA rank)"
                )

    def update(self, policy: DiffusionPolicy, decay: float) -> None:
        """``theta_old <- decay theta_old + (1 - decay) theta``, in place, without gradient.

        Args:
            policy: the trained policy (the one copied, or one of the same architecture).
            decay: in ``[0, 1)``; 0 copies the policy's values (e.g.
                :func:`~lightning_sdrl.functional.ema.ema_decay` of the step).

        Raises:
            ValueError: ``decay`` outside ``[0, 1)``, or the policy's trainable parameters are not the copied ones.
        """
        trainable = self._matching(policy)
        ema_update([self._tensors[name] for name in trainable], list(trainable.values()), decay)

    @contextlib.contextmanager
    def swapped_into(self, policy: DiffusionPolicy) -> Iterator[None]:
        """Run ``policy`` with the copy's values inside the block, without gradient.

        The policy's trainable parameters take the copy's values in place (the same tensors, so
        optimisers, compiled graphs and DDP keep working) and get their own values back, bit for
        bit, on leaving the block, also when it raises. The block runs under ``torch.no_grad()``:
        a graph through the swapped values would give gradients of the wrong weights.

        Raises:
            ValueError: the policy's trainable parameters are not the copied ones.
        """
        trainable = self._matching(policy)
        with torch.no_grad():
            own = {name: parameter.detach().clone() for name, parameter in trainable.items()}
            for name, parameter in trainable.items():
                parameter.copy_(self._tensors[name])
            try:
                yield
            finally:
                for name, parameter in trainable.items():
                    parameter.copy_(own[name])

    def state_dict(self) -> dict[str, Tensor]:
        """The copied values by parameter name (the tensors themselves, on the devices they live on).

        Copies of sharded parameters are ``DTensor`` shards; :meth:`full_state_dict` gathers them.
        """
        return dict(self._tensors)

    def full_state_dict(self) -> dict[str, Tensor]:
        """:meth:`state_dict` with every shard gathered into the whole tensor (collective when sharded)."""
        return {name: full_tensor(tensor) for name, tensor in self._tensors.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (from :meth:`state_dict`, any device) into this copy's tensors.

        Raises:
            ValueError: a name is missing or unexpected, or a shape differs (the error names them).
        """
        self._check_names_and_shapes({name: tensor.shape for name, tensor in state.items()}, "the state's")
        with torch.no_grad():
            for name, tensor in self._tensors.items():
                tensor.copy_(like_parameter(state[name], tensor))

    def __repr__(self) -> str:
        count = sum(tensor.numel() for tensor in self._tensors.values())
        return f"ParameterCopy({len(self._tensors)} tensors, {count} values)"
