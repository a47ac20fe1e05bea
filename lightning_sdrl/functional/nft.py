"""DiffusionNFT's loss: reinforcement on the forward process through implicit positive and negative policies.

Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (2025,
arXiv:2509.16117). Samples ``x_0`` drawn by the sampling ("old") model ``v_old`` with any sampler
are scored, noised afresh to ``x_t`` (:mod:`lightning_sdrl.functional.forward_process`) and used to
train ``v_theta`` with a flow-matching-like loss on two *implicit* policies

    ``v+ = (1 - beta) v_old + beta v_theta``  and  ``v- = (1 + beta) v_old - beta v_theta``

(``v+`` and ``v-`` lie symmetrically about ``v_old``). A sample's optimality probability
``r = clip(0.5 + clip(A, -c, c) / (2 c), 0, 1)`` weighs fitting it with ``v+`` (``r``) against
fitting it with ``v-`` (``1 - r``); fitting a poor sample with ``v-`` pushes ``v_theta`` away from it.
Each branch's error is that of the clean-sample estimate ``x0_hat``, self-normalised per sample:

    ``l_i = r ||x0_hat(v+) - x_0||^2 / w+ + (1 - r) ||x0_hat(v-) - x_0||^2 / w-``,
    ``w = stopgrad(mean |x0_hat - x_0|)`` clamped below at 1e-5,

the squared errors and ``w`` being means over the sample's dimensions. Because ``x0_hat`` is affine
in the model's output for rectified flow and all three DDPM prediction types, the same loss holds for
DDPM models with their outputs in place of ``v``.

Everything here follows the authors' reference code, ``scripts/train_nft_sd3.py`` of
github.com/NVlabs/DiffusionNFT (lines 910-970): ``r`` from ``adv_clip_max`` (5), the implicit
policies (``positive_prediction``, ``implicit_negative_prediction``), ``weight_factor`` (computed there
in float64), the division by ``beta`` (``ori_policy_loss``), and the loss that is optimised,
``adv_clip_max * mean(l_i) / beta`` (``policy_loss``): the constant factor ``adv_clip_max`` sets the
scale against which the KL weight (1e-4 in ``config/nft.py``) was tuned. The old model is updated after
every epoch by :func:`lightning_sdrl.functional.ema.ema_update` with
:func:`~lightning_sdrl.functional.ema.ema_decay`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sdrl.functional.forward_process import Parameterization, clean_estimate, output_kl

__all__ = ["NFTLoss", "implicit_policies", "nft_loss", "optimality_probability", "self_normalized_error"]


def optimality_probability(advantages: Tensor, adv_clip_max: float = 5.0) -> Tensor:
    """``r = clip(0.5 + clip(A, -c, c) / (2 c), 0, 1)``: advantages mapped to ``[0, 1]``, 0.5 at ``A = 0``.

    Args:
        advantages: ``[B]`` advantages (normalised rewards).
        adv_clip_max: ``c > 0``; advantages beyond ``+-c`` count as ``r = 1`` or 0 (reference: 5).

    Returns:
        ``[B]`` optimality probabilities, in float32 at least.

    Example:
        >>> optimality_probability(torch.tensor([-9.0, -2.5, 0.0, 5.0]))
        tensor([0.0000, 0.2500, 0.5000, 1.0000])
    """
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max={adv_clip_max}; expected a positive advantage bound (reference: 5)")
    advantages = advantages.to(torch.promote_types(advantages.dtype, torch.float32))
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (0.5 + clipped / (2 * adv_clip_max)).clamp(0, 1)


def implicit_policies(model_output: Tensor, old_output: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The implicit policies ``v+ = (1 - beta) v_old + beta v_theta`` and ``v- = (1 + beta) v_old - beta v_theta``.

    ``old_output`` is detached: the sampling policy is a fixed target. In float32 at least.

    Example:
        >>> implicit_policies(torch.tensor([2.0]), torch.tensor([1.0]), beta=0.5)
        (tensor([1.5000]), tensor([0.5000]))
    """
    _check_beta(beta)
    if model_output.shape != old_output.shape:
        raise ValueError(
            f"old_output has shape {list(old_output.shape)}; expected {list(model_output.shape)} (model_output's)"
        )
    dtype = torch.promote_types(torch.promote_types(model_output.dtype, old_output.dtype), torch.float32)
    theta, old = model_output.to(dtype), old_output.detach().to(dtype)
    return (1 - beta) * old + beta * theta, (1 + beta) * old - beta * theta


