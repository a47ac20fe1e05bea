"""Training callbacks: attribute ratios per epoch, with the plots and sample grids of a run.

:class:`AttributeTracker` follows what the debiasing experiments report (Fig. 5-9 of the debiasing
paper, see docs/references.md): the share of each attribute among the generated images and the
mean reward, per epoch, plus the shares of a fixed-noise set of images of the pretrained and of
the fine-tuned model, with captioned grids of them.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.figures import save_captioned_grid, shares_caption
from lightning_sdrl.rewards.attribute import BalanceReward, attribute_shares, group_probabilities


class AttributeTracker(pl.Callback):
    """Print and plot the attribute distribution of each epoch's samples (DDPO).

    Args:
        classifier: images ``[B,3,H,W]`` -> class probabilities ``[B,K]``; ``None`` uses the
            reward's own classifier (``ShiftReward`` / ``BalanceReward``).
        groups: classes summed into each attribute column (``None``: the reward's grouping, or
            every class on its own).
        names: a name per attribute column (default: the reward's attribute names).
        threshold: confidence below which an image counts as "None" (0.7 in the paper).
        prompt: the prompt of the before/after grids (default: the data's first prompt).
        num_grid_images: images shown in the before/after grids (the first of the summary samples).
        summary_samples: images per device, from fixed noise (``grid_seed``), on which the
            before/after shares of ``attributes.json`` are measured: the pretrained policy (LoRA
            switched off, also after a resume) and the fine-tuned one, from the same noise.
        grid_seed: noise seed of the before/after samples (device ``r`` uses ``grid_seed + r``).
        eval_samples: if > 0, after every epoch also sample this many images of the grid prompt per
            device, from the same noise every epoch, and record their shares as ``eval_shares``.
            The epoch's own batch is fresh noise each time; fixed noise removes that sampling
            noise from the epoch-to-epoch comparison, so "holds balance" is measured on the
            policy rather than on the luck of one batch.
        eval_seed: noise seed of those evaluation samples (device ``r`` uses ``eval_seed + r``).
    """

    def __init__(
        self,
        classifier: nn.Module | None = None,
        groups: list[list[int]] | None = None,
        names: list[str] | None = None,
        threshold: float = 0.7,
        prompt: str | None = None,
        num_grid_images: int = 16,
        summary_samples: int = 256,
        grid_seed: int = 1234,
        eval_samples: int = 0,
        eval_seed: int = 4321,
    ) -> None:
        if eval_samples < 0:
            raise ValueError(f"eval_samples={eval_samples}; expected 0 (off) or a positive number of images")
        if not 1 <= num_grid_images <= summary_samples:
            raise ValueError(
                f"num_grid_images={num_grid_images}, summary_samples={summary_samples}; expected "
                "1 <= num_grid_images <= summary_samples (the grid shows the first summary samples)"
            )
        self.classifier, self.groups, self.names = classifier, groups, names
        self.threshold, self.prompt = threshold, prompt
        self.num_grid_images, self.summary_samples, self.grid_seed = num_grid_images, summary_samples, grid_seed
        self.eval_samples, self.eval_seed = eval_samples, eval_seed
        self.history: list[dict[str, Any]] = []
        self.before: dict[str, float] | None = None

    # ------------------------------------------------------------------ helpers
    def attribute_probs(self, pl_module: pl.LightningModule, images: Tensor) -> Tensor:
        """Attribute probabilities ``[B, G]`` of images, from our classifier or the reward's."""
        if self.classifier is not None:
            self.classifier.to(images.device).eval()
            with torch.no_grad():
                return group_probabilities(self.classifier(images), self.groups)
        reward = pl_module.reward
        if not hasattr(reward, "attribute_probs"):
            raise ValueError(
                f"AttributeTracker has no classifier and the reward {type(reward).__name__} has none either; "
                "set AttributeTracker(classifier=...) or use ShiftReward / BalanceReward"
            )
        with torch.no_grad():
            return reward.attribute_probs(images)

    def column_names(self, pl_module: pl.LightningModule, num_columns: int) -> list[str]:
        """Names of the attribute columns, then ``"None"``."""
        names = self.names or getattr(pl_module.reward, "attribute_names", None)
        if not names or len(names) != num_columns:
            names = [f"class {i}" for i in range(num_columns)]
        return [*names, "None"]

    def _prompt(self, trainer: pl.Trainer) -> str:
        return self.prompt or trainer.datamodule.prompts[0]

    def _prompt_batch(self, trainer: pl.Trainer, size: int, seed: int) -> PromptBatch:
        return PromptBatch([self._prompt(trainer)] * size, torch.zeros(size, dtype=torch.long), seed=seed)

    def _shares(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor) -> dict[str, float]:
        """Attribute shares of the finite images gathered from every device, by column name.

        Non-finite images (a diverged policy) are left out of the shares and reported on the
        console, never counted as "None".
        """
        probs = pl_module.all_gather(self.attribute_probs(pl_module, images))
        probs = probs.flatten(0, 1) if trainer.world_size > 1 else probs
        finite = torch.isfinite(probs).all(dim=1)
        if not bool(finite.all()):
            rank_zero_warn(f"AttributeTracker: {int((~finite).sum())} of {len(probs)} images are not finite")
        shares = attribute_shares(probs[finite], self.threshold)
        return dict(zip(self.column_names(pl_module, len(shares) - 1), shares.tolist(), strict=True))

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, title: str) -> dict[str, float]:
        """Sample the fixed summary prompt/noise, save the captioned ``<name>.png``; returns its shares."""
        batch = self._prompt_batch(trainer, self.summary_samples, self.grid_seed + trainer.global_rank)
        images = pl_module.sample(batch).images
        shares = self._shares(trainer, pl_module, images)
        directory = self._log_dir(trainer)
        if trainer.is_global_zero:
            total = self.summary_samples * trainer.world_size
            caption = (
                f'{title}: "{self._prompt(trainer)}"\n{shares_caption(shares)} '
                f"(of {total} fixed-noise samples; the first {self.num_grid_images} shown)"
            )
            save_captioned_grid(images[: self.num_grid_images], directory / f"{name}.png", caption)
        return shares

    @staticmethod
    def _log_dir(trainer: pl.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)  # collective under DDP: all ranks call

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Shares and grid of the pretrained model (Fig. 5): same prompt and noise as the final ones.

        Measured with the LoRA switched off, so a resumed run reports the pretrained model too; a
        resumed full fine-tuning (no pretrained copy) keeps the ``before`` of its checkpoint.
        """
        total = self.summary_samples * trainer.world_size
        policy = pl_module.policy
        if self.before is not None and (trainer.ckpt_path or getattr(policy, "lora", None) is None):
            rank_zero_info(f"before fine-tuning (from the checkpoint): {_format(self.before)}")
            return
        if getattr(policy, "lora", None) is None and trainer.ckpt_path:
            rank_zero_warn("AttributeTracker: resumed full fine-tuning without a recorded 'before'; it is skipped")
            return
        context = policy.reference() if getattr(policy, "lora", None) is not None else contextlib.nullcontext()
        with context:
            self.before = self._summary(trainer, pl_module, "samples_before", "before fine-tuning")
        rank_zero_info(f"before fine-tuning ({total} fixed-noise samples): {_format(self.before)}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print and record the attribute shares and mean reward of the epoch's samples."""
        update = getattr(pl_module, "last_update", None)
        if update is None:
            return
        record: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "reward_mean": float(update.rewards.float().nanmean()),
            "shares": self._shares(trainer, pl_module, update.images),
        }
        line = f"epoch {record['epoch']:3d} | reward {record['reward_mean']:+.4f} | {_format(record['shares'])}"
        if self.eval_samples:
            batch = self._prompt_batch(trainer, self.eval_samples, self.eval_seed + trainer.global_rank)
            record["eval_shares"] = self._shares(trainer, pl_module, pl_module.sample(batch).images)
            line += f" || fixed-noise eval: {_format(record['eval_shares'])}"
        self.history.append(record)
        rank_zero_info(line)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Shares and grid of the fine-tuned model (Fig. 9), the history as JSON and its plot (Fig. 8)."""
        title = f"after fine-tuning ({trainer.current_epoch} epochs)"
        after = self._summary(trainer, pl_module, "samples_after", title)
        rank_zero_info(
            f"after fine-tuning ({self.summary_samples * trainer.world_size} fixed-noise samples): {_format(after)}"
        )
        directory = self._log_dir(trainer)
        if not trainer.is_global_zero:
            return
        summary = {
            "prompt": self._prompt(trainer),
            "summary_samples": self.summary_samples * trainer.world_size,
            "before": self.before,
            "after": after,
            "history": self.history,
        }
        (directory / "attributes.json").write_text(json.dumps(summary, indent=2))
        if self.history:
            balance = isinstance(pl_module.reward, BalanceReward)
            target = 100 / (len(self.history[0]["shares"]) - 1) if balance else None
            plot_history(self.history, directory / "attributes.png", prompt=self._prompt(trainer), target=target)

    def state_dict(self) -> dict[str, Any]:
        """The per-epoch history and the pretrained shares, kept in checkpoints for a resumed run."""
        return {"history": self.history, "before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history."""
        self.history = list(state_dict.get("history", []))
        self.before = state_dict.get("before")


