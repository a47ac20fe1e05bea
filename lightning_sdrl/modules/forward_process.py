"""What DiffusionNFT and Advantage Weighted Matching share: RL on the forward process.

Both methods train a diffusion model with its pretraining loss on its own generations, weighted
by the reward, instead of policy gradients on the reverse sampler's step log-probs:

1. rollouts keep only the final samples ``x_0`` (:class:`~lightning_sdrl.policies.samples.Samples`),
   drawn by any sampler the policy offers (its ODE, its SDE, DPM-Solver++ or UniPC), without
   classifier-free guidance by default; no step is stored and no log-prob computed;
2. the shared loop (:mod:`lightning_sdrl.modules.online`) scores them and turns the rewards into
   advantages (per-prompt mean, global std by default: the references' rule);
3. for ``num_inner_epochs`` passes over the shuffled samples, each sample is noised afresh at a
   subset of the sampler's timesteps (both drawn from the sample's own seed, so the update of a
   global batch is the same on one process as split over several) (``x_t = (1 - t) x_0 + t eps`` for flow models,
   ``sqrt(abar) x_0 + sqrt(1 - abar) eps`` for DDPM models), the denoiser's output there enters
   the algorithm's loss (:meth:`ForwardProcessModule.timestep_loss`), and the gradients of all the
   timesteps of ``gradient_accumulation_steps`` train batches make one optimiser step;
4. after the epoch the old / EMA policy (:class:`~lightning_sdrl.policies.old_policy.ParameterCopy`,
   a copy of the trained parameters) moves towards the trained one,
   ``theta_old <- eta theta_old + (1 - eta) theta`` with ``eta = min(decay_rate * step, max_decay)``
   (``step``: optimiser steps so far, as in the references).

The reference policy of the optional KL is the pretrained model (the LoRA switched off, or a
frozen copy under full fine-tuning). Checkpoints hold the old policy, so a resumed run continues
exactly. A subclass chooses the training timesteps (:meth:`ForwardProcessModule.training_steps`)
and the loss; the math of both is in :mod:`lightning_sdrl.functional`.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any, get_args

import torch
from torch import Tensor

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.functional.advantages import GroupRelativeAdvantages
from lightning_sdrl.functional.ema import ema_decay
from lightning_sdrl.functional.forward_process import noise_sample
from lightning_sdrl.functional.seeding import derive_seed
from lightning_sdrl.modules.hyperparameters import record_arguments
from lightning_sdrl.modules.online import OnlineRLModule
from lightning_sdrl.policies.old_policy import ParameterCopy
from lightning_sdrl.policies.samples import Samples
from lightning_sdrl.policies.solvers import Solver
from lightning_sdrl.validation import check_positive_ints

TRAINING_NOISE_KEY = 7
"""Key mixed into the seeds of the training noise, timestep and shuffle draws (see :func:`derive_seed`)."""


def check_forward_process_arguments(
    num_steps: int,
    eta: float,
    solver: str,
    guidance_scale: float,
    timestep_fraction: float,
    max_grad_norm: float | None,
    kl_reference_coef: float,
    decay_rate: float,
    max_decay: float,
    sample_grid_every_n_epochs: int,
    val_num_steps: int | None,
    val_eta: float | None,
) -> None:
    """Reject settings of a forward-process module that could only fail (or do nothing) later.

    Example:
        >>> check_forward_process_arguments(10, 0.0, "kernel", 1.0, 0.99, 1.0, 0.0, 0.001, 1.0, 1, None, None)
        Traceback (most recent call last):
        ...
        ValueError: max_decay=1.0; expected 0 <= max_decay < 1 (the old policy's EMA decay; DiffusionNFT: 0.5)
    """
    check_positive_ints(num_steps=num_steps)
    checks = [
        (0.0 <= eta <= 1.0, f"eta={eta}; expected 0 <= eta <= 1 (0: the deterministic ODE, the references' choice)"),
        (solver in get_args(Solver), f"solver={solver!r}; expected one of {list(get_args(Solver))}"),
        (
            solver == "kernel" or eta == 0,
            f"eta={eta} with solver={solver!r}: the ODE solvers are deterministic; set eta: 0, or solver: kernel",
        ),
        (guidance_scale >= 0, f"guidance_scale={guidance_scale}; expected >= 0 (1 disables guidance)"),
        (0.0 < timestep_fraction <= 1.0, f"timestep_fraction={timestep_fraction}; expected 0 < fraction <= 1"),
        (
            max_grad_norm is None or max_grad_norm > 0,
            f"max_grad_norm={max_grad_norm}; expected a positive norm, or null to disable clipping",
        ),
        (kl_reference_coef >= 0, f"kl_reference_coef={kl_reference_coef}; expected >= 0 (0 disables the KL)"),
        (decay_rate >= 0, f"decay_rate={decay_rate}; expected >= 0 (the old policy's decay per optimiser step)"),
        (
            0.0 <= max_decay < 1.0,
            f"max_decay={max_decay}; expected 0 <= max_decay < 1 (the old policy's EMA decay; DiffusionNFT: 0.5)",
        ),
        (
            isinstance(sample_grid_every_n_epochs, int) and sample_grid_every_n_epochs >= 0,
            f"sample_grid_every_n_epochs={sample_grid_every_n_epochs!r}; expected an integer >= 0 (0 disables)",
        ),
        (
            val_num_steps is None or isinstance(val_num_steps, int) and val_num_steps >= 1,
            f"val_num_steps={val_num_steps!r}; expected a positive number of steps, or null to use num_steps",
        ),
        (
            val_eta is None or 0.0 <= val_eta <= 1.0,
            f"val_eta={val_eta}; expected 0 <= val_eta <= 1, or null to use eta",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


OBJECTS = ("policy", "reward", "optimizer", "lr_scheduler", "evaluation", "advantages")
"""Constructor arguments given as objects (not recorded as hyper-parameters)."""


class ForwardProcessModule(OnlineRLModule):
    """Rollouts of final samples, fresh forward noising at the sampler's timesteps, an old / EMA policy.

    A subclass's constructor takes at least the arguments of :func:`check_forward_process_arguments`,
    the objects of :data:`OBJECTS` and ``solver``, ``train_batch_size``,
    ``gradient_accumulation_steps``, ``num_inner_epochs``, ``checkpoint_trainable_only`` and
    ``max_consecutive_skips``, passes them all as ``super().__init__(dict(locals()))``, and
    implements :meth:`training_steps`, :meth:`fixed_outputs` and :meth:`timestep_loss`.

    Args:
        arguments: the subclass constructor's arguments by name; they are checked, recorded as
            hyper-parameters (the objects left out) and become :attr:`settings`. ``advantages=None``
            is the references' rule: group-relative advantages over the global std.
    """

    sample_with_old_policy = False
    """Whether the rollouts come from the old policy (DiffusionNFT) or the trained one (AWM)."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        a = arguments
        advantages = GroupRelativeAdvantages(global_std=True) if a["advantages"] is None else a["advantages"]
        super().__init__(
            a["policy"], a["reward"], a["optimizer"], a["lr_scheduler"], advantages,
            a["checkpoint_trainable_only"], a["max_consecutive_skips"], a["evaluation"],
        )  # fmt: skip
        check_forward_process_arguments(
            **{name: a[name] for name in inspect.signature(check_forward_process_arguments).parameters}
        )
        check_positive_ints(
            train_batch_size=a["train_batch_size"],
            gradient_accumulation_steps=a["gradient_accumulation_steps"],
            num_inner_epochs=a["num_inner_epochs"],
        )
        self.settings = record_arguments(self, OBJECTS, arguments)
        self.old_policy = ParameterCopy(self.policy)
        """The old / EMA policy: a copy of the trained parameters (at first, their values now)."""

    # ------------------------------------------------------------------ what an algorithm adds
    @abc.abstractmethod
    def training_steps(self, num_samples: int, num_steps: int, generator: torch.Generator) -> Tensor:
        """``[N, S]`` indices into the sampler's ``num_steps`` timesteps: the ``S`` each sample trains on."""

    @abc.abstractmethod
    def fixed_outputs(self, x_t: Tensor, timesteps: Tensor, samples: Samples) -> dict[str, Tensor]:
        """The outputs of other weights the loss compares with (old, EMA, reference), without gradients.

        Computed before the trained output: they run the policy with other parameter values
        swapped in, which must not happen while a graph holds the trained ones.
        """

    @abc.abstractmethod
    def timestep_loss(
        self,
        output: Tensor,
        fixed: dict[str, Tensor],
        x_t: Tensor,
        samples: Samples,
        noise: Tensor,
        level: Tensor,
        advantages: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one training timestep of a train batch, and its statistics to log.

        Args:
            output: ``[B, C, H, W]`` the trained denoiser's output at ``x_t`` (with gradient, float32).
            fixed: what :meth:`fixed_outputs` returned (float32).
            x_t: ``[B, C, H, W]`` the noised samples (float32 at least).
            samples: the batch's rollouts (``samples.samples`` is ``x_0``).
            noise: ``[B, C, H, W]`` the noise that made ``x_t``.
            level: ``[B]`` noise levels (sigma for flow, ``alphas_cumprod[t]`` for DDPM).
            advantages: ``[B]`` the samples' advantages.
        """

    # ------------------------------------------------------------------ shared machinery
    def on_fit_start(self) -> None:
        """Keep a frozen copy of the denoiser if a reference KL is asked for under full fine-tuning."""
        super().on_fit_start()
        if self.settings.kl_reference_coef > 0:
            self.policy.keep_reference()

    @contextlib.contextmanager
    def _rollout_weights(self) -> Iterator[None]:
        if self.sample_with_old_policy:
            with self.old_policy.swapped_into(self.policy):
                yield
        else:
            yield

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Samples:
        """Final samples of ``batch`` from its seed, drawn by the old policy or the trained one."""
        hp = self.settings
        was_training = self.policy.training
        self.policy.eval()
        with self._rollout_weights():
            samples = self.policy.generate(
                batch.prompts,
                num_steps=hp.num_steps,
                eta=hp.eta,
                guidance_scale=hp.guidance_scale,
                generator=torch.Generator(self.policy.device).manual_seed(batch.seed),
                prompt_ids=batch.prompt_ids,
                solver=hp.solver,
            )
        self.policy.train(was_training)
        seeds = torch.tensor([derive_seed(batch.seed, row, TRAINING_NOISE_KEY) for row in range(len(samples))])
        return dataclasses.replace(samples, seeds=seeds)

    def conditional_output(self, x_t: Tensor, timesteps: Tensor, samples: Samples) -> Tensor:
        """The policy's output at ``x_t`` for the samples' conditions, as training reads it.

        The conditional branch alone (classifier-free guidance is a sampling-time combination), or
        a guidance-distilled model's output at the embedded guidance it samples with
        (:meth:`~lightning_sdrl.policies.base.DiffusionPolicy.training_guidance`).
        """
        guidance = self.policy.training_guidance(self.settings.guidance_scale)
        return self.policy.guided_prediction(x_t.to(self.policy.dtype), timesteps, samples.conditions, guidance)

    def output_with(
        self, weights: contextlib.AbstractContextManager[Any], x_t: Tensor, timesteps: Tensor, samples: Samples
    ) -> Tensor:
        """The denoiser's conditional output at ``x_t`` under ``weights``, without gradients, in float32."""
        with torch.no_grad(), weights:
            output = self.conditional_output(x_t, timesteps, samples)
        return output.float()

    def reference_outputs(self, x_t: Tensor, timesteps: Tensor, samples: Samples) -> dict[str, Tensor]:
        """``{"reference": the pretrained model's output}`` for the KL term (empty when its weight is 0)."""
        if self.settings.kl_reference_coef == 0:
            return {}
        return {"reference": self.output_with(self.policy.reference(), x_t, timesteps, samples)}

    def optimize(self, rollouts: Samples, advantages: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
        """``num_inner_epochs`` passes of forward-process losses, then the old policy's EMA step."""
        hp = self.settings
        timesteps = self.policy.training_timesteps(hp.num_steps)
        totals: dict[str, list[Tensor]] = {}
        for inner in range(hp.num_inner_epochs):
            for key, value in self._inner_epoch(rollouts, advantages, weights, timesteps, inner).items():
                totals.setdefault(key, []).extend(value)
        decay = ema_decay(self.global_step, hp.decay_rate, hp.max_decay)
        self.old_policy.update(self.policy, decay)
        stats = {key: torch.stack(values).mean() for key, values in totals.items()}
        return {**stats, "train/old_policy_decay": torch.tensor(decay)}

    def _inner_epoch(
        self, samples: Samples, advantages: Tensor, weights: Tensor | None, timesteps: Tensor, inner: int
    ) -> dict[str, list[Tensor]]:
        """One pass over the shuffled samples, each at its training timesteps; returns the statistics."""
        hp = self.settings
        if samples.seeds is None:
            raise ValueError(
                "the rollouts have no per-sample seeds (Samples.seeds); draw them with the module's rollout(), "
                "which sets them from the batch's sampling seed"
            )
        generator = torch.Generator().manual_seed(
            derive_seed(self.current_epoch, inner, self.global_rank, TRAINING_NOISE_KEY)
        )
        order = torch.randperm(len(samples), generator=generator)
        samples, advantages = samples.select(order), advantages[order.to(advantages.device)]
        weights = weights[order] if weights is not None else None
        steps = torch.stack(
            [self.training_steps(1, len(timesteps), generator)[0] for generator in sample_generators(samples, inner)]
        )
        num_train = steps.shape[1]
        batches = list(range(0, len(samples), hp.train_batch_size))
        optimizer = self.optimizers()
        totals: dict[str, list[Tensor]] = {}
        for index, start in enumerate(batches):
            rows = torch.arange(start, min(start + hp.train_batch_size, len(samples)))
            window_end = (index + 1) % hp.gradient_accumulation_steps == 0 or index + 1 == len(batches)
            batch, batch_advantages = samples.select(rows), advantages[rows.to(advantages.device)]
            batch_weights = weights[rows] if weights is not None else None
            for j in range(num_train):
                with self._gradient_sync(window_end and j + 1 == num_train):
                    step_timesteps = timesteps[steps[rows, j].to(timesteps.device)]
                    noise = torch.stack(
                        [
                            torch.randn(batch.samples.shape[1:], generator=generator)
                            for generator in sample_generators(batch, inner, j)
                        ]
                    )
                    loss, stats = self._batch_loss(batch, batch_advantages, batch_weights, step_timesteps, noise)
                    self.manual_backward(loss / (num_train * hp.gradient_accumulation_steps))
                for key, value in {"train/loss": loss.detach(), **stats}.items():
                    totals.setdefault(key, []).append(value.detach().float())
            if window_end:
                self._optimizer_step(optimizer)
        return totals

    def _batch_loss(
        self,
        samples: Samples,
        advantages: Tensor,
        weights: Tensor | None,
        timesteps: Tensor,
        noise: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Noise a train batch at ``timesteps`` with ``noise`` (fresh, on CPU) and return the algorithm's loss there.

        Padding rows (weight 0, see :meth:`OnlineRLModule._kept_rows`) are left out; a batch of
        padding rows only gives a zero loss that still runs backward (for DDP's gradient sync).
        """
        if weights is not None and bool((weights > 0).any()):
            kept = torch.nonzero(weights > 0).flatten()
            samples, advantages, timesteps, noise = (
                samples.select(kept),
                advantages[kept.to(advantages.device)],
                timesteps[kept.to(timesteps.device)],
                noise[kept],
            )
        x0 = samples.samples.float()
        noise = noise.to(x0.device, x0.dtype)
        level = self.policy.noise_level(timesteps).to(x0.device)
        x_t = noise_sample(x0, noise, level, self.policy.parameterization)
        if weights is not None and not bool((weights > 0).any()):
            output = self.conditional_output(x_t, timesteps, samples)
            return 0.0 * output.float().sum(), {}
        fixed = self.fixed_outputs(x_t, timesteps, samples)
        output = self.conditional_output(x_t, timesteps, samples)
        return self.timestep_loss(output.float(), fixed, x_t, samples, noise, level, advantages)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also save the old policy (a resumed run samples and trains exactly as the uninterrupted one)."""
        super().on_save_checkpoint(checkpoint)
        old = self.old_policy.full_state_dict()  # whole tensors also when sharded: rank 0 writes this entry
        if not all(bool(torch.isfinite(value).all()) for value in old.values()):
            raise FloatingPointError("the old policy's weights are not finite; not writing the checkpoint")
        checkpoint["old_policy"] = old

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the old policy with the trainable weights (a checkpoint without it is an error)."""
        super().on_load_checkpoint(checkpoint)
        if "old_policy" not in checkpoint:
            raise KeyError(
                f"the checkpoint has no 'old_policy' entry, so it was not written by {type(self).__name__}; "
                "resume from a checkpoint of the same algorithm, or start a new run without --ckpt_path"
            )
        self.old_policy.load_state_dict(checkpoint["old_policy"])


def sample_generators(samples: Samples, *keys: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from its ``seeds`` entry and ``keys`` (the pass, the timestep).

    Example:
        >>> from lightning_sdrl.policies.conditioning import Conditioning
        >>> samples = Samples(torch.zeros(2, 1), Conditioning(encoder_hidden_states=torch.zeros(2, 1, 1)),
        ...                   torch.tensor([0, 0]), ["a", "a"], torch.zeros(2, 3, 1, 1), torch.tensor([5, 9]))
        >>> draws = [torch.rand(1, generator=g).item() for g in sample_generators(samples, 0)]
        >>> swapped = samples.select(torch.tensor([1, 0]))
        >>> swapped = [torch.rand(1, generator=g).item() for g in sample_generators(swapped, 0)]
        >>> swapped == draws[::-1] and draws[0] != draws[1]  # a sample's draw does not depend on its row
        True
    """
    return [torch.Generator().manual_seed(derive_seed(seed, *keys)) for seed in samples.seeds.tolist()]


def nft_training_steps(num_samples: int, num_steps: int, fraction: float, generator: torch.Generator) -> Tensor:
    """DiffusionNFT's training timesteps: per sample a random ``int(fraction * T)`` of the ``T`` (at least 1).

    Example:
        >>> steps = nft_training_steps(2, 10, 0.99, torch.Generator().manual_seed(0))
        >>> steps.shape, bool((steps.sort(dim=1).values.diff(dim=1) > 0).all())  # 9 distinct steps each
        (torch.Size([2, 9]), True)
    """
    count = max(1, int(fraction * num_steps))
    scores = torch.rand(num_samples, num_steps, generator=generator)
    return torch.argsort(scores, dim=1)[:, :count]


def stratified_training_steps(
    num_samples: int, num_steps: int, count: int, fraction: float, generator: torch.Generator
) -> Tensor:
    """AWM's training timesteps: ``count`` strata of the step indices ``1 .. int(fraction * T) - 1``, one draw each.

    The strata are ``[b_k, b_{k+1})`` with ``b = linspace(1, int(fraction * T), count + 1)`` rounded
    down (the reference's ``"discrete_wo_init"``: the first step, pure noise, is never trained on);
    each sample draws its own index in every stratum.

    Example:
        >>> stratified_training_steps(1, 14, 6, 0.9, torch.Generator().manual_seed(0)).tolist()
        [[1, 3, 4, 6, 8, 11]]
    """
    upper = int(fraction * num_steps)
    if count > upper - 1:
        raise ValueError(
            f"train_timesteps={count} but only {max(upper - 1, 0)} sampling steps are eligible (steps 1 .. "
            f"int(timestep_fraction * num_steps) - 1 = {upper - 1}); lower train_timesteps or raise num_steps"
        )
    bounds = torch.linspace(1, upper, count + 1).long()
    lower, width = bounds[:-1], (bounds[1:] - bounds[:-1]).clamp(min=1)
    draws = torch.rand(num_samples, count, generator=generator)
    return lower + (draws * width).long().clamp(max=width - 1)
