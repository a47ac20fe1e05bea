import math

import pytest
import torch

from lightning_sdrl.functional.preference import (
    pairwise_loss,
    preference_accuracy,
    ranking_to_pairs,
)


def test_ranking_to_pairs_lower_rank_is_better_and_ties_are_skipped():
    # images 1 and 3 tie at rank 2; image 2 is best, image 0 worst
    ranks = [4, 2, 1, 2]
    pairs = ranking_to_pairs(ranks)
    assert pairs == [(1, 0), (2, 0), (3, 0), (2, 1), (2, 3)]
    assert all(ranks[better] < ranks[worse] for better, worse in pairs)


def test_ranking_to_pairs_counts():
    assert len(ranking_to_pairs(list(range(1, 10)))) == 36  # C(9, 2), no ties
    assert ranking_to_pairs([1, 1, 1]) == []
    assert ranking_to_pairs([]) == []


def test_pairwise_loss_matches_direct_computation():
    better = torch.tensor([2.0, -1.0, 0.5, 0.0])
    worse = torch.tensor([1.0, 1.0, 0.5, -3.0])
    expected = (
        -sum(math.log(1.0 / (1.0 + math.exp(-(b - w)))) for b, w in zip(better.tolist(), worse.tolist(), strict=True))
        / 4
    )
    assert pairwise_loss(better, worse).item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_loss_is_stable_for_large_gaps_and_has_bradley_terry_gradient():
    better = torch.tensor([-200.0], requires_grad=True)
    loss = pairwise_loss(better, torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0)
    loss.backward()
    assert better.grad.item() == pytest.approx(-1.0)  # -(1 - sigmoid(-400))


def test_preference_accuracy_counts_predicted_ties_as_wrong():
    better = torch.tensor([1.0, 0.3, 0.2, 5.0])
    worse = torch.tensor([0.0, 0.3, 0.9, 4.0])  # right, tie, wrong, right
    assert preference_accuracy(better, worse).item() == pytest.approx(0.5)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"\[3\].*\[2\]"):
        pairwise_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        preference_accuracy(torch.zeros(0), torch.zeros(0))
