"""FID is torchmetrics' FrechetInceptionDistance with the package's frozen feature extractor."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_sdrl.metrics.fid import FID


def conv_extractor() -> nn.Module:
    """[B, 3, 8, 8] -> [B, 6]: more images than features, full-rank covariances."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, kernel_size=3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def linear_extractor() -> nn.Module:
    """[B, 3, 8, 8] -> [B, 32]: fewer images than features, rank-deficient covariances."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32))


def images(count: int, seed: int, brightness: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 8, 8, generator=generator) * brightness


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two float64 feature sets with scipy's general matrix square root."""
    mu_r, mu_f = real.mean(0), fake.mean(0)
    sigma_r, sigma_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_r @ sigma_f).real
    assert np.isfinite(covmean).all()
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(sigma_r) + np.trace(sigma_f) - 2 * np.trace(covmean))


def filled(metric, real: torch.Tensor, fake: torch.Tensor):
    for chunk in real.split(9):
        metric.update(chunk, real=True)
    for chunk in fake.split(5):
        metric.update(chunk, real=False)
    return metric


@pytest.mark.parametrize(
    ("make_extractor", "num_features", "num_real", "num_fake"),
    [(conv_extractor, 6, 40, 30), (linear_extractor, 32, 20, 16)],
    ids=["full-rank", "rank-deficient"],
)
def test_fid_matches_scipy_sqrtm_and_torchmetrics_used_directly(make_extractor, num_features, num_real, num_fake):
    real, fake = images(num_real, seed=0), images(num_fake, seed=1, brightness=0.7)
    metric = filled(FID(make_extractor(), num_features=num_features), real, fake)
    # torchmetrics with the bare extractor: normalize=True only makes its feature-size probe a float image
    direct = FrechetInceptionDistance(make_extractor().eval(), normalize=True, input_img_size=(3, 8, 8))
    direct = filled(direct, real, fake)
    with torch.no_grad():
        extractor = make_extractor().eval()
        expected = scipy_fid(extractor(real).double().numpy(), extractor(fake).double().numpy())
    value = metric.compute()
    assert isinstance(metric, FrechetInceptionDistance)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert value.item() == pytest.approx(direct.compute().item(), rel=1e-6)
    for name in metric._defaults:
        torch.testing.assert_close(getattr(metric, name), getattr(direct, name), rtol=0, atol=0, msg=name)


# torchmetrics warns that compute comes before any update: here the states come from merge_state
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric FID was called before")
def test_fid_states_merged_from_torchmetrics_compute_the_same_float64_value():
    real, fake = images(24, seed=2), images(20, seed=3, brightness=0.5)
    direct = filled(
        FrechetInceptionDistance(conv_extractor().eval(), normalize=True, input_img_size=(3, 8, 8)), real, fake
    )
    metric = filled(FID(conv_extractor(), num_features=6), real, fake)
    merged = FID(conv_extractor(), num_features=6)  # never updated: its states all come from torchmetrics
    merged.merge_state(direct.metric_state)
    value = merged.compute()
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, metric.compute(), rtol=1e-12, atol=0)


def test_images_reach_the_feature_extractor_unchanged():
    # 1x1 images flattened: the features are the pixel values, so the sums show any rescaling or uint8 cast
    batch = torch.rand(5, 3, 1, 1, generator=torch.Generator().manual_seed(4))
    metric = FID(nn.Flatten(), num_features=3)
    metric.update(batch, real=True)
    pixels = batch.flatten(1).double()
    torch.testing.assert_close(metric.real_features_sum, pixels.sum(0), rtol=0, atol=0)
    torch.testing.assert_close(metric.real_features_cov_sum, pixels.T @ pixels, rtol=1e-15, atol=0)
    assert metric.real_features_num_samples == 5
