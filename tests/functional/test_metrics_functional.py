import functools

import numpy as np
import pytest
import torch
from cleanfid.fid import fid_from_feats
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance
from scipy.spatial.distance import cdist
from scipy.stats import entropy

from lightning_sdrl.functional.metrics import (
    _mean_cov_from_sums,
    attribute_kl,
    fid_from_features,
    frechet_distance,
    precision_recall,
)


def gaussian_features(rows: int, dim: int, seed: int, scale: float = 1.0, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * scale / np.sqrt(dim)
    return rng.normal(size=(rows, dim)) @ mixing + shift


@pytest.mark.parametrize(("rows", "dim"), [(300, 16), (500, 64), (40, 8)])
def test_fid_from_features_matches_clean_fid(rows, dim):
    real = gaussian_features(rows, dim, seed=0)
    fake = gaussian_features(rows + 17, dim, seed=1, scale=1.5, shift=0.3)
    expected = fid_from_feats(real, fake)
    fid = fid_from_features(torch.from_numpy(real), torch.from_numpy(fake))
    assert fid.dtype == torch.float64
    assert fid.item() == pytest.approx(expected, rel=1e-6)
    # float32 features are promoted to float64 before the statistics
    fid32 = fid_from_features(torch.from_numpy(real).float(), torch.from_numpy(fake).float())
    assert fid32.item() == pytest.approx(fid_from_feats(real.astype(np.float32), fake.astype(np.float32)), rel=1e-5)


def test_fid_of_a_set_with_itself_is_zero():
    real = torch.from_numpy(gaussian_features(200, 16, seed=2))
    assert fid_from_features(real, real).item() == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_clean_fid_on_singular_covariances():
    # fewer samples than dimensions: rank-deficient covariances, where sqrtm is least accurate
    real, fake = gaussian_features(20, 32, seed=3), gaussian_features(25, 32, seed=4, shift=1.0)
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = cleanfid_frechet_distance(mu1, s1, mu2, s2)
    args = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*args).item() == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_by_hand():
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([9.0, 1.0]))
    # ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 = 4 + (1 - 3)^2 + (2 - 1)^2
    assert frechet_distance(mu1, s1, mu2, s2).item() == pytest.approx(9.0, abs=1e-12)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"sigma2 has shape \[3, 3\]; expected \[2, 2\]"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(3))


def test_mean_cov_from_running_sums_matches_numpy():
    feats = torch.from_numpy(gaussian_features(50, 6, seed=5, shift=2.0))
    mean, cov = _mean_cov_from_sums(feats.sum(0), feats.T @ feats, len(feats))
    np.testing.assert_allclose(mean.numpy(), feats.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(feats.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. (2019) with scipy distances and full sorting."""
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    precision = (cdist(fake, real) <= real_radii[None, :]).any(axis=1).mean()
    recall = (cdist(real, fake) <= fake_radii[None, :]).any(axis=1).mean()
    return precision, recall


@pytest.mark.parametrize(("k", "batch_size"), [(3, 1024), (3, 7), (1, 50), (5, 13)])
def test_precision_recall_matches_reference(k, batch_size):
    real = gaussian_features(120, 10, seed=6)
    fake = gaussian_features(90, 10, seed=7, scale=1.4, shift=0.2)
    expected_precision, expected_recall = reference_precision_recall(real, fake, k)
    out = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, batch_size=batch_size)
    assert out["precision"].item() == pytest.approx(expected_precision, abs=1e-12)
    assert out["recall"].item() == pytest.approx(expected_recall, abs=1e-12)
    assert 0.0 < out["precision"] < out["recall"] < 1.0  # the wider fake set covers the real one


def test_precision_recall_counts_points_on_the_ball_boundary():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[4.0], [5.0], [6.0], [7.0]])  # 4.0 lies exactly on the ball of 3.0
    out = precision_recall(real, fake, k=1)
    assert out["precision"].item() == 0.25
    assert out["recall"].item() == 0.25


def test_precision_recall_rejects_small_sets():
    with pytest.raises(ValueError, match=r"real_feats has shape \[3, 2\]; expected \[n, D\] with n >= 4"):
        precision_recall(torch.rand(3, 2), torch.rand(10, 2), k=3)
    with pytest.raises(ValueError, match="k=0"):
        precision_recall(torch.rand(5, 2), torch.rand(5, 2), k=0)


@pytest.mark.parametrize(
    ("counts", "target"),
    [
        ([30, 10], None),
        ([5, 0, 3], None),
        ([0.2, 0.5, 0.3], [0.1, 0.6, 0.3]),
        ([7, 7, 7, 7], None),
        ([4, 1], [3, 1]),  # unnormalised target, as scipy accepts
        ([1, 1], [1, 0]),  # mass where the target has none: inf
    ],
)
def test_attribute_kl_matches_scipy_entropy(counts, target):
    expected = entropy(counts, target if target is not None else np.ones(len(counts)))
    as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
    kl = attribute_kl(as_tensor(counts), None if target is None else as_tensor(target))
    assert kl.dtype == torch.float64
    assert kl.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_attribute_kl_rejects_bad_counts():
    with pytest.raises(ValueError, match="not all zero"):
        attribute_kl(torch.zeros(3))
    with pytest.raises(ValueError, match="target="):
        attribute_kl(torch.ones(3), torch.ones(2))
