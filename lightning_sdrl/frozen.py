"""Frozen modules: judges (rewards, classifiers, feature extractors) that never switch to training.

Lightning puts the LightningModule and every child in train mode at each epoch. A reward's
classifier or a metric's feature network must not follow (dropout and batch norm would change its
verdicts during fine-tuning), so those classes derive from :class:`FrozenModule`, which stays in
eval mode whatever ``train(mode)`` asks. Their parameters are frozen separately
(``requires_grad_(False)``) where they are built.
"""

from __future__ import annotations

from typing import Self

from torch import nn


class FrozenModule(nn.Module):
    """An ``nn.Module`` that is always in eval mode: ``train(mode)`` ignores ``mode``.

    Example:
        >>> class Judge(FrozenModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.dropout = nn.Dropout(0.5)
        >>> Judge().train().dropout.training
        False
    """

    def train(self, mode: bool = True) -> Self:
        """Stay in eval mode (this module and every child), whatever ``mode``."""
        return super().train(False)
