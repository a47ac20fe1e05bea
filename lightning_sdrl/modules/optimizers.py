"""The optimiser over a policy's trainable parameters, with each parameter group's learning-rate scale.

A policy hands its trainable parameters as groups ``{"params": [...], "lr_scale": s}``
(:meth:`~lightning_sdrl.policies.base.DiffusionPolicy.parameter_groups`); the configured optimiser
factory builds the optimiser with its own rate ``lr``, and each group then runs at ``s * lr``.
Learning-rate schedules built afterwards start from the scaled rates and scale every group alike;
a resumed optimiser takes its groups' rates from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def build_optimizer(
    factory: Callable[[Iterable[Any]], torch.optim.Optimizer], groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """``factory`` over ``groups``, each group's ``lr`` multiplied by its ``lr_scale``.

    With one group of scale 1 the factory gets the plain parameter list: the optimiser (and its
    checkpoints) are those of ``factory(parameters)``.

    Args:
        factory: the optimiser factory (``OptimizerCallable``), called with parameters or groups.
        groups: ``[{"params": [...], "lr_scale": float}, ...]``, no parameter in two groups; not changed.

    Raises:
        ValueError: no parameters at all.
    """
    if not any(group["params"] for group in groups):
        raise ValueError("the policy has no trainable parameters; check its lora settings")
    if len(groups) == 1 and groups[0]["lr_scale"] == 1.0:
        return factory(list(groups[0]["params"]))
    # copies: an optimiser keeps (and its schedule changes) the very dicts it is given
    optimizer = factory([dict(group) for group in groups])
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group["lr_scale"]
    return optimizer