def self_normalized_error(x0_hat: Tensor, x0: Tensor, min_weight: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``mean (x0_hat - x_0)^2 / w`` per sample, with ``w = stopgrad(mean |x0_hat - x_0|)`` clamped at ``min_weight``.

    The normalisation makes each sample's loss about the size of its mean absolute error whatever
    the noise level (the reference's "adaptive weighting", ``weight_factor``).

    Returns:
        ``(loss, weight)``, both ``[B]``, in float32 at least.

    Example:
        >>> loss, weight = self_normalized_error(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2))
        >>> loss, weight  # (1 + 9) / 2 / 2
        (tensor([2.5000]), tensor([2.]))
    """
    if x0_hat.shape != x0.shape:
        raise ValueError(f"x0 has shape {list(x0.shape)}; expected {list(x0_hat.shape)} (x0_hat's)")
    dtype = torch.promote_types(torch.promote_types(x0_hat.dtype, x0.dtype), torch.float32)
    error = (x0_hat.to(dtype) - x0.to(dtype)).flatten(1)
    weight = error.detach().abs().mean(1).clamp(min=min_weight)
    return error.pow(2).mean(1) / weight, weight


@dataclass(frozen=True)
class NFTLoss:
    """DiffusionNFT's loss with the statistics the reference logs.

    Attributes:
        loss: scalar to minimise, ``adv_clip_max * mean(per_sample)`` (the reference's ``policy_loss``).
        per_sample: ``[B]`` ``(r * positive_loss + (1 - r) * negative_loss) / beta``
            (the reference's ``ori_policy_loss``).
        optimality: ``[B]`` the optimality probabilities ``r``.
        positive_loss: ``[B]`` ``mean (x0_hat(v+) - x_0)^2 / w+``.
        negative_loss: ``[B]`` ``mean (x0_hat(v-) - x_0)^2 / w-``.
        positive_weight: ``[B]`` ``w+`` (no gradient).
        negative_weight: ``[B]`` ``w-`` (no gradient).
        kl: ``[B]`` ``mean (v_theta - v_ref)^2`` when a reference output was given, else ``None``; the
            caller adds ``kl_weight * kl.mean()`` (reference weight: 1e-4).
    """

    loss: Tensor
    per_sample: Tensor
    optimality: Tensor
    positive_loss: Tensor
    negative_loss: Tensor
    positive_weight: Tensor
    negative_weight: Tensor
    kl: Tensor | None


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta={beta}; expected beta > 0 (the implicit policies' step; reference: 1.0 or 0.1)")


def nft_loss(
    model_output: Tensor,
    old_output: Tensor,
    x_t: Tensor,
    x0: Tensor,
    level: Tensor | float,
    advantages: Tensor,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    parameterization: Parameterization = "flow",
    reference_output: Tensor | None = None,
) -> NFTLoss:
    """DiffusionNFT's loss at one noise level (Zheng et al. 2025; reference ``train_nft_sd3.py``).

    Args:
        model_output: ``[B, ...]`` the trained model's output at ``x_t`` (with gradient).
        old_output: ``[B, ...]`` the sampling ("old") model's output at ``x_t`` (detached here).
        x_t: ``[B, ...]`` the noised samples (:func:`~lightning_sdrl.functional.forward_process.noise_sample`).
        x0: ``[B, ...]`` the generated clean samples that were noised.
        level: ``[B]`` (or a scalar) noise levels: ``sigma`` for ``"flow"``, ``alphas_cumprod[t]`` otherwise.
        advantages: ``[B]`` the samples' advantages.
        beta: ``> 0``, how far the implicit policies lie from the old one (reference: 1.0, 0.1 for OCR).
        adv_clip_max: ``c > 0`` of :func:`optimality_probability`, also the loss's scale (reference: 5).
        parameterization: ``"flow"`` or the DDPM ``prediction_type`` of the outputs.
        reference_output: ``[B, ...]`` the reference model's output at ``x_t``, for the KL term.

    Returns:
        The loss, its per-sample values and the diagnostics (:class:`NFTLoss`), in float32 at least.

    Example:
        >>> x0, x_t, v = torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, 4)
        >>> out = nft_loss(v, v, x_t, x0, torch.tensor([0.5, 0.5]), torch.tensor([5.0, -5.0]))
        >>> out.optimality, out.per_sample  # x0_hat = 0.5 for both branches: 0.25 / 0.5
        (tensor([1., 0.]), tensor([0.5000, 0.5000]))
    """
    _check_beta(beta)
    if advantages.shape != x0.shape[:1]:
        raise ValueError(f"advantages has shape {list(advantages.shape)}; expected [{x0.shape[0]}] (one per sample)")
    # 1. optimality probability r in [0, 1] from the clipped advantage
    r = optimality_probability(advantages, adv_clip_max)
    # 2. implicit policies v+ = (1 - beta) v_old + beta v_theta, v- = (1 + beta) v_old - beta v_theta
    positive, negative = implicit_policies(model_output, old_output, beta)
    # 3. their clean-sample estimates (affine in the output for every parameterization)
    positive_x0 = clean_estimate(x_t, positive, level, parameterization)
    negative_x0 = clean_estimate(x_t, negative, level, parameterization)
    # 4. self-normalised squared errors ("adaptive weighting")
    positive_loss, positive_weight = self_normalized_error(positive_x0, x0)
    negative_loss, negative_weight = self_normalized_error(negative_x0, x0)
    # 5. r-weighted sum, divided by beta; the optimised loss is scaled by adv_clip_max as in the reference
    r = r.to(positive_loss.dtype)
    per_sample = (r * positive_loss + (1 - r) * negative_loss) / beta
    kl = None if reference_output is None else output_kl(model_output, reference_output.detach())
    return NFTLoss(
        loss=adv_clip_max * per_sample.mean(),
        per_sample=per_sample,
        optimality=r,
        positive_loss=positive_loss,
        negative_loss=negative_loss,
        positive_weight=positive_weight,
        negative_weight=negative_weight,
        kl=kl,
    )
