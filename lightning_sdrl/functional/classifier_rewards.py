"""Rewards computed from attribute classifiers' probabilities.

Section III-E of the debiasing paper (docs/references.md): ``R_shift`` (eq. 1) pushes every image
towards an under-represented class; ``R_balance`` (eq. 2-3) rewards a batch for being balanced
between the classes. Section V leaves two extensions open, both here: balance *per prompt*
(:func:`grouped_balance_reward`: eq. 2-3 within each prompt's images of a batch) and balance
*jointly over several attributes* (:func:`joint_balance_reward`: eq. 2-3 over the joint classes of
several classifiers, e.g. gender x age). For the joint classes, whose rarest pair eq. (3) fills
slowly, :func:`joint_balance_reward` also offers the log ratio ``log(t_c / p_c)`` (the descent of
``KL(p || t)``) and its expectation over each image's class probabilities
(:func:`expected_log_ratio_reward`).
"""

import math
from collections.abc import Hashable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "Shaping",
    "balance_reward",
    "check_groups",
    "check_shaping",
    "classify_with_threshold",
    "expected_log_ratio_reward",
    "group_probabilities",
    "grouped_balance_reward",
    "joint_balance_reward",
    "joint_classes",
    "joint_probabilities",
    "joint_target",
    "shift_reward",
]

_NONE = -1  # class index of an image whose top probability is below the confidence threshold


def _check_probs(probs: Tensor) -> None:
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(
            f"probs has shape {list(probs.shape)}; expected [B, K] with K >= 2 "
            "(one row of class probabilities per image)"
        )


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold}; expected a confidence level in (0, 1], e.g. 0.7")


def shift_reward(probs: Tensor, target: int) -> Tensor:
    """Probability that each image shows the under-represented class, ``R_shift`` of eq. (1).

    Args:
        probs: Classifier probabilities ``[B, K]``.
        target: Index of the under-represented class ``U``.

    Returns:
        ``[B]`` rewards ``P_classifier(X = U)`` in ``[0, 1]``.

    Raises:
        ValueError: If ``probs`` is not ``[B, K]`` or ``target`` is not a class index.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> shift_reward(probs, target=1)
        tensor([0.1000, 0.8000])
    """
    _check_probs(probs)
    num_classes = probs.shape[1]
    if not 0 <= target < num_classes:
        raise ValueError(f"target={target}; expected a class index in [0, {num_classes - 1}]")
    # eq. (1): R_shift(X, U) = P_classifier(X = U)
    return probs[:, target]


def classify_with_threshold(probs: Tensor, threshold: float = 0.7) -> Tensor:
    """Assign each image its most probable class, or ``-1`` ("None") when the classifier is unsure.

    Section III-C: an image is classified only if its top probability reaches the confidence
    level ``threshold`` (0.7 in the paper); otherwise it is labelled "None". A row with a NaN
    probability never reaches the threshold, so it is "None" here; :func:`balance_reward` gives
    such rows NaN instead.

    Args:
        probs: Classifier probabilities ``[B, K]``.
        threshold: Confidence level; the top probability must be ``>= threshold``.

    Returns:
        ``[B]`` long tensor of class indices in ``[0, K)``, ``-1`` for "None".

    Raises:
        ValueError: If ``probs`` is not ``[B, K]`` or ``threshold`` is outside ``(0, 1]``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
        >>> classify_with_threshold(probs, threshold=0.7)
        tensor([ 0, -1,  1])
    """
    _check_probs(probs)
    _check_threshold(threshold)
    confidence, classes = probs.max(dim=1)
    return torch.where(confidence >= threshold, classes, torch.full_like(classes, _NONE))


def _target_distribution(target: Tensor | None, num_classes: int, device: torch.device) -> Tensor:
    if target is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64, device=device)
    target = torch.as_tensor(target, dtype=torch.float64, device=device)
    if target.shape != (num_classes,):
        raise ValueError(f"target has shape {list(target.shape)}; expected [{num_classes}] (one share per class)")
    if (target <= 0).any() or not torch.isclose(target.sum(), target.new_tensor(1.0)):
        raise ValueError(f"target={target.tolist()}; expected strictly positive class shares summing to 1")
    return target


