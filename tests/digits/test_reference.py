import pytest
import torch

from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.digits.reference import DigitsReference


def test_digits_reference_takes_per_class_images_of_the_split():
    images, labels = digits_split("test")
    full = DigitsReference(classes=[0, 6, 8, 9])
    keep = torch.isin(labels, torch.tensor([0, 6, 8, 9]))
    torch.testing.assert_close(full.images, images[keep].expand(-1, 3, -1, -1))
    torch.testing.assert_close(full.labels, labels[keep])

    small = DigitsReference(split="train", classes=[0, 6], per_class=7, image_size=32)
    assert small.images.shape == (14, 3, 32, 32)
    assert torch.bincount(small.labels).tolist() == [7, 0, 0, 0, 0, 0, 7]
    same = DigitsReference(split="train", classes=[0, 6], per_class=7, image_size=32)
    torch.testing.assert_close(same.images, small.images)
    seed_0 = DigitsReference(split="train", classes=[0, 6], per_class=7)
    seed_1 = DigitsReference(split="train", classes=[0, 6], per_class=7, seed=1)
    assert not torch.equal(seed_0.images, seed_1.images)
    with pytest.raises(ValueError, match="classes=\\[12\\]"):
        DigitsReference(classes=[12])
