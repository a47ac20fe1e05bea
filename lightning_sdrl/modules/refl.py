"""ReFL (Xu et al. 2023, ImageReward): fine-tune a diffusion model by backpropagating a reward.

For each prompt batch (eq. 5 of the reward-model report, docs/references.md):

1. sample without gradients from ``x_T`` down to a random step ``t`` of a configured window
   (the report: 40 steps, ``t`` in ``[30, 40)``);
2. take step ``t`` with gradients and predict ``x_0`` from it;
3. decode and score with any differentiable reward;
4. loss ``= -alpha * reward + beta * KL(p_theta || p_pretrained)`` of that step's Gaussians, which
   for a shared ``sigma_t`` is a scaled squared difference of the two noise predictions.

With ``truncated_backprop_steps = K`` it becomes DRaFT-K / AlignProp: the last ``K`` steps run with
gradients (reparameterised noise) and the final sample is scored, the KL summed over those steps.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.functional.gaussian import gaussian_kl_same_std, sample_step
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.modules.generation import GenerationModule
from lightning_sdrl.modules.guards import NonFiniteGuard, check_checkpoint_keys, check_finite_state
from lightning_sdrl.modules.hyperparameters import record_arguments
from lightning_sdrl.modules.optimizers import build_optimizer
from lightning_sdrl.policies.base import DiffusionPolicy
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.sharding import is_sharded
from lightning_sdrl.rewards.base import RewardModule, check_reward_output
from lightning_sdrl.validation import check_positive_ints


def refl_adamw(params: Any) -> torch.optim.Optimizer:
    """The reward-model report's optimiser: AdamW with default hyper-parameters and learning rate 1e-5."""
    return torch.optim.AdamW(params, lr=1e-5)