def balance_reward(probs: Tensor, threshold: float = 0.7, target: Tensor | None = None) -> Tensor:
    """Per-image reward for a batch whose class shares match a target, ``R_balance``, eq. (2)-(3).

    Images are first thresholded (:func:`classify_with_threshold`). Over the classified images
    with counts ``n_k`` and ``n = sum_k n_k``, the shares are ``p_k = n_k / n`` (eq. 2 is
    ``q = p_1``). With target shares ``t_k`` (uniform ``1/K`` by default):

    * an image of class ``k`` gets ``r_k = (1 - p_k / t_k) / K``: positive while class ``k`` is
      under its target share, negative while it is over;
    * a "None" image gets ``min_k r_k = (1 - max_k p_k / t_k) / K <= 0``, the reward of the most
      over-represented class;
    * if no image is classified (``n = 0``), ``q`` of eq. (2) is ``0 / 0``: an all-"None" batch
      is not balanced, so every image gets the reward's worst value ``(1 - 1 / min_k t_k) / K``
      (``-1/2`` for ``K = 2``), that of a batch entirely in the class with the smallest target
      share;
    * a row with a NaN or infinite probability (e.g. the classifier's output for a NaN image) gets
      NaN and is left out of the counts: it is neither a class nor "None".

    For ``K = 2`` and the uniform target this is eq. (3) exactly, with column 1 the class whose
    share is ``q``: ``r_1 = 1/2 - q`` and ``r_0 = q - 1/2``, so the minority class (the
    "indicator") gets ``+|q - 1/2|`` and the majority ``-|q - 1/2|``; at ``q = 1/2`` both are 0.
    In eq. (3) as written a "None" image never equals the indicator, so it gets
    ``-|q - 1/2| = min(r_0, r_1)``, which is the rule above.

    For ``n > 0`` the batch total is ``-(n / K) * chi2(p || t) + n_None * min_k r_k`` with
    ``chi2(p || t) = sum_k (p_k - t_k)^2 / t_k``; both terms are ``<= 0`` and vanish exactly
    when ``p = t``, so the total is maximal (zero) at the target distribution (for ``K = 2``:
    ``-2 n (q - 1/2)^2 - n_None |q - 1/2|``, the curve of Fig. 2). Every reward is at least the
    worst value above, so the all-"None" total ``B (1 - 1 / min_k t_k) / K`` is the lowest a
    batch of ``B`` can get (for ``K = 2``: ``-B / 2``, as for ``q = 0`` or ``q = 1``).

    Args:
        probs: Classifier probabilities ``[B, K]``.
        threshold: Confidence level below which an image is "None" (0.7 in the paper).
        target: Target class shares ``[K]``, strictly positive and summing to 1; ``None`` for
            the uniform distribution.

    Returns:
        ``[B]`` rewards in ``probs.dtype``.

    Raises:
        ValueError: If ``probs``, ``threshold`` or ``target`` are malformed.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.95, 0.05], [0.1, 0.9], [0.5, 0.5]])
        >>> balance_reward(probs)  # q = 1/4: the female (column 1) image is rewarded
        tensor([-0.2500, -0.2500, -0.2500,  0.2500, -0.2500])
        >>> probs = torch.tensor([[8.0, 1, 1], [8, 1, 1], [1, 8, 1], [1, 1, 8]]) / 10
        >>> balance_reward(probs)  # p = (1/2, 1/4, 1/4) against the uniform 1/3
        tensor([-0.1667, -0.1667,  0.0833,  0.0833])
        >>> balance_reward(torch.tensor([[0.5, 0.5], [0.6, 0.4]]))  # all "None": the worst value
        tensor([-0.5000, -0.5000])
        >>> balance_reward(torch.tensor([[0.9, 0.1], [float("nan")] * 2, [0.2, 0.8]]))
        tensor([0., nan, 0.])
    """
    _check_probs(probs)
    shares_target = _target_distribution(target, probs.shape[1], probs.device)
    # 1. threshold the classifier output: class(i) in {0, ..., K-1} or None (section III-C);
    #    a non-finite row is neither (NaN reward, not counted)
    finite = torch.isfinite(probs).all(dim=1)
    classes = classify_with_threshold(probs, threshold)
    return _balance_of_classes(classes, finite, shares_target).to(probs.dtype)


