"""Higher-order deterministic ODE solvers for rollouts that keep only final samples.

DiffusionNFT and Advantage Weighted Matching train on freshly noised copies of the generated
samples, not on the sampler's steps, so their rollouts may be drawn with any solver (DiffusionNFT's
paper samples SD3.5 with DPM-Solver). :func:`solver_scheduler` builds diffusers'
``DPMSolverMultistepScheduler`` (DPM-Solver++, Lu et al. 2022) or ``UniPCMultistepScheduler``
(Zhao et al. 2023) over the noise schedule of a policy's step kernel, and :func:`denoiser_timesteps`
says what timestep the denoiser is called with at each of its steps.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

__all__ = ["ODESolver", "Solver", "denoiser_timesteps", "solver_scheduler"]

ODESolver = Literal["dpmsolver++", "unipc"]
"""diffusers' multistep ODE solvers: ``"dpmsolver++"`` (2nd-order DPM-Solver++) and ``"unipc"`` (UniPC, bh2)."""

Solver = Literal["kernel", ODESolver]
"""How :meth:`~lightning_sdrl.policies.base.DiffusionPolicy.generate` samples: ``"kernel"`` runs the
policy's own step kernel (its ``eta``; 0 is the kernel's ODE), the others an :data:`ODESolver`."""

_SOLVER_CLASSES: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}

# Options of a FlowMatchEulerDiscreteScheduler that change its sigmas in ways the solvers' flow
# sigmas (a fixed ``shift`` of linear sigmas) do not reproduce.
_FLOW_SCHEDULE_OPTIONS = (
    "shift_terminal",
    "invert_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
)


def _check_solver(name: str) -> None:
    if name not in _SOLVER_CLASSES:
        raise ValueError(f"solver={name!r}; expected one of {list(get_args(Solver))}")


def solver_scheduler(scheduler: Any, name: ODESolver) -> SchedulerMixin:
    """A fresh diffusers solver scheduler over ``scheduler``'s noise schedule.

    * DDPM-family schedules (``DDIMScheduler``, ``DDPMScheduler``: anything with ``alphas_cumprod``):
      the solver is built ``from_config`` of the same configuration (betas, ``prediction_type``,
      timestep spacing kept), as a pipeline's ``Solver.from_config(pipe.scheduler.config)`` does.
    * ``FlowMatchEulerDiscreteScheduler``: the solvers' flow mode, ``use_flow_sigmas=True``,
      ``prediction_type="flow_prediction"`` (the network predicts the velocity) and
      ``flow_shift`` = the scheduler's ``shift``, over its ``num_train_timesteps``.

    Args:
        scheduler: the noise schedule (a step kernel's ``scheduler``).
        name: ``"dpmsolver++"`` or ``"unipc"``.

    Returns:
        A new scheduler; call its ``set_timesteps(num_steps)`` before stepping.

    Raises:
        ValueError: an unknown ``name``; a flow scheduler with dynamic shifting or another sigma
            option the solvers cannot follow; a scheduler of neither family.

    Example:
        >>> from diffusers import DDIMScheduler
        >>> solver = solver_scheduler(DDIMScheduler(prediction_type="v_prediction"), "dpmsolver++")
        >>> type(solver).__name__, solver.config.prediction_type
        ('DPMSolverMultistepScheduler', 'v_prediction')
        >>> solver_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), "unipc").config.flow_shift
        3.0
    """
    _check_solver(name)
    solver_class, options = _SOLVER_CLASSES[name]
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        config = scheduler.config
        if config.get("use_dynamic_shifting", False):
            raise ValueError(
                f"solver={name!r}: the flow scheduler has use_dynamic_shifting=True, whose shift depends on the image "
                "resolution (mu in set_timesteps); build the scheduler with use_dynamic_shifting=False and a fixed "
                "shift, or use solver='kernel'"
            )
        unsupported = {option: config[option] for option in _FLOW_SCHEDULE_OPTIONS if config.get(option)}
        if unsupported:
            raise ValueError(
                f"solver={name!r}: the flow scheduler sets {unsupported}, which the solver's flow sigmas (a fixed "
                "shift of linear sigmas) do not reproduce; build the scheduler without them, or use solver='kernel'"
            )
        return solver_class(
            num_train_timesteps=config.num_train_timesteps,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=config.shift,
            **options,
        )
    if not isinstance(getattr(scheduler, "alphas_cumprod", None), Tensor):
        raise ValueError(
            f"solver={name!r} needs a DDPM-family scheduler (with alphas_cumprod, e.g. DDIMScheduler) or a "
            f"FlowMatchEulerDiscreteScheduler; the kernel's scheduler is {type(scheduler).__name__}: "
            "use solver='kernel'"
        )
    return solver_class.from_config(scheduler.config, **options)


def denoiser_timesteps(solver: SchedulerMixin) -> Tensor:
    """The timestep to call the denoiser with at each step of ``solver`` (after its ``set_timesteps``).

    DDPM-family: the solver's ``timesteps`` (indices into the training schedule, as the UNet was
    trained). Flow: ``sigma * num_train_timesteps`` as a float, the units and precision of
    ``FlowMatchEulerDiscreteScheduler.timesteps`` that an SD3 transformer expects; the solvers' own
    ``timesteps`` are these values truncated to integers (up to ``1 / num_train_timesteps`` of
    sigma lost), while their steps use the exact sigmas.

    Example:
        >>> solver = solver_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), "dpmsolver++")
        >>> solver.set_timesteps(2)
        >>> solver.timesteps, denoiser_timesteps(solver)
        (tensor([999, 749]), tensor([999.6664, 749.6248]))
    """
    if solver.config.get("use_flow_sigmas", False):
        return solver.sigmas[:-1] * solver.config.num_train_timesteps
    return solver.timesteps
