"""Frechet Inception Distance over any frozen feature extractor."""

from typing import Any, Self

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_sdrl.functional.metrics import _mean_cov_from_sums, frechet_distance

__all__ = ["FID"]


class _ImageFeatureMetric(Metric):
    """Base for metrics that embed ``[B, 3, H, W]`` images with a frozen feature extractor.

    The extractor is a submodule (it follows ``.to(device)``) but not a metric state: it is never
    synced, reset or trained. It is put in eval mode with gradients off and kept in eval mode
    when the metric (or the LightningModule holding it) is switched to training.
    """

    def __init__(self, feature_extractor: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(feature_extractor, nn.Module):
            raise TypeError(
                f"feature_extractor is a {type(feature_extractor).__name__}; expected an "
                "nn.Module mapping images [B, 3, H, W] to features [B, D]"
            )
        self.feature_extractor = feature_extractor.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Self:
        """Set the metric's training flag; the feature extractor always stays in eval mode."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    def _extract(self, images: Tensor) -> Tensor:
        """Features ``[B, D]`` of ``images`` ``[B, 3, H, W]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images has shape {list(images.shape)}; expected [B, 3, H, W] (RGB batch)")
        with torch.no_grad():
            features = self.feature_extractor(images)
        return features.reshape(images.shape[0], -1)


class FID(_ImageFeatureMetric):
    """Frechet distance between the feature Gaussians of real and generated images.

    Each update adds float64 running sums ``sum x``, ``sum x x^T`` and the count of one side,
    all summed across processes, so a DDP result equals the single-process one. ``compute``
    turns them into means and unbiased covariances and calls
    :func:`~lightning_sdrl.functional.metrics.frechet_distance` (the numbers of clean-fid's
    ``fid_from_feats`` on the same features).

    Args:
        feature_extractor: Module mapping images ``[B, 3, H, W]`` to ``[B, num_features]``
            (e.g. InceptionV3 pool features, 2048). Frozen and kept in eval mode.
        num_features: Size ``D`` of the extracted features.
        reset_real_features: If ``False``, ``reset()`` keeps the real statistics, so a fixed
            reference set is embedded only once.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> fid = FID(torch.nn.Flatten(), num_features=3)  # mean colour of 1x1 images
        >>> fid.update(torch.rand(16, 3, 1, 1), real=True)
        >>> fid.update(torch.rand(16, 3, 1, 1) * 0.5, real=False)
        >>> round(fid.compute().item(), 4)
        0.1989
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    real_sum: Tensor
    real_outer_sum: Tensor
    real_count: Tensor
    fake_sum: Tensor
    fake_outer_sum: Tensor
    fake_count: Tensor

    def __init__(
        self,
        feature_extractor: nn.Module,
        num_features: int,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_extractor, **kwargs)
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"num_features={num_features}; expected the positive feature size D of "
                "feature_extractor's output [B, D]"
            )
        self.num_features = num_features
        self.reset_real_features = reset_real_features
        for side in ("real", "fake"):
            zeros = torch.zeros(num_features, dtype=torch.float64)
            self.add_state(f"{side}_sum", zeros, dist_reduce_fx="sum")
            self.add_state(f"{side}_outer_sum", torch.outer(zeros, zeros), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch of real or generated images.

        Args:
            images: ``[B, 3, H, W]`` images in the format ``feature_extractor`` expects.
            real: ``True`` for reference images, ``False`` for generated ones.

        Raises:
            ValueError: If ``images`` is not ``[B, 3, H, W]`` or the features are not
                ``[B, num_features]``.
        """
        features = self._extract(images).double()
        if features.shape[1] != self.num_features:
            raise ValueError(
                f"feature_extractor returned {features.shape[1]} features per image; expected "
                f"num_features={self.num_features}"
            )
        if real:
            self.real_sum += features.sum(dim=0)
            self.real_outer_sum += features.T @ features
            self.real_count += features.shape[0]
        else:
            self.fake_sum += features.sum(dim=0)
            self.fake_outer_sum += features.T @ features
            self.fake_count += features.shape[0]

    def compute(self) -> Tensor:
        """FID between everything added so far (float64 scalar).

        Raises:
            RuntimeError: If either side has fewer than 2 images.
        """
        if self.real_count < 2 or self.fake_count < 2:
            raise RuntimeError(
                f"FID needs >= 2 real and >= 2 generated images; got {int(self.real_count)} real "
                f"and {int(self.fake_count)} generated"
            )
        real = _mean_cov_from_sums(self.real_sum, self.real_outer_sum, self.real_count)
        fake = _mean_cov_from_sums(self.fake_sum, self.fake_outer_sum, self.fake_count)
        return frechet_distance(*real, *fake)

    def reset(self) -> None:
        """Reset the states; the real statistics survive if ``reset_real_features=False``."""
        if self.reset_real_features:
            super().reset()
            return
        real_states = (self.real_sum, self.real_outer_sum, self.real_count)
        super().reset()
        self.real_sum, self.real_outer_sum, self.real_count = real_states