class RewardTracker(pl.Callback):
    """Before/after grids, per-epoch mean reward and its curve for any DDPO or ReFL run.

    Writes to the run's log directory ``samples_before.png`` (the pretrained policy: LoRA
    switched off, also after a resume) and ``samples_after.png`` of the same prompts and noise,
    captioned with their mean reward; ``rewards.json`` (``before``, ``after``, ``history``) and
    ``reward_curve.png``. Use :class:`AttributeTracker` instead for attribute (debiasing) runs,
    which writes the grids with attribute shares.

    Args:
        num_samples: fixed-noise images per device for the before/after mean reward.
        num_grid_images: images shown in each grid (the first of those samples).
        seed: noise seed of the before/after samples (device ``r`` uses ``seed + r``).
    """

    def __init__(self, num_samples: int = 64, num_grid_images: int = 16, seed: int = 1234) -> None:
        if not 1 <= num_grid_images <= num_samples:
            raise ValueError(
                f"num_grid_images={num_grid_images}, num_samples={num_samples}; expected "
                "1 <= num_grid_images <= num_samples (the grid shows the first samples)"
            )
        self.num_samples, self.num_grid_images, self.seed = num_samples, num_grid_images, seed
        self.history: list[dict[str, Any]] = []
        self.before: float | None = None

    def _batch(self, trainer: pl.Trainer) -> PromptBatch:
        prompts = trainer.datamodule.prompts
        ids = torch.arange(self.num_samples) % len(prompts)
        return PromptBatch([prompts[i] for i in ids.tolist()], ids, seed=self.seed + trainer.global_rank)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, title: str) -> float:
        """Sample the fixed prompts/noise, save the captioned ``<name>.png``; returns the mean reward."""
        batch = self._batch(trainer)
        images = pl_module.sample(batch).images
        with torch.no_grad():
            rewards = pl_module.reward(images, batch.prompts).float()
        mean = float(pl_module.all_gather(rewards).float().nanmean())
        if trainer.is_global_zero:
            prompts = list(dict.fromkeys(batch.prompts[: self.num_grid_images]))
            shown = "; ".join(f'"{p}"' for p in prompts[:3]) + (
                f" and {len(prompts) - 3} more" if len(prompts) > 3 else ""
            )
            caption = (
                f"{title}: mean reward {mean:+.4f} (of {self.num_samples * trainer.world_size} fixed-noise "
                f"samples; the first {self.num_grid_images} shown)\n{shown}"
            )
            save_captioned_grid(
                images[: self.num_grid_images], AttributeTracker._log_dir(trainer) / f"{name}.png", caption
            )
        return mean

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Mean reward and grid of the pretrained policy (kept from the checkpoint on a resume)."""
        policy = pl_module.policy
        lora = getattr(policy, "lora", None) is not None
        if self.before is not None and (trainer.ckpt_path or not lora):
            return
        if not lora and trainer.ckpt_path:
            rank_zero_warn("RewardTracker: resumed full fine-tuning without a recorded 'before'; it is skipped")
            return
        with policy.reference() if lora else contextlib.nullcontext():
            self.before = self._measure(trainer, pl_module, "samples_before", "before fine-tuning")
        rank_zero_info(f"before fine-tuning: mean reward {self.before:+.4f}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the epoch's mean training reward (``pl_module.reward_history``)."""
        history = getattr(pl_module, "reward_history", [])
        if len(history) > len(self.history):
            self.history.append({"epoch": trainer.current_epoch, "reward_mean": float(history[-1])})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Grid and mean reward of the fine-tuned policy; ``rewards.json`` and ``reward_curve.png``."""
        after = self._measure(
            trainer, pl_module, "samples_after", f"after fine-tuning ({trainer.current_epoch} epochs)"
        )
        rank_zero_info(f"after fine-tuning: mean reward {after:+.4f}")
        directory = AttributeTracker._log_dir(trainer)
        if not trainer.is_global_zero:
            return
        summary = {"num_samples": self.num_samples * trainer.world_size, "before": self.before, "after": after}
        (directory / "rewards.json").write_text(json.dumps({**summary, "history": self.history}, indent=2))
        if self.history:
            plot_reward_curve(self.history, directory / "reward_curve.png", before=self.before, after=after)

    def state_dict(self) -> dict[str, Any]:
        """History and the pretrained mean reward, for a resumed run."""
        return {"history": self.history, "before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history."""
        self.history = list(state_dict.get("history", []))
        self.before = state_dict.get("before")


