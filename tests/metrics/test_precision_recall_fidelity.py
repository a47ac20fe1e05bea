"""Precision / recall against torch-fidelity's ``prc`` (needs torch-fidelity >= 0.4, which added ``metric_prc``)."""

import pytest
import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from lightning_sdrl.functional.metrics import precision_recall
from lightning_sdrl.metrics.precision_recall import PrecisionRecall


def fidelity_prc(real: torch.Tensor, fake: torch.Tensor, k: int, save_cpu_ram: bool = False) -> dict[str, float]:
    # torch-fidelity's convention: features_1 is the generated set, features_2 the real one.
    return prc_features_to_metric(
        fake, real, prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=save_cpu_ram, verbose=False
    )


def gaussian_sets(num_real: int, num_fake: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real ~ N(0, I); fake ~ N(0.5, 0.6^2 I): a partial overlap, so neither score is 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.randn(num_real, dim, generator=generator)
    fake = 0.6 * torch.randn(num_fake, dim, generator=generator) + 0.5
    return real, fake


@pytest.mark.parametrize(
    ("num_real", "num_fake", "dim", "k", "batch_size"),
    [(40, 40, 4, 3, 1024), (64, 100, 16, 1, 7), (100, 30, 8, 5, 16), (200, 150, 32, 10, 64), (30, 90, 2, 3, 1)],
)
def test_precision_recall_equals_torch_fidelity(num_real, num_fake, dim, k, batch_size):
    real, fake = gaussian_sets(num_real, num_fake, dim, seed=num_real + dim + k)
    ours = precision_recall(real, fake, k=k, batch_size=batch_size)
    for save_cpu_ram in (False, True):  # torch-fidelity's two code paths
        theirs = fidelity_prc(real, fake, k, save_cpu_ram)
        for name in ("precision", "recall"):
            assert ours[name].item() == pytest.approx(theirs[name], abs=1e-6), (name, save_cpu_ram)
    # the comparison means something only when the scores are not trivially 0 or 1
    assert 0 < ours["precision"] < 1 or 0 < ours["recall"] < 1


@pytest.mark.parametrize("k", [1, 2, 4])
def test_points_on_a_ball_boundary_count_as_inside_as_in_torch_fidelity(k):
    # Integer grids (with duplicates): exact distances, so many points lie exactly on a k-NN radius.
    generator = torch.Generator().manual_seed(k)
    real = torch.randint(0, 4, (60, 2), generator=generator).float()
    fake = torch.randint(1, 6, (50, 2), generator=generator).float()
    ours = precision_recall(real, fake, k=k, batch_size=8)
    theirs = fidelity_prc(real, fake, k)
    for name in ("precision", "recall"):
        assert ours[name].item() == pytest.approx(theirs[name], abs=1e-6), name
    # the case discriminates: counting boundary points as outside would give another precision
    radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    strict_precision = (torch.cdist(fake, real) < radii).any(dim=1).double().mean()
    assert strict_precision < ours["precision"]


def test_metric_over_image_batches_equals_torch_fidelity_on_their_features():
    generator = torch.Generator().manual_seed(0)
    real_images = torch.rand(48, 3, 2, 2, generator=generator)
    fake_images = torch.rand(40, 3, 2, 2, generator=generator) * 0.6 + 0.2
    metric = PrecisionRecall(torch.nn.Flatten(), k=3, batch_size=10)
    for part in real_images.split(16):
        metric.update(part, real=True)
    for part in fake_images.split(13):
        metric.update(part, real=False)
    ours = metric.compute()
    theirs = fidelity_prc(real_images.flatten(1), fake_images.flatten(1), k=3)
    for name in ("precision", "recall"):
        assert ours[name].item() == pytest.approx(theirs[name], abs=1e-6), name
    assert 0 < ours["precision"] < 1 or 0 < ours["recall"] < 1