class ReFLModule(GenerationModule):
    """Reward feedback learning with a KL regulariser to the pretrained model.

    Args:
        policy: the diffusion model to fine-tune (LoRA rank 4 in the report).
        reward: a differentiable reward ``(images [B,3,H,W] in [0,1], prompts) -> [B]``.
        optimizer: optimiser factory for the trainable parameters.
        num_steps: DDIM steps ``T`` (40 in the report).
        eta: DDIM noise weight in ``(0, 1]`` (the KL needs ``sigma_t > 0``).
        guidance_scale: classifier-free guidance weight.
        grad_step_range: ``[low, high)`` window of step indices from which the gradient step is
            drawn (``[30, 40)`` in the report).
        reward_weight: ``alpha`` of eq. (5) (100 in the report).
        kl_weight: ``beta`` of eq. (5) (0.01 in the report).
        truncated_backprop_steps: ``K`` for DRaFT-K / AlignProp (gradients through the last ``K``
            steps, final sample scored); ``None`` is ReFL.
        max_consecutive_skips: optimiser steps skipped in a row (non-finite loss or gradients)
            after which the run stops with an error.
        save_trained_on_end: write the trained LoRA/UNet to ``<log_dir>/trained`` after fit.
        evaluation: FID / precision-recall / attribute-KL of validation samples against a
            reference set (``None``: only the mean reward is validated).
    """

    def __init__(
        self,
        policy: DiffusionPolicy,
        reward: RewardModule,
        optimizer: OptimizerCallable = refl_adamw,
        num_steps: int = 40,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        grad_step_range: tuple[int, int] = (30, 40),
        reward_weight: float = 100.0,
        kl_weight: float = 0.01,
        truncated_backprop_steps: int | None = None,
        max_consecutive_skips: int = 3,
        save_trained_on_end: bool = True,
        evaluation: GenerationMetrics | None = None,
    ) -> None:
        arguments = dict(locals())
        super().__init__()
        check_positive_ints(num_steps=num_steps)
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"eta={eta}; expected 0 < eta <= 1 (the KL term needs sigma_t > 0)")
        if reward_weight <= 0 or kl_weight < 0:
            raise ValueError(
                f"reward_weight={reward_weight}, kl_weight={kl_weight}; expected reward_weight > 0 and kl_weight >= 0"
            )
        low, high = grad_step_range
        if not 0 <= low < high <= num_steps:
            raise ValueError(
                f"grad_step_range={tuple(grad_step_range)} with num_steps={num_steps}; expected "
                "0 <= low < high <= num_steps (step indices counted from the first denoising step)"
            )
        if truncated_backprop_steps is not None and not 1 <= truncated_backprop_steps <= num_steps:
            raise ValueError(f"truncated_backprop_steps={truncated_backprop_steps}; expected 1..{num_steps} or None")
        self.settings = record_arguments(self, ["policy", "reward", "optimizer", "evaluation"], arguments)
        self.evaluation = evaluation
        self.policy, self.reward, self.optimizer_factory = policy, reward, optimizer
        self.strict_loading = False
        self.guard = NonFiniteGuard(max_consecutive_skips, "ReFL")
        self.reward_history: list[Tensor] = []
        self._epoch_rewards: list[Tensor] = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimiser over the policy's trainable parameters (LoRA ``lr_scales`` per layer)."""
        return build_optimizer(self.optimizer_factory, self.policy.parameter_groups())

    def on_fit_start(self) -> None:
        """Keep a frozen reference denoiser for the KL term under full fine-tuning."""
        if self.settings.kl_weight > 0:
            self.policy.keep_reference()

    def _gradient_step_index(self, generator: torch.Generator) -> int:
        hp = self.settings
        if hp.truncated_backprop_steps is not None:
            return hp.num_steps - hp.truncated_backprop_steps
        low, high = hp.grad_step_range
        return int(torch.randint(low, high, (1,), generator=generator))

    def _step_kl(self, dist: Any, sample: Tensor, timesteps: Tensor, conditions: Conditioning) -> Tensor:
        """KL(p_theta || p_pretrained) of one step, mean over the batch (0 when beta = 0)."""
        if self.settings.kl_weight == 0:
            return dist.mean.new_zeros(())
        with torch.no_grad(), self.policy.reference():
            reference = self.policy.step_distribution(
                sample, timesteps, conditions, self.settings.eta, self.settings.guidance_scale
            )
        return gaussian_kl_same_std(dist.mean, reference.mean, dist.std).mean()

    def refl_loss(self, batch: PromptBatch) -> dict[str, Tensor]:
        """Loss of eq. (5) for one prompt batch, and what it is made of."""
        hp, policy = self.settings, self.policy
        generator = torch.Generator(policy.device).manual_seed(batch.seed)
        timesteps = policy.set_num_steps(hp.num_steps)
        conditions = policy.encode_prompts(batch.prompts)
        size = len(batch)
        start = self._gradient_step_index(torch.Generator().manual_seed(batch.seed))
        if is_sharded(policy.denoiser):  # FSDP2 gathers each block per call: every rank must call alike
            start = int(self.trainer.strategy.broadcast(start))  # rank 0's step, on every rank
        x = randn_tensor((size, *policy.sample_shape), generator=generator, device=policy.device, dtype=policy.dtype)
        # 1. no gradients down to the chosen step
        with torch.no_grad():
            x = policy.run_steps(x, conditions, timesteps[:start], hp.eta, hp.guidance_scale, generator)
        # 2. the gradient step(s)
        kl = x.new_zeros((), dtype=torch.float32)
        grad_steps = timesteps[start:] if hp.truncated_backprop_steps is not None else timesteps[start : start + 1]
        for t in grad_steps:
            t_batch = t.expand(size)
            dist = policy.step_distribution(x, t_batch, conditions, hp.eta, hp.guidance_scale)
            kl = kl + self._step_kl(dist, x, t_batch, conditions)
            if hp.truncated_backprop_steps is None:
                x = dist.pred_original_sample  # ReFL scores the x_0 predicted at step t
            else:
                x, _ = sample_step(dist, x.dtype, generator)  # reparameterised: d x / d mean = 1
        # 3. decode and score
        images = policy.decode(x)
        rewards = check_reward_output(self.reward(images, batch.prompts), size, type(self.reward).__name__)
        loss = -hp.reward_weight * rewards.mean() + hp.kl_weight * kl
        return {"loss": loss, "reward": rewards.detach().mean(), "kl": kl.detach(), "grad_step": torch.tensor(start)}

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        """One ReFL update's loss (a non-finite one gives non-finite gradients: the step is skipped)."""
        out = self.refl_loss(batch)
        self.log_dict({f"train/{k}": v.float() for k, v in out.items()}, batch_size=len(batch))
        self.log("reward", out["reward"], prog_bar=True, logger=False, batch_size=len(batch))
        self._epoch_rewards.append(out["reward"].float())
        if batch_idx + 1 >= self.trainer.num_training_batches:
            # the epoch's mean training reward over all processes (callbacks read it at epoch end)
            rewards = self.all_gather(torch.stack(self._epoch_rewards)).float()
            self.reward_history.append(rewards.nanmean().detach().cpu())
            self._epoch_rewards = []
        return out["loss"]

    def on_train_end(self) -> None:
        """Write the trained weights in diffusers format to ``<log_dir>/trained`` (never non-finite ones)."""
        self.write_trained()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip (and count) a step whose gradients are not finite; stop after too many in a row."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        fix = "Check the reward for NaN and lower the learning rate (or reward_weight)."
        if not self.guard.check_gradients(params, fix):
            self.log("train/skipped_steps", float(self.guard.skipped_steps))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold only the (finite) trainable weights; the base model reloads from its source."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["fault_counters"] = self.guard.state_dict()
        check_finite_state(checkpoint["state_dict"], "checkpoint")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint holds every trainable weight (and nothing else)."""
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        check_checkpoint_keys(checkpoint.get("state_dict", {}), trainable, self.state_dict().keys())
        self.guard.load_state_dict(checkpoint.get("fault_counters", {}))
