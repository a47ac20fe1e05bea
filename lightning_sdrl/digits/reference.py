"""The digits miniature's reference sets ``X_r``: digits of the fixed split, per class.

A :class:`~lightning_sdrl.reference.ReferenceSet` for diversity rewards and for FID /
precision-recall, taken from :mod:`lightning_sdrl.digits.data` instead of image files.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.reference import ReferenceSet

__all__ = ["DigitsReference"]


class DigitsReference(ReferenceSet):
    """A reference set from the digits miniature's data (:mod:`lightning_sdrl.digits.data`).

    The canonical ``16 x 16`` digits, grey replicated to 3 channels. Following the paper's
    "about 50 images per class", ``per_class`` draws a seeded random subset of each class.

    Args:
        split: ``"train"`` or ``"test"`` side of the digits split.
        classes: Digits to keep (``None``: all ten).
        per_class: Images drawn at random per class (``None``: all of them).
        image_size: Resize (bilinear) to this square size; ``None`` keeps 16.
        seed: Seed of the ``per_class`` draw.
        cache_path: Folder for on-disk feature caches (see :class:`ReferenceSet`).

    Attributes:
        indices: Positions of the chosen images in the split (:func:`digits_split`), e.g. to
            evaluate on the digits a reference set did not use.

    Example:
        >>> reference = DigitsReference(classes=[0, 6], per_class=5)
        >>> reference.images.shape, sorted(reference.labels.tolist())
        (torch.Size([10, 3, 16, 16]), [0, 0, 0, 0, 0, 6, 6, 6, 6, 6])
        >>> images, labels = digits_split("test")
        >>> bool((labels[reference.indices] == reference.labels).all())
        True
    """

    def __init__(
        self,
        split: Literal["train", "test"] = "test",
        classes: list[int] | None = None,
        per_class: int | None = None,
        image_size: int | None = None,
        seed: int = 0,
        cache_path: str | None = None,
    ) -> None:
        images, labels = digits_split(split)
        keep = torch.ones_like(labels, dtype=torch.bool)
        if classes is not None:
            if not classes or any(not 0 <= c <= 9 for c in classes):
                raise ValueError(f"classes={classes!r}; expected a non-empty list of digits 0..9")
            keep = torch.isin(labels, torch.tensor(classes))
        indices = keep.nonzero().squeeze(1)
        if per_class is not None:
            if per_class < 1:
                raise ValueError(f"per_class={per_class}; expected a positive int or None")
            generator = torch.Generator().manual_seed(seed)
            order = indices[torch.randperm(len(indices), generator=generator)]
            chosen = [order[labels[order] == c][:per_class] for c in labels[indices].unique()]
            indices = torch.cat(chosen).sort().values
        images = images[indices].expand(-1, 3, -1, -1).contiguous()
        if image_size is not None:
            images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
        self.labels, self.indices = labels[indices], indices
        self.paths = []
        identity = f"digits:{split}:{classes}:{per_class}:{seed}:size={image_size}"
        self._init_set(images, identity, cache_path)
