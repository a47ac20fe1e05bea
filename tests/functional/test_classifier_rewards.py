import itertools
import math

import pytest
import torch

from lightning_sdrl.functional.classifier_rewards import (
    balance_reward,
    classify_with_threshold,
    expected_log_ratio_reward,
    grouped_balance_reward,
    joint_balance_reward,
    joint_classes,
    joint_probabilities,
    joint_target,
    shift_reward,
)

MALE, FEMALE, UNSURE = [0.9, 0.1], [0.15, 0.85], [0.45, 0.55]


def eq3_by_hand(probs: list[list[float]], threshold: float = 0.7) -> list[float]:
    """Eq. (2)-(3) of the debiasing paper, written out literally (column 1 is "female")."""
    classes = []
    for p_male, p_female in probs:
        if max(p_male, p_female) < threshold:
            classes.append(None)
        else:
            classes.append(1 if p_female > p_male else 0)
    female, male = classes.count(1), classes.count(0)
    if female + male == 0:  # q = 0 / 0: not balanced, the worst value (that of q = 0 or q = 1)
        return [-0.5] * len(probs)
    q = female / (female + male)  # eq. (2)
    indicator = 1 if q < 0.5 else 0
    return [abs(q - 0.5) * (2 * (c == indicator) - 1) for c in classes]  # eq. (3)


def test_shift_reward_is_the_target_column():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    torch.testing.assert_close(shift_reward(probs, target=1), torch.tensor([0.1, 0.7, 0.5]))
    torch.testing.assert_close(shift_reward(probs, target=0), torch.tensor([0.9, 0.3, 0.5]))


def test_shift_reward_rejects_bad_target():
    with pytest.raises(ValueError, match="target=2"):
        shift_reward(torch.rand(3, 2), target=2)


def test_classify_with_threshold_marks_unsure_images_none():
    probs = torch.tensor([[0.7, 0.3], [0.69, 0.31], [0.2, 0.8]])
    assert classify_with_threshold(probs).tolist() == [0, -1, 1]
    probs3 = torch.tensor([[0.1, 0.2, 0.7], [0.4, 0.3, 0.3], [0.05, 0.9, 0.05]])
    assert classify_with_threshold(probs3, threshold=0.5).tolist() == [2, -1, 1]


@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_classify_with_threshold_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        classify_with_threshold(torch.rand(2, 2), threshold)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        # q = 1/4 < 0.5: indicator = 1, the female image gets +1/4, males and None -1/4
        ([MALE, MALE, MALE, FEMALE, UNSURE], [-0.25, -0.25, -0.25, 0.25, -0.25]),
        # q = 3/4 >= 0.5: indicator = 0, the male image gets +1/4, females and None -1/4
        ([FEMALE, FEMALE, MALE, FEMALE, UNSURE, UNSURE], [-0.25, -0.25, 0.25, -0.25, -0.25, -0.25]),
        # q = 1/2: indicator = 0 and |q - 0.5| = 0, everything (None included) gets 0
        ([MALE, FEMALE, UNSURE, FEMALE, MALE], [0.0] * 5),
        # q = 0: only males; they get -1/2, None too
        ([MALE, MALE, UNSURE], [-0.5, -0.5, -0.5]),
        # q = 1: only females
        ([FEMALE, FEMALE], [-0.5, -0.5]),
        # q = 1/3: indicator = 1
        ([MALE, FEMALE, MALE], [-1 / 6, 1 / 6, -1 / 6]),
        # no classified image: q is undefined and the batch is not balanced, the worst value -1/2
        ([UNSURE, UNSURE], [-0.5, -0.5]),
    ],
)
def test_balance_reward_matches_eq3_by_hand(batch, expected):
    rewards = balance_reward(torch.tensor(batch))
    torch.testing.assert_close(rewards, torch.tensor(expected))
    torch.testing.assert_close(rewards, torch.tensor(eq3_by_hand(batch)))


def test_balance_reward_matches_eq3_on_random_batches():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        p_female = torch.rand(int(torch.randint(1, 12, (1,), generator=generator)), generator=generator)
        probs = torch.stack([1 - p_female, p_female], dim=1)
        torch.testing.assert_close(balance_reward(probs), torch.tensor(eq3_by_hand(probs.tolist())))