Shaping = Literal["balance", "log_ratio", "expected_log_ratio"]
"""How :func:`joint_balance_reward` turns a batch into rewards: ``"balance"``, eq. (3)
``(1 - p_k / t_k) / K``; ``"log_ratio"``, ``log(t_k / p_k)``; ``"expected_log_ratio"``,
:func:`expected_log_ratio_reward`."""


def check_shaping(shaping: str) -> None:
    """Raise a clear error unless ``shaping`` is one of :data:`Shaping`.

    Example:
        >>> check_shaping("kl")
        Traceback (most recent call last):
        ...
        ValueError: shaping='kl'; expected 'balance' (eq. 3), 'log_ratio' or 'expected_log_ratio'
    """
    if shaping not in get_args(Shaping):
        raise ValueError(f"shaping={shaping!r}; expected 'balance' (eq. 3), 'log_ratio' or 'expected_log_ratio'")


def _class_rewards(shares: Tensor, shares_target: Tensor, shaping: Shaping) -> Tensor:
    """Reward ``r_k`` of an image of class ``k`` given the batch shares ``p`` (float64 ``[K]``)."""
    if shaping == "balance":
        # eq. (3) generalised: r_k = (1 - p_k / t_k) / K, which is 1/2 - p_k = +-|q - 1/2| for K = 2
        return (1.0 - shares / shares_target) / len(shares_target)
    # log(t_k / p_k): +inf for an absent class, which no image takes (only "None" sees the min)
    return torch.log(shares_target) - torch.log(shares)


def _balance_of_classes(classes: Tensor, finite: Tensor, shares_target: Tensor, shaping: Shaping = "balance") -> Tensor:
    """Steps 2-4 of :func:`balance_reward` on thresholded classes ``[B]`` (``-1``: "None"), float64.

    ``finite`` marks the rows that take part; the others get NaN and are not counted.
    """
    num_classes = len(shares_target)
    classified = (classes != _NONE) & finite
    if not classified.any():
        # eq. (2) with F_count + M_count = 0: q is undefined, and a batch with no classified image
        # is not balanced: the worst value, min over p of min_k r_k, reached at p_k = 1 for argmin t
        one_hot = torch.zeros_like(shares_target)
        one_hot[shares_target.argmin()] = 1.0
        worst = _class_rewards(one_hot, shares_target, shaping).min()
        return worst.expand(len(classes)).masked_fill(~finite, float("nan"))
    # 2. shares of the classified images, eq. (2): q = F_count / (F_count + M_count) = p_1
    counts = torch.bincount(classes[classified], minlength=num_classes).to(torch.float64)
    shares = counts / counts.sum()
    # 3. the reward of each class (eq. 3 generalised, or its shaping)
    class_rewards = _class_rewards(shares, shares_target, shaping)
    # 4. "None" never equals the indicator: it gets the reward of the most over-represented class
    none_reward = class_rewards.min()
    rewards = torch.where(classified, class_rewards[classes.clamp(min=0)], none_reward)
    return rewards.masked_fill(~finite, float("nan"))


def _rows_by_key(keys: Sequence[Hashable] | None, batch_size: int, device: torch.device) -> list[Tensor]:
    """Row indices of each distinct key, in order of first appearance (one group of all rows if ``None``)."""
    if keys is None:
        return [torch.arange(batch_size, device=device)]
    keys = list(keys)
    if len(keys) != batch_size:
        raise ValueError(f"got {len(keys)} keys for {batch_size} images; expected one key (e.g. the prompt) per image")
    rows: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        rows.setdefault(key, []).append(index)
    return [torch.tensor(indices, device=device) for indices in rows.values()]


def _balance_by_key(
    classes: Tensor,
    finite: Tensor,
    shares_target: Tensor,
    keys: Sequence[Hashable] | None,
    shaping: Shaping = "balance",
) -> Tensor:
    """:func:`_balance_of_classes` within each key's rows, float64 ``[B]``."""
    rewards = torch.empty(len(classes), dtype=torch.float64, device=classes.device)
    for rows in _rows_by_key(keys, len(classes), classes.device):
        rewards[rows] = _balance_of_classes(classes[rows], finite[rows], shares_target, shaping)
    return rewards


