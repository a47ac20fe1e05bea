"""Seeds derived from integer keys, so that every random draw of a run has its own reproducible seed.

Samplers, data modules and evaluations seed a ``torch.Generator`` per batch, process and epoch
with :func:`derive_seed` of those keys, so runs are reproducible and resumable. Pure, no torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence hashing).

    Example:
        >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
        True
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)
