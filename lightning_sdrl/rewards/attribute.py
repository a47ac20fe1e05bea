"""Attribute rewards of the DDPO debiasing paper over any image classifier (section III-E).

A classifier maps images ``[B, 3, H, W]`` in ``[0, 1]`` to class probabilities ``[B, K]``
(:mod:`lightning_sdrl.rewards.classifiers`). ``groups`` turns its classes into attribute columns
by summing probabilities: for the digits classifier ``[[0], [6, 8, 9]]`` is the binary attribute
"zero vs another loop digit" (a 3 then has both columns near 0 and is "None" for the balance
reward); for a gender classifier ``[[0], [1]]`` keeps its two classes.

* :class:`ShiftReward`: ``R_shift`` of eq. (1), the probability of the under-represented column;
* :class:`BalanceReward`: ``R_balance`` of eq. (2)-(3), rewarding a batch for balanced columns
  (with ``per_prompt=True``: each prompt's images for their own balance, each prompt with its own
  groups if ``prompt_groups`` says so);
* :class:`JointBalanceReward`: ``R_balance`` over the joint classes of several classifiers
  (e.g. gender x age, digit x stroke thickness; per prompt, each prompt with its own groups if
  ``prompt_groups`` says so);
* :func:`attribute_shares`: shares of each column and of "None" in a batch, to print per epoch.

The math is :mod:`lightning_sdrl.functional.classifier_rewards`; these modules only classify.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.functional.classifier_rewards import (
    Shaping,
    balance_reward,
    check_groups,
    check_shaping,
    classify_with_threshold,
    group_probabilities,
    grouped_balance_reward,
    joint_balance_reward,
    joint_classes,
    joint_target,
    shift_reward,
)
from lightning_sdrl.rewards.base import RewardModule, check_images, score_finite_images

__all__ = [
    "BalanceReward",
    "JointBalanceReward",
    "ShiftReward",
    "attribute_shares",
    "class_shares",
    "group_probabilities",
]


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
    return class_shares(classify_with_threshold(probs, threshold), probs.shape[1])


def class_shares(classes: Tensor, num_classes: int) -> Tensor:
    """Share of each class and of "None" (``-1``) among thresholded classes ``[B]``, ``[K + 1]``.

    Example:
        >>> class_shares(torch.tensor([0, -1, 1, 1]), 2)
        tensor([0.2500, 0.5000, 0.2500])
    """
    # "None" is -1: shift it to the last bin
    counts = torch.bincount(torch.where(classes < 0, num_classes, classes), minlength=num_classes + 1)
    return counts.to(torch.float32) / max(len(classes), 1)


def _check_prompts(prompts: Sequence[str], batch_size: int, name: str) -> list[str]:
    if len(prompts) != batch_size:
        raise ValueError(
            f"{name} got {len(prompts)} prompts for {batch_size} images; per-prompt balance needs the "
            "prompt of every image"
        )
    return list(prompts)


def _score_balance(
    images: Tensor, prompts: list[str], name: str, balance: Callable[[Tensor, list[str]], Tensor]
) -> Tensor:
    """``balance(finite images, their prompts)``; NaN for non-finite images (which are left out)."""
    finite = check_images(images, name)
    kept = [prompt for prompt, keep in zip(prompts, finite.tolist(), strict=False) if keep] if prompts else []
    with torch.no_grad():
        return score_finite_images(lambda x: balance(x, kept), images, finite, batch_level=True)


class _AttributeReward(FrozenModule, RewardModule):
    """A frozen classifier and the grouping of its classes into attribute columns."""

    def __init__(
        self,
        classifier: nn.Module,
        groups: list[list[int]] | None,
        prompt_groups: dict[str, list[list[int]]] | None = None,
    ) -> None:
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
        self.prompt_groups = {
            str(prompt): check_groups(prompt_grouping, num_classes)
            for prompt, prompt_grouping in (prompt_groups or {}).items()
        }
        sizes = {len(grouping) for grouping in self.prompt_groups.values()}
        if len(sizes) > 1 or (self.groups is not None and sizes and sizes != {len(self.groups)}):
            raise ValueError(
                f"prompt_groups={prompt_groups} (and groups={groups}) give the prompts different numbers of "
                "attribute columns; give every prompt the same number of groups"
            )

    @property
    def num_columns(self) -> int | None:
        """Number of attribute columns (``None`` if the classifier has no ``labels``)."""
        if self.groups is not None:
            return len(self.groups)
        if getattr(self, "prompt_groups", None):  # (set after groups in __init__)
            return len(next(iter(self.prompt_groups.values())))
        return None if self.class_labels is None else len(self.class_labels)

    @property
    def attribute_names(self) -> list[str] | None:
        """Name of each attribute column: a class label, or a group's labels joined by ``+``."""
        if self.class_labels is None:
            return None
        if self.groups is None:
            return list(self.class_labels)
        return ["+".join(self.class_labels[c] for c in group) for group in self.groups]

    def prompt_attribute_names(self, prompt: str) -> list[str] | None:
        """Names of ``prompt``'s attribute columns (its own ``prompt_groups`` entry, if any)."""
        if prompt not in self.prompt_groups or self.class_labels is None:
            return self.attribute_names
        return ["+".join(self.class_labels[c] for c in group) for group in self.prompt_groups[prompt]]

    def attribute_probs(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        """Attribute probabilities ``[B, G]`` of images ``[B, 3, H, W]`` in ``[0, 1]``.

        Args:
            images: The images.
            prompts: Their prompts; needed only with ``prompt_groups`` (each image's columns are
                then its prompt's groups; prompts not named there use ``groups``).
        """
        probs = self.classifier(images)
        if not self.prompt_groups:
            return group_probabilities(probs, self.groups)
        if prompts is None:
            raise ValueError(f"{type(self).__name__} has prompt_groups: pass the images' prompts to attribute_probs")
        prompts = _check_prompts(prompts, len(probs), type(self).__name__)
        columns: list[Tensor | None] = [None] * len(probs)
        for prompt in dict.fromkeys(prompts):
            rows = [index for index, other in enumerate(prompts) if other == prompt]
            grouped = group_probabilities(probs[rows], self.prompt_groups.get(prompt, self.groups))
            for row, values in zip(rows, grouped, strict=True):
                columns[row] = values
        sizes = {len(values) for values in columns}
        if len(sizes) > 1:
            raise ValueError(
                f"prompts without a prompt_groups entry get {self.groups or 'every class'} as columns, a different "
                f"number of columns than prompt_groups; name every prompt in prompt_groups or set groups"
            )
        return torch.stack(columns)


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

    With several prompts in a batch, the whole-batch shares can be balanced while every prompt
    is biased (one all zeros, one all sixes); ``per_prompt=True`` measures eq. (2)-(3) within
    each prompt's images instead
    (:func:`~lightning_sdrl.functional.classifier_rewards.grouped_balance_reward`), over all
    processes' images of that prompt. Each prompt then needs enough images per batch: sample
    every prompt the same number of times with ``SamplingDataModule(group_size=G)`` (each drawn
    prompt ``G`` times in a row) and a batch of a multiple of ``G`` images.

    Args:
        classifier: Module mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to probabilities
            ``[B, K]``.
        threshold: Confidence level of section III-C (0.7 in the paper).
        groups: Lists of class indices summed into attribute columns; ``None`` keeps the
            classes.
        target_distribution: Target share of each column, positive and summing to 1; ``None``
            for uniform (gender balance).
        per_prompt: Balance each prompt's images on their own instead of the whole batch.
        prompt_groups: Groups of particular prompts (``{"an even digit": [[2], [4]]}``), each
            balanced over its own classes; other prompts use ``groups``. Every prompt must have
            the same number of columns.

    Raises:
        ValueError: If an argument is out of range or does not match the classifier.

    Example:
        >>> class Judge(nn.Module):  # column 1 is the mean pixel
        ...     def forward(self, images):
        ...         p = images.mean(dim=(1, 2, 3))
        ...         return torch.stack([1 - p, p], dim=1)
        >>> images = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
        >>> prompts = ["a", "a", "b", "b"]  # the batch is 50/50, each prompt 100/0
        >>> BalanceReward(Judge())(images, prompts)
        tensor([0., 0., 0., 0.])
        >>> BalanceReward(Judge(), per_prompt=True)(images, prompts)
        tensor([-0.5000, -0.5000, -0.5000, -0.5000])
    """

    batch_level = True

    def __init__(
        self,
        classifier: nn.Module,
        threshold: float = 0.7,
        groups: list[list[int]] | None = None,
        target_distribution: list[float] | None = None,
        per_prompt: bool = False,
        prompt_groups: dict[str, list[list[int]]] | None = None,
    ) -> None:
        super().__init__(classifier, groups, prompt_groups)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold}; expected a confidence level in (0, 1]")
        self.threshold = float(threshold)
        self.per_prompt = bool(per_prompt)
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
        """Balance reward of each image given the whole batch (or its prompt's images), ``[B]``.

        A non-finite image is neither a class nor "None": it gets NaN, and the shares are those
        of the finite images; a batch with no finite image is all NaN, never "balanced".

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``: all images sampled together.
            prompts: The ``B`` prompts (used with ``per_prompt`` or ``prompt_groups``).
            **metadata: Ignored.
        """
        if self.per_prompt or self.prompt_groups:
            prompts = _check_prompts(prompts, len(images), type(self).__name__)
        return _score_balance(images, prompts, type(self).__name__, self._balance)

    def _balance(self, images: Tensor, prompts: list[str]) -> Tensor:
        probs = self.attribute_probs(images, prompts if self.prompt_groups else None)
        if self.per_prompt:
            return grouped_balance_reward(probs, prompts, self.threshold, self.target_distribution)
        return balance_reward(probs, self.threshold, self.target_distribution)


class JointBalanceReward(FrozenModule, RewardModule):
    """``R_balance`` over the joint classes of several attribute classifiers (gender x age, ...).

    Each classifier ``a`` (with its optional ``groups[a]``) gives attribute probabilities
    ``[B, K_a]``; an image's joint class is the tuple of its thresholded classes, "None" if any
    attribute is below ``threshold``, and eq. (2)-(3) is applied over the ``prod_a K_a`` joint
    classes against a joint target: the product of ``marginals`` (uniform by default), or
    ``target_distribution`` itself
    (:func:`~lightning_sdrl.functional.classifier_rewards.joint_balance_reward`). Joint balance
    is stronger than balance of each attribute: a batch of bold zeros and thin sixes is balanced
    in digit and in thickness but not in the pairs. Not differentiable.

    Args:
        classifiers: One module per attribute mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to
            probabilities ``[B, K_a]``; their optional ``labels`` name the classes.
        threshold: Confidence level every attribute must reach (0.7 in the paper).
        groups: Per classifier, lists of class indices summed into its columns, or ``None``.
        marginals: Per attribute, target shares of its columns (or ``None`` for uniform); the
            joint target is their product. Exclusive with ``target_distribution``.
        target_distribution: The joint target over the joint classes in row-major order (the
            first attribute varies slowest), positive and summing to 1.
        per_prompt: Balance each prompt's images on their own instead of the whole batch.
        shaping: How a batch becomes rewards
            (:func:`~lightning_sdrl.functional.classifier_rewards.joint_balance_reward`): a joint
            class with batch share ``p_c`` and target ``t_c`` gets ``"balance"``, eq. (3)
            ``(1 - p_c / t_c) / K``, or ``"log_ratio"``, ``log(t_c / p_c)`` (the policy gradient
            descends ``KL(p || t)``); ``"expected_log_ratio"`` gives each image the expectation of
            ``log(t_c / p_c)`` under its joint class probabilities, so an unsure image is rewarded
            for leaning towards a missing class instead of getting the "None" value.
        prompt_groups: Groups of particular prompts, one entry per classifier: that classifier's
            groups for the prompt's images, or ``None`` to keep its ``groups[a]``
            (``{"an even digit": [[[2], [4]], None]}`` with ``[digits, thickness]``: two vs four x
            thin vs bold). Other prompts use ``groups``. Every prompt must have the same number of
            columns per classifier. As for :class:`BalanceReward`, the prompts then pick each
            image's columns; ``per_prompt`` still decides whether each prompt is balanced on its own.

    Raises:
        ValueError: If an argument is out of range or does not match the classifiers.

    Example:
        >>> class Judge(nn.Module):  # column 1 is the mean pixel
        ...     labels = ["dark", "light"]
        ...     def forward(self, images):
        ...         p = images.mean(dim=(1, 2, 3))
        ...         return torch.stack([1 - p, p], dim=1)
        >>> reward = JointBalanceReward([Judge(), Judge()], per_prompt=True, prompt_groups={"b": [None, [[1], [0]]]})
        >>> reward.prompt_attribute_names("b")
        ['dark & light', 'dark & dark', 'light & light', 'light & dark']
    """

    batch_level = True

    def __init__(
        self,
        classifiers: list[nn.Module],
        threshold: float = 0.7,
        groups: list[list[list[int]] | None] | None = None,
        marginals: list[list[float] | None] | None = None,
        target_distribution: list[float] | None = None,
        per_prompt: bool = False,
        shaping: Shaping = "balance",
        prompt_groups: dict[str, list[list[list[int]] | None]] | None = None,
    ) -> None:
        super().__init__()
        check_shaping(shaping)
        self.shaping = shaping
        if not classifiers:
            raise ValueError("classifiers is empty; expected one classifier per attribute, e.g. [digits, thickness]")
        groups = [None] * len(classifiers) if groups is None else list(groups)
        if len(groups) != len(classifiers):
            raise ValueError(
                f"got {len(groups)} groups for {len(classifiers)} classifiers; expected one (or null) per classifier"
            )
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold}; expected a confidence level in (0, 1]")
        if marginals is not None and target_distribution is not None:
            raise ValueError("marginals and target_distribution are both set; give the joint target one way")
        self.prompt_groups = _check_joint_prompt_groups(prompt_groups, len(classifiers))
        self.attributes = nn.ModuleList(
            _AttributeReward(
                classifier,
                grouping,
                {prompt: entry[a] for prompt, entry in self.prompt_groups.items() if entry[a] is not None},
            )
            for a, (classifier, grouping) in enumerate(zip(classifiers, groups, strict=True))
        )
        self.threshold, self.per_prompt = float(threshold), bool(per_prompt)
        sizes = [attribute.num_columns for attribute in self.attributes]
        self.target_distribution: Tensor | None = None
        if None not in sizes and (marginals is not None or target_distribution is not None):
            self.target_distribution = self._joint_target(sizes, marginals, target_distribution)
        elif marginals is not None or target_distribution is not None:
            raise ValueError(
                "a target needs every classifier's number of columns: give the classifiers labels or groups"
            )

    @staticmethod
    def _joint_target(
        sizes: list[int], marginals: list[list[float] | None] | None, target_distribution: list[float] | None
    ) -> Tensor:
        if marginals is not None:
            return joint_target(marginals, sizes)
        target = torch.tensor(target_distribution, dtype=torch.float64)
        if target.shape != (math.prod(sizes),) or (target <= 0).any() or abs(target.sum().item() - 1) > 1e-6:
            raise ValueError(
                f"target_distribution={target_distribution}; expected {math.prod(sizes)} positive shares "
                f"(one per joint class of {' x '.join(map(str, sizes))} columns, first attribute slowest) summing to 1"
            )
        return target

    @property
    def attribute_names(self) -> list[str] | None:
        """Name of each joint class, the attributes' column names joined by ``" & "``."""
        return _joint_names([attribute.attribute_names for attribute in self.attributes])

    def prompt_attribute_names(self, prompt: str) -> list[str] | None:
        """Names of ``prompt``'s joint classes (each attribute's ``prompt_groups`` entry, if any)."""
        return _joint_names([attribute.prompt_attribute_names(prompt) for attribute in self.attributes])

    def attribute_probs_list(self, images: Tensor, prompts: Sequence[str] | None = None) -> list[Tensor]:
        """Each attribute's probabilities ``[B, K_a]`` of images ``[B, 3, H, W]``.

        Args:
            images: The images.
            prompts: Their prompts; needed only with ``prompt_groups`` (each image's columns are
                then its prompt's groups).

        Returns:
            One ``[B, K_a]`` tensor per classifier.

        Raises:
            ValueError: If the reward has ``prompt_groups`` and ``prompts`` is missing.
        """
        if self.prompt_groups and prompts is None:
            raise ValueError(
                f"{type(self).__name__} has prompt_groups: pass the images' prompts to attribute_probs_list"
            )
        return [
            attribute.attribute_probs(images, prompts if attribute.prompt_groups else None)
            for attribute in self.attributes
        ]

    def attribute_classes(
        self, images: Tensor, threshold: float | None = None, prompts: Sequence[str] | None = None
    ) -> Tensor:
        """Joint class of each image ``[B]`` (``-1``: "None"), at ``threshold`` (default: the reward's).

        Args:
            images: The images ``[B, 3, H, W]``.
            threshold: Confidence level every attribute must reach; ``None``: the reward's.
            prompts: Their prompts; needed only with ``prompt_groups``.

        Returns:
            ``[B]`` joint class indices in row-major order (the first attribute slowest), ``-1`` for "None".

        Raises:
            ValueError: If the reward has ``prompt_groups`` and ``prompts`` is missing.
        """
        probs = self.attribute_probs_list(images, prompts)
        return joint_classes(probs, self.threshold if threshold is None else threshold)

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Joint balance reward of each image given the whole batch (or its prompt's images), ``[B]``.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``: all images sampled together.
            prompts: The ``B`` prompts (used with ``per_prompt`` or ``prompt_groups``).
            **metadata: Ignored.
        """
        if self.per_prompt or self.prompt_groups:
            prompts = _check_prompts(prompts, len(images), type(self).__name__)
        return _score_balance(images, prompts, type(self).__name__, self._balance)

    def _balance(self, images: Tensor, prompts: list[str]) -> Tensor:
        probs = self.attribute_probs_list(images, prompts if self.prompt_groups else None)
        keys = prompts if self.per_prompt else None
        return joint_balance_reward(probs, self.threshold, self.target_distribution, keys, self.shaping)


def _joint_names(names: list[list[str] | None]) -> list[str] | None:
    """Joint class names in row-major order, the attributes' names joined by ``" & "``."""
    if any(columns is None for columns in names):
        return None
    joint = [""]
    for columns in names:
        joint = [f"{head} & {column}" if head else column for head in joint for column in columns]
    return joint


def _check_joint_prompt_groups(
    prompt_groups: dict[str, list[list[list[int]] | None]] | None, num_classifiers: int
) -> dict[str, list[list[list[int]] | None]]:
    """``prompt_groups`` of :class:`JointBalanceReward`, each entry checked to have one item per classifier."""
    checked = {}
    for prompt, entry in (prompt_groups or {}).items():
        if not isinstance(entry, list | tuple) or len(entry) != num_classifiers:
            raise ValueError(
                f"prompt_groups[{prompt!r}]={entry}; expected one entry per classifier ({num_classifiers}): "
                "that classifier's groups for the prompt, or null to keep its groups"
            )
        checked[str(prompt)] = list(entry)
    return checked
