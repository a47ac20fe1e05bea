"""Training a preference reward model on ranked comparisons (the reward-model report, IV.1 and V.1).

A frozen CLIP embeds images and prompts (once, cached by the DataModule); an MLP head is trained
with the Bradley-Terry loss of eq. (4) on ``(prompt, better, worse)`` embedding triples. The best
head on the validation set is exported with the score statistics that standardise it into a
:class:`~lightning_sdrl.rewards.reward_model.LearnedPreferenceReward`.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_sdrl.data.imagereward_db import PreferenceBatch
from lightning_sdrl.functional.preference import pairwise_loss, preference_accuracy
from lightning_sdrl.modules.guards import NonFiniteGuard, check_finite_state
from lightning_sdrl.modules.hyperparameters import record_arguments
from lightning_sdrl.rewards.reward_model import CLIPEmbedder, RewardHead, save_reward_head


class RewardModelModule(pl.LightningModule):
    """Fits a :class:`RewardHead` on frozen CLIP embeddings of ranked comparisons.

    Batches are :class:`~lightning_sdrl.data.imagereward_db.PreferenceBatch` embeddings (from
    :class:`~lightning_sdrl.data.imagereward_db.ImageRewardDataModule`, which encodes with this
    module's ``embedder``). Logs ``{train,val,test}/loss`` and ``{train,val,test}/accuracy``
    (preference accuracy, predicted ties wrong). Checkpoints leave out the frozen CLIP weights.

    Args:
        clip_model_name: open_clip config of the frozen CLIP (the report: OpenAI ViT-L/14).
        clip_pretrained: Local weights file of that CLIP; ``None`` is random (tests only).
        hidden_sizes: Head hidden widths (seed: 1024, 256, 128, 32).
        dropout: Head dropout on the input, then the first hidden layers (seed: 0.2, 0.2, 0.1).
        lr: Adam learning rate, constant (seed: 1e-5).
        betas: Adam betas (seed: 0.9, 0.99).
        eps: Adam epsilon (seed: 1e-8).
        weight_decay: Adam L2 weight decay (the report uses none).
        export_dir: Folder to write the trained head to when fitting ends (see :meth:`export`);
            ``None`` skips it.
        embedder: Another frozen embedder with :class:`CLIPEmbedder`'s interface (``embed_dim``,
            ``cache_key``, ``device``, ``preprocess``, ``encode_pixels``, ``encode_text``, and
            ``config()`` for export), e.g.
            :class:`~lightning_sdrl.digits.embedder.DigitsEmbedder` for the digits default;
            replaces the CLIP named by ``clip_model_name`` / ``clip_pretrained``.
        max_consecutive_skips: optimiser steps skipped in a row (non-finite gradients) after which
            the run stops with an error.
    """

    def __init__(
        self,
        clip_model_name: str = "ViT-L-14-quickgelu",
        clip_pretrained: str | None = None,
        hidden_sizes: Sequence[int] = (1024, 256, 128, 32),
        dropout: Sequence[float] = (0.2, 0.2, 0.1),
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        export_dir: str | None = None,
        embedder: nn.Module | None = None,
        max_consecutive_skips: int = 3,
    ) -> None:
        super().__init__()
        record_arguments(self, ["embedder"])
        self.guard = NonFiniteGuard(max_consecutive_skips, "reward model")
        self.embedder = CLIPEmbedder(clip_model_name, pretrained=clip_pretrained) if embedder is None else embedder
        self.head = RewardHead(self.embedder.embed_dim, hidden_sizes, dropout)

    def forward(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Unnormalised rewards ``[B]`` of image and prompt embeddings ``[B, D]``."""
        return self.head(image_embeds, text_embeds)

    def _shared_step(self, batch: PreferenceBatch, stage: str) -> Tensor:
        better = self(batch.better, batch.text)
        worse = self(batch.worse, batch.text)
        loss = pairwise_loss(better, worse)  # eq. (4)
        size = len(batch.text)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=size)
        self.log(f"{stage}/accuracy", preference_accuracy(better, worse), batch_size=size)
        return loss

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        """Bradley-Terry loss of a batch of comparisons."""
        return self._shared_step(batch, "train")

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        """Log validation loss and preference accuracy."""
        self._shared_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Print the epoch's validation accuracy and loss (what ``ModelCheckpoint`` selects on)."""
        metrics = self.trainer.callback_metrics
        if self.trainer.sanity_checking or "val/accuracy" not in metrics:
            return
        rank_zero_info(
            f"epoch {self.current_epoch:3d} | val/accuracy {float(metrics['val/accuracy']):.4f} | "
            f"val/loss {float(metrics['val/loss']):.4f}"
        )

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        """Log test loss and preference accuracy."""
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the head only, with the report's settings as defaults."""
        hp = self.hparams
        return torch.optim.Adam(
            self.head.parameters(),
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
            weight_decay=hp.weight_decay,
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip (and count) a step whose gradients are not finite; stop after too many in a row."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self.guard.check_gradients(params, "Lower the learning rate; check the embeddings for NaN."):
            self.log("train/skipped_steps", float(self.guard.skipped_steps))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen CLIP out of checkpoints (rebuilt from ``clip_pretrained``); refuse non-finite weights."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("embedder.")]:
            del state[key]
        checkpoint["fault_counters"] = self.guard.state_dict()
        check_finite_state(state, "checkpoint")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put this module's CLIP weights back so the checkpoint loads strictly."""
        embedder_state = {f"embedder.{k}": v for k, v in self.embedder.state_dict().items()}
        checkpoint["state_dict"] = {**embedder_state, **checkpoint["state_dict"]}
        self.guard.load_state_dict(checkpoint.get("fault_counters", {}))

    @torch.no_grad()
    def export(self, directory: str | Path, image_embeds: Tensor, text_embeds: Tensor) -> None:
        """Save the head for :meth:`LearnedPreferenceReward.from_pretrained`.

        Like ImageReward, the reward is standardised with the mean and standard deviation of the
        head's scores over the training images, given here as their embeddings.

        Args:
            directory: Folder to write ``config.json`` and ``head.safetensors`` to.
            image_embeds: Embeddings ``[N, D]`` of the training images.
            text_embeds: Embeddings ``[N, D]`` of each image's prompt.
        """
        was_training = self.head.training
        self.head.eval()
        scores = self.head(image_embeds.to(self.device), text_embeds.to(self.device))
        self.head.train(was_training)
        check_finite_state(dict(self.head.named_parameters()), f"the reward head to {directory}")
        if scores.numel() < 2:
            raise ValueError(f"got {scores.numel()} training image(s); expected at least 2 for the score std")
        save_reward_head(directory, self.head, self.embedder, scores.mean().item(), scores.std().item())

    def on_train_end(self) -> None:
        """Export the best checkpoint's head to ``export_dir`` with training-set statistics.

        The report keeps the state that is best on the validation set: when the Trainer's
        ``ModelCheckpoint`` has a best checkpoint (``monitor: val/accuracy``), its head is loaded
        first; otherwise the last weights are exported.
        """
        if self.hparams.export_dir is None:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "image_text_embeddings"):
            raise TypeError(
                f"export_dir is set but the datamodule {type(datamodule).__name__} has no "
                "image_text_embeddings(split) for the score statistics; use ImageRewardDataModule "
                "or call export() yourself"
            )
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if best:
            # our own checkpoint from this run, with Lightning's non-tensor entries
            state = torch.load(best, map_location=self.device, weights_only=False)["state_dict"]
            self.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
        if self.trainer.is_global_zero:
            self.export(self.hparams.export_dir, *datamodule.image_text_embeddings("train"))
