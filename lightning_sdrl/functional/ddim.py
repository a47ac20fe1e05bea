"""One DDIM step seen as a Gaussian policy: its mean, its standard deviation and log-densities.

DDPO (Black et al. 2023) treats every denoising step ``x_t -> x_{t-1}`` of a DDIM sampler with
``eta > 0`` as an action drawn from an isotropic Gaussian whose mean depends on the model. This file
computes that Gaussian for a diffusers :class:`~diffusers.DDIMScheduler`, with one timestep per
sample (so a batch may mix timesteps), and the log-density of a given ``x_{t-1}``; the Gaussian
machinery shared by every step kernel is in :mod:`lightning_sdrl.functional.gaussian`.

Equation numbers refer to Song et al., "Denoising Diffusion Implicit Models" (2021).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from lightning_sdrl.functional.gaussian import StepDistribution, step_with_log_prob

DDIMStepDistribution = StepDistribution
"""The Gaussian ``p(x_{t-1} | x_t)`` of one DDIM step (a :class:`StepDistribution`)."""


def _step_alphas(
    scheduler: DDIMScheduler, timestep: int | Tensor, sample: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``alpha_t`` and ``alpha_{t-1}`` of the mean, then the ``alpha_t`` and ``alpha_{t-1}`` of the variance.

    The variance's pair differs from the mean's only where formula (16) would be zero (see
    :func:`ddim_step_distribution`). For a scalar timestep these are 0-dim CPU tensors (which
    broadcast into device kernels as scalars: no tiny device ops, no synchronisation; pass the
    timestep on the CPU), otherwise ``[B, 1, ..., 1]`` tensors on the sample's device. Both round
    exactly alike, so a step scored in a mixed batch gets the log-prob it was sampled with.
    """
    offset = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    dtype = torch.promote_types(sample.dtype, torch.float32)
    final = float(scheduler.final_alpha_cumprod)
    if not isinstance(timestep, Tensor) or timestep.ndim == 0:
        alphas, t, shape = scheduler.alphas_cumprod.to(dtype), torch.tensor(int(timestep)), ()
    else:
        if timestep.shape != (sample.shape[0],):
            raise ValueError(
                f"timestep has shape {list(timestep.shape)}; expected a scalar or shape [{sample.shape[0]}] "
                "(one timestep per sample)"
            )
        alphas = scheduler.alphas_cumprod.to(device=sample.device, dtype=dtype)
        t, shape = timestep.to(sample.device).long(), (-1, *([1] * (sample.ndim - 1)))
    is_last = (t - offset < 0).reshape(shape)
    alpha_t = alphas[t].reshape(shape)
    alpha_prev = torch.where(is_last, final, alphas[(t - offset).clamp(min=0)].reshape(shape))
    alpha_prev_for_var = torch.where(is_last & (alpha_prev >= 1), alphas[0], alpha_prev)
    # t = 0 has alpha_t = alphas_cumprod[0] = alpha_prev_for_var: no noise level left to step down to
    alpha_t_for_var = torch.where((t == 0).reshape(shape), alphas[1], alpha_t)
    return alpha_t, alpha_prev, alpha_t_for_var, alpha_prev_for_var