def plot_reward_curve(
    history: list[dict[str, Any]], path: Path, before: float | None = None, after: float | None = None
) -> None:
    """Mean training reward against epoch, with the fixed-noise before/after values, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([r["epoch"] for r in history], [r["reward_mean"] for r in history], marker="o", label="training batches")
    if before is not None:
        ax.axhline(before, color="grey", linestyle=":", label=f"pretrained, fixed noise ({before:+.3f})")
    if after is not None:
        ax.axhline(after, color="C1", linestyle="--", label=f"fine-tuned, fixed noise ({after:+.3f})")
    ax.set(xlabel="epoch", ylabel="mean reward", title="reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def classified_ratio(shares: dict[str, float], column: str) -> float:
    """``q`` of eq. (2): ``column``'s share among the classified (not ``"None"``) images.

    Args:
        shares: one record's shares by column name, as :class:`AttributeTracker` writes them
            (``shares`` / ``eval_shares`` in ``attributes.json``).
        column: the attribute column whose ratio is wanted.

    Returns:
        The ratio in ``[0, 1]``; ``0.0`` if no image was classified.

    Example:
        >>> classified_ratio({"0": 0.45, "6+8+9": 0.45, "None": 0.1}, "6+8+9")
        0.5
    """
    classified = sum(value for key, value in shares.items() if key != "None")
    return shares[column] / classified if classified else 0.0


def _format(shares: dict[str, float]) -> str:
    return " | ".join(f"{name} {100 * share:5.1f}%" for name, share in shares.items())


def plot_history(
    history: list[dict[str, Any]], path: Path, prompt: str | None = None, target: float | None = None
) -> None:
    """Attribute shares and mean reward against epoch (the paper's Fig. 8), saved as a PNG.

    Args:
        history: the per-epoch records of :class:`AttributeTracker`.
        path: the PNG to write.
        prompt: named in the title.
        target: a share (in %) drawn as a dotted line, e.g. 50 for a two-class balance run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [record["epoch"] for record in history]
    fig, (ax_share, ax_reward) = plt.subplots(1, 2, figsize=(10, 3.6))
    for index, name in enumerate(history[0]["shares"]):
        color = f"C{index}"
        ax_share.plot(epochs, [100 * r["shares"][name] for r in history], marker="o", color=color, label=name)
        if "eval_shares" in history[0]:
            eval_shares = [100 * r["eval_shares"][name] for r in history]
            ax_share.plot(epochs, eval_shares, linestyle="--", color=color, alpha=0.6, label=f"{name} (fixed noise)")
    if target is not None:
        ax_share.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"balance ({target:.0f}%)")
    title = f'attribute ratio: "{prompt}"' if prompt else "attribute ratio"
    ax_share.set(xlabel="epoch", ylabel="share of samples (%)", ylim=(-2, 102), title=title)
    ax_share.legend(fontsize=8)
    ax_reward.plot(epochs, [r["reward_mean"] for r in history], marker="o", color="black")
    ax_reward.set(xlabel="epoch", ylabel="mean reward", title="reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