def grouped_balance_reward(
    probs: Tensor, keys: Sequence[Hashable], threshold: float = 0.7, target: Tensor | None = None
) -> Tensor:
    """``R_balance`` of eq. (2)-(3) within each group of images sharing a key (e.g. a prompt).

    With ``P`` groups (one per distinct key) and ``n^g_k`` the classified images of group ``g``
    in class ``k``, the shares are those of the group alone, ``p^g_k = n^g_k / sum_j n^g_j``,
    and an image ``i`` of group ``g`` gets :func:`balance_reward` of its group's images::

        r_i = (1 - p^g_{class(i)} / t_{class(i)}) / K        (class(i) != None)
        r_i = min_k (1 - p^g_k / t_k) / K                    (class(i) = None)

    (a group with no classified image gets the worst value ``(1 - 1 / min_k t_k) / K``). A batch
    can be balanced as a whole while each prompt is not (one prompt all class 0, another all
    class 1): the whole-batch reward is then 0 everywhere, this one is not. Each group's total
    is ``-(n^g / K) chi2(p^g || t) + n^g_None min_k r^g_k`` (see :func:`balance_reward`), so the
    sum over the batch is maximal exactly when every group matches the target.

    Args:
        probs: Classifier probabilities ``[B, K]``.
        keys: ``B`` hashable group keys, e.g. each image's prompt.
        threshold: Confidence level below which an image is "None" (0.7 in the paper).
        target: Target class shares ``[K]`` of every group, positive and summing to 1; ``None``
            for uniform.

    Returns:
        ``[B]`` rewards in ``probs.dtype`` (NaN for a non-finite row).

    Raises:
        ValueError: If an input is malformed or ``keys`` does not have one key per row.

    Example:
        >>> zero, one = [0.9, 0.1], [0.1, 0.9]
        >>> probs = torch.tensor([zero, zero, zero, one, one, one, one, zero])
        >>> balance_reward(probs)  # balanced as a whole
        tensor([0., 0., 0., 0., 0., 0., 0., 0.])
        >>> grouped_balance_reward(probs, ["a"] * 4 + ["b"] * 4)  # each prompt 3 : 1
        tensor([-0.2500, -0.2500, -0.2500,  0.2500, -0.2500, -0.2500, -0.2500,  0.2500])
    """
    _check_probs(probs)
    shares_target = _target_distribution(target, probs.shape[1], probs.device)
    finite = torch.isfinite(probs).all(dim=1)
    classes = classify_with_threshold(probs, threshold)
    return _balance_by_key(classes, finite, shares_target, keys).to(probs.dtype)


def joint_classes(probs: Sequence[Tensor], threshold: float = 0.7) -> Tensor:
    """Joint class of each image under several attribute classifiers, ``-1`` ("None") if any is unsure.

    Attribute ``a`` has ``K_a`` classes and thresholded class ``c_a`` (:func:`classify_with_threshold`);
    the joint class is the row-major index ``c = sum_a c_a * prod_{b > a} K_b`` (the first
    attribute varies slowest), in ``[0, prod_a K_a)``. An image is "None" as soon as one
    attribute is "None".

    Args:
        probs: ``A >= 1`` tensors ``[B, K_a]`` of class probabilities, one per attribute.
        threshold: Confidence level each attribute's top probability must reach.

    Returns:
        ``[B]`` long tensor of joint classes, ``-1`` for "None".

    Raises:
        ValueError: If ``probs`` is empty or the tensors are malformed or of different ``B``.

    Example:
        >>> digit = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
        >>> thickness = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]])
        >>> joint_classes([digit, thickness])
        tensor([ 1,  2, -1])
    """
    probs = _check_attribute_probs(probs)
    classes = torch.zeros(len(probs[0]), dtype=torch.long, device=probs[0].device)
    unsure = torch.zeros(len(probs[0]), dtype=torch.bool, device=probs[0].device)
    for attribute in probs:
        attribute_classes = classify_with_threshold(attribute, threshold)
        unsure |= attribute_classes == _NONE
        classes = classes * attribute.shape[1] + attribute_classes.clamp(min=0)
    return classes.masked_fill(unsure, _NONE)


