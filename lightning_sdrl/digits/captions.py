"""Captioned digits for pretraining the digits text-to-image model, with deliberately biased captions.

The gender-debiasing experiment (sections III-E and IV-B/C of the debiasing paper) starts from prompts
whose images are biased: "an electrical engineer" is almost always male-looking (``R_shift``
flips it), "a mechanical engineer" is about 80/20 (``R_balance`` brings it to 50/50). The digits
miniature reproduces such prompts by captioning the training digits with a fixed table:

- **per-digit captions** ("a handwritten seven", "the digit 7", "the number seven"): each training
  image once per epoch, with one of its digit's captions;
- **group captions** whose images are drawn with biased class weights
  (:data:`PROMPT_CLASS_WEIGHTS`):

  ============================  ============================================  ===================
  prompt                        training images                               plays
  ============================  ============================================  ===================
  :data:`BALANCE_PROMPT`        70% zeros, 10% each of 6, 8, 9                ``R_balance``: zero
                                                                              vs other loop digit
  :data:`SHIFT_PROMPT`          93% zeros, 7% sixes                           ``R_shift``: six is
                                                                              under-represented
  :data:`MULTICLASS_PROMPT`     55% twos, 20% fours, 12% sixes, 6.5% each     a bias over more
                                of 0 and 8                                    than two classes
  ============================  ============================================  ===================

  The model reproduces these shares when sampled without guidance; classifier-free guidance
  sharpens them towards the majority class. The weights are chosen so that with guidance 3
  (DDPO's sampling) the biases are those of the paper's prompts: about 85/15 for
  :data:`BALANCE_PROMPT` (with 85/5/5/5 in training, guidance 3 gave 98/2) and a few percent of
  sixes for :data:`SHIFT_PROMPT` (``docs/digits_model.md`` has the measured numbers).

An epoch is a seeded draw (:func:`sample_captioned_examples`) in which the class counts of each
group caption are the table's weights rounded to whole images (largest remainder), so the
caption-conditional class distribution of the data equals the table up to one image.

Images are the canonical digits of :mod:`lightning_sdrl.digits.data` mapped to ``[-1, 1]``
(the diffusion model's pixel range), ``[1, 16, 16]``, from the ``"train"`` split only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.functional.seeding import derive_seed
from lightning_sdrl.validation import check_positive_ints

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""English names of the digits 0..9."""

DIGIT_TEMPLATES = ("a handwritten {word}", "the digit {digit}", "the number {word}")
"""Per-digit caption templates; ``{word}`` is e.g. ``"seven"``, ``{digit}`` is ``"7"``."""

BALANCE_PROMPT = "a digit with a loop"
"""Binary-attribute prompt for ``R_balance``: zero vs the other loop digits 6, 8, 9."""

SHIFT_PROMPT = "a round digit"
"""Prompt for ``R_shift``: mostly zeros, the under-represented class is six."""

MULTICLASS_PROMPT = "an even digit"
"""Prompt skewed over the five even digits, most of all towards 2, then 4 and 6."""

GROUP_PROMPTS = (BALANCE_PROMPT, SHIFT_PROMPT, MULTICLASS_PROMPT)
"""The prompts whose training images are drawn with biased class weights."""


def digit_captions(digit: int) -> list[str]:
    """The per-digit captions of ``digit``, one per template of :data:`DIGIT_TEMPLATES`.

    Example:
        >>> digit_captions(7)
        ['a handwritten seven', 'the digit 7', 'the number seven']
    """
    if not 0 <= digit <= 9:
        raise ValueError(f"digit={digit}; expected an int in 0..9")
    return [t.format(word=DIGIT_WORDS[digit], digit=digit) for t in DIGIT_TEMPLATES]


PROMPT_CLASS_WEIGHTS: dict[str, dict[int, float]] = {
    **{caption: {digit: 1.0} for digit in range(10) for caption in digit_captions(digit)},
    BALANCE_PROMPT: {0: 0.70, 6: 0.10, 8: 0.10, 9: 0.10},
    SHIFT_PROMPT: {0: 0.93, 6: 0.07},
    MULTICLASS_PROMPT: {2: 0.55, 4: 0.20, 6: 0.12, 0: 0.065, 8: 0.065},
}
"""Class distribution of the training images of every caption (weights sum to 1)."""


def class_counts(weights: dict[int, float], total: int) -> dict[int, int]:
    """Split ``total`` images among classes in proportion to ``weights`` (largest remainder).

    Example:
        >>> class_counts(PROMPT_CLASS_WEIGHTS[SHIFT_PROMPT], 200)
        {0: 186, 6: 14}
    """
    exact = {digit: weight * total for digit, weight in weights.items()}
    counts = {digit: int(value) for digit, value in exact.items()}
    by_remainder = sorted(exact, key=lambda digit: counts[digit] - exact[digit])
    for digit in by_remainder[: total - sum(counts.values())]:
        counts[digit] += 1
    return counts


