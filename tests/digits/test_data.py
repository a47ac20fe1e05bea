import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_sdrl.digits.data import (
    DigitsDataset,
    digits_split,
    digits_split_indices,
    load_digits_images,
)


def _upsample_2x_bilinear(image: np.ndarray) -> np.ndarray:
    """Independent 2x bilinear upsampling with half-pixel centres (align_corners=False)."""
    n = image.shape[0]
    source = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n - 1)
    weight = source - low
    rows = image[low] * (1 - weight)[:, None] + image[high] * weight[:, None]
    return rows[:, low] * (1 - weight)[None, :] + rows[:, high] * weight[None, :]


def test_load_digits_images_shapes_range_and_labels():
    images, labels = load_digits_images()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(labels, torch.from_numpy(load_digits().target))


def test_canonical_images_are_bilinear_upsampled_sklearn_pixels_over_16():
    raw = load_digits().images
    images, _ = load_digits_images(16)
    for index in (0, 100, 1796):
        expected = _upsample_2x_bilinear(raw[index] / 16.0)
        np.testing.assert_allclose(images[index, 0].numpy(), expected, atol=1e-6)
    originals, _ = load_digits_images(8)
    np.testing.assert_allclose(originals[:, 0].numpy(), raw / 16.0, atol=1e-7)


def test_split_is_disjoint_complete_stratified_and_deterministic():
    train, test = digits_split_indices("train"), digits_split_indices("test")
    assert len(train) == 1437 and len(test) == 360
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    labels = load_digits_images()[1]
    per_class = torch.bincount(labels, minlength=10)
    test_per_class = torch.bincount(labels[test], minlength=10)
    assert ((test_per_class - 0.2 * per_class).abs() <= 1).all()
    assert torch.equal(test, digits_split_indices("test"))
    assert not torch.equal(test, digits_split_indices("test", seed=1))


def test_digits_split_returns_the_indexed_images():
    images, labels = load_digits_images(8)
    test_images, test_labels = digits_split("test", size=8)
    indices = digits_split_indices("test")
    assert torch.equal(test_images, images[indices]) and torch.equal(test_labels, labels[indices])


def test_dataset_matches_split():
    dataset = DigitsDataset("test")
    images, labels = digits_split("test")
    image, label = dataset[5]
    assert len(dataset) == 360
    assert torch.equal(image, images[5]) and label == int(labels[5])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: digits_split("val"), "split='val'"),
        (lambda: load_digits_images(0), "size=0"),
    ],
)
def test_bad_arguments_name_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()
