"""Improved precision and recall (Kynkaanniemi et al., 2019) over a frozen feature extractor."""

from typing import Any

from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from lightning_sdrl.functional.metrics import precision_recall
from lightning_sdrl.metrics.fid import _ImageFeatureMetric

__all__ = ["PrecisionRecall"]


class PrecisionRecall(_ImageFeatureMetric):
    """Share of generated images on the real manifold (precision) and vice versa (recall).

    Features of every image are kept (list states gathered with ``cat`` across processes);
    ``compute`` calls :func:`~lightning_sdrl.functional.metrics.precision_recall`, which gives
    torch-fidelity's ``prc`` numbers on the same features.

    Args:
        feature_extractor: Module mapping images ``[B, 3, H, W]`` to features ``[B, D]``
            (VGG-16 fc2 in the paper of Kynkaanniemi et al.). Frozen and kept in eval mode.
        k: Neighbourhood size of the manifold balls.
        batch_size: Rows of each block of pairwise distances computed at once.
        reset_real_features: If ``False``, ``reset()`` keeps the real features, so a fixed
            reference set is embedded only once.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> metric = PrecisionRecall(torch.nn.Flatten(), k=3)
        >>> metric.update(torch.rand(32, 3, 1, 1), real=True)
        >>> metric.update(torch.rand(32, 3, 1, 1) * 0.5, real=False)
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'precision': 0.9688, 'recall': 0.1562}
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    real_features: list[Tensor]
    fake_features: list[Tensor]

    def __init__(
        self,
        feature_extractor: nn.Module,
        k: int = 3,
        batch_size: int = 1024,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_extractor, **kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k}; expected a positive neighbourhood size, e.g. 3")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive number of rows")
        self.k = k
        self.batch_size = batch_size
        self.reset_real_features = reset_real_features
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch of real or generated images.

        Args:
            images: ``[B, 3, H, W]`` images in the format ``feature_extractor`` expects.
            real: ``True`` for reference images, ``False`` for generated ones.

        Raises:
            ValueError: If ``images`` is not ``[B, 3, H, W]``.
        """
        features = self._extract(images)
        (self.real_features if real else self.fake_features).append(features)

    def compute(self) -> dict[str, Tensor]:
        """``{"precision": scalar, "recall": scalar}`` over everything added so far.

        Raises:
            RuntimeError: If either side has ``k`` images or fewer.
        """
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        if min(len(real), len(fake)) <= self.k:
            raise RuntimeError(
                f"PrecisionRecall with k={self.k} needs > {self.k} real and generated images; "
                f"got {len(real)} real and {len(fake)} generated"
            )
        return precision_recall(real, fake, self.k, self.batch_size)

    def reset(self) -> None:
        """Reset the states; the real features survive if ``reset_real_features=False``."""
        real_features = list(self.real_features)
        super().reset()
        if not self.reset_real_features:
            self.real_features.extend(real_features)
