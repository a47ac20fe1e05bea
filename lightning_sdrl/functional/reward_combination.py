"""Several rewards at once: a weighted sum, optionally of group-normalised components (GDPO).

With ``K`` reward components ``r_1 .. r_K`` of ``N`` samples and weights ``w_k``:

* plain weighted sum (DiffusionNFT's multi-reward run): ``r = sum_k w_k r_k``;
* group-normalised first (GDPO, Liu et al. 2026, "Group reward-Decoupled Normalization Policy
  Optimization", arXiv 2601.05242): each component is standardised within the group of samples of
  the same prompt, ``r~_k = (r_k - mean_group(r_k)) / (std_group(r_k) + eps)``, then
  ``r = sum_k w_k r~_k``. A component on a large scale (PickScore ~ 22) then no longer drowns one
  on a small scale (HPS ~ 0.3), and distinct combinations of component values keep distinct
  advantages. GDPO normalises the sum once more over the batch: choose
  ``BatchNormalizedAdvantages`` as the module's advantage rule for that.

A sample with a non-finite component gets a NaN combined reward (the training loop drops it); the
group statistics are those of the finite samples.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from lightning_sdrl.functional.advantages import GroupRelativeAdvantages

__all__ = ["combine_rewards"]


def combine_rewards(
    components: Tensor,
    weights: Tensor,
    group_keys: Sequence[Hashable] | None = None,
    eps: float = 1e-4,
) -> Tensor:
    """The combined reward ``[N]`` of ``[N, K]`` component rewards.

    Args:
        components: ``[N, K]`` rewards, column ``k`` from component ``k``.
        weights: ``[K]`` weights.
        group_keys: ``N`` group keys (the prompt of each sample): standardise each component within
            its group before the weighted sum; ``None`` sums the raw components.
        eps: Added to each group's standard deviation (a group of equal values gets 0).

    Returns:
        ``[N]`` combined rewards, NaN where a component is not finite.

    Raises:
        ValueError: If the shapes do not agree.

    Example:
        >>> components = torch.tensor([[20.0, 0.25], [22.0, 0.35], [21.0, 0.30], [21.0, 0.20]])
        >>> combine_rewards(components, torch.tensor([1.0, 10.0]))
        tensor([22.5000, 25.5000, 24.0000, 23.0000])
        >>> combine_rewards(components, torch.tensor([1.0, 1.0]), ["a", "a", "b", "b"], eps=0.0)
        tensor([-2.,  2.,  1., -1.])
    """
    if components.ndim != 2 or weights.shape != (components.shape[1],):
        raise ValueError(
            f"got components of shape {list(components.shape)} and weights of shape {list(weights.shape)}; "
            "expected [N, K] and [K] (one weight per component)"
        )
    if group_keys is not None and len(group_keys) != len(components):
        raise ValueError(f"got {len(group_keys)} group keys for {len(components)} samples; expected one per sample")
    finite = torch.isfinite(components).all(dim=1)
    combined = components.new_full((len(components),), float("nan"))
    if not bool(finite.any()):
        return combined
    kept = components[finite]
    if group_keys is not None:
        keys = [key for key, keep in zip(group_keys, finite.tolist(), strict=True) if keep]
        standardise = GroupRelativeAdvantages(eps=eps)
        kept = torch.stack([standardise(keys, column) for column in kept.unbind(dim=1)], dim=1)
    combined[finite] = kept @ weights.to(kept)
    return combined
