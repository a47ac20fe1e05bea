"""Pairwise preference learning from rankings (ImageReward, eq. (4) of the reward-model report).

A prompt has ``k`` generated images ranked by annotators, best first. Every two images with
different ranks give one comparison ``(better, worse)``; a reward model ``r`` is trained so that
``sigmoid(r(better) - r(worse))`` is the probability that annotators prefer ``better``
(Bradley-Terry), and is judged by how often it orders a held-out pair as the annotators did.
"""

from collections.abc import Sequence
from itertools import combinations

import torch.nn.functional as F
from torch import Tensor


def ranking_to_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Turn one prompt's ranking into ``(better, worse)`` index pairs.

    A lower rank is better (1 is the best image). Images with equal ranks are ties and give no
    pair, so ``k`` images give at most ``k * (k - 1) / 2`` pairs. Pairs come in the order of
    ``itertools.combinations`` over the image indices, as ImageReward builds them.

    Args:
        ranks: Rank of each image of one prompt, in the order the images are listed.

    Returns:
        Index pairs ``(better, worse)`` into ``ranks``.

    Example:
        >>> ranking_to_pairs([2, 1, 3])
        [(1, 0), (0, 2), (1, 2)]
        >>> ranking_to_pairs([1, 2, 1])  # images 0 and 2 tie
        [(0, 1), (2, 1)]
    """
    pairs = []
    for i, j in combinations(range(len(ranks)), 2):
        if ranks[i] < ranks[j]:
            pairs.append((i, j))
        elif ranks[j] < ranks[i]:
            pairs.append((j, i))
    return pairs


def _check_scores(better_scores: Tensor, worse_scores: Tensor) -> None:
    if better_scores.shape != worse_scores.shape:
        raise ValueError(
            f"better_scores has shape {list(better_scores.shape)} but worse_scores has shape "
            f"{list(worse_scores.shape)}; expected the same shape (one score per image of a pair)"
        )
    if better_scores.numel() == 0:
        raise ValueError("better_scores is empty; expected the scores of at least one pair")


def pairwise_loss(better_scores: Tensor, worse_scores: Tensor) -> Tensor:
    """Bradley-Terry loss of a batch of comparisons, eq. (4) of the reward-model report.

    ``loss = -mean(log(sigmoid(r(x_better, z) - r(x_worse, z))))``, computed with
    ``logsigmoid`` so that large score gaps do not overflow.

    Args:
        better_scores: Reward of the preferred image of each pair, shape ``[P]`` (any shape works
            as long as both arguments agree).
        worse_scores: Reward of the other image of each pair, same shape.

    Returns:
        The mean loss, a scalar tensor.

    Example:
        >>> import torch
        >>> pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
        tensor(0.4100)
    """
    _check_scores(better_scores, worse_scores)
    return -F.logsigmoid(better_scores - worse_scores).mean()


def preference_accuracy(better_scores: Tensor, worse_scores: Tensor) -> Tensor:
    """Fraction of comparisons the scores order as the annotators did.

    A predicted tie (equal scores) counts as wrong, as in ImageReward's evaluation: the model
    must strictly prefer the image the annotators preferred.

    Args:
        better_scores: Reward of the preferred image of each pair, shape ``[P]``.
        worse_scores: Reward of the other image of each pair, same shape.

    Returns:
        Accuracy in ``[0, 1]``, a scalar float tensor.

    Example:
        >>> import torch
        >>> preference_accuracy(torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 0.5, 3.0]))
        tensor(0.3333)
    """
    _check_scores(better_scores, worse_scores)
    return (better_scores > worse_scores).float().mean()
