"""Post-sampling selection: pick the subset of generated images with the largest set reward.

Table 1 of the diversity reward paper validates the rewards without training: ``O = 10`` images
are sampled per condition, the subset of ``M`` images with the maximum (or minimum) reward
against the reference set is kept, and the kept images' FID / precision / recall are compared
with a random subset's. A good diversity reward ranks max above random above min.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lightning_sdrl.functional.diversity import marginal_utility, mmd_reward, mmd_subset_rewards, unwrap_set_reward

__all__ = ["select_subset"]

RewardFn = Callable[[Tensor, Tensor], Tensor]


def _exhaustive(features: Tensor, ref_feats: Tensor, size: int, reward_fn: RewardFn, sign: float) -> Tensor:
    subsets = torch.tensor(list(itertools.combinations(range(features.shape[0]), size)))
    func, kwargs = unwrap_set_reward(reward_fn)
    if func is mmd_reward and size >= 2:  # one set of kernel matrices for all C(O, M) subsets
        rewards = mmd_subset_rewards(features, ref_feats, subsets, **kwargs).cpu()
    else:
        rewards = torch.stack([reward_fn(features[subset], ref_feats) for subset in subsets])
    return subsets[torch.argmax(sign * rewards.double())]


def _greedy(features: Tensor, ref_feats: Tensor, size: int, reward_fn: RewardFn, sign: float) -> Tensor:
    kept = torch.arange(features.shape[0])
    while len(kept) > size:
        # r(S \ {m}) = r(S) - u_m: dropping the smallest utility leaves the best smaller set
        utility = marginal_utility(reward_fn, features[kept], ref_feats)
        drop = torch.argmin(sign * utility.double())
        kept = torch.cat([kept[:drop], kept[drop + 1 :]])
    return kept


def select_subset(
    features: Tensor,
    ref_feats: Tensor,
    size: int,
    reward_fn: RewardFn,
    mode: Literal["max", "min", "random"] = "max",
    generator: torch.Generator | None = None,
    max_exhaustive: int = 10_000,
) -> Tensor:
    """Indices of the ``size`` generated images whose set reward is maximal (or minimal).

    Algorithm, for ``mode="max"`` (``"min"`` is the same with the reward negated):

    1. if there are at most ``max_exhaustive`` subsets (``C(O, M)``; 252 for the paper's
       ``O = 10, M = 5``), every subset is scored with ``reward_fn`` and the best one is
       returned: the exact optimum of Table 1's protocol;
    2. otherwise greedy backward elimination: starting from all ``O`` images, repeatedly drop
       the image with the smallest marginal utility ``r(S) - r(S without x_m)`` (eq. 18,
       :func:`~lightning_sdrl.functional.diversity.marginal_utility`, closed form for
       ``mmd_reward`` and ``gp_mi_reward``), i.e. move to the best subset one image smaller,
       until ``M`` remain. Not guaranteed optimal.

    ``mode="random"`` draws ``M`` images uniformly without replacement (the baseline).

    Args:
        features: ``[O, D]`` features of the generated images.
        ref_feats: ``[N, D]`` features of the reference images.
        size: Subset size ``M`` (``2 <= M <= O`` for ``mmd_reward``).
        reward_fn: Set reward ``(gen_feats, ref_feats) -> scalar``, e.g. ``mmd_reward`` or a
            ``functools.partial`` of it.
        mode: ``"max"``, ``"min"`` or ``"random"``.
        generator: Random generator for ``mode="random"``.
        max_exhaustive: Largest number of subsets scored one by one; ``0`` always uses the
            greedy elimination.

    Returns:
        ``[M]`` sorted int64 indices into ``features``.

    Raises:
        ValueError: If ``features`` is not ``[O, D]``, ``size`` is not in ``[1, O]`` or ``mode``
            is unknown.

    Example:
        >>> from lightning_sdrl.functional.diversity import mmd_reward
        >>> ref = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
        >>> gen = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
        >>> select_subset(gen, ref, 3, mmd_reward, mode="max")  # one of each reference image
        tensor([0, 3, 4])
        >>> select_subset(gen, ref, 3, mmd_reward, mode="min")  # the three duplicates
        tensor([0, 1, 2])
    """
    if features.ndim != 2:
        raise ValueError(f"features have shape {list(features.shape)}; expected [O, D]")
    num_images = features.shape[0]
    if not 1 <= size <= num_images:
        raise ValueError(f"size={size}; expected a subset size in [1, {num_images}] (O)")
    if mode == "random":
        chosen = torch.randperm(num_images, generator=generator)[:size]
    elif mode in ("max", "min"):
        sign = 1.0 if mode == "max" else -1.0
        if size == num_images:
            chosen = torch.arange(num_images)
        elif math.comb(num_images, size) <= max_exhaustive:
            chosen = _exhaustive(features, ref_feats, size, reward_fn, sign)
        else:
            chosen = _greedy(features, ref_feats, size, reward_fn, sign)
    else:
        raise ValueError(f'mode={mode!r}; expected "max", "min" or "random"')
    return chosen.sort().values.to(features.device)
