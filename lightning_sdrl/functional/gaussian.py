"""One stochastic denoising step seen as a Gaussian policy: sampling, log-density and exact KL.

DDPO (Black et al. 2023) and its descendants treat each step ``x_t -> x_prev`` of a stochastic
sampler as an action drawn from an isotropic Gaussian whose mean depends on the model. A step
kernel (:mod:`lightning_sdrl.policies.kernels`) computes that Gaussian, a
:class:`StepDistribution`; this file holds what follows from it, once, for every kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor


class StepDistribution(NamedTuple):
    """The Gaussian ``p(x_prev | x_t)`` of one stochastic denoising step.

    Every step kernel (DDIM, a flow-matching SDE, ...) returns one; sampling, the log-density
    and the exact KL below follow from it alone.

    Attributes:
        mean: ``[B, ...]`` mean of ``x_{t-1}`` (same shape as the sample).
        std: ``[B, 1, ..., 1]`` (or ``[1, ..., 1]`` for a shared timestep) standard deviation,
            broadcastable to the sample.
        pred_original_sample: ``[B, ...]`` the predicted ``x_0`` (after clipping, if configured).
    """

    mean: Tensor
    std: Tensor
    pred_original_sample: Tensor


def gaussian_log_prob(value: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of an isotropic Gaussian, **averaged** over all non-batch dimensions.

    Averaging (rather than summing) follows ddpo-pytorch, so its PPO clip ranges (e.g. 1e-4)
    carry over unchanged.

    Example:
        >>> x = torch.zeros(2, 3)
        >>> gaussian_log_prob(x, torch.zeros(2, 3), torch.ones(2, 1))
        tensor([-0.9189, -0.9189])
    """
    value = value.to(mean.dtype)
    log_prob = -((value - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def sample_step(
    dist: StepDistribution,
    dtype: torch.dtype,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``x_{t-1}`` from a step distribution; returns it (in ``dtype``) and its log-prob ``[B]``.

    The log-prob is that of the sample after casting to ``dtype``, so re-scoring the stored
    sample later gives the same number.
    """
    noise = randn_tensor(dist.mean.shape, generator=generator, device=dist.mean.device, dtype=dist.mean.dtype)
    prev_sample = (dist.mean + dist.std * noise).to(dtype)
    return prev_sample, gaussian_log_prob(prev_sample, dist.mean, dist.std)


def step_with_log_prob(
    dist: StepDistribution,
    sample: Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """Take a step from ``sample`` (or score the given ``prev_sample``): ``(prev_sample, log_prob [B])``.

    The tail of every ``*_step_with_logprob`` function: without ``prev_sample`` the step is drawn
    with :func:`sample_step` (in ``sample``'s dtype); with it nothing is drawn and its log-density
    under ``dist`` is returned (how a stored trajectory is re-scored).
    """
    if prev_sample is None:
        return sample_step(dist, sample.dtype, generator)
    if prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample has shape {list(prev_sample.shape)}; expected {list(sample.shape)} (the sample's)"
        )
    return prev_sample, gaussian_log_prob(prev_sample, dist.mean, dist.std)


def gaussian_kl_same_std(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL(p || q) of two isotropic Gaussians with one shared std, averaged over non-batch dims.

    For two DDIM step distributions at the same ``x_t`` (same ``sigma_t``), the KL is
    ``||mu_p - mu_q||^2 / (2 sigma_t^2)``: exact, no sampling estimate. Averaged over dimensions
    like :func:`gaussian_log_prob`.

    Example:
        >>> gaussian_kl_same_std(torch.ones(1, 4), torch.zeros(1, 4), torch.full((1, 1), 0.5))
        tensor([2.])
    """
    kl = (mean_p - mean_q) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
