"""The rectified-flow (flow-matching) training objective of Stable Diffusion 3, as pure tensor functions.

Rectified flow (Liu et al. 2022; Esser et al. 2024, section 2) joins an image ``x_0`` and
Gaussian noise ``eps`` by a straight line, ``x_sigma = (1 - sigma) x_0 + sigma eps`` for
``sigma`` in ``[0, 1]``, and trains a network ``v(x_sigma, sigma)`` to regress the line's
velocity ``eps - x_0`` (the conditional flow-matching loss, eq. 1 and 3 of Esser et al. with
``a_t = 1 - t``, ``b_t = t``). Sampling integrates ``dx = v dsigma`` from ``sigma = 1`` to 0: one
Euler step is ``x + (sigma_next - sigma) v``, exactly ``FlowMatchEulerDiscreteScheduler.step``.

SD3 draws the training ``sigma`` from a logit-normal distribution (``sigmoid`` of a Gaussian,
section 3.1 of Esser et al.: ``logit_normal(0, 1)`` was their best), which trains the middle
noise levels most; ``"uniform"`` weighs every level alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FlowNoisedImages", "TimeSampling", "flow_interpolation", "sample_flow_sigmas", "velocity_loss"]

TimeSampling = Literal["logit_normal", "uniform"]


def sample_flow_sigmas(
    count: int,
    sampling: TimeSampling = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training noise levels ``sigma`` ``[count]`` in ``[0, 1]``.

    Args:
        count: how many.
        sampling: ``"logit_normal"`` (``sigmoid(mean + std * z)``, ``z ~ N(0, 1)``) or
            ``"uniform"`` (``U[0, 1)``; ``mean`` and ``std`` are unused).
        mean: mean of the logit-normal's Gaussian.
        std: standard deviation of the logit-normal's Gaussian.
        generator: random generator (``None``: the global one).
        device: where to draw them.

    Example:
        >>> sigmas = sample_flow_sigmas(10000, generator=torch.Generator().manual_seed(0))
        >>> abs(sigmas.median().item() - 0.5) < 0.02, bool(sigmas.min() > 0), bool(sigmas.max() < 1)
        (True, True, True)
    """
    if sampling == "uniform":
        return torch.rand(count, generator=generator, device=device)
    if sampling != "logit_normal":
        raise ValueError(f"sampling={sampling!r}; expected 'logit_normal' or 'uniform'")
    if std <= 0:
        raise ValueError(f"std={std}; expected a positive standard deviation of the logit-normal")
    return torch.sigmoid(mean + std * torch.randn(count, generator=generator, device=device))


@dataclass
class FlowNoisedImages:
    """Images moved along the straight path towards noise.

    Attributes:
        noisy: ``[B, C, H, W]`` the points ``x_sigma = (1 - sigma) x_0 + sigma eps``.
        velocity: ``[B, C, H, W]`` the target ``eps - x_0`` the network must predict.
        sigmas: ``[B]`` each image's ``sigma``.
    """

    noisy: Tensor
    velocity: Tensor
    sigmas: Tensor


def flow_interpolation(images: Tensor, noise: Tensor, sigmas: Tensor) -> FlowNoisedImages:
    """``x_sigma = (1 - sigma) x_0 + sigma eps`` and its velocity ``eps - x_0``, for ``sigmas`` ``[B]``.

    Example:
        >>> noised = flow_interpolation(torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1), torch.tensor([0.0, 0.25]))
        >>> noised.noisy.flatten().tolist(), noised.velocity.flatten().tolist()
        ([0.0, 0.25], [1.0, 1.0])
    """
    if images.shape != noise.shape:
        raise ValueError(f"images {tuple(images.shape)} and noise {tuple(noise.shape)} differ in shape")
    if sigmas.shape != images.shape[:1]:
        raise ValueError(f"sigmas {tuple(sigmas.shape)}; expected one per image, [{images.shape[0]}]")
    sigma = sigmas.to(images.dtype).view(-1, *([1] * (images.ndim - 1)))
    return FlowNoisedImages((1 - sigma) * images + sigma * noise, noise - images, sigmas)


def velocity_loss(predicted: Tensor, velocity: Tensor) -> Tensor:
    """Mean squared error between predicted and target velocity (in float32 at least)."""
    dtype = torch.promote_types(predicted.dtype, torch.float32)
    return F.mse_loss(predicted.to(dtype), velocity.to(dtype))
