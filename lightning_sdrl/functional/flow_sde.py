"""One step of a flow-matching sampler made stochastic, seen as a Gaussian policy (Flow-GRPO, CPS).

A rectified-flow model (Stable Diffusion 3, Flux) is trained on ``x_t = (1 - t) x_0 + t eps`` and
predicts the velocity ``v = eps - x_0``; its sampler integrates the ODE ``dx = v dt`` from ``t = 1``
(noise) to ``t = 0`` (data), which has no density per step and so cannot be scored like DDPO's DDIM
steps. Two stochastic replacements with the same marginals ``p_t`` are computed here, for a diffusers
:class:`~diffusers.FlowMatchEulerDiscreteScheduler` (``t`` is its ``sigma``; its timesteps are
``1000 t``):

* **Flow-GRPO's SDE** (Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", 2025,
  arXiv:2505.05470, eq. (8)-(9)). For the linear path the score is
  ``grad log p_t(x) = -(x + (1 - t) v) / t``, so the reverse-time SDE

      ``dx = [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t dw``

  has, for any ``sigma_t``, the marginals of the ODE (the Fokker-Planck equation gains
  ``sigma_t^2 / 2`` times the score term and loses it in the diffusion term). Flow-GRPO takes
  ``sigma_t = a sqrt(t / (1 - t))`` with the noise level ``a`` (0.7 by default) and one
  Euler-Maruyama step from ``t`` to the next sigma ``s`` (``dt = s - t < 0``): a Gaussian with mean
  ``x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt`` and std ``sigma_t sqrt(-dt)``. The
  discretisation keeps the marginal noise level only to first order in ``dt``.
* **Coefficients-preserving sampling** (Wang & Yu, "Coefficients-Preserving Sampling for
  Reinforcement Learning with Flow Matching", 2025, arXiv:2509.05952). From the predictions
  ``x0_hat = x - t v`` and ``eps_hat = x + (1 - t) v`` it draws
  ``x_prev = (1 - s) x0_hat + sqrt(s^2 - std^2) eps_hat + std * noise`` with
  ``std = s sin(a pi / 2)``: with exact predictions the sample is again ``(1 - s) x_0`` plus noise
  of variance exactly ``s^2``, the marginal at ``s`` for every step size.

With ``a = 0`` both are the deterministic Euler step ``x + (s - t) v`` of the ODE (std 0, no
density), which Flow-GRPO uses for the steps outside its stochastic window. The Gaussian machinery
shared with the other step kernels (sampling, log-densities averaged over dimensions) is in
:mod:`lightning_sdrl.functional.gaussian`.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from lightning_sdrl.functional.gaussian import StepDistribution, step_with_log_prob


def _step_index(scheduler: FlowMatchEulerDiscreteScheduler, timestep: float | Tensor, sample: Tensor) -> Tensor:
    """The position of each timestep in ``scheduler.timesteps``: a 0-dim CPU tensor or ``[B]`` on the sample's device.

    A scalar is matched on the CPU (pass it on the CPU: no device synchronisation). Per-sample
    timesteps are matched on the sample's device; checking that all are in the schedule reads one
    boolean back from it.
    """
    # a fresh FlowMatchEulerDiscreteScheduler has no num_inference_steps until set_timesteps
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler has no inference timesteps; call scheduler.set_timesteps(n) first")
    if scheduler.config.invert_sigmas:
        raise ValueError(
            "scheduler.config.invert_sigmas=True (sigmas rising from 0 to 1) is not supported; "
            "build the scheduler with invert_sigmas=False"
        )
    schedule = scheduler.timesteps
    if not isinstance(timestep, Tensor) or timestep.ndim == 0:
        matches = (schedule.cpu() == float(timestep)).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep={float(timestep)} is not one of scheduler.timesteps; pass a value from "
                "scheduler.timesteps (after scheduler.set_timesteps(n))"
            )
        return matches[0, 0]
    if timestep.shape != (sample.shape[0],):
        raise ValueError(
            f"timestep has shape {list(timestep.shape)}; expected a scalar or shape [{sample.shape[0]}] "
            "(one timestep per sample)"
        )
    schedule = schedule.to(sample.device)
    matches = timestep.to(device=sample.device, dtype=schedule.dtype)[:, None] == schedule
    found = matches.any(dim=1)
    if not bool(found.all()):
        missing = timestep[~found.to(timestep.device)].tolist()
        raise ValueError(
            f"timesteps {missing} are not in scheduler.timesteps; pass values from scheduler.timesteps "
            "(after scheduler.set_timesteps(n))"
        )
    return matches.int().argmax(dim=1)


def _step_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, timestep: float | Tensor, sample: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The current sigma ``t``, the next sigma ``s`` and ``sigmas[1]`` (for ``t = 1``), in the compute dtype.

    For a scalar timestep these are 0-dim CPU tensors (which broadcast into device kernels as
    scalars: no tiny device ops), otherwise ``[B, 1, ..., 1]`` tensors on the sample's device. Both
    round exactly alike, so a step scored in a mixed batch gets the log-prob it was sampled with.
    """
    dtype = torch.promote_types(sample.dtype, torch.float32)
    index = _step_index(scheduler, timestep, sample)
    if index.ndim == 0:
        sigmas, shape = scheduler.sigmas.cpu().to(dtype), ()
    else:
        sigmas, shape = scheduler.sigmas.to(device=sample.device, dtype=dtype), (-1, *([1] * (sample.ndim - 1)))
    return sigmas[index].reshape(shape), sigmas[index + 1].reshape(shape), sigmas[1]


