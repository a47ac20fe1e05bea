"""The forward (noising) process and the model's clean-sample estimate, for flow-matching and DDPM models.

Forward-process RL methods (DiffusionNFT, Advantage Weighted Matching) train on the *pretraining*
objective instead of on sampler steps: they noise a generated sample ``x_0`` afresh,
``x_t = a_t x_0 + b_t eps``, and compare the model's output at ``x_t`` with its training target or
read the clean sample it implies. Both families of models are covered, named by one
:data:`Parameterization` string:

* ``"flow"``: rectified flow (Liu et al. 2022; SD3, Esser et al. 2024, eq. 1 and 3), with
  ``t = sigma`` in ``[0, 1]``: ``x_t = (1 - t) x_0 + t eps``, the network predicts the velocity
  ``v = eps - x_0`` and ``x0_hat = x_t - t v``. A diffusers
  :class:`~diffusers.FlowMatchEulerDiscreteScheduler` has timesteps ``num_train_timesteps * sigma``.
* ``"epsilon"``, ``"v_prediction"``, ``"sample"``: the variance-preserving DDPM process (Ho et al.
  2020, eq. 4) with ``abar_t = alphas_cumprod[t]``: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``,
  and the network predicts ``eps``, ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho
  2022, section 4) or ``x_0`` itself: a diffusers ``DDPMScheduler`` / ``DDIMScheduler``'s
  ``prediction_type``.

Every function takes the noise **level** of each sample: ``sigma`` for ``"flow"`` and ``abar_t``
for the DDPM types (:func:`timestep_to_level` reads it off a scheduler), as a ``[B]`` tensor that
broadcasts over ``[B, C, H, W]`` (or a scalar for the whole batch). The results are in float32, or
float64 for float64 inputs: half-precision inputs are upcast, as in
:mod:`lightning_sdrl.functional.flow_sde`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

__all__ = [
    "DDPMPredictionType",
    "Parameterization",
    "clean_estimate",
    "ddpm_clean_estimate",
    "ddpm_noise",
    "ddpm_target",
    "flow_clean_estimate",
    "flow_noise",
    "flow_target",
    "noise_coefficient",
    "noise_sample",
    "output_kl",
    "parameterization_of",
    "timestep_to_level",
    "training_target",
]

Parameterization = Literal["flow", "epsilon", "v_prediction", "sample"]
"""The forward process and what the network predicts: ``"flow"`` (rectified flow, velocity) or a
DDPM ``prediction_type``."""

DDPMPredictionType = Literal["epsilon", "v_prediction", "sample"]
"""What a DDPM model predicts (a diffusers DDPM scheduler's ``config.prediction_type``)."""

_PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if an input is float64: bf16 / fp16 lose the small differences the losses need."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_same_shape(**tensors: Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {list(tensor.shape)}; expected {list(first.shape)} (the shape of {first_name})"
            )


