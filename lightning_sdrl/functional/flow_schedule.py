"""The resolution-dependent time shift of flow-matching schedules (FLUX.1's ``use_dynamic_shifting``).

A flow model trained on images of several sizes shifts its sampling times towards the noisy end
the more latent tokens an image has: ``mu`` grows linearly with the image's sequence length, from
``base_shift`` at ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len``, and the scheduler
maps each ``sigma`` to ``exp(mu) / (exp(mu) + 1 / sigma - 1)`` (Esser et al. 2024, section 5.3.2;
FLUX.1's values: 0.5 at 256 tokens, 1.15 at 4096). FLUX.1's pipeline samples the unshifted sigmas
``linspace(1, 1 / n, n)`` before that map. Pure, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["flux_sigmas", "resolution_shift"]


def resolution_shift(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """``mu`` for an image of ``image_seq_len`` latent tokens under a scheduler ``config``.

    The line through ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``
    of ``config`` (defaults 256, 0.5, 4096, 1.15: FLUX.1's), at ``image_seq_len``.

    Example:
        >>> resolution_shift(256, {}), round(resolution_shift(4096, {}), 6), round(resolution_shift(1024, {}), 4)
        (0.5, 1.15, 0.63)
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return float(base_shift + slope * (image_seq_len - base_len))


def flux_sigmas(num_steps: int) -> np.ndarray:
    """FLUX.1's unshifted sampling sigmas ``linspace(1, 1 / n, n)`` (the scheduler shifts them by ``mu``).

    Example:
        >>> flux_sigmas(4).tolist()
        [1.0, 0.75, 0.5, 0.25]
    """
    return np.linspace(1.0, 1.0 / num_steps, num_steps)