def ddim_step_distribution(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float = 1.0,
) -> DDIMStepDistribution:
    """The Gaussian of one DDIM step ``x_t -> x_{t-1}``, with one timestep per sample allowed.

    The mean is what :meth:`diffusers.DDIMScheduler.step` returns before it adds noise, and the
    standard deviation is ``eta * sigma_t`` with ``sigma_t`` from formula (16) of the DDIM paper.

    Where formula (16) is exactly zero the step would be a deterministic map with no density, and
    DDPO could not score it. This happens only at the last step (``t - Δt < 0``), in two cases:

    * ``set_alpha_to_one=True``: ``alpha_{t-1} = 1`` zeroes formula (16). There we take ``sigma_t``
      from formula (16) with ``alpha_{t-1} = alphas_cumprod[0]`` (the value
      ``set_alpha_to_one=False`` uses), the smallest noise level the training schedule defines.
    * ``t = 0`` (the last timestep of ``steps_offset=0`` or ``timestep_spacing="linspace"``), for
      either ``set_alpha_to_one``: ``alpha_t = alphas_cumprod[0]`` is already that smallest noise
      level, so the floor above leaves nothing to step down to. There we take ``sigma_t`` from
      formula (16) for the step ``alphas_cumprod[1] -> alphas_cumprod[0]``, i.e. DDPM's posterior
      variance ``(1 - alphas_cumprod[0]) / (1 - alphas_cumprod[1]) * betas[1]`` (Ho et al. 2020,
      eq. 7, whose indices start at 1): the variance of the lowest-noise step the training
      schedule defines, and exactly the ``sigma_t`` of the last step ``t = 1`` of the
      ``steps_offset=1`` schedule, so both offsets end with the same noise. It is below
      ``1 - alphas_cumprod[0]``, so with ``set_alpha_to_one=False`` the step keeps the marginal
      noise level ``alphas_cumprod[0]`` and only swaps part of the noise for fresh noise.

    In both cases the mean stays aimed at the scheduler's ``alpha_{t-1}`` (``final_alpha_cumprod``)
    through formula (12), with the direction term ``sqrt(1 - alpha_{t-1} - sigma_t^2)`` clamped at
    zero. Every other step is exactly the stock DDIM step; with ``set_alpha_to_one=False`` and
    timesteps that stop before 0 (``"leading"`` with ``steps_offset=1``, or ``"trailing"``), that
    is every step.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` on which ``set_timesteps`` was called.
        model_output: ``[B, ...]`` the denoiser's output (epsilon, sample or v, per the scheduler's
            ``prediction_type``).
        timestep: the current timestep ``t``, a scalar or a ``[B]`` tensor.
        sample: ``[B, ...]`` the current sample ``x_t``.
        eta: DDIM's noise weight in ``[0, 1]``; 1 is DDPM-like sampling, 0 the deterministic
            DDIM step (std 0: a map without a density, for steps that are not trained on).

    Returns:
        The step's mean, standard deviation and predicted ``x_0``, in float32 or float64 (the
        wider of float32 and the inputs' dtype), so that log-densities are not computed in half
        precision.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.num_inference_steps is None; call scheduler.set_timesteps(n) first")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta}; expected 0 <= eta <= 1")
    if scheduler.config.num_train_timesteps < 2:
        raise ValueError(
            f"scheduler.config.num_train_timesteps={scheduler.config.num_train_timesteps}; expected at least 2 "
            "(the variance at t = 0 needs alphas_cumprod[1])"
        )
    if scheduler.config.thresholding:
        raise ValueError(
            "scheduler.config.thresholding=True is not supported by ddim_step_distribution; "
            "build the scheduler with thresholding=False"
        )
    dtype = torch.promote_types(sample.dtype, torch.float32)
    sample, model_output = sample.to(dtype), model_output.to(dtype)
    # 1.-2. alpha_t, alpha_{t-1} = alpha of t - Δt, and the pair the variance uses ("alpha" is the
    # cumulative product, as in the DDIM paper)
    alpha_t, alpha_prev, alpha_t_for_var, alpha_prev_for_var = _step_alphas(scheduler, timestep, sample)
    beta_t = 1 - alpha_t
    # 3. predicted x_0 and epsilon: formula (12)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_eps = model_output
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        pred_eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    else:
        raise ValueError(f"scheduler prediction_type={prediction_type!r} is not supported")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)
    # 4. variance sigma_t^2: formula (16); its alphas differ from the mean's only where it would be
    # zero, at the last step when alpha_{t-1} = 1 or t = 0 (see above)
    variance = (1 - alpha_prev_for_var) / (1 - alpha_t_for_var) * (1 - alpha_t_for_var / alpha_prev_for_var)
    std = eta * variance.sqrt()
    # 5. mean: "x_0 direction" + "x_t direction" of formula (12)
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * pred_eps
    mean = alpha_prev.sqrt() * pred_x0 + direction
    if std.ndim == 0:
        std = torch.full([1] * sample.ndim, std.item(), device=sample.device, dtype=dtype)
    return DDIMStepDistribution(mean=mean, std=std, pred_original_sample=pred_x0)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step that also returns the log-probability of the step taken.

    ``log_prob`` is the Gaussian log-density of ``prev_sample`` under
    :func:`ddim_step_distribution`, **averaged over the non-batch dimensions** (the convention of
    ddpo-pytorch, so its clip ranges carry over). With ``prev_sample`` given, nothing is sampled and
    the log-probability of that sample is returned (how DDPO re-scores stored trajectories).

    Args:
        scheduler: a diffusers ``DDIMScheduler`` on which ``set_timesteps`` was called.
        model_output: ``[B, ...]`` the denoiser's (guided) output at ``sample``.
        timestep: the current timestep, a scalar or a ``[B]`` tensor (one per sample).
        sample: ``[B, ...]`` the current sample ``x_t``.
        eta: DDIM noise weight in ``(0, 1]``.
        prev_sample: ``[B, ...]`` an ``x_{t-1}`` to score instead of sampling one.
        generator: random generator(s) for the noise (ignored when ``prev_sample`` is given).

    Returns:
        ``(prev_sample, log_prob)``: ``prev_sample`` has the dtype of ``sample``; ``log_prob`` is
        ``[B]`` in float32 (or float64 for float64 inputs).
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta={eta}; expected 0 < eta <= 1 (eta = 0 is deterministic DDIM: no density)")
    dist = ddim_step_distribution(scheduler, model_output, timestep, sample, eta)
    return step_with_log_prob(dist, sample, prev_sample, generator)
