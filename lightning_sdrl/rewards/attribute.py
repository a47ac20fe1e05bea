"""Attribute rewards of the DDPO debiasing paper over any image classifier (section III-E).

A classifier maps images ``[B, 3, H, W]`` in ``[0, 1]`` to class probabilities ``[B, K]``
(:mod:`lightning_sdrl.rewards.classifiers`). ``groups`` turns its classes into attribute columns
by summing probabilities: for the digits classifier ``[[0], [6, 8, 9]]`` is the binary attribute
"zero vs another loop digit" (a 3 then has both columns near 0 and is "None" for the balance
reward); for a gender classifier ``[[0], [1]]`` keeps its two classes.

* :class:`ShiftReward`: ``R_shift`` of eq. (1), the probability of the under-represented column;
* :class:`BalanceReward`: ``R_balance`` of eq. (2)-(3), rewarding a batch for balanced columns;
* :func:`attribute_shares`: shares of each column and of "None" in a batch, to print per epoch.

The math is :mod:`lightning_sdrl.functional.classifier_rewards`; these modules only classify.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.functional.classifier_rewards import (
    balance_reward,
    check_groups,
    classify_with_threshold,
    group_probabilities,
    shift_reward,
)
from lightning_sdrl.rewards.base import RewardModule, check_images, score_finite_images

__all__ = ["BalanceReward", "ShiftReward", "attribute_shares", "group_probabilities"]


def attribute_shares(probs: Tensor, threshold: float = 0.7) -> Tensor:
    """Share of the batch classified in each column, and of "None", ``[K + 1]``.

    Images are classified as in section III-C (:func:`classify_with_threshold`): the most
    probable column if its probability reaches ``threshold``, else "None" (the last entry).
    The shares sum to 1.

    Args:
        probs: Attribute probabilities ``[B, K]`` (e.g. from :func:`group_probabilities`).
        threshold: Confidence level (0.7 in the paper).

    Returns:
        ``[K + 1]`` float shares: columns ``0..K-1``, then "None".

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.1, 0.9]])
        >>> attribute_shares(probs, threshold=0.7)
        tensor([0.2500, 0.5000, 0.2500])
    """
    classes = classify_with_threshold(probs, threshold)
    num_columns = probs.shape[1]
    # "None" is -1: shift it to the last bin
    counts = torch.bincount(torch.where(classes < 0, num_columns, classes), minlength=num_columns + 1)
    return counts.to(torch.float32) / max(len(classes), 1)


class _AttributeReward(FrozenModule, RewardModule):
    """A frozen classifier and the grouping of its classes into attribute columns."""

    def __init__(self, classifier: nn.Module, groups: list[list[int]] | None) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(
                f"classifier is a {type(classifier).__name__}; expected an nn.Module mapping "
                "images [B, 3, H, W] to class probabilities [B, K]"
            )
        self.classifier = classifier.eval().requires_grad_(False)
        labels = getattr(classifier, "labels", None)
        self.class_labels: list[str] | None = None if labels is None else list(labels)
        num_classes = None if labels is None else len(labels)
        self.groups = None if groups is None else check_groups(groups, num_classes)

    @property
    def num_columns(self) -> int | None:
        """Number of attribute columns (``None`` if the classifier has no ``labels``)."""
        if self.groups is not None:
            return len(self.groups)
        return None if self.class_labels is None else len(self.class_labels)

    @property
    def attribute_names(self) -> list[str] | None:
        """Name of each attribute column: a class label, or a group's labels joined by ``+``."""
        if self.class_labels is None:
            return None
        if self.groups is None:
            return list(self.class_labels)
        return ["+".join(self.class_labels[c] for c in group) for group in self.groups]

    def attribute_probs(self, images: Tensor) -> Tensor:
        """Attribute probabilities ``[B, G]`` of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        return group_probabilities(self.classifier(images), self.groups)


class ShiftReward(_AttributeReward):
    """``R_shift`` of eq. (1): the probability that an image shows the under-represented class.

    Differentiable with respect to the images (through the classifier).

    Args:
        classifier: Module mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to probabilities
            ``[B, K]``; its optional ``labels`` name the classes.
        target: The under-represented attribute ``U``: an index into the columns (the classes,
            or ``groups`` when given), or a class name from ``classifier.labels``; with
            ``groups``, a class name selects the group that contains it (for digits with
            ``groups=[[0], [6, 8, 9]]``, ``target="8"`` and ``target=1`` both mean ``{6, 8, 9}``).
        groups: Lists of class indices summed into attribute columns; ``None`` keeps the
            classes.

    Raises:
        ValueError: If ``target`` or ``groups`` do not match the classifier.
    """

    batch_level = False

    def __init__(self, classifier: nn.Module, target: int | str, groups: list[list[int]] | None = None) -> None:
        super().__init__(classifier, groups)
        self.target = self._resolve_target(target)

    def _resolve_target(self, target: int | str) -> int:
        if isinstance(target, str):
            if self.class_labels is None or target not in self.class_labels:
                raise ValueError(
                    f"target={target!r} is not a class name of the classifier (labels: "
                    f"{self.class_labels}); give a label or a column index"
                )
            index = self.class_labels.index(target)
            if self.groups is None:
                return index
            for column, group in enumerate(self.groups):
                if index in group:
                    return column
            raise ValueError(
                f"target={target!r} (class {index}) is in none of groups={self.groups}; add it "
                "to a group or pick a grouped class"
            )
        if self.num_columns is not None and not 0 <= target < self.num_columns:
            raise ValueError(f"target={target}; expected a column index in [0, {self.num_columns - 1}]")
        return int(target)

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """``P(attribute = target)`` of each image, ``[B]`` (NaN for a non-finite image).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            prompts: The ``B`` prompts (unused).
            **metadata: Ignored.
        """
        finite = check_images(images, type(self).__name__)
        return score_finite_images(lambda x: shift_reward(self.attribute_probs(x), self.target), images, finite)


class BalanceReward(_AttributeReward):
    """``R_balance`` of eq. (2)-(3): a batch is rewarded for matching target attribute shares.

    Each image is classified with the confidence ``threshold`` (below it: "None"), the shares
    of the classified images are compared with ``target_distribution``, and an image of an
    under-represented column is rewarded, one of an over-represented column (or "None")
    penalised (:func:`~lightning_sdrl.functional.classifier_rewards.balance_reward`). The reward
    depends on the whole batch: ``batch_level = True`` makes DDPO hand it the images of all
    processes. Not differentiable (it counts classes).

    Args:
        classifier: Module mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to probabilities
            ``[B, K]``.
        threshold: Confidence level of section III-C (0.7 in the paper).
        groups: Lists of class indices summed into attribute columns; ``None`` keeps the
            classes.
        target_distribution: Target share of each column, positive and summing to 1; ``None``
            for uniform (gender balance).

    Raises:
        ValueError: If an argument is out of range or does not match the classifier.
    """

    batch_level = True

    def __init__(
        self,
        classifier: nn.Module,
        threshold: float = 0.7,
        groups: list[list[int]] | None = None,
        target_distribution: list[float] | None = None,
    ) -> None:
        super().__init__(classifier, groups)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold}; expected a confidence level in (0, 1]")
        self.threshold = float(threshold)
        self.target_distribution = None
        if target_distribution is not None:
            target = torch.tensor(target_distribution, dtype=torch.float64)
            expected = self.num_columns or len(target)
            if target.shape != (expected,) or (target <= 0).any() or abs(target.sum().item() - 1) > 1e-6:
                raise ValueError(
                    f"target_distribution={target_distribution}; expected {expected} positive "
                    "shares (one per attribute column) summing to 1"
                )
            self.target_distribution = target

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Balance reward of each image given the whole batch, ``[B]``.

        A non-finite image is neither a class nor "None": it gets NaN, and the shares are those
        of the finite images; a batch with no finite image is all NaN, never "balanced".

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``: all images sampled together.
            prompts: The ``B`` prompts (unused).
            **metadata: Ignored.
        """
        finite = check_images(images, type(self).__name__)
        with torch.no_grad():
            return score_finite_images(self._balance, images, finite, batch_level=True)

    def _balance(self, images: Tensor) -> Tensor:
        return balance_reward(self.attribute_probs(images), self.threshold, self.target_distribution)