def test_balance_reward_keeps_dtype_and_threshold():
    probs = torch.tensor([[0.65, 0.35], [0.2, 0.8]], dtype=torch.float64)
    assert balance_reward(probs).dtype == torch.float64
    # at threshold 0.6 the first image counts as male: q = 1/2
    torch.testing.assert_close(balance_reward(probs, threshold=0.6), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(balance_reward(probs), torch.tensor([-0.5, -0.5], dtype=torch.float64))


def probs_for_counts(counts: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """One confident row per classified image of each class, then uniform ("None") rows."""
    confident = torch.eye(num_classes) * 0.9 + 0.1 / num_classes
    rows = torch.cat([confident, torch.full((1, num_classes), 1.0 / num_classes)])
    return rows.repeat_interleave(torch.tensor(counts), dim=0)


def compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(total + parts - 1), parts - 1):
        bounds = (-1, *cuts, total + parts - 1)
        yield tuple(bounds[i + 1] - bounds[i] - 1 for i in range(parts))


@pytest.mark.parametrize(
    ("target", "batch_size", "best"),
    [
        (None, 6, (3, 3)),
        (None, 6, (2, 2, 2)),
        ([0.5, 1 / 3, 1 / 6], 6, (3, 2, 1)),
        (None, 4, (1, 1, 1, 1)),
    ],
)
def test_balance_reward_total_is_maximal_at_the_target(target, batch_size, best):
    num_classes = len(best)
    shares = torch.full((num_classes,), 1 / num_classes) if target is None else torch.tensor(target)
    totals = {}
    # brute force over every (n_0, ..., n_{K-1}, n_None) with sum B
    for counts in compositions(batch_size, num_classes + 1):
        totals[counts] = balance_reward(probs_for_counts(counts, num_classes), target=target).sum().item()
    maximum = max(totals.values())
    assert maximum == pytest.approx(0.0, abs=1e-6)
    argmax = {c for c, total in totals.items() if total > maximum - 1e-6}
    for counts in argmax:  # the maximum is reached exactly when the classified shares equal the target
        classified = torch.tensor(counts[:num_classes], dtype=torch.float64)
        assert classified.sum() == 0 or torch.allclose(classified / classified.sum(), shares.double())
    assert (*best, 0) in argmax
    without_none = {c for c in argmax if c[-1] == 0}
    assert without_none == {(*best, 0)}


def test_balance_reward_total_is_minus_scaled_chi_square():
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(20, 4, generator=generator), dim=1)
    target = torch.tensor([0.1, 0.2, 0.3, 0.4])
    classes = classify_with_threshold(probs, 0.5)
    counts = torch.bincount(classes[classes >= 0], minlength=4).double()
    p = counts / counts.sum()
    chi2 = ((p - target.double()) ** 2 / target).sum()
    none_reward = (1 - (p / target).max()) / 4
    expected = -(counts.sum() / 4) * chi2 + (classes < 0).sum() * none_reward
    total = balance_reward(probs, threshold=0.5, target=target).double().sum()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)


def test_balance_reward_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"expected \[B, K\]"):
        balance_reward(torch.rand(4))
    with pytest.raises(ValueError, match=r"expected \[3\]"):
        balance_reward(torch.rand(4, 3), target=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="strictly positive"):
        balance_reward(torch.rand(4, 2), target=torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    ("num_classes", "target", "worst"),
    [
        (2, None, -0.5),
        (3, None, -2 / 3),
        (3, [0.5, 1 / 3, 1 / 6], (1 - 6) / 3),
    ],
)
def test_balance_reward_of_an_all_none_batch_is_the_lowest_any_batch_gets(num_classes, target, worst):
    unsure = torch.full((5, num_classes), 1.0 / num_classes)
    rewards = balance_reward(unsure, target=target)
    torch.testing.assert_close(rewards, torch.full((5,), worst))
    # brute force: no batch of 5 (classified or not) gets a lower reward or total
    for counts in compositions(5, num_classes + 1):
        other = balance_reward(probs_for_counts(counts, num_classes), target=target)
        assert other.min() >= worst - 1e-6 and other.sum() >= rewards.sum() - 1e-5


