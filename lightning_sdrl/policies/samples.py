"""Final samples of a batch: the rollouts of forward-process RL (DiffusionNFT, Advantage Weighted Matching).

These methods train on the pretraining objective at freshly noised copies of the generated samples,
so a rollout keeps only where sampling ended (no per-step latents or log-probs), and any sampler
may draw it (:meth:`~lightning_sdrl.policies.base.DiffusionPolicy.generate`). Rows are selected and
concatenated as those of a :class:`~lightning_sdrl.policies.base.Trajectory`, by the two helpers
below that both containers share.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from lightning_sdrl.policies.conditioning import Conditioning

__all__ = ["Samples", "cat_rows", "select_rows"]


def select_rows(value: Any, index: Tensor) -> Any:
    """Rows ``index`` (a ``[N]`` long tensor) of a batch field, in that order.

    A tensor or :class:`Conditioning` is indexed along its first dimension (``index`` moved to its
    device), a list item by item; ``None`` (an optional field left out) stays ``None``.

    Example:
        >>> select_rows(torch.tensor([10, 11, 12]), torch.tensor([2, 0])), select_rows(["a", "b"], torch.tensor([1]))
        (tensor([12, 10]), ['b'])
    """
    if value is None:
        return None
    if isinstance(value, Conditioning):
        return value.select(index)
    if isinstance(value, Tensor):
        return value[index.to(value.device)]
    return [value[i] for i in index.tolist()]


def cat_rows(parts: list[Any]) -> Any:
    """One batch field of several batches, concatenated along the batch (``None`` if any part is ``None``).

    Example:
        >>> cat_rows([torch.tensor([1]), torch.tensor([2, 3])]), cat_rows([["a"], ["b"]]), cat_rows([None, ["b"]])
        (tensor([1, 2, 3]), ['a', 'b'], None)
    """
    if any(part is None for part in parts):
        return None
    if isinstance(parts[0], Conditioning):
        return Conditioning.cat(parts)
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return sum(parts, [])


@dataclass
class Samples:
    """An epoch's rollouts for forward-process RL: final samples only.

    Attributes:
        samples: ``[B, C, H, W]`` the final ``x_0`` in the denoiser's space (latents; pixels for
            pixel-space models), in the policy's sampling dtype.
        conditions: the policy's :class:`Conditioning` of each sample (``B`` rows).
        prompt_ids: ``[B]`` index of each sample's prompt in the prompt source, on the policy's device.
        prompts: the ``B`` prompts.
        images: ``[B, 3, H, W]`` the decoded samples in ``[0, 1]``.
        seeds: ``[B]`` (CPU, int64) the seed of each sample's own random draws in training, or
            ``None``. Forward-process RL derives them from the batch's sampling seed and the row, and
            draws every sample's training noise and timesteps from its seed, so an update does not
            depend on how the samples were split over processes or shuffled into train batches.

    Example:
        >>> samples = Samples(
        ...     samples=torch.zeros(2, 4, 8, 8),
        ...     conditions=Conditioning(encoder_hidden_states=torch.zeros(2, 3, 5)),
        ...     prompt_ids=torch.tensor([0, 1]),
        ...     prompts=["a cat", "a dog"],
        ...     images=torch.zeros(2, 3, 16, 16),
        ... )
        >>> both = Samples.cat([samples, samples.select(torch.tensor([1]))])
        >>> len(both), both.prompts
        (3, ['a cat', 'a dog', 'a dog'])
    """

    samples: Tensor
    conditions: Conditioning
    prompt_ids: Tensor
    prompts: list[str]
    images: Tensor
    seeds: Tensor | None = None

    def __post_init__(self) -> None:
        rows = {
            "samples": self.samples.shape[0],
            "conditions": self.conditions.batch_size,
            "prompt_ids": self.prompt_ids.shape[0] if self.prompt_ids.ndim == 1 else None,
            "prompts": len(self.prompts),
            "images": self.images.shape[0],
        }
        if self.seeds is not None:
            rows["seeds"] = self.seeds.shape[0] if self.seeds.ndim == 1 else None
        if len(set(rows.values())) != 1:
            raise ValueError(
                f"Samples fields have {rows} rows; expected the same batch size B in each "
                "(prompt_ids and seeds of shape [B])"
            )

    def __len__(self) -> int:
        return self.samples.shape[0]

    def select(self, index: Tensor) -> Samples:
        """The samples at ``index`` (a ``[N]`` long tensor), in that order."""
        return Samples(**{field.name: select_rows(getattr(self, field.name), index) for field in fields(self)})

    @staticmethod
    def cat(parts: list[Samples]) -> Samples:
        """Concatenate samples along the batch dimension."""
        if not parts:
            raise ValueError("Samples.cat got an empty list; expected at least one Samples")
        return Samples(**{field.name: cat_rows([getattr(p, field.name) for p in parts]) for field in fields(Samples)})
