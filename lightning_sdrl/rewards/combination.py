"""Several rewards at once: :class:`MultiReward`, a weighted sum of named reward components.

In YAML each component is a reward of its own, selected by ``class_path``::

    reward:
      class_path: lightning_sdrl.rewards.combination.MultiReward
      init_args:
        rewards:
          pickscore: {class_path: lightning_sdrl.rewards.pickscore.PickScoreReward, init_args: {...}}
          hps: {class_path: lightning_sdrl.rewards.hps.HPSv2Reward, init_args: {...}}
        weights: {pickscore: 1.0, hps: 1.0}
        normalize: group

The online RL loop scores each component (:meth:`MultiReward.score_components`), gathers them
from all processes, combines them over the whole epoch (:meth:`MultiReward.combine`: the groups of
``normalize="group"`` are the epoch's prompt groups, even when a group spans batches or
processes) and logs each component's mean as ``train/reward/<name>``. Called directly
(``reward(images, prompts)``, as ReFL and the evaluation callbacks do) the groups are the images
of the same prompt in the batch given.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sdrl.functional.reward_combination import combine_rewards
from lightning_sdrl.rewards.base import RewardModule, check_reward_output

__all__ = ["MultiReward"]


class MultiReward(RewardModule):
    """A weighted sum of several rewards, each optionally group-normalised first (GDPO).

    ``r = sum_k w_k r_k``, or with ``normalize="group"`` ``r = sum_k w_k (r_k - mean_g r_k) /
    (std_g r_k + eps)`` over the samples ``g`` of the same prompt (see
    :mod:`lightning_sdrl.functional.reward_combination`).

    The combination is batch-level when any component is (under DDP every component then sees the
    images of all processes), and runs in the background when any component does (a reward
    server, a VLM judge).

    Args:
        rewards: The components by name (names become the log keys ``train/reward/<name>``).
        weights: Weight of each component by name; ``None`` weighs each 1. Every component needs a
            weight and every weight a component.
        normalize: ``"none"`` sums the raw rewards; ``"group"`` standardises each within its
            prompt's group first.
        eps: Added to each group's standard deviation with ``normalize="group"``.

    Raises:
        ValueError: If there is no component, the weights name other components, or a weight is
            not finite.

    Example:
        >>> from lightning_sdrl.rewards.simple import Brightness
        >>> reward = MultiReward({"bright": Brightness(), "dark": Brightness()}, {"bright": 2.0, "dark": -1.0})
        >>> reward(torch.full((2, 3, 4, 4), 0.5), ["a", "b"])
        tensor([0.5000, 0.5000])
    """

    def __init__(
        self,
        rewards: dict[str, RewardModule],
        weights: dict[str, float] | None = None,
        normalize: Literal["none", "group"] = "none",
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("MultiReward got rewards={}; expected at least one named reward component")
        weights = {name: 1.0 for name in rewards} if weights is None else dict(weights)
        if set(weights) != set(rewards):
            raise ValueError(
                f"MultiReward got weights for {sorted(weights)} and rewards {sorted(rewards)}; give exactly one "
                "weight per reward component (or weights=None for all 1)"
            )
        if not all(torch.isfinite(torch.tensor(float(w))) for w in weights.values()):
            raise ValueError(f"MultiReward got weights={weights}; expected finite numbers")
        if normalize not in ("none", "group"):
            raise ValueError(f"normalize={normalize!r}; expected 'none' or 'group'")
        if eps < 0:
            raise ValueError(f"eps={eps}; expected >= 0")
        self.names: tuple[str, ...] = tuple(rewards)
        self.components = nn.ModuleDict(rewards)
        self.register_buffer("weights", torch.tensor([float(weights[n]) for n in self.names]), persistent=False)
        self.normalize, self.eps = normalize, eps
        self.batch_level = any(getattr(r, "batch_level", False) for r in rewards.values())
        self.background = any(getattr(r, "background", False) for r in rewards.values())

    def score_components(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Each component's rewards, ``[B, K]`` in the order of :attr:`names`."""
        columns = []
        for name in self.names:
            rewards = self.components[name](images, prompts, **metadata)
            columns.append(check_reward_output(rewards, len(prompts), f"MultiReward component {name!r}"))
        return torch.stack([c.to(images.device, torch.float32) for c in columns], dim=1)

    def combine(self, components: Tensor, group_keys: Sequence[Hashable]) -> Tensor:
        """The combined rewards ``[N]`` of components ``[N, K]`` whose samples have the prompts ``group_keys``."""
        keys = list(group_keys) if self.normalize == "group" else None
        return combine_rewards(components, self.weights.to(components.device), keys, self.eps)

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """The combined reward ``[B]`` (groups: the images of the same prompt in this batch)."""
        return self.combine(self.score_components(images, prompts, **metadata), prompts)
