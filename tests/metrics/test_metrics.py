import numpy as np
import pytest
import torch
from cleanfid.fid import fid_from_feats
from scipy.stats import entropy
from torch import nn
from torchmetrics.utilities.data import dim_zero_sum

from lightning_sdrl.functional.metrics import attribute_kl as attribute_kl_fn
from lightning_sdrl.functional.metrics import precision_recall
from lightning_sdrl.metrics.attribute_kl import AttributeKL
from lightning_sdrl.metrics.fid import FID
from lightning_sdrl.metrics.precision_recall import PrecisionRecall

NUM_FEATURES = 6


def tiny_extractor(dropout: float = 0.0) -> nn.Module:
    """A seeded conv net: [B, 3, 8, 8] images -> [B, 6] features."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, NUM_FEATURES, kernel_size=3),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def images(count: int, seed: int, brightness: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 8, 8, generator=generator) * brightness


def features_of(extractor: nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return extractor.eval()(batch).double().numpy()


def test_fid_matches_clean_fid_on_the_extracted_features():
    extractor = tiny_extractor()
    real, fake = images(40, seed=0), images(30, seed=1, brightness=0.7)
    metric = FID(tiny_extractor(), num_features=NUM_FEATURES)
    for chunk in real.split(16):
        metric.update(chunk, real=True)
    for chunk in fake.split(7):
        metric.update(chunk, real=False)
    expected = fid_from_feats(features_of(extractor, real), features_of(extractor, fake))
    value = metric.compute()
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_fid_states_are_float64_sums_and_the_extractor_is_not_a_state():
    metric = FID(tiny_extractor(), num_features=NUM_FEATURES)
    # torchmetrics' FrechetInceptionDistance states: sum x, sum x x^T and the count of each side
    assert set(metric._defaults) == {
        f"{side}_features_{name}" for side in ("real", "fake") for name in ("sum", "cov_sum", "num_samples")
    }
    assert all(metric._reductions[name] is dim_zero_sum for name in metric._defaults)
    assert metric.real_features_cov_sum.dtype == torch.float64
    assert (FID.higher_is_better, FID.is_differentiable, FID.full_state_update) == (
        False,
        False,
        False,
    )


@pytest.mark.parametrize("metric_cls", [FID, PrecisionRecall])
def test_feature_extractor_is_frozen_and_stays_in_eval_mode(metric_cls):
    kwargs = {"num_features": NUM_FEATURES} if metric_cls is FID else {}
    metric = metric_cls(tiny_extractor(dropout=0.5), **kwargs)
    metric.train()
    assert not metric.feature_extractor.training
    assert not any(p.requires_grad for p in metric.feature_extractor.parameters())
    batch = images(8, seed=2)
    # the path update() takes: torchmetrics' feature module for FID, _extract for PrecisionRecall
    extract = metric.inception if metric_cls is FID else metric._extract
    # dropout is off: the same images give the same features
    torch.testing.assert_close(extract(batch), extract(batch))
    assert not extract(batch).requires_grad


@pytest.mark.parametrize("metric_cls", [FID, PrecisionRecall])
@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (3, 8, 8), (4, 3, 8)])
def test_wrong_image_shape_names_the_expected_one(metric_cls, shape):
    kwargs = {"num_features": NUM_FEATURES} if metric_cls is FID else {}
    metric = metric_cls(tiny_extractor(), **kwargs)
    with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
        metric.update(torch.rand(shape), real=True)


def test_fid_validates_arguments_and_feature_size():
    with pytest.raises(ValueError, match="num_features=0"):
        FID(tiny_extractor(), num_features=0)
    with pytest.raises(TypeError, match="feature_extractor"):
        FID(lambda x: x, num_features=3)
    metric = FID(tiny_extractor(), num_features=5)
    with pytest.raises(ValueError, match="returned 6 features per image; expected num_features=5"):
        metric.update(images(2, seed=0), real=True)
    metric = FID(tiny_extractor(), num_features=NUM_FEATURES)
    metric.update(images(1, seed=0), real=True)
    with pytest.raises(RuntimeError, match="got 1 real and 0 generated"):
        metric.compute()


def test_fid_reset_can_keep_the_real_statistics():
    real, fake = images(20, seed=3), images(20, seed=4, brightness=0.5)
    metric = FID(tiny_extractor(), num_features=NUM_FEATURES, reset_real_features=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    first = metric.compute()
    metric.reset()
    assert metric.real_features_num_samples == 20 and metric.fake_features_num_samples == 0
    metric.update(fake, real=False)
    torch.testing.assert_close(metric.compute(), first)
    full_reset = FID(tiny_extractor(), num_features=NUM_FEATURES)
    full_reset.update(real, real=True)
    full_reset.reset()
    assert full_reset.real_features_num_samples == 0


def test_precision_recall_matches_functional_on_the_extracted_features():
    extractor = tiny_extractor()
    real, fake = images(40, seed=5), images(36, seed=6, brightness=0.8)
    metric = PrecisionRecall(tiny_extractor(), k=3, batch_size=9)
    for chunk in real.split(15):
        metric.update(chunk, real=True)
    metric.update(fake, real=False)
    expected = precision_recall(
        torch.from_numpy(features_of(extractor, real)),
        torch.from_numpy(features_of(extractor, fake)),
        k=3,
    )
    out = metric.compute()
    assert set(out) == {"precision", "recall"}
    for name in out:
        assert out[name].item() == pytest.approx(expected[name].item(), abs=1e-12)
    assert PrecisionRecall.higher_is_better and not PrecisionRecall.full_state_update


def test_precision_recall_validates_and_keeps_real_features_on_request():
    with pytest.raises(ValueError, match="k=0"):
        PrecisionRecall(tiny_extractor(), k=0)
    metric = PrecisionRecall(tiny_extractor(), k=3, reset_real_features=False)
    metric.update(images(10, seed=7), real=True)
    metric.update(images(3, seed=8), real=False)
    with pytest.raises(RuntimeError, match="got 10 real and 3 generated"):
        metric.compute()
    metric.reset()
    assert sum(len(f) for f in metric.real_features) == 10 and metric.fake_features == []


def test_attribute_kl_matches_scipy_entropy_of_argmax_counts():
    generator = torch.Generator().manual_seed(9)
    probs = torch.softmax(torch.randn(50, 3, generator=generator) + torch.tensor([1.0, 0.0, 0.0]), dim=1)
    counts = np.bincount(probs.argmax(1).numpy(), minlength=3)
    for target in (None, [0.5, 0.25, 0.25]):
        metric = AttributeKL(num_classes=3, target=target)
        for chunk in probs.split(16):
            metric.update(chunk)
        expected = entropy(counts, np.ones(3) if target is None else target)
        assert metric.compute().item() == pytest.approx(expected, rel=1e-12)
    assert AttributeKL.higher_is_better is False


def test_attribute_kl_validates_arguments():
    with pytest.raises(ValueError, match="num_classes=1"):
        AttributeKL(num_classes=1)
    with pytest.raises(ValueError, match="expected 2 non-negative values"):
        AttributeKL(num_classes=2, target=[0.2, 0.3, 0.5])
    metric = AttributeKL(num_classes=2)
    with pytest.raises(ValueError, match=r"expected \[B, 2\]"):
        metric.update(torch.rand(4, 3))
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()


def test_functional_attribute_kl_of_per_prompt_rows_matches_scipy_row_by_row():
    counts = torch.tensor([[30, 10, 0], [5, 5, 5], [1, 7, 2]])
    target = torch.tensor([0.5, 0.3, 0.2])
    got = attribute_kl_fn(counts, target)
    expected = [entropy(row, target.numpy()) for row in counts.numpy()]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert attribute_kl_fn(counts[1]).item() == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="not all zero"):
        attribute_kl_fn(torch.tensor([[1, 1], [0, 0]]))


def test_attribute_kl_per_prompt_matches_scipy_for_each_prompt():
    generator = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(60, 2, generator=generator), dim=1)
    prompts = ["a", "b", "c"]
    keys = [prompts[i] for i in torch.randint(0, 2, (60,), generator=generator).tolist()]  # "c" never seen
    metric = AttributeKL(num_classes=2, target=[0.4, 0.6], prompts=prompts)
    for start in range(0, 60, 16):
        metric.update(probs[start : start + 16], keys[start : start + 16])
    classes = probs.argmax(1).numpy()
    expected = [entropy(np.bincount(classes[[k == p for k in keys]], minlength=2), [0.4, 0.6]) for p in ("a", "b")]
    kl = metric.compute()
    np.testing.assert_allclose(kl[:2].numpy(), expected, rtol=1e-12)
    assert kl[2].isnan()
    assert metric.compute_mean().item() == pytest.approx(np.mean(expected), rel=1e-12)
    assert metric.compute_worst().item() == pytest.approx(max(expected), rel=1e-12)
    with pytest.raises(ValueError, match="needs the prompt of each"):
        metric.update(probs[:2], ["a", "z"])
    with pytest.raises(ValueError, match="distinct prompts"):
        AttributeKL(num_classes=2, prompts=["a", "a"])