def _check_attribute_probs(probs: Sequence[Tensor]) -> list[Tensor]:
    probs = list(probs)
    if not probs:
        raise ValueError("probs is empty; expected one [B, K_a] tensor of probabilities per attribute")
    for attribute in probs:
        _check_probs(attribute)
    sizes = [len(attribute) for attribute in probs]
    if len(set(sizes)) > 1:
        raise ValueError(f"the attributes' probabilities have {sizes} rows; expected the same B images for each")
    return probs


def joint_target(marginals: Sequence[Tensor | Sequence[float] | None], num_classes: Sequence[int]) -> Tensor:
    """Product of per-attribute target shares, the joint target of independent attributes.

    ``t_c = prod_a t^a_{c_a}`` for the joint class ``c`` of :func:`joint_classes` (row-major,
    first attribute slowest).

    Args:
        marginals: Per attribute ``[K_a]`` target shares (positive, summing to 1) or ``None``
            for uniform.
        num_classes: ``K_a`` of each attribute.

    Returns:
        ``[prod_a K_a]`` float64 joint shares.

    Raises:
        ValueError: If the lengths do not match or a marginal is malformed.

    Example:
        >>> joint_target([[0.5, 0.5], [0.2, 0.8]], [2, 2])
        tensor([0.1000, 0.4000, 0.1000, 0.4000], dtype=torch.float64)
    """
    if len(marginals) != len(num_classes):
        raise ValueError(
            f"got {len(marginals)} marginals for {len(num_classes)} attributes; expected one (or None) per attribute"
        )
    joint = torch.ones(1, dtype=torch.float64)
    for marginal, size in zip(marginals, num_classes, strict=True):
        shares = _target_distribution(None if marginal is None else torch.as_tensor(marginal), size, joint.device)
        joint = torch.outer(joint, shares).flatten()
    return joint


def joint_balance_reward(
    probs: Sequence[Tensor],
    threshold: float = 0.7,
    target: Tensor | None = None,
    keys: Sequence[Hashable] | None = None,
    shaping: Shaping = "balance",
) -> Tensor:
    """``R_balance`` of eq. (2)-(3) over the joint classes of several attributes.

    Each image's joint class ``c(i)`` is that of :func:`joint_classes` ("None" if any attribute
    is below ``threshold``); over the ``K = prod_a K_a`` joint classes, with shares ``p_c`` of
    the classified images (within each key's group when ``keys`` is given) and the joint target
    ``t_c`` (:func:`joint_target`; by default the product of uniform marginals, ``1 / K``)::

        r_i = (1 - p_{c(i)} / t_{c(i)}) / K                  (c(i) != None)
        r_i = min_c (1 - p_c / t_c) / K                      (c(i) = None)

    which is :func:`balance_reward` on the joint classes: for one attribute it is eq. (3), and
    the batch total ``-(n / K) chi2(p || t) + n_None min_c r_c`` is maximal exactly at ``p = t``,
    so balance of each marginal alone (all zeros bold, all loop digits thin) is not rewarded as
    balance of the pairs. A row with a non-finite probability in any attribute gets NaN and is
    not counted.

    ``shaping="log_ratio"`` replaces the class reward by the log ratio of target to share::

        r_i = log(t_{c(i)} / p_{c(i)})                       (c(i) != None)
        r_i = min_c log(t_c / p_c)                           (c(i) = None; over the present classes)

    (``log(min_c t_c)`` for every image of a batch with no classified image). Why: with the
    shares held fixed, the policy gradient of a per-image reward ``r_c`` is
    ``sum_c r_c grad p_c``; for eq. (3) that is ``-grad chi2(p || t) / (2K)``, whose pull on a
    class is bounded (``|d chi2 / d p_c| <= 2 / t_c``), while for ``log(t_c / p_c)`` it is
    ``-grad KL(p || t)`` (``sum_c grad p_c = 0`` removes the ``+1`` of ``d KL / d p_c =
    log(p_c / t_c) + 1``), which grows without bound as a class empties: a rare joint class is
    pulled back much harder than by eq. (3). Near ``p = t`` both agree up to the factor ``K``
    (``log(t_c / p_c) ~ 1 - p_c / t_c``), so the updates still fade at balance.

    Args:
        probs: ``A >= 1`` tensors ``[B, K_a]`` of class probabilities, one per attribute.
        threshold: Confidence level of every attribute (0.7 in the paper).
        target: ``[prod_a K_a]`` joint target shares, positive and summing to 1; ``None`` for uniform.
        keys: ``B`` group keys (e.g. prompts) to balance each group on its own; ``None``: the batch.
        shaping: ``"balance"`` (eq. 3), ``"log_ratio"`` (``log(t_c / p_c)``, the descent of
            ``KL(p || t)``) or ``"expected_log_ratio"`` (its expectation over each image's
            classes, :func:`expected_log_ratio_reward`).

    Returns:
        ``[B]`` rewards in the first attribute's dtype.

    Raises:
        ValueError: If an input is malformed.

    Example:
        >>> digit = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
        >>> thickness = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
        >>> joint_balance_reward([digit, thickness])  # each marginal 50/50, the pairs (0,0) (1,1) only
        tensor([-0.2500, -0.2500, -0.2500, -0.2500])
        >>> thickness = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
        >>> joint_balance_reward([digit, thickness], shaping="log_ratio")  # p = (1/2, 0, 1/4, 1/4)
        tensor([-0.6931, -0.6931,  0.0000,  0.0000])
    """
    probs = _check_attribute_probs(probs)
    num_classes = [attribute.shape[1] for attribute in probs]
    device = probs[0].device
    if target is None:  # the product of uniform marginals
        shares_target = joint_target([None] * len(probs), num_classes).to(device)
    else:
        shares_target = _target_distribution(target, math.prod(num_classes), device)
    finite = torch.stack([torch.isfinite(attribute).all(dim=1) for attribute in probs]).all(dim=0)
    check_shaping(shaping)
    if shaping == "expected_log_ratio":
        return expected_log_ratio_reward(probs, threshold, shares_target, keys)
    classes = joint_classes(probs, threshold)
    return _balance_by_key(classes, finite, shares_target, keys, shaping).to(probs[0].dtype)


