"""Frechet Inception Distance over any frozen feature extractor, on torchmetrics' metric."""

from typing import Any, Self

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_sdrl.frozen import FrozenModule

__all__ = ["FID"]


def _freeze(feature_extractor: nn.Module) -> nn.Module:
    """``feature_extractor`` in eval mode with gradients off; a clear error if it is no module."""
    if not isinstance(feature_extractor, nn.Module):
        raise TypeError(
            f"feature_extractor is a {type(feature_extractor).__name__}; expected an "
            "nn.Module mapping images [B, 3, H, W] to features [B, D]"
        )
    return feature_extractor.eval().requires_grad_(False)


def _extract_features(feature_extractor: nn.Module, images: Tensor) -> Tensor:
    """Features ``[B, D]`` of ``images`` ``[B, 3, H, W]``, without gradients."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images has shape {list(images.shape)}; expected [B, 3, H, W] (RGB batch)")
    with torch.no_grad():
        features = feature_extractor(images)
    return features.reshape(images.shape[0], -1)


class _ImageFeatureMetric(Metric):
    """Base for metrics that embed ``[B, 3, H, W]`` images with a frozen feature extractor.

    The extractor is a submodule (it follows ``.to(device)``) but not a metric state: it is never
    synced, reset or trained. It is put in eval mode with gradients off and kept in eval mode
    when the metric (or the LightningModule holding it) is switched to training.
    """

    def __init__(self, feature_extractor: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature_extractor = _freeze(feature_extractor)

    def train(self, mode: bool = True) -> Self:
        """Set the metric's training flag; the feature extractor always stays in eval mode."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    def _extract(self, images: Tensor) -> Tensor:
        """Features ``[B, D]`` of ``images`` ``[B, 3, H, W]``."""
        return _extract_features(self.feature_extractor, images)


class _FrozenFeatures(FrozenModule):
    """The feature module handed to torchmetrics: checks shapes, never trains, returns float64.

    ``num_features`` is the attribute :class:`FrechetInceptionDistance` reads instead of running
    a dummy ``[1, 3, 299, 299]`` image through the network to find the feature size. Features come
    out in float64, the dtype of torchmetrics' running sums, which it also gives its result.
    """

    def __init__(self, feature_extractor: nn.Module, num_features: int) -> None:
        super().__init__()
        self.feature_extractor = _freeze(feature_extractor)
        self.num_features = num_features

    def forward(self, images: Tensor) -> Tensor:
        """Float64 features ``[B, num_features]`` of ``images`` ``[B, 3, H, W]``."""
        features = _extract_features(self.feature_extractor, images)
        if features.shape[1] != self.num_features:
            raise ValueError(
                f"feature_extractor returned {features.shape[1]} features per image; expected "
                f"num_features={self.num_features}"
            )
        return features.double()


class FID(FrechetInceptionDistance):
    """Frechet distance between the feature Gaussians of real and generated images.

    torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` with the package's
    feature extractor: images go to ``feature_extractor`` unchanged (torchmetrics' ``normalize``
    only rescales images for its own Inception network). Each update adds float64 running sums
    ``sum x``, ``sum x x^T`` and the count of one side (states ``{real,fake}_features_sum``,
    ``_cov_sum``, ``_num_samples``), all summed across processes, so a DDP result equals the
    single-process one. ``compute`` turns them into means and unbiased covariances and returns
    ``||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2))`` in float64, which matches
    clean-fid's ``fid_from_feats`` on the same features to float64 round-off.

    Args:
        feature_extractor: Module mapping images ``[B, 3, H, W]`` to ``[B, num_features]``
            (e.g. InceptionV3 pool features, 2048). Frozen and kept in eval mode; the metric holds
            it as ``inception.feature_extractor`` (torchmetrics' name for the feature network).
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

    inception: _FrozenFeatures
    # torchmetrics casts the result to the dtype of the last features (set in ``update``); ours are
    # always float64, so a metric whose states arrived without an update (merge_state) computes too
    orig_dtype: torch.dtype = torch.float64

    def __init__(
        self,
        feature_extractor: nn.Module,
        num_features: int,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"num_features={num_features}; expected the positive feature size D of "
                "feature_extractor's output [B, D]"
            )
        features = _FrozenFeatures(feature_extractor, num_features)
        super().__init__(feature=features, reset_real_features=reset_real_features, **kwargs)
        self.num_features = num_features

    @property
    def feature_extractor(self) -> nn.Module:
        """The frozen module mapping images ``[B, 3, H, W]`` to features ``[B, num_features]``."""
        return self.inception.feature_extractor

    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch of real or generated images.

        Args:
            images: ``[B, 3, H, W]`` images in the format ``feature_extractor`` expects.
            real: ``True`` for reference images, ``False`` for generated ones.

        Raises:
            ValueError: If ``images`` is not ``[B, 3, H, W]`` or the features are not
                ``[B, num_features]``.
        """
        super().update(images, real)

    def compute(self) -> Tensor:
        """FID between everything added so far (float64 scalar).

        Raises:
            RuntimeError: If either side has fewer than 2 images.
        """
        real_count, fake_count = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if real_count < 2 or fake_count < 2:
            raise RuntimeError(
                f"FID needs >= 2 real and >= 2 generated images; got {real_count} real and {fake_count} generated"
            )
        return super().compute()
