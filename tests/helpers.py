"""Rewards and callbacks used by the tests (importable by subprocesses as ``tests.helpers``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.functional.seeding import derive_seed
from lightning_sdrl.policies.sharding import full_tensor, local_numel
from lightning_sdrl.rewards.base import RewardModule


class NaNOnceReward(RewardModule):
    """Brightness, except that the first call returns NaN for one image."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images, prompts, **metadata):
        self.calls += 1
        rewards = images.mean(dim=(1, 2, 3))
        if self.calls == 1:
            rewards[0] = float("nan")
        return rewards


class WrongShapeReward(RewardModule):
    def forward(self, images, prompts, **metadata):
        return images.mean(dim=(1, 2, 3)).unsqueeze(1)


class BatchRankReward(RewardModule):
    """A batch-level reward that records how many images it saw."""

    batch_level = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, images, prompts, **metadata):
        self.seen.append(len(images))
        return images.mean(dim=(1, 2, 3))


class ThreadRecordingBrightness(RewardModule):
    """Brightness that records the thread each call ran on, scored in the background when ``background``."""

    def __init__(self, background: bool = False, fail_at_call: int | None = None) -> None:
        super().__init__()
        self.background, self.fail_at_call = background, fail_at_call
        self.threads: list[str] = []

    def forward(self, images, prompts, **metadata):
        import threading

        self.threads.append(threading.current_thread().name)
        if self.fail_at_call is not None and len(self.threads) == self.fail_at_call:
            raise RuntimeError(f"the reward failed at call {self.fail_at_call}")
        return images.mean(dim=(1, 2, 3))


class RaiseOnRankOneReward(RewardModule):
    """Brightness on process 0; process 1 raises at its first call (a judge that crashes on one rank)."""

    def forward(self, images, prompts, **metadata):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("the reward failed on rank 1")
        return images.mean(dim=(1, 2, 3))


class NaNOnRankZeroReward(RewardModule):
    """Brightness, except that process 0's first image of every epoch's first batch scores NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images, prompts, **metadata):
        rewards = images.mean(dim=(1, 2, 3))
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0 and self.calls % 2 == 0:  # the tiny config samples two batches per epoch
            rewards[0] = float("nan")
        self.calls += 1
        return rewards


class KillAtEpoch(pl.Callback):
    """Kills its own process with SIGKILL (``kill -9``: no clean-up, no checkpoint) when ``epoch`` starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class RecordUpdates(pl.Callback):
    """Writes, per rank and epoch, a fingerprint of the samples and the advantages used."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        info = pl_module.last_update.__dict__
        record = {
            "rank": trainer.global_rank,
            "epoch": trainer.current_epoch,
            "sample_sums": info["images"].flatten(1).sum(1).tolist(),
            "advantages": info["advantages"].tolist(),
            "rewards": info["rewards"].tolist(),
            "prompt_ids": info["prompt_ids"].tolist(),
            "local_prompts": list(info["prompts"]),
            "reward_seen": next((list(m.seen) for m in pl_module.reward.modules() if hasattr(m, "seen")), []),
            "components": None if info.get("components") is None else info["components"].tolist(),
            # whole tensors also when sharded (a collective call: every rank records)
            "trainable_sum": sum(float(full_tensor(p).double().sum()) for p in pl_module.policy.trainable_parameters()),
            "denoiser_numel": sum(p.numel() for p in pl_module.policy.denoiser.parameters()),
            "local_denoiser_numel": local_numel(pl_module.policy.denoiser),
        }
        if hasattr(pl_module, "old_policy"):  # forward-process RL: the old / EMA policy
            old = pl_module.old_policy.full_state_dict().values()
            record["old_policy_sum"] = sum(float(t.double().sum()) for t in old)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json"
        path.write_text(json.dumps(record))


def lora_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def tiny_clip_config(embed_dim: int = 16, layers: int = 2) -> dict:
    """An open_clip model config small enough for CPU tests (32x32 images, CLIP's BPE vocabulary)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": layers, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": layers},
    }


def make_tiny_clip(folder, name: str, config: dict) -> tuple:
    """Register ``config`` with open_clip as ``name`` and save seeded weights in ``folder``.

    Returns:
        ``(name, weights_path, model)`` with the model in eval mode.
    """
    import json

    import open_clip

    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    weights = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    return name, str(weights), model


class WorldSizeFreeSeeds(SamplingDataModule):
    """Training batches seeded by their place in the epoch's global batch, not by (rank, batch index).

    ``SamplingDataModule`` seeds batch ``k`` of rank ``r`` from ``(epoch, r, k)``, so 2 processes with
    one batch each sample other images than 1 process with two batches. Here batch ``k`` of rank ``r``
    of ``W`` is the global batch ``k * W + r`` (the prompts already are): both runs sample the same
    global batch, which lets a test compare the updates of one process and of DDP.
    """

    def train_dataloader(self):
        batches, where, seed = super().train_dataloader().dataset, self._where, self.seed

        class Batches(torch.utils.data.IterableDataset):
            def __len__(self) -> int:
                return len(batches)

            def __iter__(self):
                epoch, rank, world = where()
                for index, batch in enumerate(batches):
                    yield dataclasses.replace(batch, seed=derive_seed(seed, epoch, index * world + rank))

        return torch.utils.data.DataLoader(Batches(), batch_size=None, collate_fn=lambda batch: batch)