def sample_captioned_examples(
    labels: Tensor, seed: int, group_caption_fraction: float = 0.3
) -> tuple[Tensor, list[str]]:
    """One epoch of ``(image index, caption)`` pairs over images with ``labels``, shuffled.

    1. every image once, with one of its digit's captions (:data:`DIGIT_TEMPLATES`, uniformly);
    2. ``round(N f / (1 - f) / 3)`` examples per group prompt (``N`` images, ``f`` the group
       fraction), their class counts split by :func:`class_counts` and each image drawn uniformly
       from that class;
    3. all examples in one seeded random order.

    Args:
        labels: ``[N]`` digit of each image.
        seed: seed of the draw (derive one per epoch).
        group_caption_fraction: fraction ``f`` of the examples that carry a group caption.

    Returns:
        ``(indices [M], captions)``: image index and caption of each of the ``M`` examples.

    Example:
        >>> labels = torch.arange(10).repeat(10)
        >>> indices, captions = sample_captioned_examples(labels, seed=0)
        >>> len(indices), captions.count(SHIFT_PROMPT)
        (142, 14)
    """
    if not 0.0 <= group_caption_fraction < 1.0:
        raise ValueError(f"group_caption_fraction={group_caption_fraction}; expected 0 <= f < 1")
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randint(len(DIGIT_TEMPLATES), (len(labels),), generator=generator).tolist()
    indices = [torch.arange(len(labels))]
    captions = [digit_captions(d)[t] for d, t in zip(labels.tolist(), templates, strict=True)]
    per_prompt = round(len(labels) * group_caption_fraction / (1 - group_caption_fraction) / 3)
    for prompt in GROUP_PROMPTS:
        for digit, count in class_counts(PROMPT_CLASS_WEIGHTS[prompt], per_prompt).items():
            pool = torch.nonzero(labels == digit).flatten()
            if count and not len(pool):
                raise ValueError(f"no image of digit {digit} to caption {prompt!r}")
            indices.append(pool[torch.randint(len(pool), (count,), generator=generator)])
            captions += [prompt] * count
    order = torch.randperm(len(captions), generator=generator)
    return torch.cat(indices)[order], [captions[i] for i in order.tolist()]


@dataclass
class CaptionBatch:
    """A batch of captioned training digits.

    Attributes:
        images: ``[B, 1, 16, 16]`` float32 in ``[-1, 1]``.
        captions: the ``B`` captions.
        labels: ``[B]`` the digit each image shows.
    """

    images: Tensor
    captions: list[str]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.captions)


class _CaptionBatches(IterableDataset):
    """Yields one process's share of an epoch's caption batches (a fresh draw every epoch)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        seed: int,
        group_caption_fraction: float,
        where: Callable[[], tuple[int, int, int]],
    ) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.seed, self.group_caption_fraction, self.where = seed, group_caption_fraction, where
        examples = len(labels) + 3 * round(len(labels) * group_caption_fraction / (1 - group_caption_fraction) / 3)
        # Whole batches only (the examples left over are redrawn next epoch).
        self.num_batches = max(1, examples // batch_size)

    def __len__(self) -> int:
        _, _, world = self.where()
        return self.num_batches // world

    def __iter__(self) -> Iterator[CaptionBatch]:
        epoch, rank, world = self.where()
        indices, captions = sample_captioned_examples(
            self.labels, derive_seed(self.seed, epoch), self.group_caption_fraction
        )
        # Every process takes the same number of whole batches (a DDP step needs all of them).
        for batch in range(rank, self.num_batches // world * world, world):
            rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            yield CaptionBatch(self.images[indices[rows]], captions[rows], self.labels[indices[rows]])


class DigitsCaptionDataModule(pl.LightningDataModule):
    """Captioned training digits (biased group captions included) and per-digit validation prompts.

    Training batches are :class:`CaptionBatch` es of the ``"train"`` split, redrawn every epoch by
    :func:`sample_captioned_examples`. Validation batches are :class:`~lightning_sdrl.data.
    sampling.PromptBatch` es of the ten prompts ``"a handwritten <digit>"`` (``prompt_ids`` are the
    digits), with seeds fixed across epochs, for a model to sample and a classifier to check.

    Args:
        batch_size: training examples per batch, per device.
        seed: base seed of the caption draws and of the validation noise.
        group_caption_fraction: fraction of training examples with a group caption.
        val_samples_per_prompt: validation samples of each digit prompt (over all devices).
        val_batch_size: prompts per validation sampling call, per device.

    Example:
        >>> data = DigitsCaptionDataModule(batch_size=64)
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch.images.shape, len(batch.captions), float(batch.images.min())
        (torch.Size([64, 1, 16, 16]), 64, -1.0)
    """

    def __init__(
        self,
        batch_size: int = 128,
        seed: int = 0,
        group_caption_fraction: float = 0.3,
        val_samples_per_prompt: int = 8,
        val_batch_size: int = 40,
    ) -> None:
        super().__init__()
        check_positive_ints(
            batch_size=batch_size, val_samples_per_prompt=val_samples_per_prompt, val_batch_size=val_batch_size
        )
        if not 0.0 <= group_caption_fraction < 1.0:
            raise ValueError(f"group_caption_fraction={group_caption_fraction}; expected 0 <= f < 1")
        self.batch_size, self.seed, self.group_caption_fraction = batch_size, seed, group_caption_fraction
        self.val_samples_per_prompt, self.val_batch_size = val_samples_per_prompt, val_batch_size
        self.val_prompts = [digit_captions(digit)[0] for digit in range(10)]

    def _where(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        return trainer.current_epoch, trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        """The epoch's :class:`CaptionBatch` es for this process (images in ``[-1, 1]``)."""
        images, labels = digits_split("train")
        dataset = _CaptionBatches(
            images * 2 - 1, labels, self.batch_size, self.seed, self.group_caption_fraction, self._where
        )
        return DataLoader(dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """Each digit prompt ``val_samples_per_prompt`` times, in digit order, with fixed seeds."""
        _, rank, world = self._where()
        ids = torch.arange(10).repeat_interleave(self.val_samples_per_prompt)
        batches = [
            PromptBatch([self.val_prompts[i] for i in part.tolist()], part, derive_seed(self.seed, index, 1))
            for index, part in enumerate(ids.split(self.val_batch_size))
        ]
        return DataLoader(batches[rank::world], batch_size=None, collate_fn=_identity)


def _identity(batch: PromptBatch) -> PromptBatch:
    return batch