def test_balance_reward_gives_non_finite_rows_nan_and_leaves_them_out():
    nan, inf = float("nan"), float("inf")
    probs = torch.tensor([MALE, [nan, nan], MALE, FEMALE, [inf, 0.0], UNSURE])
    rewards = balance_reward(probs)
    assert torch.isnan(rewards[[1, 4]]).all()
    # the other four are scored as the batch without the non-finite rows (q = 1/3)
    torch.testing.assert_close(rewards[[0, 2, 3, 5]], balance_reward(probs[[0, 2, 3, 5]]))
    torch.testing.assert_close(rewards[[0, 2, 3, 5]], torch.tensor([-1 / 6, -1 / 6, 1 / 6, -1 / 6]))
    # a batch with no finite row is never scored as balanced
    assert torch.isnan(balance_reward(torch.full((4, 2), nan))).all()
    # unsure images next to NaN rows: an all-"None" batch, the worst value
    torch.testing.assert_close(
        balance_reward(torch.tensor([UNSURE, [nan, nan]])), torch.tensor([-0.5, nan]), equal_nan=True
    )


# ---------------------------------------------------------------- per-prompt balance (section V)
def balance_by_hand(labels: list, num_classes: int, target: list[float] | None = None) -> list[float]:
    """Eq. (2)-(3) generalised, written out with Python counts: labels are class indices or None."""
    target = target or [1.0 / num_classes] * num_classes
    classified = [c for c in labels if c is not None]
    if not classified:
        return [(1 - 1 / min(target)) / num_classes] * len(labels)
    shares = [classified.count(k) / len(classified) for k in range(num_classes)]
    per_class = [(1 - shares[k] / target[k]) / num_classes for k in range(num_classes)]
    return [per_class[c] if c is not None else min(per_class) for c in labels]


def threshold_by_hand(row: list[float], threshold: float = 0.7):
    best = max(range(len(row)), key=lambda k: row[k])
    return best if row[best] >= threshold else None


def test_grouped_balance_on_a_batch_balanced_as_a_whole_but_not_per_prompt():
    # prompt "a" is 3 male : 1 female, prompt "b" 1 male : 3 female: the batch is 4 : 4
    batch = [MALE, MALE, MALE, FEMALE, FEMALE, FEMALE, FEMALE, MALE]
    keys = ["a"] * 4 + ["b"] * 4
    probs = torch.tensor(batch, dtype=torch.float64)
    torch.testing.assert_close(balance_reward(probs), torch.zeros(8, dtype=torch.float64))
    rewards = grouped_balance_reward(probs, keys)
    expected = eq3_by_hand(batch[:4]) + eq3_by_hand(batch[4:])
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=torch.float64))
    assert (rewards != 0).all()
    # within each prompt, its minority image is rewarded and its majority penalised
    assert rewards[3] > 0 > rewards[0] and rewards[7] > 0 > rewards[4]


def test_grouped_balance_total_of_each_prompt_rises_towards_its_balance():
    # move prompt "a" one image at a time from all male to balanced: its total reward rises to 0,
    # whatever prompt "b" does (the whole-batch reward would be fooled by "b")
    totals = []
    for females in range(5):
        batch = [FEMALE] * females + [MALE] * (8 - females) + [FEMALE] * 8
        rewards = grouped_balance_reward(torch.tensor(batch), ["a"] * 8 + ["b"] * 8)
        totals.append(rewards[:8].sum().item())
    assert totals == sorted(totals) and totals[-1] == pytest.approx(0.0, abs=1e-6) and totals[0] < 0


