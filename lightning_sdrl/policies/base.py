"""A diffusion model seen as a policy: sample trajectories with log-probs, re-score their steps.

:class:`DiffusionPolicy` is the one interface DDPO and ReFL train. A subclass says how to turn
prompts into conditioning, how to run its denoiser and how to decode a final sample into images;
the sampling loop, classifier-free guidance (batched into one denoiser call) and step
log-probabilities live here once. The step itself is the policy's :class:`~.kernels.StepKernel`
(DDIM by default), and conditioning is a :class:`~.conditioning.Conditioning` of named tensors.

Performance options shared by every policy: frozen weights in reduced precision (``torch_dtype`` of
the subclasses) with the trained parameters kept in float32, and a ``torch.compile``-d denoiser
call (``compile``; the module itself is not wrapped, so state-dict keys and saved weights are
unchanged).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from lightning_sdrl.functional.forward_process import Parameterization, parameterization_of, timestep_to_level
from lightning_sdrl.functional.gaussian import StepDistribution, gaussian_log_prob, sample_step
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.kernels import StepKernel
from lightning_sdrl.policies.loading import load_component
from lightning_sdrl.policies.lora import (
    LORA_WEIGHTS_FILE,
    LoRASettings,
    load_lora_weights,
    lora_disabled,
    read_lora_weights,
    save_lora_weights,
    settings_hint,
)
from lightning_sdrl.policies.samples import Samples, cat_rows, select_rows
from lightning_sdrl.policies.solvers import ODESolver, Solver, denoiser_timesteps, solver_scheduler

log = logging.getLogger("lightning_sdrl")

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""``torch.compile`` modes of the denoiser call (``True`` is ``"default"``)."""


def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # Compiled once per mode for every denoiser: the module is an argument (dynamo guards on it), so
    # no compiled state lives inside the module (deep copies, state_dict and save_pretrained see none).
    return module(*args, **kwargs)


@functools.cache
def compiled_module_call(mode: CompileMode) -> Callable[..., Any]:
    """``torch.compile`` of ``module(*args, **kwargs)`` in ``mode``, one graph per input shape and grad mode.

    ``dynamic=False``: the sampling batch, the training batch and a last partial batch each get
    their own static graph, compiled at their first call; timesteps are ``[B]`` tensors, so a new
    step never recompiles.
    """
    return torch.compile(_call_module, mode=None if mode == "default" else mode, dynamic=False)


