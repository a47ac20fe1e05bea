"""The digits miniature's data: scikit-learn's 1797 real 8x8 handwritten digits as image tensors.

Every part of the digits miniature (the feedback models in :mod:`lightning_sdrl.digits.models`,
the digits diffusion model, reference sets for FID) reads images through these helpers, so they
all agree on two conventions:

1. **Canonical image**: ``[1, 16, 16]`` float in ``[0, 1]``, the 8x8 scikit-learn image (values
   0..16) divided by 16 and upsampled with ``F.interpolate(..., mode="bilinear",
   align_corners=False)``.
2. **Split**: one stratified 80/20 train/test split with a fixed seed (``seed=0``).

Pure tensors, no Lightning.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset

NUM_DIGITS = 1797
"""Number of images in scikit-learn's digits data set."""

TEST_FRACTION = 0.2
"""Fraction of each class held out for the ``"test"`` split."""


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r}; expected a positive int (16 is the canonical size)")


def load_digits_images(size: int = 16) -> tuple[Tensor, Tensor]:
    """All 1797 digits as canonical images and their labels.

    Args:
        size: Side of the returned images in pixels. 16 is the canonical size; 8 returns the
            original scikit-learn pixels (divided by 16).

    Returns:
        ``(images, labels)``: ``images`` ``[1797, 1, size, size]`` float32 in ``[0, 1]``,
        ``labels`` ``[1797]`` int64 in ``0..9``.

    Example:
        >>> images, labels = load_digits_images()
        >>> images.shape, labels.shape, labels.dtype
        (torch.Size([1797, 1, 16, 16]), torch.Size([1797]), torch.int64)
        >>> bool(images.min() >= 0) and bool(images.max() <= 1)
        True
    """
    _check_size(size)
    pixels, targets = _raw_digits()
    images = torch.from_numpy(pixels).div(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    # Bilinear weights are convex, so the result stays in [0, 1]; size=8 is the identity.
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images, torch.from_numpy(targets).clone()


def digits_split_indices(split: Literal["train", "test"], seed: int = 0) -> Tensor:
    """Indices into :func:`load_digits_images` of one side of the stratified 80/20 split.

    Args:
        split: ``"train"`` (1437 images) or ``"test"`` (360 images).
        seed: Seed of the split. Everything in the project uses the default, 0.

    Returns:
        Sorted ``[N]`` int64 indices; the two splits are disjoint and cover all 1797 images.

    Example:
        >>> len(digits_split_indices("train")), len(digits_split_indices("test"))
        (1437, 360)
    """
    if split not in ("train", "test"):
        raise ValueError(f'split={split!r}; expected "train" or "test"')
    _, targets = _raw_digits()
    train, test = train_test_split(
        np.arange(len(targets)), test_size=TEST_FRACTION, stratify=targets, random_state=seed
    )
    return torch.from_numpy(np.sort(train if split == "train" else test))


def digits_split(split: Literal["train", "test"], size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images and labels of one side of the stratified 80/20 train/test split.

    Args:
        split: ``"train"`` (1437 images) or ``"test"`` (360 images, 35 to 37 per class).
        size: Side of the images in pixels, as in :func:`load_digits_images`.
        seed: Seed of the split. Everything in the project uses the default, 0.

    Returns:
        ``(images [N, 1, size, size] float32 in [0, 1], labels [N] int64)``.

    Example:
        >>> images, labels = digits_split("test")
        >>> images.shape
        torch.Size([360, 1, 16, 16])
        >>> torch.bincount(labels).tolist()
        [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    """
    indices = digits_split_indices(split, seed)
    images, labels = load_digits_images(size)
    return images[indices], labels[indices]


class DigitsDataset(Dataset[tuple[Tensor, int]]):
    """One side of the digits split as a map-style dataset of ``(image [1, size, size], label)``.

    Args:
        split: ``"train"`` or ``"test"``.
        size: Side of the images in pixels (16 is canonical).
        seed: Seed of the split (keep the default, 0).

    Example:
        >>> dataset = DigitsDataset("train")
        >>> image, label = dataset[0]
        >>> len(dataset), image.shape, type(label)
        (1437, torch.Size([1, 16, 16]), <class 'int'>)
    """

    def __init__(self, split: Literal["train", "test"] = "train", size: int = 16, seed: int = 0) -> None:
        self.images, self.labels = digits_split(split, size, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])
