"""Step kernels: one stochastic denoising step of a sampler, seen as a Gaussian policy.

A policy's sampling loop asks its kernel for the Gaussian of each step given the denoiser's output;
sampling, log-probabilities and exact KLs then follow from
:mod:`lightning_sdrl.functional.gaussian`, the same for every kernel. A kernel owns its diffusers
scheduler, which stays the source of the noise schedule. To add a sampler (a flow-matching SDE, say)
write one class with the four members of :class:`StepKernel`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from diffusers import DDIMScheduler
from torch import Tensor

from lightning_sdrl.functional.ddim import ddim_step_distribution
from lightning_sdrl.functional.gaussian import StepDistribution


@runtime_checkable
class StepKernel(Protocol):
    """What a policy needs of a sampler: its timesteps and the Gaussian of each step.

    Attributes:
        scheduler: the diffusers scheduler holding the noise schedule and, after
            :meth:`set_timesteps`, the inference timesteps (``scheduler.timesteps``, on the CPU).
    """

    scheduler: Any

    def set_timesteps(self, num_steps: int) -> Tensor:
        """Set ``num_steps`` inference steps; returns the timesteps ``[T]`` (on the CPU)."""
        ...

    def is_stochastic(self, step: int, eta: float) -> bool:
        """Whether step ``step`` (an index into the set timesteps) draws noise at noise weight ``eta``.

        A step that does not (``eta = 0``, CPS's last step to sigma 0) has std 0 and no density:
        the sampler takes its mean, stores log-prob 0 and never trains on it.
        """
        ...

    def distribution(self, model_output: Tensor, timestep: Tensor, sample: Tensor, eta: float) -> StepDistribution:
        """The Gaussian of the step from ``sample`` at ``timestep`` (a CPU scalar or ``[B]``).

        Args:
            model_output: ``[B, ...]`` the (guided) denoiser output at ``sample``.
            timestep: the step's timestep: a 0-dim CPU tensor shared by the batch, or one per sample.
            sample: ``[B, ...]`` the current sample ``x_t``.
            eta: the kernel's noise weight (DDIM's ``eta``; an SDE kernel's noise level).
        """
        ...


class DDIMStep:
    """DDIM's step with ``eta > 0`` (Song et al. 2021; DDPO's policy), for a ``DDIMScheduler``.

    Args:
        scheduler: the noise schedule; any diffusers scheduler config is re-read as a
            ``DDIMScheduler`` (a private copy, so ``set_timesteps`` here changes no other object).

    Example:
        >>> import torch
        >>> kernel = DDIMStep(DDIMScheduler(num_train_timesteps=1000))
        >>> kernel.set_timesteps(2)
        tensor([500,   0])
        >>> dist = kernel.distribution(torch.zeros(1, 2), torch.tensor(500), torch.ones(1, 2), eta=1.0)
        >>> dist.mean.shape, dist.std.shape
        (torch.Size([1, 2]), torch.Size([1, 1]))
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = DDIMScheduler.from_config(scheduler.config)

    def set_timesteps(self, num_steps: int) -> Tensor:
        """Set the scheduler's inference timesteps (only if they change); returns them."""
        if self.scheduler.num_inference_steps != num_steps:
            self.scheduler.set_timesteps(num_steps)
        return self.scheduler.timesteps

    def is_stochastic(self, step: int, eta: float) -> bool:
        """Every DDIM step with ``eta > 0`` has positive variance (also the last, see ``ddim_step_distribution``)."""
        return eta > 0

    def distribution(self, model_output: Tensor, timestep: Tensor, sample: Tensor, eta: float) -> StepDistribution:
        """:func:`~lightning_sdrl.functional.ddim.ddim_step_distribution` of the step."""
        return ddim_step_distribution(self.scheduler, model_output, timestep, sample, eta)

    def __repr__(self) -> str:
        return f"DDIMStep({self.scheduler.config.num_train_timesteps} training steps)"