def cast_frozen_weights(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Cast ``module``'s floating-point weights to ``dtype`` in place, keeping its float32 modules float32.

    The modules ``from_pretrained(..., torch_dtype=...)`` would keep in float32 stay in float32: a
    diffusers model's ``_keep_in_fp32_modules``; a transformers model's ``_keep_in_fp32_modules_strict``
    and, under float16 only, its ``_keep_in_fp32_modules`` (T5's ``wo`` projections).
    ``dtype=None`` leaves the module unchanged.

    Example:
        >>> cast_frozen_weights(nn.Linear(2, 2), torch.bfloat16).weight.dtype
        torch.bfloat16
    """
    if dtype is None:
        return module
    keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16 or not hasattr(module, "_keep_in_fp32_modules_strict"):  # not a transformers model
        keep |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            kept = any(part in name.split(".") for part in keep)
            tensor.data = tensor.data.to(torch.float32 if kept else dtype)
    return module


@dataclass
class Trajectory:
    """Sampled denoising trajectories of a batch.

    Attributes:
        latents: ``[B, T+1, C, H, W]`` every sample ``x_T, ..., x_0`` of the chain.
        timesteps: ``[B, T]`` the timestep of each step (step ``j`` maps ``latents[:, j]`` to
            ``latents[:, j + 1]``).
        log_probs: ``[B, T]`` log-probability of each step under the sampling policy (averaged
            over latent dimensions, see :func:`~lightning_sdrl.functional.ddim_step_with_logprob`).
        conditions: the policy's :class:`Conditioning` of each sample (prompt embeddings, class
            labels, ...; ``B`` rows).
        prompt_ids: ``[B]`` index of each sample's prompt in the prompt source.
        prompts: the ``B`` prompts.
        images: ``[B, 3, H, W]`` decoded final samples in ``[0, 1]``.
        means: ``[B, T, C, H, W]`` mean of each step's Gaussian under the sampling policy, kept
            only when asked for (an exact KL trust region needs it).
        stochastic: ``[B, T]`` bool, which steps were sampled from their Gaussian (the others ran
            deterministically, e.g. the ODE outside Flow-GRPO-Fast's SDE window: their log-prob is
            stored as 0 and they must not be trained on). ``None``: every step is stochastic.
    """

    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor
    conditions: Conditioning
    prompt_ids: Tensor
    prompts: list[str]
    images: Tensor
    means: Tensor | None = None
    stochastic: Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        """Number of denoising steps ``T``."""
        return self.timesteps.shape[1]

    def stochastic_mask(self) -> Tensor:
        """``[B, T]`` bool: the steps with a log-prob (all of them when :attr:`stochastic` is ``None``)."""
        if self.stochastic is None:
            return torch.ones(self.timesteps.shape, dtype=torch.bool, device=self.timesteps.device)
        return self.stochastic

    def select(self, index: Tensor) -> Trajectory:
        """The trajectories at ``index`` (a ``[N]`` long tensor), in that order."""
        return Trajectory(**{field.name: select_rows(getattr(self, field.name), index) for field in fields(self)})

    @staticmethod
    def cat(trajectories: list[Trajectory]) -> Trajectory:
        """Concatenate trajectories along the batch dimension."""
        if not trajectories:
            raise ValueError("Trajectory.cat got an empty list")
        return Trajectory(
            **{field.name: cat_rows([getattr(t, field.name) for t in trajectories]) for field in fields(Trajectory)}
        )


class _KernelRun(NamedTuple):
    """What :meth:`DiffusionPolicy._kernel_loop` returns: the final sample and, when kept, the steps'."""

    final: Tensor
    latents: list[Tensor]
    log_probs: list[Tensor]
    means: list[Tensor]


class StoredSteps(NamedTuple):
    """``N`` stored denoising steps ``x_t -> x_{t-1}`` gathered from trajectories (for re-scoring).

    Attributes:
        sample: ``[N, C, H, W]`` the samples ``x_t``.
        timesteps: ``[N]`` their timesteps.
        conditions: the conditioning of each row (``N`` rows).
        next_sample: ``[N, C, H, W]`` the stored ``x_{t-1}``.
    """

    sample: Tensor
    timesteps: Tensor
    conditions: Conditioning
    next_sample: Tensor


class DiffusionPolicy(nn.Module, abc.ABC):
    """A conditional diffusion model sampled with a stochastic step kernel, whose step log-probs can be recomputed.

    Subclasses set the trained denoiser as the attribute named by :attr:`denoiser_name`
    (``self.unet`` by default; ``self.transformer`` for diffusion transformers) and ``self.kernel``
    (a :class:`~.kernels.StepKernel`, e.g. ``DDIMStep(scheduler)``), implement the abstract
    methods, and call the denoiser through :meth:`run_denoiser` (which compiles it when asked).

    Args:
        lora: LoRA settings for the denoiser; ``None`` fine-tunes all its weights.
        gradient_checkpointing: recompute denoiser activations in the backward pass.
        compile: ``torch.compile`` the denoiser call for sampling and training (``True`` or a
            :data:`CompileMode`); ``False`` runs it eagerly. Where compilation is unavailable
            (no dynamo on this platform, a backend that fails) one warning is logged and the
            denoiser runs eagerly.
    """

    kernel: StepKernel
    denoiser_name: str = "unet"
    """Attribute, pipeline component and ``save_trained`` subfolder of the denoiser (also the LoRA keys' prefix)."""

    def __init__(
        self,
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__()
        if compile is not False and compile is not True and compile not in get_args(CompileMode):
            raise ValueError(
                f"compile={compile!r}; expected true, false or a torch.compile mode {list(get_args(CompileMode))}"
            )
        self.lora = lora
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_mode: CompileMode | None = "default" if compile is True else (compile or None)
        if self.compile_mode is not None and not torch._dynamo.is_dynamo_supported():
            self._compile_unavailable("torch._dynamo is not supported on this platform")

    # ----------------------------------------------------------------- subclass interface
    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning for each prompt (``B`` rows)."""

    @abc.abstractmethod
    def null_condition(self, batch_size: int) -> Conditioning:
        """The unconditional conditioning for classifier-free guidance (``batch_size`` rows)."""

    @abc.abstractmethod
    def denoise(self, sample: Tensor, timesteps: Tensor, conditions: Conditioning) -> Tensor:
        """The denoiser's raw output at ``sample`` (``timesteps`` is ``[B]``)."""

    @abc.abstractmethod
    def decode(self, sample: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from final samples ``x_0``."""

    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample ``x_t``."""

    # ----------------------------------------------------------------- shared machinery
    @property
    def denoiser(self) -> nn.Module:
        """The trained denoiser (``self.unet``, or the attribute :attr:`denoiser_name` names)."""
        return getattr(self, self.denoiser_name)

    @property
    def scheduler(self) -> object:
        """The kernel's diffusers scheduler (the noise schedule)."""
        return self.kernel.scheduler

    def _setup_trainable(self) -> None:
        """Freeze everything, then make the denoiser (or its LoRA layers) trainable, in float32.

        peft gives adapters the dtype of the layer they wrap; the trained parameters are cast to
        float32 (diffusers' ``cast_training_params``) so reduced-precision frozen weights never
        mean reduced-precision optimiser updates.
        """
        self.requires_grad_(False)
        if self.lora is not None:
            self.lora.apply(self.denoiser)
        else:
            self.denoiser.requires_grad_(True)
        cast_training_params(self.denoiser, torch.float32)
        if self.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    def run_denoiser(self, *args: Any, **kwargs: Any) -> Any:
        """``self.denoiser(*args, **kwargs)``, compiled when :attr:`compile_mode` is set.

        A compilation failure (``torch._dynamo`` errors, e.g. no C++ compiler for the CPU backend)
        logs one warning, switches compilation off for this policy and reruns the call eagerly.
        """
        if self.compile_mode is None:
            return self.denoiser(*args, **kwargs)
        try:
            return compiled_module_call(self.compile_mode)(self.denoiser, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            self._compile_unavailable(f"{type(error).__name__}: {str(error).splitlines()[0]}")
            return self.denoiser(*args, **kwargs)

    def _compile_unavailable(self, reason: str) -> None:
        log.warning(
            "compile=%r: torch.compile of the %s is unavailable (%s); running it eagerly",
            self.compile_mode,
            self.denoiser_name,
            reason,
        )
        self.compile_mode = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters as optimiser groups ``{"params": [...], "lr_scale": s}``.

        One group of scale 1 unless the LoRA settings give some layers their own ``lr_scales``;
        :func:`~lightning_sdrl.modules.optimizers.build_optimizer` applies the scales.
        """
        if self.lora is None:
            return [{"params": self.trainable_parameters(), "lr_scale": 1.0}]
        return self.lora.parameter_groups((name, p) for name, p in self.named_parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        """Device of the denoiser."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the denoiser's base weights (its first frozen parameter; samples are drawn in it).

        Trained parameters are float32 whatever the base weights' dtype, so under full
        fine-tuning (every parameter trained) this is float32.
        """
        parameters = self.denoiser.parameters()
        first = next(parameters)
        if not first.requires_grad:
            return first.dtype
        return next((p.dtype for p in parameters if not p.requires_grad), first.dtype)

    def guided_prediction(
        self, sample: Tensor, timesteps: Tensor, conditions: Conditioning, guidance_scale: float
    ) -> Tensor:
        """Denoiser output with classifier-free guidance, both branches in one denoiser call."""
        return self._guided(sample, timesteps, self._guidance_conditions(conditions, guidance_scale), guidance_scale)

    def training_guidance(self, guidance_scale: float) -> float:
        """The guidance that forward-process RL trains the policy's outputs at, for rollouts at ``guidance_scale``.

        1 (the conditional output alone: classifier-free guidance is a sampling-time combination);
        a guidance-distilled model whose guidance is an input (FLUX.1-dev) returns ``guidance_scale``.
        """
        return 1.0

    def _guidance_conditions(self, conditions: Conditioning, guidance_scale: float) -> Conditioning:
        """``[null; conditions]`` stacked once for guided calls (``conditions`` without guidance)."""
        if guidance_scale == 1.0:
            return conditions
        return conditions.with_null(self.null_condition(conditions.batch_size))

    def _guided(self, sample: Tensor, timesteps: Tensor, both: Conditioning, guidance_scale: float) -> Tensor:
        if guidance_scale == 1.0:
            return self.denoise(sample, timesteps, both)
        output = self.denoise(torch.cat([sample, sample]), timesteps.repeat(2), both)
        uncond, cond = output.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def set_num_steps(self, num_steps: int) -> Tensor:
        """Set the kernel's inference timesteps; returns them (``[T]``, on the device)."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps}; expected at least 1 denoising step")
        return self.kernel.set_timesteps(num_steps).to(self.device)

    def training_timesteps(self, num_steps: int) -> Tensor:
        """The kernel's inference timesteps for ``num_steps`` steps (``[T]``, on the device; a copy).

        What :meth:`set_num_steps` returns: the times forward-process RL draws its training
        timesteps from (DiffusionNFT and AWM noise their samples at the sampler's timesteps).
        """
        return self.set_num_steps(num_steps).clone()

    @property
    def parameterization(self) -> Parameterization:
        """The forward process and what the denoiser predicts.

        ``"flow"`` for a flow-matching kernel (its scheduler a ``FlowMatchEulerDiscreteScheduler``),
        else the DDPM scheduler's ``prediction_type`` (``"epsilon"``, ``"v_prediction"``,
        ``"sample"``); see :func:`~lightning_sdrl.functional.forward_process.parameterization_of`.
        """
        return parameterization_of(self.scheduler)

    def noise_level(self, timesteps: Tensor) -> Tensor:
        """The noise levels of ``timesteps`` (``[B]``): sigma for flow, ``alphas_cumprod[t]`` for DDPM.

        The ``level`` that :mod:`lightning_sdrl.functional.forward_process` takes
        (:func:`~lightning_sdrl.functional.forward_process.timestep_to_level` of the kernel's
        scheduler); ``[B]`` float32 on the timesteps' device.
        """
        return timestep_to_level(self.scheduler, timesteps)

    def _initial_noise(self, prompts: list[str], generator: torch.Generator | None) -> tuple[Conditioning, Tensor]:
        """The prompts' conditioning and the initial samples ``x_T`` ``[B, C, H, W]`` drawn with ``generator``."""
        if not prompts:
            raise ValueError("prompts is empty; expected at least one prompt to sample")
        conditions = self.encode_prompts(prompts)
        shape = (len(prompts), *self.sample_shape)
        return conditions, randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def _prompt_ids(self, prompt_ids: Tensor | None, batch: int) -> Tensor:
        """``prompt_ids`` (default ``0..B-1``) on the device."""
        return (torch.arange(batch) if prompt_ids is None else prompt_ids).to(self.device)

    def _stochastic_steps(self, num_steps: int, eta: float, sde_steps: Tensor | None) -> list[bool]:
        """Which steps draw noise, decided once from the schedule (no per-step device reads)."""
        if sde_steps is None:
            window = [True] * num_steps
        elif tuple(sde_steps.shape) != (num_steps,):
            raise ValueError(f"sde_steps has shape {list(sde_steps.shape)}; expected [{num_steps}] (one per step)")
        else:
            window = sde_steps.cpu().tolist()
        return [bool(w) and self.kernel.is_stochastic(j, eta) for j, w in enumerate(window)]

    def _kernel_loop(
        self,
        x: Tensor,
        conditions: Conditioning,
        timesteps: Tensor,
        eta: float,
        guidance_scale: float,
        generator: torch.Generator | None,
        stochastic_steps: list[bool],
        keep_steps: bool,
        keep_means: bool = False,
    ) -> _KernelRun:
        """Run the kernel's steps at the set ``timesteps`` from ``x``: the loop of :meth:`sample` and :meth:`generate`.

        A step in ``stochastic_steps`` is drawn from its Gaussian, the others take its mean.
        ``keep_steps`` keeps every sample and step log-prob (a trajectory), ``keep_means`` every
        step's mean; without them only the final sample is returned.
        """
        batch = x.shape[0]
        run = _KernelRun(final=x, latents=[x] if keep_steps else [], log_probs=[], means=[])
        both = self._guidance_conditions(conditions, guidance_scale)
        # The step math reads timesteps on the CPU (no device synchronisation per step).
        for j, (t, t_cpu) in enumerate(zip(timesteps, self.kernel.scheduler.timesteps, strict=True)):
            model_output = self._guided(x, t.expand(batch), both, guidance_scale)
            noisy = stochastic_steps[j]
            dist = self.kernel.distribution(model_output, t_cpu, x, eta if noisy else 0.0)
            if noisy:
                x, log_prob = sample_step(dist, x.dtype, generator)
            else:
                x, log_prob = dist.mean.to(x.dtype), torch.zeros(batch, device=x.device, dtype=torch.float32)
            if keep_steps:
                run.latents.append(x)
                run.log_probs.append(log_prob)
            if keep_means:
                run.means.append(dist.mean)
        return run._replace(final=x)

    def _solver_loop(
        self, x: Tensor, conditions: Conditioning, num_steps: int, solver: ODESolver, guidance_scale: float
    ) -> Tensor:
        """Solve the probability-flow ODE from ``x`` with a diffusers solver over the kernel's schedule."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps}; expected at least 1 denoising step")
        scheduler = solver_scheduler(self.scheduler, solver)  # fresh: multistep solvers keep a history
        scheduler.set_timesteps(num_steps)
        model_timesteps = denoiser_timesteps(scheduler).to(self.device)
        batch = x.shape[0]
        both = self._guidance_conditions(conditions, guidance_scale)
        for t, t_model in zip(scheduler.timesteps, model_timesteps, strict=True):
            model_output = self._guided(x, t_model.expand(batch), both, guidance_scale)
            x = scheduler.step(model_output, t, x, return_dict=False)[0].to(x.dtype)
        return x

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        generator: torch.Generator | None = None,
        prompt_ids: Tensor | None = None,
        keep_means: bool = False,
        sde_steps: Tensor | None = None,
    ) -> Trajectory:
        """Sample one trajectory per prompt, keeping every latent and step log-prob.

        Args:
            prompts: ``B`` prompts (or class names for class-conditional policies).
            num_steps: sampling steps ``T``.
            eta: the kernel's noise weight (DDIM's ``eta`` in ``(0, 1]``, a flow SDE's noise
                level); ``0`` runs every step deterministically (DDIM's ODE, the flow ODE).
            guidance_scale: classifier-free guidance weight (1 disables guidance).
            generator: random generator on the policy's device, for reproducible samples.
            prompt_ids: ``[B]`` ids of the prompts (default ``0..B-1``).
            keep_means: also keep each step's Gaussian mean (``Trajectory.means``).
            sde_steps: ``[T]`` bool, the steps to sample stochastically; the others take the
                kernel's deterministic step (``eta = 0``) and get no log-prob (Flow-GRPO-Fast's
                SDE window). ``None``: every step. A step the kernel says has no noise
                (:meth:`~.kernels.StepKernel.is_stochastic`: CPS's last step) is deterministic too.
        """
        timesteps = self.set_num_steps(num_steps)
        stochastic = self._stochastic_steps(num_steps, eta, sde_steps)
        conditions, x = self._initial_noise(prompts, generator)
        run = self._kernel_loop(
            x, conditions, timesteps, eta, guidance_scale, generator, stochastic, keep_steps=True, keep_means=keep_means
        )
        batch, device = len(prompts), x.device
        return Trajectory(
            latents=torch.stack(run.latents, dim=1),
            timesteps=timesteps.unsqueeze(0).expand(batch, -1).clone(),
            log_probs=torch.stack(run.log_probs, dim=1),
            conditions=conditions,
            prompt_ids=self._prompt_ids(prompt_ids, batch),
            prompts=list(prompts),
            images=self.decode(run.final),
            means=torch.stack(run.means, dim=1) if keep_means else None,
            stochastic=torch.tensor(stochastic, device=device).unsqueeze(0).expand(batch, -1).clone(),
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_steps: int = 10,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        prompt_ids: Tensor | None = None,
        solver: Solver = "kernel",
    ) -> Samples:
        """Sample one final sample per prompt, keeping nothing of the steps (forward-process RL's rollouts).

        ``solver="kernel"`` runs :meth:`sample`'s loop: the same arguments and generator give
        exactly its final latents and images. The ODE solvers start from the same initial noise
        (the generator's first draw) and draw nothing else.

        Args:
            prompts: ``B`` prompts (or class names for class-conditional policies).
            num_steps: sampling steps (denoiser evaluations, times 2 with guidance).
            eta: the kernel's noise weight, as in :meth:`sample`; 0 (the default) is the kernel's
                deterministic ODE. Must be 0 with an ODE solver.
            guidance_scale: classifier-free guidance weight (1 disables guidance).
            generator: random generator on the policy's device, for reproducible samples.
            prompt_ids: ``[B]`` ids of the prompts (default ``0..B-1``).
            solver: ``"kernel"`` (the policy's step kernel), ``"dpmsolver++"`` or ``"unipc"``
                (diffusers' multistep solvers over the kernel's noise schedule, see
                :func:`~lightning_sdrl.policies.solvers.solver_scheduler`).

        Raises:
            ValueError: an unknown ``solver``, ``eta != 0`` with an ODE solver, no prompts, or a
                schedule the solver cannot follow.
        """
        if solver not in get_args(Solver):
            raise ValueError(f"solver={solver!r}; expected one of {list(get_args(Solver))}")
        if solver != "kernel" and eta != 0:
            raise ValueError(
                f"eta={eta} with solver={solver!r}; the ODE solvers are deterministic: pass eta=0, or "
                "solver='kernel' to sample with the kernel's noise"
            )
        if solver == "kernel":
            timesteps = self.set_num_steps(num_steps)
            stochastic = self._stochastic_steps(num_steps, eta, None)
            conditions, x = self._initial_noise(prompts, generator)
            x = self._kernel_loop(
                x, conditions, timesteps, eta, guidance_scale, generator, stochastic, keep_steps=False
            ).final
        else:
            conditions, x = self._initial_noise(prompts, generator)
            x = self._solver_loop(x, conditions, num_steps, solver, guidance_scale)
        return Samples(
            samples=x,
            conditions=conditions,
            prompt_ids=self._prompt_ids(prompt_ids, len(prompts)),
            prompts=list(prompts),
            images=self.decode(x),
        )

    def run_steps(
        self,
        sample: Tensor,
        conditions: Conditioning,
        timesteps: Tensor,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run the kernel's steps at ``timesteps`` (``[S]``) from ``sample``; returns the last sample.

        Gradients flow if the caller enables them (ReFL runs the early steps under no_grad).
        """
        batch = sample.shape[0]
        both = self._guidance_conditions(conditions, guidance_scale)
        for t in timesteps:
            model_output = self._guided(sample, t.expand(batch), both, guidance_scale)
            dist = self.kernel.distribution(model_output, t.cpu(), sample, eta)
            sample, _ = sample_step(dist, sample.dtype, generator)
        return sample

    def step_distribution(
        self,
        sample: Tensor,
        timesteps: Tensor,
        conditions: Conditioning,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
    ) -> StepDistribution:
        """The Gaussian of the step from ``sample`` at ``timesteps`` ``[B]`` (with gradients)."""
        model_output = self.guided_prediction(sample, timesteps, conditions, guidance_scale)
        return self.kernel.distribution(model_output, timesteps, sample, eta)

    def stored_steps(self, trajectory: Trajectory, step: Tensor) -> StoredSteps:
        """The stored steps ``step`` of ``trajectory``, one row per scored step.

        Args:
            trajectory: stored trajectories of ``B`` samples.
            step: ``[B]`` (one step of each trajectory) or ``[B, S]`` (``S`` steps of each) long
                tensor of step indices.

        Returns:
            ``N = step.numel()`` rows in row-major order of ``step`` (trajectory ``i``'s ``S`` steps
            are rows ``i * S .. i * S + S - 1``).
        """
        if step.ndim not in (1, 2) or step.shape[0] != len(trajectory):
            raise ValueError(
                f"step has shape {list(step.shape)}; expected [{len(trajectory)}] or [{len(trajectory)}, S] "
                "(step indices of each trajectory)"
            )
        device = trajectory.latents.device
        steps = step.to(device).view(len(trajectory), -1)
        rows = torch.arange(len(trajectory), device=device).unsqueeze(1)
        per_row = steps.shape[1]
        conditions = trajectory.conditions
        if per_row > 1:  # each trajectory's conditioning once per scored step
            conditions = conditions.select(rows.expand_as(steps).flatten())
        return StoredSteps(
            sample=trajectory.latents[rows, steps].flatten(0, 1),
            timesteps=trajectory.timesteps[rows, steps].flatten(),
            conditions=conditions,
            next_sample=trajectory.latents[rows, steps + 1].flatten(0, 1),
        )

    def step_log_prob(
        self,
        trajectory: Trajectory,
        step: Tensor,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
    ) -> tuple[Tensor, StepDistribution]:
        """Log-prob of stored steps of each trajectory, with gradients, in one denoiser call.

        Args:
            trajectory: stored trajectories of ``B`` samples.
            step: ``[B]`` long tensor, which step of each trajectory to score, or ``[B, S]``: ``S``
                steps of each (one denoiser batch of ``B * S`` rows, times 2 with guidance).
            eta: the DDIM noise weight used when sampling.
            guidance_scale: the guidance used when sampling.

        Returns:
            The log-probs (the shape of ``step``) and the step distributions they come from (``N =
            step.numel()`` rows in the order of :meth:`stored_steps`).
        """
        self.set_num_steps(trajectory.num_steps)
        stored = self.stored_steps(trajectory, step)
        dist = self.step_distribution(stored.sample, stored.timesteps, stored.conditions, eta, guidance_scale)
        log_prob = gaussian_log_prob(stored.next_sample, dist.mean, dist.std)
        return log_prob.view(step.shape), dist

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the pretrained (reference) model inside this block.

        With LoRA the adapters are switched off; under full fine-tuning a frozen copy of the
        denoiser made at the first call is swapped in.
        """
        if self.lora is not None:
            with lora_disabled(self.denoiser):
                yield
            return
        if not hasattr(self, "_reference_unet"):
            raise RuntimeError("reference() under full fine-tuning needs keep_reference() to be called before training")
        trained = self.denoiser
        setattr(self, self.denoiser_name, self._reference_unet[0])
        try:
            yield
        finally:
            setattr(self, self.denoiser_name, trained)

    def keep_reference(self) -> None:
        """Keep a frozen copy of the current denoiser for :meth:`reference` (full fine-tuning only)."""
        if self.lora is None and not hasattr(self, "_reference_unet"):
            import copy

            frozen = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
            # A list hides the copy from state_dict() and from the optimiser.
            self._reference_unet = [frozen]

    @property
    def reference_denoiser(self) -> nn.Module | None:
        """The frozen copy :meth:`keep_reference` made (full fine-tuning), or ``None``."""
        return self._reference_unet[0] if hasattr(self, "_reference_unet") else None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, D102 - keep the reference copy on our device
        result = super()._apply(fn, recurse)
        if hasattr(self, "_reference_unet"):
            self._reference_unet[0]._apply(fn, recurse)
        return result

    def save_trained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Save what training changed, in diffusers format; :meth:`load_trained` reads it back.

        With LoRA, ``directory/pytorch_lora_weights.safetensors``: the adapter weights under
        peft's names prefixed ``unet.`` (:attr:`denoiser_name`), with the ``LoraConfig`` (rank,
        alpha) as metadata (:mod:`~lightning_sdrl.policies.lora`); the pipeline's
        ``load_lora_weights`` reads it. Under full fine-tuning, ``directory/unet/`` (or
        ``directory/transformer/``) written by the denoiser's ``save_pretrained``.

        Args:
            directory: output directory.
            state_dict: the denoiser's trained weights to write instead of its own parameters
                (:func:`~lightning_sdrl.policies.sharding.gathered_trained_state` of a sharded
                denoiser); under full fine-tuning a fresh denoiser of the same config is built
                from it and saved.

        Returns:
            ``directory``.
        """
        directory = Path(directory)
        if self.lora is None:
            self.denoiser_with(state_dict).save_pretrained(directory / self.denoiser_name)
        else:
            save_lora_weights(self.denoiser, self.lora, directory, prefix=self.denoiser_name, state_dict=state_dict)
        return directory

    def denoiser_with(self, state_dict: dict[str, Tensor] | None) -> nn.Module:
        """The denoiser, or (given its whole ``state_dict``, e.g. gathered from shards) a fresh one holding it."""
        if state_dict is None:
            return self.denoiser
        denoiser = type(self.denoiser).from_config(self.denoiser.config)
        denoiser.load_state_dict(state_dict, strict=True)
        return denoiser

    def load_trained(self, directory: str | Path) -> None:
        """Load what :meth:`save_trained` wrote into this policy (built as the one that saved).

        Every weight in the directory must land in this policy's denoiser, and every trained
        weight of the denoiser must be in the directory: afterwards the policy computes what the
        saving one did.

        Args:
            directory: output of :meth:`save_trained` of a policy of the same architecture and
                the same ``lora`` settings (or ``lora=None`` for a fully fine-tuned ``unet/``).

        Raises:
            FileNotFoundError: ``directory`` or the file this policy's ``lora`` setting expects
                is missing.
            ValueError: the weights do not fit (other rank, alpha, target modules or model).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"trained-weights directory '{directory}' does not exist; pass the directory written by save_trained"
            )
        name = self.denoiser_name
        has_lora, has_unet = (directory / LORA_WEIGHTS_FILE).is_file(), (directory / name).is_dir()
        if self.lora is not None:
            if has_unet and not has_lora:
                raise FileNotFoundError(
                    f"'{directory}' holds a fully fine-tuned denoiser ({name}/) and no {LORA_WEIGHTS_FILE}; "
                    "build the policy with lora=None to load it"
                )
            load_lora_weights(self.denoiser, self.lora, directory, prefix=name)
        elif has_unet:
            self._load_full_denoiser(directory / name)
        elif has_lora:
            _, metadata = read_lora_weights(directory / LORA_WEIGHTS_FILE, prefix=name)
            raise FileNotFoundError(
                f"'{directory}' holds LoRA weights ({LORA_WEIGHTS_FILE}) and no {name}/ subfolder, but this policy "
                f"has lora=None; build it with {settings_hint(metadata)} to load them"
            )
        else:
            raise FileNotFoundError(
                f"'{directory}' has neither {LORA_WEIGHTS_FILE} nor a {name}/ subfolder; pass the directory "
                "written by save_trained"
            )

    def _load_full_denoiser(self, path: Path) -> None:
        """Copy the weights of the denoiser saved at ``path`` into :attr:`denoiser` (all keys must match)."""
        saved = load_component(type(self.denoiser), str(path.parent), path.name)
        try:
            self.denoiser.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"the denoiser in '{path}' does not fit this policy's {type(self.denoiser).__name__} ({error}); "
                "load it into a policy of the architecture that saved it"
            ) from error