def check_groups(groups: Sequence[Sequence[int]], num_classes: int | None) -> list[list[int]]:
    """``groups`` as lists of ints, checked: at least two non-empty, disjoint, valid class indices.

    Args:
        groups: Lists of class indices, one per attribute column.
        num_classes: Number ``K`` of classes; ``None`` checks only that indices are not negative.

    Raises:
        ValueError: naming ``groups`` and what is wrong with it.
    """
    groups = [[int(c) for c in group] for group in groups]
    flat = [c for group in groups for c in group]
    if len(groups) < 2 or any(len(group) == 0 for group in groups):
        raise ValueError(
            f"groups={groups}; expected at least two non-empty lists of class indices, e.g. [[0], [6, 8, 9]]"
        )
    if len(set(flat)) != len(flat):
        raise ValueError(f"groups={groups} put a class in two columns; each class may be in one group only")
    upper = num_classes if num_classes is not None else float("inf")
    if any(not 0 <= c < upper for c in flat):
        raise ValueError(
            f"groups={groups} has class indices outside [0, {num_classes - 1}]"
            if num_classes is not None
            else f"groups={groups} has negative class indices"
        )
    return groups


def group_probabilities(probs: Tensor, groups: Sequence[Sequence[int]] | None) -> Tensor:
    """Attribute probabilities ``[B, G]``: column ``g`` sums the classes of ``groups[g]``.

    Classes in no group are dropped, so a row may sum to less than 1 (such an image is then
    "None" under a confidence threshold).

    Args:
        probs: Class probabilities ``[B, K]``.
        groups: ``G >= 2`` disjoint lists of class indices; ``None`` returns ``probs``.

    Returns:
        ``[B, G]`` probabilities.

    Example:
        >>> probs = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
        >>> group_probabilities(probs, [[0], [1, 2]])
        tensor([[0.1000, 0.9000],
                [0.6000, 0.4000]])
    """
    if groups is None:
        return probs
    groups = check_groups(groups, probs.shape[-1])
    membership = probs.new_zeros(probs.shape[-1], len(groups))
    for column, group in enumerate(groups):
        membership[group, column] = 1.0
    return probs @ membership