@pytest.mark.parametrize("target", [None, [0.2, 0.3, 0.5]])
def test_grouped_balance_matches_counts_by_hand_on_random_batches(target):
    generator = torch.Generator().manual_seed(3)
    probs = torch.softmax(3 * torch.randn(40, 3, generator=generator), dim=1)
    keys = [int(k) for k in torch.randint(0, 4, (40,), generator=generator)]
    rewards = grouped_balance_reward(probs, keys, 0.7, None if target is None else torch.tensor(target))
    labels = [threshold_by_hand(row) for row in probs.tolist()]
    for key in set(keys):
        rows = [i for i, k in enumerate(keys) if k == key]
        expected = balance_by_hand([labels[i] for i in rows], 3, target)
        torch.testing.assert_close(rewards[rows], torch.tensor(expected, dtype=torch.float32))


def test_grouped_balance_gives_nan_to_non_finite_rows_and_checks_keys():
    probs = torch.tensor([MALE, [float("nan")] * 2, FEMALE, MALE])
    rewards = grouped_balance_reward(probs, ["a", "a", "a", "b"])
    # "a": one male, one female (balanced); "b": one male only (q = 0, the worst)
    assert rewards[1].isnan() and rewards[[0, 2, 3]].tolist() == [0.0, 0.0, -0.5]
    with pytest.raises(ValueError, match="got 3 keys for 4 images"):
        grouped_balance_reward(probs, ["a", "a", "b"])


# ---------------------------------------------------------------- joint balance of several attributes
def test_joint_classes_are_row_major_and_none_if_any_attribute_is_unsure():
    first = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.4, 0.3, 0.3], [0.1, 0.8, 0.1]])
    second = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.9, 0.1], [0.5, 0.5]])
    assert joint_classes([first, second]).tolist() == [1, 4, -1, -1]


