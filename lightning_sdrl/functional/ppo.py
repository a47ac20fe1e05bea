"""Policy-gradient losses of DDPO: PPO clipping and the Truly-PPO trust region with rollback.

Every function takes per-sample tensors of one denoising step (``[B]``) and returns a scalar loss
to minimise. Advantages are assumed already normalised (see :mod:`.stat_tracking`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PolicyLoss(NamedTuple):
    """A policy loss with the statistics DDPO logs.

    Attributes:
        loss: scalar loss to minimise.
        ratio: ``[B]`` importance ratio ``pi_theta / pi_old`` of the step taken.
        clip_fraction: scalar, the fraction of samples whose ratio left ``[1 - eps, 1 + eps]``
            (PPO) or whose rollback term was active (Truly PPO).
        approx_kl: scalar, ``0.5 * mean((log pi_theta - log pi_old)^2)``, the estimator ddpo-pytorch logs.
    """

    loss: Tensor
    ratio: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Clamp advantages to ``[-max_abs, max_abs]`` (DDPO's ``adv_clip_max``, 5 by default).

    Example:
        >>> clip_advantages(torch.tensor([-9.0, 0.5, 7.0]), 5.0)
        tensor([-5.0000,  0.5000,  5.0000])
    """
    if max_abs <= 0:
        raise ValueError(f"max_abs={max_abs}; expected a positive advantage bound")
    return advantages.clamp(-max_abs, max_abs)


def _ratio_and_kl(log_prob: Tensor, old_log_prob: Tensor) -> tuple[Tensor, Tensor]:
    ratio = torch.exp(log_prob - old_log_prob)
    approx_kl = 0.5 * torch.mean((log_prob - old_log_prob) ** 2)
    return ratio, approx_kl


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(log_prob -
    old_log_prob)``.

    Example:
        >>> out = ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), 0.2)
        >>> out.loss, out.ratio
        (tensor(0.), tensor([1., 1.]))
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range={clip_range}; expected a positive PPO clip range")
    ratio, approx_kl = _ratio_and_kl(log_prob, old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    clip_fraction = torch.mean((torch.abs(ratio - 1.0) > clip_range).float())
    return PolicyLoss(loss, ratio, clip_fraction, approx_kl)


def truly_ppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    kl: Tensor,
    kl_threshold: float,
    rollback_coef: float,
) -> PolicyLoss:
    """Trust-region PPO with rollback (Wang et al. 2020, "Truly PPO", TR-PPO-RB), negated.

    Per sample, with ``r`` the ratio and ``KL`` the divergence ``KL(pi_old || pi_theta)`` at that
    state (section III-F of the debiasing paper):

    - if ``KL >= delta`` and ``r * A >= A`` (the update still pushes further out of the trust
      region), the objective is ``r * A - alpha * KL``: the rollback term replaces the clipped one;
    - otherwise it is the plain surrogate ``r * A``.

    Args:
        log_prob: ``[B]`` log-probability of the stored step under the current policy.
        old_log_prob: ``[B]`` log-probability under the sampling policy.
        advantages: ``[B]`` advantages.
        kl: ``[B]`` KL between the sampling and the current policy at the step's state (exact for
            DDIM steps: :func:`lightning_sdrl.functional.ddim.gaussian_kl_same_std`).
        kl_threshold: ``delta``, the trust region's radius.
        rollback_coef: ``alpha``, the rollback strength.

    Example:
        >>> adv = torch.tensor([1.0, 1.0])
        >>> out = truly_ppo_loss(torch.tensor([0.1, 0.1]), torch.zeros(2), adv,
        ...                      kl=torch.tensor([0.0, 1.0]), kl_threshold=0.5, rollback_coef=2.0)
        >>> out.clip_fraction
        tensor(0.5000)
    """
    if kl_threshold <= 0 or rollback_coef < 0:
        raise ValueError(
            f"kl_threshold={kl_threshold}, rollback_coef={rollback_coef}; "
            "expected kl_threshold > 0 and rollback_coef >= 0"
        )
    ratio, approx_kl = _ratio_and_kl(log_prob, old_log_prob)
    surrogate = ratio * advantages
    rollback = (kl >= kl_threshold) & (surrogate >= advantages)
    objective = torch.where(rollback, surrogate - rollback_coef * kl, surrogate)
    return PolicyLoss(-objective.mean(), ratio, rollback.float().mean(), approx_kl)
