"""Training callbacks: attribute ratios per epoch, with the plots and sample grids of a run.

:class:`AttributeTracker` follows what the debiasing experiments report (Fig. 5-9 of the debiasing
paper, see docs/references.md): the share of each attribute among the generated images and the
mean reward, per epoch, plus the shares of a fixed-noise set of images of the pretrained and of
the fine-tuned model, with captioned grids of them. With ``per_prompt=True`` it also records the
shares of every prompt on its own and plots one curve per prompt (``attributes_per_prompt.png``),
so a run debiasing many prompts shows which prompt is still biased.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.figures import save_captioned_grid, shares_caption
from lightning_sdrl.functional.classifier_rewards import classify_with_threshold, joint_classes
from lightning_sdrl.functional.metrics import attribute_kl, pairwise_bias
from lightning_sdrl.rewards.attribute import BalanceReward, JointBalanceReward, class_shares, group_probabilities

_NOT_FINITE = -2  # class of an image with a non-finite probability: neither a class nor "None"


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
        per_prompt: also record the shares of each prompt's images of the epoch
            (``prompt_shares``, by prompt) and, with ``eval_samples``, of ``eval_samples``
            fixed-noise images of every prompt of the data (``prompt_eval_shares``); each prompt's
            columns are its own (``prompt_groups`` of ``BalanceReward`` or ``JointBalanceReward``).
            ``attributes_per_prompt.png`` then shows one curve per prompt: the share of its last
            column among classified images (``q`` of eq. 2 for two columns) and its KL divergence
            to the target, with the mean and the worst prompt.
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
        per_prompt: bool = False,
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
        self.eval_samples, self.eval_seed, self.per_prompt = eval_samples, eval_seed, per_prompt
        self.history: list[dict[str, Any]] = []
        self.before: dict[str, float] | None = None

    # ------------------------------------------------------------------ helpers
    def attribute_probs(
        self, pl_module: pl.LightningModule, images: Tensor, prompts: Sequence[str] | None = None
    ) -> Tensor:
        """Attribute probabilities ``[B, G]`` of images, from our classifier or the reward's.

        ``prompts`` are needed only by a reward with per-prompt groups (``prompt_groups``).
        """
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
            if getattr(reward, "prompt_groups", None):
                return reward.attribute_probs(images, prompts)
            return reward.attribute_probs(images)

    def attribute_classes(
        self, pl_module: pl.LightningModule, images: Tensor, prompts: Sequence[str] | None = None
    ) -> tuple[Tensor, int]:
        """Thresholded class of each image ``[B]`` and the number of columns.

        ``-1`` is "None", ``-2`` an image with a non-finite probability. A
        :class:`~lightning_sdrl.rewards.attribute.JointBalanceReward` (and no classifier of our
        own) gives the joint classes of its attributes, "None" if any is unsure (each image's
        columns its prompt's, with the reward's ``prompt_groups``).
        """
        reward = pl_module.reward
        if self.classifier is None and isinstance(reward, JointBalanceReward):
            with torch.no_grad():
                probs = reward.attribute_probs_list(images, prompts if reward.prompt_groups else None)
            finite = torch.stack([torch.isfinite(p).all(dim=1) for p in probs]).all(dim=0)
            classes, num_columns = joint_classes(probs, self.threshold), math.prod(p.shape[1] for p in probs)
        else:
            probs = self.attribute_probs(pl_module, images, prompts)
            finite = torch.isfinite(probs).all(dim=1)
            classes, num_columns = classify_with_threshold(probs, self.threshold), probs.shape[1]
        return classes.masked_fill(~finite, _NOT_FINITE), num_columns

    def column_names(self, pl_module: pl.LightningModule, num_columns: int, prompt: str | None = None) -> list[str]:
        """Names of the attribute columns (of ``prompt``'s, with per-prompt groups), then ``"None"``."""
        reward = pl_module.reward
        names = self.names
        if not names and prompt is not None and hasattr(reward, "prompt_attribute_names"):
            names = reward.prompt_attribute_names(prompt)
        names = names or getattr(reward, "attribute_names", None)
        if not names or len(names) != num_columns:
            names = [f"class {i}" for i in range(num_columns)]
        return [*names, "None"]

    def _prompt(self, trainer: pl.Trainer) -> str:
        return self.prompt or trainer.datamodule.prompts[0]

    def _prompt_batch(self, trainer: pl.Trainer, size: int, seed: int) -> PromptBatch:
        return PromptBatch([self._prompt(trainer)] * size, torch.zeros(size, dtype=torch.long), seed=seed)

    def _gather_classes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor, prompts: Sequence[str]
    ) -> tuple[Tensor, list[str], int]:
        """Classes (:meth:`attribute_classes`) and prompts of the images of every device, in rank order."""
        classes, num_columns = self.attribute_classes(pl_module, images, prompts)
        classes = pl_module.all_gather(classes)
        prompts = list(prompts)
        if trainer.world_size > 1:
            classes = classes.flatten(0, 1)
            gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(gathered, prompts)
            prompts = sum(gathered, [])
        not_finite = int((classes == _NOT_FINITE).sum())
        if not_finite:
            rank_zero_warn(f"AttributeTracker: {not_finite} of {len(classes)} images are not finite")
        return classes, prompts, num_columns

    def _named_shares(
        self, pl_module: pl.LightningModule, classes: Tensor, num_columns: int, prompt: str | None = None
    ) -> dict[str, float]:
        """Shares of the finite images' classes, by column name (non-finite images left out)."""
        shares = class_shares(classes[classes != _NOT_FINITE], num_columns)
        return dict(zip(self.column_names(pl_module, num_columns, prompt), shares.tolist(), strict=True))

    def _shares(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor, prompts: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Attribute shares of the finite images gathered from every device, by column name.

        Non-finite images (a diverged policy) are left out of the shares and reported on the
        console, never counted as "None".
        """
        prompts = [self._prompt(trainer)] * len(images) if prompts is None else prompts
        classes, _, num_columns = self._gather_classes(trainer, pl_module, images, prompts)
        return self._named_shares(pl_module, classes, num_columns, prompts[0] if len(set(prompts)) == 1 else None)

    def _prompt_shares(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor, prompts: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """Shares of each prompt's images (all devices), by prompt, in the data's prompt order."""
        classes, prompts, num_columns = self._gather_classes(trainer, pl_module, images, prompts)
        known = list(trainer.datamodule.prompts)
        order = [p for p in known if p in prompts] + sorted(set(prompts) - set(known))
        shares = {}
        for prompt in order:
            rows = torch.tensor([i for i, other in enumerate(prompts) if other == prompt], device=classes.device)
            shares[prompt] = self._named_shares(pl_module, classes[rows], num_columns, prompt)
        return shares

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
            "shares": self._shares(trainer, pl_module, update.images, update.prompts),
        }
        line = f"epoch {record['epoch']:3d} | reward {record['reward_mean']:+.4f} | {_format(record['shares'])}"
        if self.eval_samples:
            batch = self._prompt_batch(trainer, self.eval_samples, self.eval_seed + trainer.global_rank)
            record["eval_shares"] = self._shares(trainer, pl_module, pl_module.sample(batch).images)
            line += f" || fixed-noise eval: {_format(record['eval_shares'])}"
        if self.per_prompt:
            record["prompt_shares"] = self._prompt_shares(trainer, pl_module, update.images, update.prompts)
            shown = "prompt_shares"
            if self.eval_samples:
                record["prompt_eval_shares"] = self._prompt_eval_shares(trainer, pl_module)
                shown = "prompt_eval_shares"
            for prompt, shares in record[shown].items():
                line += f'\n    "{prompt}"{" (fixed noise)" if self.eval_samples else ""}: {_format(shares)}'
        # the fairness literature's bias of each shares entry (classified images; see prompt_bias)
        for key in ("shares", "eval_shares"):
            if key in record:
                record[key.replace("shares", "bias")] = prompt_bias(record[key])
        for key in ("prompt_shares", "prompt_eval_shares"):
            if key in record:
                record[key.replace("shares", "bias")] = {p: prompt_bias(s) for p, s in record[key].items()}
        self.history.append(record)
        rank_zero_info(line)

    def _prompt_eval_shares(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        """Shares of ``eval_samples`` images of every prompt, from the same noise every epoch."""
        shares = {}
        for prompt in trainer.datamodule.prompts:
            size, seed = self.eval_samples, self.eval_seed + trainer.global_rank
            batch = PromptBatch([prompt] * size, torch.zeros(size, dtype=torch.long), seed=seed)
            shares[prompt] = self._shares(trainer, pl_module, pl_module.sample(batch).images, batch.prompts)
        return shares

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
            "bias": {"before": None if self.before is None else prompt_bias(self.before), "after": prompt_bias(after)},
            "history": self.history,
        }
        (directory / "attributes.json").write_text(json.dumps(summary, indent=2))
        if self.history:
            balance = isinstance(pl_module.reward, BalanceReward | JointBalanceReward)
            target = 100 / (len(self.history[0]["shares"]) - 1) if balance else None
            plot_history(self.history, directory / "attributes.png", prompt=self._prompt(trainer), target=target)
        if self.history and "prompt_shares" in self.history[0]:
            targets = getattr(pl_module.reward, "target_distribution", None)
            plot_prompt_history(
                self.history, directory / "attributes_per_prompt.png", None if targets is None else targets.tolist()
            )

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


def prompt_kl(shares: dict[str, float], target: Sequence[float] | None = None) -> float:
    """KL divergence (nats) of one prompt's classified shares to the target, ``"None"`` left out.

    Args:
        shares: shares by column name (the last one ``"None"``), as in ``prompt_shares``.
        target: target share of each column; ``None`` for uniform.

    Returns:
        ``KL(p || t)`` with ``p`` the shares of the classified images; ``nan`` if none is.

    Example:
        >>> round(prompt_kl({"0": 0.6, "6": 0.2, "None": 0.2}), 4)
        0.1308
    """
    counts = torch.tensor([value for key, value in shares.items() if key != "None"], dtype=torch.float64)
    if counts.sum() <= 0:
        return float("nan")
    return float(attribute_kl(counts, None if target is None else torch.tensor(target)))


def prompt_bias(shares: dict[str, float]) -> float | None:
    """Shen et al.'s bias (mean over class pairs of ``|freq_i - freq_j|``) of classified shares, ``"None"`` left out.

    Args:
        shares: shares by column name (the last one ``"None"``), as in ``shares`` or ``prompt_shares``.

    Returns:
        The bias of the classified images' frequencies (0 balanced, ``2 / K`` one class only);
        ``None`` if no image is classified (JSON has no NaN).

    Example:
        >>> round(prompt_bias({"0": 0.6, "6": 0.2, "None": 0.2}), 4)
        0.5
    """
    counts = torch.tensor([value for key, value in shares.items() if key != "None"], dtype=torch.float64)
    if counts.sum() <= 0:
        return None
    return float(pairwise_bias(counts))


def plot_prompt_history(history: list[dict[str, Any]], path: Path, target: Sequence[float] | None = None) -> None:
    """One curve per prompt against epoch: its last column's ratio and its KL to the target.

    Uses the fixed-noise ``prompt_eval_shares`` when recorded, else the epoch's ``prompt_shares``.
    Left: the share of each prompt's last column among its classified images (``q`` of eq. (2)
    for two columns), with the target share dotted. Right: each prompt's KL divergence to the
    target (:func:`prompt_kl`), the mean over prompts and the worst prompt, so a prompt that is
    still biased stands out.

    Args:
        history: the per-epoch records of :class:`AttributeTracker` (``per_prompt=True``).
        path: the PNG to write.
        target: target share of each column; ``None`` for uniform.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "prompt_eval_shares" if "prompt_eval_shares" in history[0] else "prompt_shares"
    epochs = [record["epoch"] for record in history]
    prompts = list(history[0][key])
    fig, (ax_ratio, ax_kl) = plt.subplots(1, 2, figsize=(11, 3.8))
    kls = []
    for index, prompt in enumerate(prompts):
        columns = list(history[0][key][prompt])[:-1]
        ratios = [100 * classified_ratio(record[key][prompt], columns[-1]) for record in history]
        ax_ratio.plot(epochs, ratios, marker="o", color=f"C{index}", label=f'"{prompt}": {columns[-1]}')
        kls.append([prompt_kl(record[key][prompt], target) for record in history])
        ax_kl.plot(epochs, kls[-1], marker="o", color=f"C{index}", label=f'"{prompt}"')
    num_columns = len(history[0][key][prompts[0]]) - 1
    goal = 100 * (target[-1] if target is not None else 1 / num_columns)
    ax_ratio.axhline(goal, color="grey", linestyle=":", linewidth=1, label=f"target ({goal:.0f}%)")
    values = torch.tensor(kls, dtype=torch.float64)
    ax_kl.plot(epochs, values.nanmean(dim=0).tolist(), color="black", linestyle="--", label="mean over prompts")
    worst = torch.where(values.isnan(), -math.inf, values).amax(dim=0)
    ax_kl.plot(epochs, worst.tolist(), color="black", linestyle=":", label="worst prompt")
    noise = "fixed-noise samples" if key == "prompt_eval_shares" else "training samples"
    ax_ratio.set(xlabel="epoch", ylabel="share among classified (%)", ylim=(-2, 102), title=f"per prompt ({noise})")
    ax_kl.set(xlabel="epoch", ylabel="KL to target (nats)", title="attribute KL per prompt")
    ax_ratio.legend(fontsize=7)
    ax_kl.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