def test_joint_target_is_the_product_of_the_marginals():
    got = joint_target([[0.3, 0.7], None, [0.1, 0.9]], [2, 3, 2])
    expected = [a * b * c for a in (0.3, 0.7) for b in (1 / 3,) * 3 for c in (0.1, 0.9)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 marginals for 3 attributes"):
        joint_target([None, None], [2, 2, 2])


def random_joint_case(seed, marginals, per_key):
    """60 images' probabilities under a 2-class and a 3-class judge, keys (3 groups or None), the target
    (uniform or the product of ``marginals``), the 6 (a, b) pairs in row-major order and their target shares."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.softmax(3 * torch.randn(60, 2, generator=generator), dim=1).double()
    second = torch.softmax(3 * torch.randn(60, 3, generator=generator), dim=1).double()
    keys = [i % 3 for i in range(60)] if per_key else None
    target = None if marginals is None else joint_target(marginals, [2, 3])
    pairs = [(a, b) for a in range(2) for b in range(3)]
    joint = [1 / 6] * 6 if marginals is None else [marginals[0][a] * marginals[1][b] for a, b in pairs]
    return first, second, keys, target, pairs, joint


@pytest.mark.parametrize("marginals", [None, [[0.4, 0.6], [0.2, 0.3, 0.5]]])
@pytest.mark.parametrize("per_key", [False, True])
def test_joint_balance_matches_an_independent_computation(marginals, per_key):
    first, second, keys, target, pairs, joint = random_joint_case(11, marginals, per_key)
    rewards = joint_balance_reward([first, second], 0.7, target, keys)
    # independently: pairs of thresholded classes, counted with Python, joint shares over the 6 pairs
    labels = []
    for row_first, row_second in zip(first.tolist(), second.tolist(), strict=True):
        a, b = threshold_by_hand(row_first), threshold_by_hand(row_second)
        labels.append(None if a is None or b is None else pairs.index((a, b)))
    assert any(label is None for label in labels) and len(set(labels)) > 4
    groups = [list(range(60))] if keys is None else [[i for i in range(60) if keys[i] == k] for k in range(3)]
    for rows in groups:
        expected = balance_by_hand([labels[i] for i in rows], 6, joint)
        torch.testing.assert_close(rewards[rows], torch.tensor(expected, dtype=torch.float64))


def test_joint_balance_of_one_attribute_is_the_balance_reward_and_sees_joint_bias():
    probs = torch.softmax(2 * torch.randn(20, 2, generator=torch.Generator().manual_seed(1)), dim=1)
    torch.testing.assert_close(joint_balance_reward([probs]), balance_reward(probs))
    # every marginal is balanced (half zeros, half bold) but the pairs are (0, thin) and (1, bold) only
    digit = torch.tensor([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4)
    assert balance_reward(digit).abs().max() == 0 and balance_reward(digit.flip(0)).abs().max() == 0
    assert (joint_balance_reward([digit, digit]) < 0).all()


def test_joint_balance_rejects_bad_inputs():
    with pytest.raises(ValueError, match="probs is empty"):
        joint_balance_reward([])
    with pytest.raises(ValueError, match=r"\[4, 3\] rows"):
        joint_balance_reward([torch.rand(4, 2), torch.rand(3, 2)])
    with pytest.raises(ValueError, match="expected \\[4\\]"):
        joint_balance_reward([torch.rand(4, 2), torch.rand(4, 2)], target=torch.ones(3) / 3)


def log_ratio_by_hand(labels: list, num_classes: int, target: list[float]) -> list[float]:
    """``log(t_c / p_c)`` with Python counts; "None" gets the smallest over the present classes."""
    classified = [c for c in labels if c is not None]
    if not classified:
        return [math.log(min(target))] * len(labels)
    per_class = {k: math.log(target[k] * len(classified) / classified.count(k)) for k in set(classified)}
    return [per_class[c] if c is not None else min(per_class.values()) for c in labels]


@pytest.mark.parametrize("marginals", [None, [[0.4, 0.6], [0.2, 0.3, 0.5]]])
@pytest.mark.parametrize("per_key", [False, True])
def test_joint_log_ratio_matches_an_independent_computation(marginals, per_key):
    generator = torch.Generator().manual_seed(5)
    first = torch.softmax(3 * torch.randn(60, 2, generator=generator), dim=1).double()
    second = torch.softmax(3 * torch.randn(60, 3, generator=generator), dim=1).double()
    keys = [i % 3 for i in range(60)] if per_key else None
    target = None if marginals is None else joint_target(marginals, [2, 3])
    rewards = joint_balance_reward([first, second], 0.7, target, keys, shaping="log_ratio")
    pairs = [(a, b) for a in range(2) for b in range(3)]
    joint = [1 / 6] * 6 if marginals is None else [marginals[0][a] * marginals[1][b] for a, b in pairs]
    labels = []
    for row_first, row_second in zip(first.tolist(), second.tolist(), strict=True):
        a, b = threshold_by_hand(row_first), threshold_by_hand(row_second)
        labels.append(None if a is None or b is None else pairs.index((a, b)))
    assert any(label is None for label in labels)
    groups = [list(range(60))] if keys is None else [[i for i in range(60) if keys[i] == k] for k in range(3)]
    for rows in groups:
        expected = log_ratio_by_hand([labels[i] for i in rows], 6, joint)
        torch.testing.assert_close(rewards[rows], torch.tensor(expected, dtype=torch.float64))
    # no classified image: every image gets the log of the smallest target share
    unsure = [torch.full((3, 2), 1 / 2, dtype=torch.float64), torch.full((3, 3), 1 / 3, dtype=torch.float64)]
    expected = torch.full((3,), math.log(min(joint)), dtype=torch.float64)
    torch.testing.assert_close(joint_balance_reward(unsure, 0.7, target, shaping="log_ratio"), expected)


def test_joint_log_ratio_policy_gradient_descends_kl():
    """``sum_c r_c grad p_c`` (``r`` at fixed shares) is ``-grad KL(p || t)``; for eq. (3) ``-grad chi2 / (2K)``."""
    counts = [4, 2, 1, 1]  # joint classes (0,0) (0,1) (1,0) (1,1) of 8 images
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    digit = torch.tensor([[0.9, 0.1] if c < 2 else [0.1, 0.9] for c in labels], dtype=torch.float64)
    thickness = torch.tensor([[0.9, 0.1] if c % 2 == 0 else [0.1, 0.9] for c in labels], dtype=torch.float64)
    first_of_class = [labels.index(c) for c in range(4)]
    target = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    logits = torch.log(torch.tensor(counts, dtype=torch.float64) / 8).requires_grad_(True)
    shares = torch.softmax(logits, dim=0)
    kl = (shares * (shares / target).log()).sum()
    chi2 = ((shares - target) ** 2 / target).sum()
    (grad_kl,) = torch.autograd.grad(kl, logits, retain_graph=True)
    (grad_chi2,) = torch.autograd.grad(chi2, logits, retain_graph=True)
    for shaping, expected in (("log_ratio", -grad_kl), ("balance", -grad_chi2 / 8)):
        rewards = joint_balance_reward([digit, thickness], target=target, shaping=shaping)[first_of_class]
        (policy_gradient,) = torch.autograd.grad(shares, logits, grad_outputs=rewards, retain_graph=True)
        torch.testing.assert_close(policy_gradient, expected)


def test_joint_balance_rejects_an_unknown_shaping():
    with pytest.raises(ValueError, match="shaping='ratio'"):
        joint_balance_reward([torch.rand(4, 2)], shaping="ratio")


def test_joint_probabilities_are_the_products_in_row_major_order():
    generator = torch.Generator().manual_seed(2)
    first, second = torch.rand(5, 2, generator=generator), torch.rand(5, 3, generator=generator)
    expected = torch.stack([first[:, a] * second[:, b] for a in range(2) for b in range(3)], dim=1)
    torch.testing.assert_close(joint_probabilities([first, second]), expected)


@pytest.mark.parametrize("marginals", [None, [[0.4, 0.6], [0.2, 0.3, 0.5]]])
@pytest.mark.parametrize("per_key", [False, True])
def test_expected_log_ratio_matches_an_independent_computation(marginals, per_key):
    first, second, keys, target, pairs, joint = random_joint_case(7, marginals, per_key)
    rewards = expected_log_ratio_reward([first, second], 0.7, target, keys)
    torch.testing.assert_close(
        joint_balance_reward([first, second], 0.7, target, keys, shaping="expected_log_ratio"), rewards
    )
    rows_first, rows_second = first.tolist(), second.tolist()
    labels = []
    for row_first, row_second in zip(rows_first, rows_second, strict=True):
        a, b = threshold_by_hand(row_first), threshold_by_hand(row_second)
        labels.append(None if a is None or b is None else pairs.index((a, b)))
    groups = [list(range(60))] if keys is None else [[i for i in range(60) if keys[i] == k] for k in range(3)]
    for rows in groups:
        classified = [labels[i] for i in rows if labels[i] is not None]
        shares = [max(classified.count(c), 1) / len(classified) for c in range(6)]
        expected = [
            sum(rows_first[i][a] * rows_second[i][b] * math.log(joint[c] / shares[c]) for c, (a, b) in enumerate(pairs))
            for i in rows
        ]
        torch.testing.assert_close(rewards[rows], torch.tensor(expected, dtype=torch.float64))


def test_expected_log_ratio_is_the_log_ratio_for_certain_images_and_rewards_partial_progress():
    one_hot = torch.eye(2, dtype=torch.float64)[[0, 0, 0, 1, 1, 0, 1, 0]]
    thickness = torch.eye(2, dtype=torch.float64)[[0, 1, 0, 1, 0, 0, 1, 1]]
    torch.testing.assert_close(
        expected_log_ratio_reward([one_hot, thickness]), joint_balance_reward([one_hot, thickness], shaping="log_ratio")
    )
    # an over-represented class 0 and a missing class 1: the nearer an unsure image is to 1, the more it gets
    digit = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.5, 0.5]], dtype=torch.float64)
    rewards = expected_log_ratio_reward([digit])
    assert rewards[0] < rewards[2] < rewards[3]
    # p = (1, 0) floored to (1, 1/2): r_0 = log(1/2), r_1 = log(1) = 0
    assert rewards[0].item() == pytest.approx(0.9 * math.log(0.5))
    unsure = torch.full((3, 2), 0.5, dtype=torch.float64)  # nothing classified: log(min_c t_c)
    assert expected_log_ratio_reward([unsure]).tolist() == pytest.approx([math.log(0.5)] * 3)
