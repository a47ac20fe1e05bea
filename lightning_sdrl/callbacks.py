"""Training callbacks: attribute ratios per epoch, with the plots and sample grids of a run.

:class:`AttributeTracker` follows what the debiasing experiments report (Fig. 5-9 of
../shared/seeds/ddpo_gender_debiasing.txt): the share of each attribute among the generated images
and the mean reward, per epoch, plus images of the same prompts and noise before and after
fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.rewards.attribute import attribute_shares, group_probabilities


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
        num_grid_images: images in the before/after grids.
        grid_seed: noise seed of the before/after grids (the same noise before and after).
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
        grid_seed: int = 1234,
        eval_samples: int = 0,
        eval_seed: int = 4321,
    ) -> None:
        if eval_samples < 0:
            raise ValueError(f"eval_samples={eval_samples}; expected 0 (off) or a positive number of images")
        self.classifier, self.groups, self.names = classifier, groups, names
        self.threshold, self.prompt = threshold, prompt
        self.num_grid_images, self.grid_seed = num_grid_images, grid_seed
        self.eval_samples, self.eval_seed = eval_samples, eval_seed
        self.history: list[dict[str, Any]] = []

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

    def _prompt_batch(self, trainer: pl.Trainer, size: int, seed: int) -> PromptBatch:
        prompt = self.prompt or trainer.datamodule.prompts[0]
        return PromptBatch([prompt] * size, torch.zeros(size, dtype=torch.long), seed=seed)

    def _shares(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor) -> dict[str, float]:
        """Attribute shares of images gathered from every device, by column name."""
        probs = pl_module.all_gather(self.attribute_probs(pl_module, images))
        probs = probs.flatten(0, 1) if trainer.world_size > 1 else probs
        shares = attribute_shares(probs, self.threshold)
        return dict(zip(self.column_names(pl_module, len(shares) - 1), shares.tolist(), strict=True))

    def _grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> dict[str, float]:
        """Sample the fixed grid prompt/noise, save ``<name>.png``; returns its attribute shares."""
        from torchvision.utils import save_image

        trajectory = pl_module.sample(self._prompt_batch(trainer, self.num_grid_images, self.grid_seed))
        directory = self._log_dir(trainer)
        shares = attribute_shares(self.attribute_probs(pl_module, trajectory.images), self.threshold)
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            save_image(trajectory.images.float().cpu(), directory / f"{name}.png", nrow=4)
        return dict(zip(self.column_names(pl_module, len(shares) - 1), shares.tolist(), strict=True))

    @staticmethod
    def _log_dir(trainer: pl.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)  # collective under DDP: all ranks call

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Grid of the pretrained model (Fig. 5): same prompt and noise as the final grid."""
        self.before = self._grid(trainer, pl_module, "samples_before")
        rank_zero_info(f"before fine-tuning: {_format(self.before)}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print and record the attribute shares and mean reward of the epoch's samples."""
        update = getattr(pl_module, "last_update", None)
        if update is None:
            return
        record: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "reward_mean": float(update.rewards.float().mean()),
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
        """Grid of the fine-tuned model (Fig. 9), the history as JSON and its plot (Fig. 8)."""
        after = self._grid(trainer, pl_module, "samples_after")
        rank_zero_info(f"after fine-tuning: {_format(after)}")
        directory = self._log_dir(trainer)
        if not trainer.is_global_zero:
            return
        summary = {"before": self.before, "after": after, "history": self.history}
        (directory / "attributes.json").write_text(json.dumps(summary, indent=2))
        if self.history:
            plot_history(self.history, directory / "attributes.png")

    def state_dict(self) -> dict[str, Any]:
        """The per-epoch history, kept in checkpoints so a resumed run plots all of it."""
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history."""
        self.history = list(state_dict.get("history", []))


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


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Attribute shares and mean reward against epoch (the paper's Fig. 8), saved as a PNG."""
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
    ax_share.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax_share.set(xlabel="epoch", ylabel="share of samples (%)", ylim=(-2, 102), title="attribute ratio")
    ax_share.legend(fontsize=8)
    ax_reward.plot(epochs, [r["reward_mean"] for r in history], marker="o", color="black")
    ax_reward.set(xlabel="epoch", ylabel="mean reward", title="reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
