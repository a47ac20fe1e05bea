import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_sdrl.reference import ReferenceSet, extractor_cache_key


def _write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for index, (height, width) in enumerate(sizes):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"ref_{index:02d}.png")
        arrays.append(array)
    return arrays


class CountingExtractor(nn.Module):
    """Mean colour and brightness of each image; counts its calls."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        means = images.mean(dim=(2, 3))
        return torch.cat([means, means.mean(dim=1, keepdim=True)], dim=1) * self.scale


def test_folder_loads_sorted_images_in_unit_range(tmp_path):
    arrays = _write_images(tmp_path / "ref", [(6, 5)] * 3)
    (tmp_path / "ref" / "notes.txt").write_text("not an image")
    reference = ReferenceSet(images_dir=str(tmp_path / "ref"))
    assert len(reference) == 3 and reference.images.shape == (3, 3, 6, 5)
    assert [p.rsplit("/", 1)[-1] for p in reference.paths] == ["ref_00.png", "ref_01.png", "ref_02.png"]
    expected = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(reference.images, expected)
    from_paths = ReferenceSet(paths=reference.paths[:2])
    torch.testing.assert_close(from_paths.images, expected[:2])


def test_image_size_resizes_and_crops_mixed_sizes(tmp_path):
    _write_images(tmp_path / "ref", [(6, 5), (12, 20)])
    with pytest.raises(ValueError, match=r"\[6, 5\].*\[12, 20\].*image_size"):
        ReferenceSet(images_dir=str(tmp_path / "ref"))
    reference = ReferenceSet(images_dir=str(tmp_path / "ref"), image_size=4)
    assert reference.images.shape == (2, 3, 4, 4)
    assert reference.images.min() >= 0 and reference.images.max() <= 1


def test_clear_errors_for_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        ReferenceSet(images_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ReferenceSet(images_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="exactly one"):
        ReferenceSet()
    with pytest.raises(FileNotFoundError, match="missing file"):
        ReferenceSet(paths=[str(tmp_path / "nope.png")])
    _write_images(tmp_path / "broken", [(4, 4)])
    (tmp_path / "broken" / "ref_99.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="cannot read reference image .*ref_99.png"):
        ReferenceSet(images_dir=str(tmp_path / "broken"))


def test_features_are_computed_once_per_extractor(tmp_path):
    _write_images(tmp_path / "ref", [(8, 8)] * 5)
    reference = ReferenceSet(images_dir=str(tmp_path / "ref"))
    extractor = CountingExtractor()
    features = reference.features(extractor, batch_size=2)
    assert extractor.calls == 3  # batches of 2, 2, 1
    assert features.shape == (5, 4)
    torch.testing.assert_close(features, CountingExtractor()(reference.images))
    assert reference.features(extractor) is features
    assert extractor.calls == 3
    # another extractor (other weights) gets its own features
    other = CountingExtractor(scale=2.0)
    torch.testing.assert_close(reference.features(other), 2 * features)
    assert other.calls == 1


def test_disk_cache_is_reused_and_keyed_by_extractor(tmp_path):
    _write_images(tmp_path / "ref", [(8, 8)] * 4)
    cache = tmp_path / "cache"
    first = ReferenceSet(images_dir=str(tmp_path / "ref"), cache_path=str(cache))
    features = first.features(CountingExtractor())
    assert len(list(cache.glob("*.pt"))) == 1

    again = ReferenceSet(images_dir=str(tmp_path / "ref"), cache_path=str(cache))
    extractor = CountingExtractor()
    torch.testing.assert_close(again.features(extractor), features)
    assert extractor.calls == 0  # loaded from disk
    scaled = CountingExtractor(scale=3.0)
    torch.testing.assert_close(again.features(scaled), 3 * features)
    assert scaled.calls == 1 and len(list(cache.glob("*.pt"))) == 2


def test_extractor_cache_key_uses_the_extractors_own_key():
    extractor = CountingExtractor()
    assert extractor_cache_key(extractor) == extractor_cache_key(CountingExtractor())
    assert extractor_cache_key(extractor) != extractor_cache_key(CountingExtractor(2.0))
    extractor.cache_key = "clip:ViT-L-14"
    assert extractor_cache_key(extractor) == "clip:ViT-L-14"