def _broadcastable_std(std: Tensor, sample: Tensor) -> Tensor:
    """A 0-dim CPU std as a ``[1, ..., 1]`` tensor on the sample's device (a fill, not a copy)."""
    if std.ndim == 0:
        return torch.full([1] * sample.ndim, std.item(), device=sample.device, dtype=std.dtype)
    return std


def _upcast(model_output: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output has shape {list(model_output.shape)}; expected {list(sample.shape)} (the sample's)"
        )
    # bf16 overflows and loses the log-density; compute in float32 at least
    dtype = torch.promote_types(sample.dtype, torch.float32)
    return model_output.to(dtype), sample.to(dtype)


def flow_sde_step_distribution(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: Tensor,
    timestep: float | Tensor,
    sample: Tensor,
    noise_level: float = 0.7,
) -> StepDistribution:
    """The Gaussian of one step of Flow-GRPO's reverse SDE (Liu et al. 2025, eq. (9)).

    With ``t`` the current sigma, ``s`` the next one and ``dt = s - t``: mean
    ``x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt`` and std ``sigma_t sqrt(-dt)``, where
    ``sigma_t = noise_level * sqrt(t / (1 - t))``. At ``t = 1`` (the first sigma of SD3's shifted
    schedule) ``sigma_t`` would be infinite; there the ``1 - t`` under the root uses the second
    sigma ``scheduler.sigmas[1]`` instead, as the reference implementation (flow_grpo) does, which
    makes the first step's std exactly ``noise_level``.

    Args:
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` on which ``set_timesteps`` was
            called.
        model_output: ``[B, ...]`` the predicted velocity ``v`` at ``sample``.
        timestep: the current timestep: a scalar (a python number or 0-dim tensor, best on the CPU)
            or a ``[B]`` tensor, each one of ``scheduler.timesteps``.
        sample: ``[B, ...]`` the current sample ``x_t``.
        noise_level: ``a >= 0``; 0 gives the deterministic Euler step of the ODE (std 0).

    Returns:
        The step's mean, std (``[1, ..., 1]`` or ``[B, 1, ..., 1]``) and predicted ``x_0 = x - t v``,
        in float32 or float64 (the wider of float32 and the inputs' dtype).

    Example:
        >>> scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        >>> scheduler.set_timesteps(10)
        >>> x, v = torch.ones(1, 4), torch.zeros(1, 4)
        >>> flow_sde_step_distribution(scheduler, v, scheduler.timesteps[0], x, noise_level=0.7).std
        tensor([[0.7000]])
    """
    if not noise_level >= 0:
        raise ValueError(f"noise_level={noise_level}; expected noise_level >= 0 (0 is the deterministic ODE step)")
    model_output, sample = _upcast(model_output, sample)
    # 1. current sigma t, next sigma s and the step dt < 0
    t, s, second_sigma = _step_sigmas(scheduler, timestep, sample)
    dt = s - t
    # 2. noise scale sigma_t = a sqrt(t / (1 - t)), with sigmas[1] in place of t = 1 (eq. (9))
    sigma_t = noise_level * (t / (1 - torch.where(t == 1, second_sigma, t))).sqrt()
    # 3. the drift: velocity plus sigma_t^2 / 2 times the score -(x + (1 - t) v) / t (eq. (8))
    mean = sample + (model_output + sigma_t**2 / (2 * t) * (sample + (1 - t) * model_output)) * dt
    # 4. Euler-Maruyama noise sigma_t dw with dw ~ N(0, -dt)
    std = sigma_t * (-dt).sqrt()
    pred_x0 = sample - t * model_output
    return StepDistribution(mean=mean, std=_broadcastable_std(std, sample), pred_original_sample=pred_x0)


def flow_sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: Tensor,
    timestep: float | Tensor,
    sample: Tensor,
    noise_level: float = 0.7,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of Flow-GRPO's SDE that also returns the log-probability of the step taken.

    ``log_prob`` is the Gaussian log-density of ``prev_sample`` under
    :func:`flow_sde_step_distribution`, averaged over the non-batch dimensions (as in
    :func:`~lightning_sdrl.functional.gaussian.gaussian_log_prob`). With ``prev_sample`` given,
    nothing is sampled and the log-probability of that sample is returned (how a stored trajectory
    is re-scored).

    Args:
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` on which ``set_timesteps`` was
            called.
        model_output: ``[B, ...]`` the predicted velocity at ``sample``.
        timestep: the current timestep, a scalar or a ``[B]`` tensor of values in
            ``scheduler.timesteps``.
        sample: ``[B, ...]`` the current sample ``x_t``.
        noise_level: the SDE's noise level ``a > 0`` (0 has no density).
        prev_sample: ``[B, ...]`` a sample at the next sigma to score instead of sampling one.
        generator: random generator(s) for the noise (ignored when ``prev_sample`` is given).

    Returns:
        ``(prev_sample, log_prob)``: ``prev_sample`` has the dtype of ``sample``; ``log_prob`` is
        ``[B]`` in float32 (or float64 for float64 inputs).
    """
    if not noise_level > 0:
        raise ValueError(
            f"noise_level={noise_level}; expected noise_level > 0 (noise_level = 0 is the deterministic ODE step, "
            "which has no density: use flow_sde_step_distribution(...).mean)"
        )
    dist = flow_sde_step_distribution(scheduler, model_output, timestep, sample, noise_level)
    return step_with_log_prob(dist, sample, prev_sample, generator)


def cps_step_distribution(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: Tensor,
    timestep: float | Tensor,
    sample: Tensor,
    noise_level: float = 0.7,
) -> StepDistribution:
    """The Gaussian of one coefficients-preserving step (Wang & Yu 2025, CPS).

    With ``t`` the current sigma and ``s`` the next one: ``x0_hat = x - t v``,
    ``eps_hat = x + (1 - t) v``, std ``s sin(noise_level pi / 2)`` and mean
    ``(1 - s) x0_hat + sqrt(s^2 - std^2) eps_hat``: the signal coefficient ``1 - s`` and the total
    noise variance ``s^2`` of the marginal at ``s`` are kept exactly.

    The last step goes to ``s = 0``, so its std is 0: it is the deterministic map to ``x0_hat`` and
    has no density. Score only the steps before it (e.g. a stochastic window that ends earlier).

    Args:
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` on which ``set_timesteps`` was
            called.
        model_output: ``[B, ...]`` the predicted velocity ``v`` at ``sample``.
        timestep: the current timestep, a scalar (best on the CPU) or a ``[B]`` tensor of values in
            ``scheduler.timesteps``.
        sample: ``[B, ...]`` the current sample ``x_t``.
        noise_level: ``a`` in ``[0, 1]``: the fraction (in angle) of the next noise that is fresh;
            0 is the deterministic Euler step of the ODE, 1 replaces all of it.

    Returns:
        The step's mean, std (``[1, ..., 1]`` or ``[B, 1, ..., 1]``) and ``x0_hat``, in float32 or
        float64 (the wider of float32 and the inputs' dtype).

    Example:
        >>> scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        >>> scheduler.set_timesteps(sigmas=[1.0, 0.5])  # two steps: 1 -> 0.5 -> 0
        >>> x, v = torch.ones(1, 2), torch.ones(1, 2)
        >>> cps_step_distribution(scheduler, v, scheduler.timesteps[0], x, noise_level=0.5).std  # 0.5 sin(pi / 4)
        tensor([[0.3536]])
    """
    if not 0 <= noise_level <= 1:
        raise ValueError(f"noise_level={noise_level}; expected 0 <= noise_level <= 1 (std = s sin(noise_level pi / 2))")
    model_output, sample = _upcast(model_output, sample)
    # 1. current sigma t and next sigma s
    t, s, _ = _step_sigmas(scheduler, timestep, sample)
    # 2. predicted data and noise: x_t = (1 - t) x_0 + t eps with v = eps - x_0
    pred_x0 = sample - t * model_output
    pred_eps = sample + (1 - t) * model_output
    # 3. fresh noise std = s sin(a pi / 2); the kept noise sqrt(s^2 - std^2) = s cos(a pi / 2), written
    # so that rounding can never make the root's argument negative
    std = s * math.sin(noise_level * math.pi / 2)
    mean = (1 - s) * pred_x0 + s * math.cos(noise_level * math.pi / 2) * pred_eps
    return StepDistribution(mean=mean, std=_broadcastable_std(std, sample), pred_original_sample=pred_x0)
