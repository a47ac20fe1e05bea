"""Fault guards the training modules share: non-finite gradients, weights and checkpoint keys.

A diverging run (a learning rate far too large, a reward that returns NaN) must never apply or save
non-finite numbers. :class:`NonFiniteGuard` is asked before every optimiser step: a step whose
gradients are not all finite is skipped (its gradients are dropped, so no optimiser state moves),
counted and reported on the console, and after ``max_consecutive_skips`` skipped steps in a row
the run stops with an error that names the likely fix. :func:`check_finite_state` refuses to write
weights that are not finite, and :func:`check_checkpoint_keys` refuses a checkpoint that would
silently load nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

log = logging.getLogger("lightning_sdrl")


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every given tensor (``None`` entries ignored) holds only finite values.

    Example:
        >>> all_finite([torch.ones(2), None]), all_finite([torch.tensor([1.0, float("nan")])])
        (True, False)
    """
    return bool(finite_flags(tensors).all())


def finite_flags(tensors: Iterable[Tensor | None]) -> Tensor:
    """``[N]`` bool: whether each given tensor (``None`` entries skipped) holds only finite values.

    A sharded tensor (FSDP2's ``DTensor``) is judged by all its shards: each rank checks its own
    and the flags are combined across the tensor's mesh (a collective call: every rank must make
    it), so every rank decides alike, as under DDP.
    """
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    flags = torch.stack([torch.isfinite(t).all() for t in local])  # on the tensors' device: no sync per tensor
    meshes = {t.device_mesh for t in tensors if isinstance(t, DTensor)}
    if meshes:
        counts = flags.to(torch.int32)
        for mesh in meshes:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group())
        flags = counts.bool()
    return flags


class NonFiniteGuard:
    """Skips optimiser steps with non-finite gradients and stops a run that keeps producing them.

    Args:
        max_consecutive_skips: skipped steps in a row after which :meth:`check_gradients` raises
            ``FloatingPointError`` (a run that only skips is not training).
        what: the name used in messages (``"DDPO"``, ``"ReFL"`` ...).

    Attributes:
        skipped_steps: steps skipped so far (checkpointed by the modules).
        consecutive_skips: steps skipped since the last applied one.
    """

    def __init__(self, max_consecutive_skips: int, what: str) -> None:
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips!r}; expected a positive integer")
        self.max_consecutive_skips, self.what = max_consecutive_skips, what
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def record_skip(self, reason: str, fix: str) -> None:
        """Count one skipped step, warn on the console, raise after too many in a row."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"{self.what}: {self.consecutive_skips} consecutive steps skipped ({reason}); the run is "
                f"diverging. {fix} (max_consecutive_skips={self.max_consecutive_skips} sets this limit)"
            )
        log.warning(
            "%s: step skipped (%s); %d skipped in a row, %d in all (stops at %d in a row)",
            self.what,
            reason,
            self.consecutive_skips,
            self.skipped_steps,
            self.max_consecutive_skips,
        )

    def record_success(self) -> None:
        """An applied step resets the consecutive count."""
        self.consecutive_skips = 0

    def check_gradients(self, parameters: Iterable[nn.Parameter], fix: str) -> bool:
        """``True`` if every gradient is finite; otherwise drop all gradients, count and warn.

        Dropped gradients (``grad = None``) make every torch optimiser leave those parameters and
        their state (momenta, step counts, weight decay) untouched: the step is skipped exactly.
        Under DDP the gradients are already all-reduced, so every process decides alike.
        """
        parameters = list(parameters)
        if all_finite(p.grad for p in parameters):
            self.record_success()
            return True
        for parameter in parameters:
            parameter.grad = None
        self.record_skip("non-finite gradients", fix)
        return False

    def state_dict(self) -> dict[str, int]:
        """Counters, for checkpoints."""
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore counters saved by :meth:`state_dict`."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


def check_finite_state(state: Mapping[str, Tensor], what: str) -> None:
    """Raise ``FloatingPointError`` naming the tensors of ``state`` that are not finite.

    Example:
        >>> check_finite_state({"a": torch.ones(1), "b": torch.tensor([float("inf")])}, "checkpoint")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FloatingPointError: refusing to write checkpoint: 1 of 2 tensors are not finite (b); ...
    """
    tensors = {name: value for name, value in state.items() if torch.is_tensor(value)}
    bad = [name for name, finite in zip(tensors, finite_flags(tensors.values()).tolist(), strict=True) if not finite]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise FloatingPointError(
            f"refusing to write {what}: {len(bad)} of {len(state)} tensors are not finite ({shown}); "
            "the run diverged, lower the learning rate"
        )


def check_checkpoint_keys(state: Mapping[str, Tensor], expected: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``state`` has every ``expected`` key and only ``allowed`` ones.

    Checkpoints of the fine-tuning modules hold only trainable weights and load non-strictly, so a
    checkpoint of another policy (or an empty one) would otherwise resume or validate the untrained
    model without a word.

    Args:
        state: the checkpoint's ``state_dict``.
        expected: keys that must be present (the trainable parameters).
        allowed: every key this module can load.
    """
    keys, expected = set(state), set(expected)
    missing = sorted(expected - keys)
    unexpected = sorted(keys - set(allowed))
    if not missing and not unexpected:
        return

    def shown(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(expected)} trainable weights are missing ({shown(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys match no weight of this module ({shown(unexpected)})")
    raise ValueError(
        "checkpoint does not match this model: "
        + "; ".join(parts)
        + ". Resume or validate with a checkpoint written by a run with the same policy and LoRA settings "
        "(<log_dir>/checkpoints/*.ckpt); a trained LoRA directory is loaded with policy.load_trained(directory)"
    )
