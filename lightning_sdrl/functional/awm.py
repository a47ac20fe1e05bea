"""Advantage Weighted Matching (AWM): policy gradient with the pretraining loss as the log-likelihood.

Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models" (2025,
arXiv:2509.25050). A generated sample ``x_0`` is noised afresh, ``x_t = (1 - t) x_0 + t eps``, and
the model's flow-matching error at ``x_t``,

    ``l = mean over the sample's dims of (v_theta - (eps - x_0))^2``

(for a DDPM model: its output against its training target, :func:`matching_error`), stands in for
the sample's negative log-likelihood, ``log p = -w(t) l`` or a robust version of it
(:func:`awm_log_prob`). The update is PPO's clipped surrogate on ``ratio = exp(log p_theta -
log p_old)`` against the sampling policy; on-policy the ratio is 1 and the gradient is
``-A grad log p``: flow matching with each sample's loss weighted by its advantage.

Defaults and definitions follow the authors' reference code, github.com/scxue/advantage_weighted_matching:
``compute_log_prob_awm`` in ``advantage_weighted_matching/scripts/train_sd3_awm.py`` (lines 210-252;
the weightings, with ``e = 1e-10``), its PPO loss and KL terms (lines 1293-1352: advantages clipped to
``[-adv_clip_max, adv_clip_max] = [-5, 5]`` and rescaled by ``advantage_max / adv_clip_max`` into
``[-1, 1]``), and the settings of every run in ``config/dgx_awm.py`` (weighting ``"ghuber"`` with power
0.25, ``clip_range = 1``, KL weights 1e-4 to 3e-3 to the reference and 1 to the EMA model, both as squared
velocity distances, :func:`~lightning_sdrl.functional.forward_process.output_kl`). Flow-Factory's
``trainers/awm.py`` (github.com/X-GenGroup/Flow-Factory) computes the same ``log p``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_sdrl.functional.forward_process import (
    Parameterization,
    noise_coefficient,
    output_kl,
    training_target,
)
from lightning_sdrl.functional.ppo import clip_advantages, ppo_clip_loss

__all__ = ["AWMLoss", "AWMWeighting", "awm_log_prob", "awm_loss", "matching_error"]

AWMWeighting = Literal["uniform", "t", "t2", "huber"]
"""How the matching error becomes ``log p``: ``-l``, ``-t l``, ``-t^2 l`` or the generalised Huber
``-t ((l + e)^p - e^p) / p`` (the reference's ``"Uniform"``, ``"t"``, ``"t**2"`` and ``"ghuber"``)."""

_WEIGHTINGS: tuple[str, ...] = get_args(AWMWeighting)


def matching_error(
    model_output: Tensor,
    x0: Tensor,
    noise: Tensor,
    level: Tensor | float,
    parameterization: Parameterization = "flow",
) -> Tensor:
    """``l = mean over the non-batch dims of (output - target)^2``: the pretraining loss of each sample, ``[B]``.

    The target is the velocity ``eps - x_0`` for ``"flow"`` and the DDPM training target otherwise
    (:func:`~lightning_sdrl.functional.forward_process.training_target`). In float32 at least.

    Example:
        >>> matching_error(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 0.5)  # (0 - 1)^2
        tensor([1.])
    """
    target = training_target(x0, noise, level, parameterization)
    if model_output.shape != target.shape:
        raise ValueError(f"model_output has shape {list(model_output.shape)}; expected {list(target.shape)} (x0's)")
    return (model_output.to(target.dtype) - target).pow(2).flatten(1).mean(1)


def awm_log_prob(
    error: Tensor,
    time: Tensor | float,
    weighting: AWMWeighting = "huber",
    huber_power: float = 0.25,
    huber_eps: float = 1e-10,
) -> Tensor:
    """The log-likelihood surrogate ``log p`` of a matching error ``l`` (reference ``compute_log_prob_awm``).

    ``"uniform"``: ``-l``; ``"t"``: ``-t l``; ``"t2"``: ``-t^2 l``; ``"huber"``: the generalised Huber
    ``-t ((l + e)^p - e^p) / p`` with ``p = huber_power`` and ``e = huber_eps`` (the reference's
    ``"ghuber"``, ``p = 0.25``, ``e = 1e-10``), whose gradient ``t (l + e)^(p - 1)`` shrinks for
    large errors. (The reference's separate ``"huber"``, ``-t (sqrt(l + 1e-10) - 1e-5)``, is this with
    ``p = 0.5``, halved.)

    Args:
        error: ``[B]`` matching errors (:func:`matching_error`).
        time: ``[B]`` (or a scalar) ``t`` in ``[0, 1]``: ``sigma`` for flow models (the reference's
            ``timestep / 1000``); for DDPM models :func:`awm_loss` passes ``sqrt(1 - abar_t)``.
        weighting: one of ``"uniform"``, ``"t"``, ``"t2"``, ``"huber"``.
        huber_power: ``p > 0`` of ``"huber"``.
        huber_eps: ``e > 0`` of ``"huber"``.

    Returns:
        ``[B]`` in the dtype of ``error`` (float32 at least).

    Example:
        >>> awm_log_prob(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]), "t2")
        tensor([-0.2500, -1.0000])
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; expected one of {list(_WEIGHTINGS)}")
    if not huber_power > 0 or not huber_eps > 0:
        raise ValueError(
            f"huber_power={huber_power}, huber_eps={huber_eps}; expected both > 0 (reference: 0.25, 1e-10)"
        )
    error = error.to(torch.promote_types(error.dtype, torch.float32))
    t = torch.as_tensor(time, dtype=error.dtype, device=error.device)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape != error.shape):
        raise ValueError(f"time has shape {list(t.shape)}; expected a scalar or {list(error.shape)} (one per sample)")
    if weighting == "uniform":
        return -error
    if weighting == "t":
        return -t * error
    if weighting == "t2":
        return -(t**2) * error
    return -t * ((error + huber_eps) ** huber_power - huber_eps**huber_power) / huber_power


@dataclass(frozen=True)
class AWMLoss:
    """AWM's policy loss with the statistics the reference logs; the KL terms are left to the caller to weigh.

    Attributes:
        loss: scalar PPO-clipped policy loss to minimise.
        log_prob: ``[B]`` ``log p_theta`` (with gradient).
        old_log_prob: ``[B]`` ``log p_old`` of the sampling policy (no gradient).
        ratio: ``[B]`` ``exp(log p_theta - log p_old)``.
        clip_fraction: scalar, the fraction of ratios outside ``[1 - clip_range, 1 + clip_range]``.
        approx_kl: scalar, ``0.5 * mean((log p_theta - log p_old)^2)``.
        advantages: ``[B]`` the clipped and rescaled advantages the loss used.
        kl: ``[B]`` ``mean (v_theta - v_ref)^2`` when a reference output was given, else ``None``
            (reference runs: 1e-4 for PickScore, 1e-3 for GenEval, 3e-3 for OCR).
        ema_kl: ``[B]`` ``mean (v_theta - v_ema)^2`` when an EMA output was given, else ``None``
            (reference weight 1).
    """

    loss: Tensor
    log_prob: Tensor
    old_log_prob: Tensor
    ratio: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor
    advantages: Tensor
    kl: Tensor | None
    ema_kl: Tensor | None


def awm_loss(
    model_output: Tensor,
    x0: Tensor,
    noise: Tensor,
    level: Tensor | float,
    advantages: Tensor,
    old_output: Tensor | None = None,
    reference_output: Tensor | None = None,
    ema_output: Tensor | None = None,
    parameterization: Parameterization = "flow",
    weighting: AWMWeighting = "huber",
    huber_power: float = 0.25,
    clip_range: float = 1.0,
    adv_clip_max: float = 5.0,
    advantage_max: float | None = 1.0,
) -> AWMLoss:
    """AWM's loss at one noise level: PPO clipping of the matching-loss likelihood ratio.

    Args:
        model_output: ``[B, ...]`` the trained model's output at ``x_t`` (with gradient).
        x0: ``[B, ...]`` the generated clean samples.
        noise: ``[B, ...]`` the noise ``eps`` that made ``x_t`` from them.
        level: ``[B]`` (or a scalar): ``sigma`` for ``"flow"``, ``alphas_cumprod[t]`` otherwise.
        advantages: ``[B]`` the samples' advantages.
        old_output: ``[B, ...]`` the sampling policy's output at ``x_t``; ``None`` on-policy (the
            reference's default: ``log p_old = log p_theta`` detached, ratio 1).
        reference_output: ``[B, ...]`` the reference model's output, for :attr:`AWMLoss.kl`.
        ema_output: ``[B, ...]`` the EMA model's output, for :attr:`AWMLoss.ema_kl`.
        parameterization: ``"flow"`` or the DDPM ``prediction_type`` of the outputs.
        weighting: see :func:`awm_log_prob` (reference runs: the generalised Huber).
        huber_power: ``p`` of ``"huber"`` (reference: 0.25).
        clip_range: PPO's ``eps > 0`` (reference runs: 1).
        adv_clip_max: advantages are clipped to ``[-adv_clip_max, adv_clip_max]`` (reference: 5).
        advantage_max: then rescaled by ``advantage_max / adv_clip_max`` into
            ``[-advantage_max, advantage_max]`` (reference: 1); ``None`` keeps the clipped values.

    Returns:
        The loss and its statistics (:class:`AWMLoss`).

    Example:
        >>> x0, noise, v = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3)
        >>> out = awm_loss(v, x0, noise, torch.tensor([0.5, 0.5]), torch.tensor([5.0, -10.0]))
        >>> out.ratio, out.advantages
        (tensor([1., 1.]), tensor([ 1., -1.]))
    """
    if advantages.shape != x0.shape[:1]:
        raise ValueError(f"advantages has shape {list(advantages.shape)}; expected [{x0.shape[0]}] (one per sample)")
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max={adv_clip_max}; expected a positive advantage bound (reference: 5)")
    if advantage_max is not None and not advantage_max > 0:
        raise ValueError(f"advantage_max={advantage_max}; expected a positive bound or None (no rescaling)")
    # 1. matching errors l of the trained and the sampling policy, and the time t of the weighting
    time = noise_coefficient(level, parameterization)
    error = matching_error(model_output, x0, noise, level, parameterization)
    log_prob = awm_log_prob(error, time, weighting, huber_power)
    if old_output is None:
        old_log_prob = log_prob.detach()
    else:
        old_error = matching_error(old_output.detach(), x0, noise, level, parameterization)
        old_log_prob = awm_log_prob(old_error, time, weighting, huber_power)
    # 2. advantages clipped to [-c, c], then rescaled into [-advantage_max, advantage_max]
    clipped = clip_advantages(advantages.to(log_prob.dtype), adv_clip_max)
    if advantage_max is not None:
        clipped = clipped / adv_clip_max * advantage_max
    # 3. PPO's clipped surrogate on ratio = exp(log p_theta - log p_old)
    policy = ppo_clip_loss(log_prob, old_log_prob, clipped, clip_range)
    # 4. the squared velocity distances to the reference and EMA models, for the caller to weigh
    kl = None if reference_output is None else output_kl(model_output, reference_output.detach())
    ema_kl = None if ema_output is None else output_kl(model_output, ema_output.detach())
    return AWMLoss(
        loss=policy.loss,
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        ratio=policy.ratio,
        clip_fraction=policy.clip_fraction,
        approx_kl=policy.approx_kl,
        advantages=clipped,
        kl=kl,
        ema_kl=ema_kl,
    )
