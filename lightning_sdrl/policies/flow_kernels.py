"""Step kernels for flow-matching models: Flow-GRPO's SDE step and the coefficients-preserving step.

Both turn the Euler ODE sampler of a rectified-flow model (Stable Diffusion 3, Flux) into a
Gaussian policy with the ODE's marginals; the math is in :mod:`lightning_sdrl.functional.flow_sde`.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from lightning_sdrl.functional.flow_schedule import flux_sigmas
from lightning_sdrl.functional.flow_sde import cps_step_distribution, flow_sde_step_distribution
from lightning_sdrl.functional.gaussian import StepDistribution

FlowSDEVariant = Literal["sde", "cps"]
"""``"sde"``: Flow-GRPO's reverse SDE (Liu et al. 2025); ``"cps"``: coefficients-preserving sampling
(Wang & Yu 2025)."""

_DISTRIBUTIONS = {"sde": flow_sde_step_distribution, "cps": cps_step_distribution}


class FlowSDEStep:
    """A stochastic step of a flow-matching sampler (Flow-GRPO's policy), for ``FlowMatchEulerDiscreteScheduler``.

    ``eta`` in :meth:`distribution` is the noise level: ``a >= 0`` of ``sigma_t = a sqrt(t / (1 - t))``
    for ``"sde"`` (Flow-GRPO uses 0.7), ``a`` in ``[0, 1]`` of ``std = s sin(a pi / 2)`` for ``"cps"``;
    0 is the deterministic Euler step (for steps outside a stochastic window).

    Args:
        scheduler: the noise schedule; its config is re-read as a ``FlowMatchEulerDiscreteScheduler``
            (a private copy, so ``set_timesteps`` here changes no other object).
        variant: ``"sde"`` (Flow-GRPO's reverse SDE) or ``"cps"`` (coefficients-preserving
            sampling, whose last step, to sigma 0, is deterministic).
        mu: the resolution-dependent shift of a scheduler with ``use_dynamic_shifting`` (FLUX.1:
            :func:`~lightning_sdrl.functional.flow_schedule.resolution_shift` of the image's latent
            tokens); the sampling sigmas are then FLUX.1's ``linspace(1, 1 / n, n)`` shifted by it,
            as ``FluxPipeline`` sets them. Required exactly when the scheduler shifts dynamically.

    Example:
        >>> import torch
        >>> kernel = FlowSDEStep(FlowMatchEulerDiscreteScheduler(shift=3.0))
        >>> kernel.set_timesteps(2)
        tensor([1000.0000,    8.9286])
        >>> dist = kernel.distribution(torch.zeros(1, 2), torch.tensor(1000.0), torch.ones(1, 2), eta=0.7)
        >>> dist.mean.shape, dist.std
        (torch.Size([1, 2]), tensor([[0.7000]]))
    """

    def __init__(self, scheduler: Any, variant: FlowSDEVariant = "sde", mu: float | None = None) -> None:
        if variant not in _DISTRIBUTIONS:
            raise ValueError(f"variant={variant!r}; expected one of {list(get_args(FlowSDEVariant))}")
        dynamic = bool(scheduler.config.get("use_dynamic_shifting", False))
        if dynamic and mu is None:
            raise ValueError(
                "scheduler.config.use_dynamic_shifting=True needs the resolution-dependent shift: pass "
                "mu=resolution_shift(image_seq_len, scheduler.config) (lightning_sdrl.functional.flow_schedule), "
                "or build the scheduler with use_dynamic_shifting=False and a fixed shift"
            )
        if not dynamic and mu is not None:
            raise ValueError(
                f"mu={mu} is read only by a scheduler with use_dynamic_shifting=True; this one has a fixed "
                f"shift ({scheduler.config.get('shift')}): drop mu"
            )
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.variant = variant
        self.mu = mu

    def set_timesteps(self, num_steps: int) -> Tensor:
        """Set the scheduler's inference timesteps (only if they change); returns them (on the CPU)."""
        # a fresh FlowMatchEulerDiscreteScheduler has no num_inference_steps until set_timesteps
        if getattr(self.scheduler, "num_inference_steps", None) != num_steps:
            if self.mu is None:
                self.scheduler.set_timesteps(num_steps)
            else:  # FluxPipeline's: unshifted linspace(1, 1 / n, n), shifted by mu
                self.scheduler.set_timesteps(sigmas=flux_sigmas(num_steps).tolist(), mu=self.mu)
        return self.scheduler.timesteps

    def is_stochastic(self, step: int, eta: float) -> bool:
        """``eta > 0``, except CPS's step to sigma 0 (std ``0 * sin(...)``); the SDE's last step has noise."""
        return eta > 0 and (self.variant == "sde" or float(self.scheduler.sigmas[step + 1]) > 0)

    def distribution(self, model_output: Tensor, timestep: Tensor, sample: Tensor, eta: float) -> StepDistribution:
        """The step's Gaussian, with ``noise_level=eta``.

        :func:`~lightning_sdrl.functional.flow_sde.flow_sde_step_distribution` for ``"sde"``,
        :func:`~lightning_sdrl.functional.flow_sde.cps_step_distribution` for ``"cps"``.
        """
        return _DISTRIBUTIONS[self.variant](self.scheduler, model_output, timestep, sample, eta)

    def __repr__(self) -> str:
        shift = f"mu={self.mu}" if self.mu is not None else f"shift={self.scheduler.config.shift}"
        return f"FlowSDEStep(variant={self.variant!r}, {shift})"
