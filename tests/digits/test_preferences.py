import json

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from lightning_sdrl.data.imagereward_db import ImageRewardDataModule, preference_pairs, read_parquet_split
from lightning_sdrl.digits.captions import digit_captions
from lightning_sdrl.digits.policy import DigitsPolicy
from lightning_sdrl.digits.preferences import (
    DigitsPreferenceDataModule,
    build_digits_preference_db,
    rank_by_score,
    stroke_thickness,
)

GROUPS = {"train": 3, "validation": 2, "test": 1}
CAPTIONS = {caption for digit in range(10) for caption in digit_captions(digit)}


def test_stroke_thickness_counts_pixels_above_the_level():
    images = torch.zeros(2, 3, 16, 16)
    images[0, :, 2:6, 3:5] = 0.9  # 8 pixels
    images[1, :, 0:16, 0:4] = 0.6  # 64 pixels
    images[1, :, 0:16, 4:8] = 0.5  # exactly at the level: not ink
    torch.testing.assert_close(stroke_thickness(images), torch.tensor([8 / 256, 64 / 256]))
    with pytest.raises(ValueError, match="expected \\[B, C, H, W\\]"):
        stroke_thickness(torch.zeros(16, 16))


def test_ranks_are_competition_ranks_with_ties():
    assert rank_by_score(torch.tensor([0.1, 0.3, 0.3, 0.0])) == [3, 1, 1, 4]


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    directory = tmp_path_factory.mktemp("digits_prefs")
    policy = DigitsPolicy(lora=None)
    build_digits_preference_db(directory, policy, groups=GROUPS, generations_per_prompt=4, num_steps=4)
    return directory


def test_db_is_the_imagereward_layout_ranked_by_the_rule_of_the_written_images(small_db):
    info = json.loads((small_db / "dataset_info.json").read_text())
    assert info["groups"] == GROUPS and info["generations_per_prompt"] == 4
    for split, groups in GROUPS.items():
        prompts = read_parquet_split(small_db / f"metadata-{split}.parquet")
        assert len(prompts) == groups and all(len(p.images) == 4 for p in prompts)
        for item in prompts:
            assert item.prompt in CAPTIONS
            images = torch.stack(
                [pil_to_tensor(Image.open(small_db / path).convert("RGB")).float() / 255 for path in item.images]
            )
            assert list(item.ranks) == rank_by_score(stroke_thickness(images))
    train = read_parquet_split(small_db / "metadata-train.parquet")
    assert len(preference_pairs(train)) > 0


def test_data_module_builds_once_and_refuses_other_settings(small_db, tmp_path):
    module = DigitsPreferenceDataModule(str(small_db), groups=GROUPS, generations_per_prompt=4, num_steps=4)
    assert isinstance(module, ImageRewardDataModule)
    module.prepare_data()  # already built with these settings: nothing to do
    scores = module.rule_scores("test")
    assert len(scores) == 4 and all(0 <= s <= 1 for s in scores.values())
    with pytest.raises(ValueError, match="built with other settings.*delete the folder"):
        DigitsPreferenceDataModule(str(small_db), groups={"train": 5, "validation": 2, "test": 1}).prepare_data()
    with pytest.raises(ValueError, match="at least 2 images"):
        build_digits_preference_db(tmp_path, generations_per_prompt=1)
    with pytest.raises(ValueError, match="positive number of prompt groups"):
        build_digits_preference_db(tmp_path, groups={"train": 1})
