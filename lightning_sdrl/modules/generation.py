"""What DDPO and ReFL share: sampling a prompt batch with its seed, and validation on samples."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.modules.guards import check_finite_state
from lightning_sdrl.policies.base import Trajectory
from lightning_sdrl.policies.sharding import data_parallel_mesh, gathered_trained_state, shard_denoiser
from lightning_sdrl.rewards.base import check_reward_output


class GenerationModule(pl.LightningModule):
    """Base of the fine-tuning modules: ``self.policy``, ``self.reward``, optional ``self.evaluation``.

    Subclasses set :attr:`settings` (with ``num_steps``, ``eta``, ``guidance_scale`` and
    ``save_trained_on_end``) through :func:`~lightning_sdrl.modules.hyperparameters.record_arguments`.
    Validation samples every batch with its fixed seed, logs ``val/reward_mean`` and, with an
    ``evaluation`` (:class:`~lightning_sdrl.metrics.generation.GenerationMetrics`), ``val/fid``,
    ``val/precision``, ``val/recall`` and ``val/attribute_kl``.
    """

    keep_step_means = False
    settings: AttributeDict
    """The settings the loops read, in the algorithm's names (``num_steps``, ``eta``, ...). ``hparams``
    holds exactly the concrete class's constructor arguments (what a checkpoint feeds back to its
    constructor), which differ where a subclass renames or fixes arguments (GRPO's ``noise_level``)."""

    def _log_dir(self) -> str:
        """The run's log directory (a collective call under DDP: every rank must call it)."""
        return self.trainer.log_dir or self.trainer.default_root_dir

    def write_trained(self) -> Path | None:
        """With ``save_trained_on_end``, write the trained LoRA (or UNet) to ``<log_dir>/trained``.

        Load it back with ``policy.load_trained(<log_dir>/trained)``. Non-finite weights are never
        written (``FloatingPointError``).
        """
        if not self.settings.get("save_trained_on_end", False):
            return None
        directory = Path(self._log_dir()) / "trained"  # every rank: log_dir is a collective call
        # sharded (FSDP2): every rank gathers the whole trained weights, rank 0 writes them
        state = gathered_trained_state(self.policy.denoiser, trainable_only=self.policy.lora is not None)
        if self.trainer.is_global_zero:
            weights = dict(self.policy.named_parameters()) if state is None else state
            check_finite_state(weights, f"the trained weights to {directory}")
            self.policy.save_trained(directory, state_dict=state)
        return directory

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, shard the policy's denoiser over the data-parallel ranks (FSDP2).

        Each block of the denoiser becomes one FSDP unit (:func:`~lightning_sdrl.policies.sharding.shard_denoiser`),
        with the strategy's ``cpu_offload`` and ``reshard_after_forward`` (``FSDP2Strategy``'s options);
        the text encoders, VAE and reward stay whole on every rank. Under any other strategy nothing
        changes. A tensor-parallel mesh is refused with the settings to use instead.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        strategy, policy = self.trainer.strategy, self.policy
        if policy.lora is None and self.uses_reference_model():
            policy.keep_reference()  # before sharding (a sharded module cannot be copied); sharded alike below
        options = {
            "reshard_after_forward": getattr(strategy, "reshard_after_forward", True),
            "cpu_offload": getattr(strategy, "cpu_offload", False),
        }
        shard_denoiser(policy.denoiser, data_parallel_mesh(mesh), **options)
        if policy.reference_denoiser is not None:
            shard_denoiser(policy.reference_denoiser, data_parallel_mesh(mesh), **options)

    def uses_reference_model(self) -> bool:
        """Whether training reads the pretrained model (a KL to it): full fine-tuning then keeps a frozen copy."""
        hp = self.settings
        return hp.get("kl_reference_coef", 0) > 0 or hp.get("kl_weight", 0) > 0

    def sde_steps(self, batch: PromptBatch) -> Tensor | None:
        """``[T]`` bool: the steps of ``batch``'s training samples drawn stochastically (``None``: all)."""
        return None

    @torch.no_grad()
    def sample(self, batch: PromptBatch, validation: bool = False) -> Trajectory:
        """Sample trajectories for a prompt batch with its seed (policy in eval mode).

        Validation samples use ``val_num_steps`` and ``val_eta`` where the module has them (and
        they are set), e.g. few steps for training and more for evaluation (Flow-GRPO).
        """
        hp = self.settings
        num_steps, eta, sde_steps = hp.num_steps, hp.eta, None
        if validation:
            num_steps = hp.get("val_num_steps") or num_steps
            eta = eta if hp.get("val_eta") is None else hp.get("val_eta")
        else:
            sde_steps = self.sde_steps(batch)
        was_training = self.policy.training
        self.policy.eval()
        trajectory = self.policy.sample(
            batch.prompts,
            num_steps=num_steps,
            eta=eta,
            guidance_scale=hp.guidance_scale,
            generator=torch.Generator(self.policy.device).manual_seed(batch.seed),
            prompt_ids=batch.prompt_ids,
            keep_means=self.keep_step_means and not validation,
            sde_steps=sde_steps,
        )
        self.policy.train(was_training)
        return trajectory

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Sample with fixed seeds; log the mean reward and update the evaluation metrics."""
        trajectory = self.sample(batch, validation=True)
        with torch.no_grad():
            rewards = self.reward(trajectory.images, trajectory.prompts)
        rewards = check_reward_output(rewards, len(batch), type(self.reward).__name__)
        self.log("val/reward_mean", rewards.float().nanmean(), batch_size=len(batch), sync_dist=True)
        if getattr(self, "evaluation", None) is not None:
            self.evaluation.update(trajectory.images)

    def on_validation_epoch_end(self) -> None:
        """Log FID / precision / recall / attribute KL of the epoch's samples."""
        if getattr(self, "evaluation", None) is None:
            return
        values: dict[str, Tensor] = self.evaluation.compute()
        self.log_dict({f"val/{name}": value.to(self.device) for name, value in values.items()})
        self.evaluation.reset()