def _per_sample(level: Tensor | float, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``level`` as a 0-dim tensor or ``[B, 1, ..., 1]``, on ``like``'s device, in ``dtype``."""
    level = torch.as_tensor(level, dtype=dtype, device=like.device)
    if level.ndim == 0:
        return level
    if level.shape != like.shape[:1]:
        raise ValueError(
            f"level has shape {list(level.shape)}; expected a scalar or shape [{like.shape[0]}] (one per sample)"
        )
    return level.view(-1, *([1] * (like.ndim - 1)))


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(f"parameterization={parameterization!r}; expected one of {list(_PARAMETERIZATIONS)}")


# -- rectified flow ------------------------------------------------------------------------------------------------


def flow_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_t = (1 - sigma) x_0 + sigma eps`` (Esser et al. 2024, eq. 3 with ``a_t = 1 - t``, ``b_t = t``).

    Args:
        x0: ``[B, ...]`` clean samples.
        noise: ``[B, ...]`` standard Gaussian noise ``eps``.
        sigma: ``[B]`` (or a scalar) noise levels in ``[0, 1]``.

    Returns:
        ``[B, ...]`` the noised samples, in float32 at least.

    Example:
        >>> flow_noise(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([0.25, 1.0])).flatten()
        tensor([0.2500, 1.0000])
    """
    _check_same_shape(x0=x0, noise=noise)
    dtype = _compute_dtype(x0, noise)
    t = _per_sample(sigma, x0, dtype)
    return (1 - t) * x0.to(dtype) + t * noise.to(dtype)


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity ``v = eps - x_0`` a rectified-flow model is trained to predict, in float32 at least."""
    _check_same_shape(x0=x0, noise=noise)
    dtype = _compute_dtype(x0, noise)
    return noise.to(dtype) - x0.to(dtype)


def flow_clean_estimate(x_t: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """``x0_hat = x_t - sigma v``: where the straight line through ``x_t`` with velocity ``v`` meets ``sigma = 0``.

    It is the Euler step of the ODE from ``sigma`` straight to 0, i.e. a one-step
    ``FlowMatchEulerDiscreteScheduler.step``.

    Example:
        >>> flow_clean_estimate(torch.ones(1, 2), torch.ones(1, 2), 0.5)
        tensor([[0.5000, 0.5000]])
    """
    _check_same_shape(x_t=x_t, velocity=velocity)
    dtype = _compute_dtype(x_t, velocity)
    t = _per_sample(sigma, x_t, dtype)
    return x_t.to(dtype) - t * velocity.to(dtype)


# -- DDPM (variance preserving) --------------------------------------------------------------------------------------


def ddpm_noise(x0: Tensor, noise: Tensor, alphas_cumprod_t: Tensor | float) -> Tensor:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4): ``DDPMScheduler.add_noise``.

    Args:
        x0: ``[B, ...]`` clean samples.
        noise: ``[B, ...]`` standard Gaussian noise ``eps``.
        alphas_cumprod_t: ``[B]`` (or a scalar) ``abar_t = alphas_cumprod[t]`` in ``(0, 1]``.

    Returns:
        ``[B, ...]`` the noised samples, in float32 at least.

    Example:
        >>> ddpm_noise(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0.25]))
        tensor([[0.5000, 0.5000]])
    """
    _check_same_shape(x0=x0, noise=noise)
    dtype = _compute_dtype(x0, noise)
    abar = _per_sample(alphas_cumprod_t, x0, dtype)
    return abar.sqrt() * x0.to(dtype) + (1 - abar).sqrt() * noise.to(dtype)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in get_args(DDPMPredictionType):
        raise ValueError(
            f"prediction_type={prediction_type!r}; expected one of {list(get_args(DDPMPredictionType))} "
            "(a DDPM scheduler's config.prediction_type)"
        )


def ddpm_target(
    x0: Tensor, noise: Tensor, alphas_cumprod_t: Tensor | float, prediction_type: DDPMPredictionType
) -> Tensor:
    """What a DDPM model is trained to predict: ``eps``, ``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` or ``x_0``.

    ``v`` is Salimans & Ho (2022), section 4 (``DDPMScheduler.get_velocity``).

    Example:
        >>> ddpm_target(torch.ones(1, 1), torch.zeros(1, 1), 0.36, "v_prediction")
        tensor([[-0.8000]])
    """
    _check_prediction_type(prediction_type)
    _check_same_shape(x0=x0, noise=noise)
    dtype = _compute_dtype(x0, noise)
    x0, noise = x0.to(dtype), noise.to(dtype)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    abar = _per_sample(alphas_cumprod_t, x0, dtype)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def ddpm_clean_estimate(
    x_t: Tensor, model_output: Tensor, alphas_cumprod_t: Tensor | float, prediction_type: DDPMPredictionType
) -> Tensor:
    """The ``x_0`` a DDPM model's output implies: the ``pred_original_sample`` of ``DDPMScheduler.step``.

    Ho et al. (2020), eq. 15 for ``epsilon``: ``(x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)``;
    ``sqrt(abar) x_t - sqrt(1 - abar) v_hat`` for ``v_prediction``; the output itself for ``sample``.
    No clipping or thresholding (the schedulers' ``clip_sample`` is a sampling heuristic). Each is
    affine in the output, which DiffusionNFT's implicit policies rely on.

    Example:
        >>> ddpm_clean_estimate(torch.ones(1, 1), torch.zeros(1, 1), 0.25, "epsilon")
        tensor([[2.]])
    """
    _check_prediction_type(prediction_type)
    _check_same_shape(x_t=x_t, model_output=model_output)
    dtype = _compute_dtype(x_t, model_output)
    x_t, model_output = x_t.to(dtype), model_output.to(dtype)
    if prediction_type == "sample":
        return model_output
    abar = _per_sample(alphas_cumprod_t, x_t, dtype)
    if prediction_type == "epsilon":
        return (x_t - (1 - abar).sqrt() * model_output) / abar.sqrt()
    return abar.sqrt() * x_t - (1 - abar).sqrt() * model_output


# -- one entry point for both families -----------------------------------------------------------------------------


def noise_sample(x0: Tensor, noise: Tensor, level: Tensor | float, parameterization: Parameterization) -> Tensor:
    """``x_t`` of the forward process: :func:`flow_noise` for ``"flow"``, :func:`ddpm_noise` otherwise.

    ``level`` is ``sigma`` for ``"flow"`` and ``abar_t`` for the DDPM types (:func:`timestep_to_level`).
    """
    _check_parameterization(parameterization)
    if parameterization == "flow":
        return flow_noise(x0, noise, level)
    return ddpm_noise(x0, noise, level)


def training_target(x0: Tensor, noise: Tensor, level: Tensor | float, parameterization: Parameterization) -> Tensor:
    """What the network is trained to output at ``x_t``: :func:`flow_target` or :func:`ddpm_target`."""
    _check_parameterization(parameterization)
    if parameterization == "flow":
        return flow_target(x0, noise)
    return ddpm_target(x0, noise, level, parameterization)


def clean_estimate(
    x_t: Tensor, model_output: Tensor, level: Tensor | float, parameterization: Parameterization
) -> Tensor:
    """The model's clean-sample estimate ``x0_hat``: :func:`flow_clean_estimate` or :func:`ddpm_clean_estimate`.

    Example:
        >>> x_t, output = torch.ones(1, 1), torch.ones(1, 1)
        >>> clean_estimate(x_t, output, 0.5, "flow"), clean_estimate(x_t, output, 0.25, "v_prediction")
        (tensor([[0.5000]]), tensor([[-0.3660]]))
    """
    _check_parameterization(parameterization)
    if parameterization == "flow":
        return flow_clean_estimate(x_t, model_output, level)
    return ddpm_clean_estimate(x_t, model_output, level, parameterization)


def noise_coefficient(level: Tensor | float, parameterization: Parameterization) -> Tensor:
    """The coefficient ``b_t`` of ``eps`` in ``x_t``: ``sigma`` for ``"flow"``, ``sqrt(1 - abar_t)`` otherwise.

    A noise level in ``[0, 1]`` common to both families (0 clean, 1 pure noise), for time weightings.

    Example:
        >>> noise_coefficient(torch.tensor([0.3]), "flow"), noise_coefficient(torch.tensor([0.36]), "epsilon")
        (tensor([0.3000]), tensor([0.8000]))
    """
    _check_parameterization(parameterization)
    level = torch.as_tensor(level)
    level = level.to(_compute_dtype(level))
    return level if parameterization == "flow" else (1 - level).sqrt()


def output_kl(model_output: Tensor, reference_output: Tensor) -> Tensor:
    """``mean over the non-batch dims of (output - reference)^2``: ``[B]``, in float32 at least.

    The "KL" that DiffusionNFT and AWM add to keep a policy near a reference (or EMA) model: the
    squared distance of the two models' predictions at the same ``x_t`` (for Gaussian steps of
    equal std, the KL is this distance up to a timestep-dependent factor).

    Example:
        >>> output_kl(torch.ones(2, 3), torch.zeros(2, 3))
        tensor([1., 1.])
    """
    _check_same_shape(model_output=model_output, reference_output=reference_output)
    dtype = _compute_dtype(model_output, reference_output)
    return (model_output.to(dtype) - reference_output.to(dtype)).pow(2).flatten(1).mean(1)


# -- diffusers schedulers --------------------------------------------------------------------------------------------


def parameterization_of(scheduler: object) -> Parameterization:
    """``"flow"`` for a ``FlowMatchEulerDiscreteScheduler``, else a DDPM scheduler's ``config.prediction_type``.

    Example:
        >>> from diffusers import DDIMScheduler
        >>> parameterization_of(FlowMatchEulerDiscreteScheduler()), parameterization_of(DDIMScheduler())
        ('flow', 'epsilon')
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "flow"
    if not isinstance(getattr(scheduler, "alphas_cumprod", None), Tensor):
        raise ValueError(
            f"scheduler {type(scheduler).__name__} is neither a FlowMatchEulerDiscreteScheduler nor a DDPM "
            "scheduler with alphas_cumprod (DDPMScheduler, DDIMScheduler)"
        )
    prediction_type = scheduler.config.prediction_type
    _check_prediction_type(prediction_type)
    return prediction_type


def timestep_to_level(scheduler: object, timesteps: Tensor) -> Tensor:
    """The noise level of diffusers timesteps: ``timestep / num_train_timesteps`` or ``alphas_cumprod[timestep]``.

    ``FlowMatchEulerDiscreteScheduler.timesteps`` are ``sigmas * num_train_timesteps`` (as the
    DiffusionNFT and AWM reference code divide them by 1000); DDPM timesteps index the training
    schedule's ``alphas_cumprod`` (integers in ``[0, num_train_timesteps)``).

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler``, ``DDPMScheduler`` or ``DDIMScheduler``.
        timesteps: ``[B]`` (or a scalar) timesteps, on any device.

    Returns:
        The levels, shaped like ``timesteps``, on their device, in float32 (float64 for float64
        flow timesteps).

    Example:
        >>> from diffusers import DDPMScheduler
        >>> timestep_to_level(FlowMatchEulerDiscreteScheduler(), torch.tensor([250.0, 1000.0]))
        tensor([0.2500, 1.0000])
        >>> timestep_to_level(DDPMScheduler(), torch.tensor([0]))  # 1 - beta_start
        tensor([0.9999])
    """
    timesteps = torch.as_tensor(timesteps)
    if parameterization_of(scheduler) == "flow":
        return timesteps.to(_compute_dtype(timesteps)) / scheduler.config.num_train_timesteps
    if timesteps.is_floating_point() and not bool((timesteps == timesteps.round()).all()):
        raise ValueError(
            f"timesteps={timesteps.tolist()} are not whole numbers; a DDPM timestep indexes alphas_cumprod"
        )
    index = timesteps.long()
    count = len(scheduler.alphas_cumprod)
    if bool(((index < 0) | (index >= count)).any()):
        raise ValueError(f"timesteps={index.tolist()}; expected integers in [0, {count}) (the training schedule)")
    return scheduler.alphas_cumprod.to(device=index.device, dtype=torch.float32)[index]
