"""The on-policy sampling DataModule: which prompts each process samples, with which seed.

On-policy RL has no dataset: each training step the policy samples images for a batch of
prompts. This DataModule decides those prompts and the noise seed of every batch, so that

- one epoch is ``num_batches_per_epoch`` batches of ``batch_size`` prompts per process;
- the prompts of an epoch are one global draw (identical on all processes) cycling through
  shuffled copies of the prompt list, shared out across processes; with ``group_size`` each drawn
  prompt is repeated ``group_size`` times in a row (GRPO's groups), so a group may span
  batches and processes;
- each process and batch gets its own noise seed, derived from ``(seed, epoch, rank, batch)``,
  so runs are reproducible and resumable (:func:`~lightning_sdrl.functional.seeding.derive_seed`,
  also importable from here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_sdrl.data.prompts import load_prompts
from lightning_sdrl.functional.seeding import derive_seed
from lightning_sdrl.validation import check_positive_ints


@dataclass
class PromptBatch:
    """Prompts for one sampling call.

    Attributes:
        prompts: the ``B`` prompts.
        prompt_ids: ``[B]`` their indices in the DataModule's prompt list.
        seed: noise seed for this batch on this process.
    """

    prompts: list[str]
    prompt_ids: Tensor
    seed: int

    def __len__(self) -> int:
        return len(self.prompts)


def draw_prompt_ids(num_prompts: int, count: int, seed: int) -> Tensor:
    """``count`` prompt indices cycling through seeded shuffles of ``range(num_prompts)``.

    Every prompt appears ``count // num_prompts`` or one more times.

    Example:
        >>> sorted(draw_prompt_ids(3, 6, seed=0).tolist())
        [0, 0, 1, 1, 2, 2]
    """
    generator = torch.Generator().manual_seed(seed)
    rounds = -(-count // num_prompts)
    return torch.cat([torch.randperm(num_prompts, generator=generator) for _ in range(rounds)])[:count]


def check_group_size(samples_per_epoch: int, group_size: int) -> None:
    """Raise unless an epoch's ``samples_per_epoch`` (over all processes) split into whole groups."""
    if samples_per_epoch % group_size:
        raise ValueError(
            f"an epoch samples {samples_per_epoch} images (batch_size x num_batches_per_epoch x devices), not a "
            f"multiple of group_size={group_size}; choose batch_size and num_batches_per_epoch so that it is"
        )


class _PromptBatches(IterableDataset):
    """Yields the prompt batches of one epoch for one process."""

    def __init__(
        self,
        prompts: list[str],
        batch_size: int,
        num_batches: int,
        seed: int,
        where: Callable[[], tuple[int, int, int]],
        fixed: bool,
        group_size: int = 1,
    ) -> None:
        self.prompts, self.batch_size, self.num_batches = prompts, batch_size, num_batches
        self.seed, self.where, self.fixed, self.group_size = seed, where, fixed, group_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[PromptBatch]:
        epoch, rank, world = self.where()
        epoch = 0 if self.fixed else epoch
        if self.fixed:  # validation: every prompt in order, the same seeds each time
            ids = torch.arange(self.num_batches * world * self.batch_size) % len(self.prompts)
        elif self.group_size > 1:
            total = self.num_batches * world * self.batch_size
            check_group_size(total, self.group_size)
            groups = draw_prompt_ids(len(self.prompts), total // self.group_size, derive_seed(self.seed, epoch))
            ids = groups.repeat_interleave(self.group_size)
        else:
            ids = draw_prompt_ids(
                len(self.prompts), self.num_batches * world * self.batch_size, derive_seed(self.seed, epoch)
            )
        per_batch = ids.view(self.num_batches, world, self.batch_size)[:, rank]
        for index, batch_ids in enumerate(per_batch):
            yield PromptBatch(
                prompts=[self.prompts[i] for i in batch_ids.tolist()],
                prompt_ids=batch_ids.clone(),
                seed=derive_seed(self.seed, epoch, rank, index, int(self.fixed)),
            )


class SamplingDataModule(pl.LightningDataModule):
    """Prompt batches for on-policy sampling (DDPO, ReFL) and for validation.

    Set exactly one prompt source: ``prompts``, ``prompt_file`` or ``template`` + ``fill_ins``.

    Args:
        prompts: the prompts.
        prompt_file: text file, one prompt per line.
        template: template with one ``{}``, e.g. ``"photo of the face of a {}"``.
        fill_ins: values for ``template``, e.g. a list of occupations.
        batch_size: prompts per sampling call, per device.
        num_batches_per_epoch: sampling calls per epoch, per device.
        val_samples_per_prompt: validation images per prompt (over all devices).
        val_batch_size: prompts per validation sampling call, per device.
        seed: base seed of prompt draws and sampling noise.
        group_size: training samples of each drawn prompt per epoch, in a row (GRPO's group,
            Flow-GRPO: 24); 1 draws prompts independently. An epoch's
            ``batch_size x num_batches_per_epoch x devices`` samples must be a multiple of it.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompt_file: str | Path | None = None,
        template: str | None = None,
        fill_ins: list[str] | None = None,
        batch_size: int = 8,
        num_batches_per_epoch: int = 4,
        val_samples_per_prompt: int = 4,
        val_batch_size: int = 8,
        seed: int = 0,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        self.prompts = load_prompts(prompts, prompt_file, template, fill_ins)
        check_positive_ints(
            batch_size=batch_size,
            num_batches_per_epoch=num_batches_per_epoch,
            val_samples_per_prompt=val_samples_per_prompt,
            val_batch_size=val_batch_size,
            group_size=group_size,
        )
        self.batch_size, self.num_batches_per_epoch = batch_size, num_batches_per_epoch
        self.val_samples_per_prompt, self.val_batch_size = val_samples_per_prompt, val_batch_size
        self.seed, self.group_size = seed, group_size

    def setup(self, stage: str) -> None:
        """Check that an epoch's samples over all processes split into whole groups."""
        if stage == "fit" and self.group_size > 1:
            _, _, world = self._where()
            check_group_size(self.batch_size * self.num_batches_per_epoch * world, self.group_size)

    def _where(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        return trainer.current_epoch, trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        """``num_batches_per_epoch`` :class:`PromptBatch` es per epoch for this process."""
        dataset = _PromptBatches(
            self.prompts,
            self.batch_size,
            self.num_batches_per_epoch,
            self.seed,
            self._where,
            fixed=False,
            group_size=self.group_size,
        )
        return DataLoader(dataset, batch_size=None, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        """Every prompt ``val_samples_per_prompt`` times, with seeds fixed across epochs."""
        _, _, world = self._where()
        total = len(self.prompts) * self.val_samples_per_prompt
        num_batches = -(-total // (world * self.val_batch_size))
        dataset = _PromptBatches(self.prompts, self.val_batch_size, num_batches, self.seed, self._where, fixed=True)
        return DataLoader(dataset, batch_size=None, collate_fn=_identity)


def _identity(batch: PromptBatch) -> PromptBatch:
    return batch