def joint_probabilities(probs: Sequence[Tensor]) -> Tensor:
    """Probability of each joint class, the product of the attributes' probabilities, ``[B, prod_a K_a]``.

    ``P_i(c) = prod_a P^a_i(c_a)`` for the joint class ``c`` of :func:`joint_classes` (row-major,
    first attribute slowest): the attribute classifiers are separate models, so their outputs are
    combined as independent.

    Example:
        >>> joint_probabilities([torch.tensor([[0.9, 0.1]]), torch.tensor([[0.2, 0.8]])])
        tensor([[0.1800, 0.7200, 0.0200, 0.0800]])
    """
    probs = _check_attribute_probs(probs)
    joint = probs[0]
    for attribute in probs[1:]:
        joint = (joint[:, :, None] * attribute[:, None, :]).flatten(1)
    return joint


def expected_log_ratio_reward(
    probs: Sequence[Tensor],
    threshold: float = 0.7,
    target: Tensor | None = None,
    keys: Sequence[Hashable] | None = None,
) -> Tensor:
    """The class reward ``log(t_c / p_c)`` of the thresholded shares, in expectation over each image's classes.

    The shares are those of ``"log_ratio"`` (:func:`joint_balance_reward`): ``p_c = n_c / n``
    over the ``n`` images of the batch (of a key's group) whose joint class :func:`joint_classes`
    reaches ``threshold``, floored at ``1 / n`` so that a class absent from the batch is counted as
    one image. Each image is rewarded with the expectation of the class reward under its joint
    class probabilities ``P_i(c)`` (:func:`joint_probabilities`)::

        r_i = sum_c P_i(c) log(t_c / max(p_c, 1 / n))

    A confidently classified image (``P_i(c(i)) ~ 1``) gets ``log(t_c / p_c)`` of its class, as
    with ``"log_ratio"``; an unsure one ("None" there, rewarded like the most over-represented
    class) gets the mixture of its candidate classes' rewards, so a bold loop digit growing thinner
    is rewarded for every step towards the missing thin loop digits instead of meeting a flat
    "None" value on the way. The fixed point is unchanged: at ``p = t`` every class reward, so every
    image's reward, is 0. A batch with no classified image gets ``log(min_c t_c)`` everywhere; a row
    with a non-finite probability gets NaN and is not counted.

    Args:
        probs: ``A >= 1`` tensors ``[B, K_a]`` of class probabilities, one per attribute.
        threshold: Confidence level of every attribute (0.7 in the paper).
        target: ``[prod_a K_a]`` joint target shares, positive and summing to 1; ``None`` for uniform.
        keys: ``B`` group keys (e.g. prompts) to balance each group on its own; ``None``: the batch.

    Returns:
        ``[B]`` rewards in the first attribute's dtype.

    Raises:
        ValueError: If an input is malformed.

    Example:
        >>> digit = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.4, 0.6]])
        >>> expected_log_ratio_reward([digit])  # p = (3/4, 1/4); the unsure image leans to class 1
        tensor([-0.2956, -0.2956, -0.2956,  0.5833,  0.2537])
    """
    joint = joint_probabilities(probs)
    shares_target = _target_distribution(target, joint.shape[1], joint.device)
    finite = torch.isfinite(joint).all(dim=1)
    classes = joint_classes(probs, threshold)
    rewards = torch.full((len(joint),), float("nan"), dtype=torch.float64, device=joint.device)
    for rows in _rows_by_key(keys, len(joint), joint.device):
        rows = rows[finite[rows]]
        classified = classes[rows][classes[rows] != _NONE]
        if len(classified) == 0:
            rewards[rows] = shares_target.min().log()
            continue
        # 1. thresholded shares p_c of the classified images (eq. 2), an absent class counted as one
        counts = torch.bincount(classified, minlength=joint.shape[1]).to(torch.float64)
        shares = counts.clamp(min=1.0) / len(classified)
        # 2. the class rewards log(t_c / p_c), 3. their expectation under each image's P_i(c)
        rewards[rows] = joint[rows].to(torch.float64) @ (shares_target.log() - shares.log())
    return rewards.to(joint.dtype)
