"""Conditioning: the named tensors a denoiser is conditioned on, one row per sample.

Stable Diffusion 1.5 needs one tensor (the text embeddings), SD3 two (prompt and pooled embeddings),
SDXL adds ``time_ids``, a class-conditional model has class labels. A :class:`Conditioning` holds any
such set under the denoiser's own argument names, and knows how to select rows, concatenate
batches, move devices and stack the null condition for classifier-free guidance, so the policy code
needs no special case per model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor


class Conditioning(Mapping[str, Tensor]):
    """Named conditioning tensors whose first dimension is the batch.

    It is a read-only mapping (``cond["encoder_hidden_states"]``, ``**cond`` into a denoiser call).

    Args:
        **tensors: the tensors, each ``[B, ...]`` with the same ``B``.

    Example:
        >>> import torch
        >>> cond = Conditioning(encoder_hidden_states=torch.ones(2, 3, 4), pooled=torch.zeros(2, 4))
        >>> cond.select(torch.tensor([1])).batch_size, Conditioning.cat([cond, cond]).batch_size
        (1, 4)
        >>> null = Conditioning(encoder_hidden_states=torch.zeros(2, 3, 4), pooled=torch.zeros(2, 4))
        >>> cond.with_null(null).batch_size
        4
    """

    def __init__(self, **tensors: Tensor) -> None:
        if not tensors:
            raise ValueError("Conditioning needs at least one tensor, e.g. Conditioning(encoder_hidden_states=...)")
        sizes = {name: value.shape[0] if value.ndim else None for name, value in tensors.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"Conditioning tensors must share their first (batch) dimension; got sizes {sizes}")
        self._tensors = dict(tensors)

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        """The number of names (a mapping's length); the rows are :attr:`batch_size`."""
        return len(self._tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={list(value.shape)}" for name, value in self._tensors.items())
        return f"Conditioning({shapes})"

    @property
    def batch_size(self) -> int:
        """``B``, the rows of every tensor."""
        return next(iter(self._tensors.values())).shape[0]

    @property
    def names(self) -> list[str]:
        """The tensors' names."""
        return list(self._tensors)

    # ------------------------------------------------------------------ batch operations
    def select(self, index: Tensor) -> Conditioning:
        """The rows ``index`` (a ``[N]`` long tensor) of every tensor, in that order."""
        return Conditioning(**{name: value[index.to(value.device)] for name, value in self._tensors.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch; every part must have the same names."""
        if not parts:
            raise ValueError("Conditioning.cat got an empty list")
        names = parts[0].names
        if any(part.names != names for part in parts):
            raise ValueError(f"Conditioning.cat: parts have different names {[part.names for part in parts]}")
        return Conditioning(**{name: torch.cat([part[name] for part in parts]) for name in names})

    def to(self, *args: object, **kwargs: object) -> Conditioning:
        """Every tensor moved/cast like ``Tensor.to`` (integer tensors keep their dtype under a float cast)."""
        moved = {}
        for name, value in self._tensors.items():
            if value.is_floating_point():
                moved[name] = value.to(*args, **kwargs)
            else:
                devices = [a for a in args if isinstance(a, (str, torch.device))]
                moved[name] = value.to(device=kwargs.get("device", devices[0] if devices else value.device))
        return Conditioning(**moved)

    def expand(self, batch_size: int) -> Conditioning:
        """A one-row conditioning repeated to ``batch_size`` rows (a view, as ``Tensor.expand``)."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a one-row Conditioning; this one has {self.batch_size} rows")
        return Conditioning(
            **{name: value.expand(batch_size, *value.shape[1:]) for name, value in self._tensors.items()}
        )

    def with_null(self, null: Conditioning) -> Conditioning:
        """``[null; self]``: the batch of a classifier-free-guided call (unconditional rows first)."""
        return Conditioning.cat([null.like(self), self])

    def like(self, other: Conditioning) -> Conditioning:
        """This conditioning with each floating tensor in ``other``'s dtype for the same name."""
        return Conditioning(
            **{
                name: value.to(other[name].dtype) if value.is_floating_point() and name in other else value
                for name, value in self._tensors.items()
            }
        )
