import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lightning_sdrl.data.imagereward_db import (
    ImageRewardDataModule,
    PreferenceBatch,
    PreferencePair,
    read_parquet_split,
)
from lightning_sdrl.rewards.reward_model import CLIPEmbedder
from tests.helpers import make_tiny_clip, tiny_clip_config

TINY_CLIP = tiny_clip_config(16, 2)

# split -> prompts (prompt_id, prompt, ranks of its images); lower rank is better, equal ranks tie
SPLITS = {
    "train": [
        ("000864-0061", "painting of a holy woman, intricate", [2, 1, 3, 2]),
        ("001215-0007", "a red fox in the snow", [1, 2, 3]),
        ("002001-0100", "two yellow dogs on the table", [1, 1]),
    ],
    "validation": [("003000-0001", "a tiger and a lion", [3, 1, 2])],
    "test": [("004000-0002", '"Happy birthday" text', [2, 1])],
}
# the pairs (prompt_id, better image index, worse image index) the rankings above give
EXPECTED_PAIRS = {
    "train": [
        ("000864-0061", 1, 0),
        ("000864-0061", 0, 2),
        ("000864-0061", 1, 2),
        ("000864-0061", 1, 3),
        ("000864-0061", 3, 2),
        ("001215-0007", 0, 1),
        ("001215-0007", 0, 2),
        ("001215-0007", 1, 2),
    ],
    "validation": [("003000-0001", 1, 0), ("003000-0001", 2, 0), ("003000-0001", 1, 2)],
    "test": [("004000-0002", 1, 0)],
}
JSON_NAMES = {"train": "train.json", "validation": "valid.json", "test": "test.json"}


def _save_image(path, seed, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    # ImageRewardDB's images are lossless WebP; lossless keeps the test's pixels exact
    options = {"lossless": True} if path.suffix == ".webp" else {}
    Image.fromarray(pixels).save(path, **options)


def write_hf_layout(root):
    """THUDM/ImageRewardDB as published: metadata-<split>.parquet + images/<split>/<shard>/."""
    images = {}
    seed = 0
    for split, prompts in SPLITS.items():
        rows = {
            k: []
            for k in (
                "image_path",
                "prompt_id",
                "prompt",
                "classification",
                "image_amount_in_total",
                "rank",
                "overall_rating",
                "image_text_alignment_rating",
                "fidelity_rating",
            )
        }
        for prompt_id, prompt, ranks in prompts:
            for k, rank in enumerate(ranks):
                path = f"images/{split}/{split}_1/{prompt_id}-{k:02d}.webp"
                _save_image(root / path, seed, (24 + 8 * (k % 2), 32))
                seed += 1
                images[(prompt_id, k)] = path
                for key, value in (
                    ("image_path", path),
                    ("prompt_id", prompt_id),
                    ("prompt", prompt),
                    ("classification", "Arts"),
                    ("image_amount_in_total", len(ranks)),
                    ("rank", rank),
                    ("overall_rating", 7 - rank),
                    ("image_text_alignment_rating", 7 - rank),
                    ("fidelity_rating", 7 - rank),
                ):
                    rows[key].append(value)
        pq.write_table(pa.table(rows), root / f"metadata-{split}.parquet")
    return images


def write_json_layout(root):
    """ImageReward training layout: dataset/{train,valid,test}.json, generations under images/."""
    images = {}
    seed = 100
    (root / "dataset").mkdir(parents=True)
    for split, prompts in SPLITS.items():
        items = []
        for prompt_id, prompt, ranks in prompts:
            generations = []
            for k in range(len(ranks)):
                path = f"{prompt_id}/{k}.png"
                _save_image(root / "images" / path, seed, (32, 40))
                seed += 1
                images[(prompt_id, k)] = path
                generations.append(path)
            items.append(
                {"id": prompt_id, "prompt": prompt, "generations": generations, "ranking": ranks}
            )
        (root / "dataset" / JSON_NAMES[split]).write_text(json.dumps(items))
    return images


class CountingEmbedder(CLIPEmbedder):
    """The tiny CLIP, counting how many images and prompts it encodes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images_encoded = 0
        self.prompts_encoded = 0

    def encode_pixels(self, pixels):
        self.images_encoded += len(pixels)
        return super().encode_pixels(pixels)

    def encode_text(self, prompts):
        self.prompts_encoded += len(prompts)
        return super().encode_text(prompts)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), "tiny-clip-test", TINY_CLIP)[:2]


@pytest.fixture
def encoder(tiny_clip):
    return CountingEmbedder(*tiny_clip)


@pytest.fixture(params=["parquet", "json"])
def dataset(request, tmp_path):
    """(datamodule kwargs, image path of each (prompt_id, index)) for one published layout."""
    if request.param == "parquet":
        return {"data_dir": str(tmp_path)}, write_hf_layout(tmp_path)
    images = write_json_layout(tmp_path)
    return {"data_dir": str(tmp_path / "dataset"), "image_dir": str(tmp_path / "images")}, images


def _expected(split, images):
    prompts = {prompt_id: prompt for prompt_id, prompt, _ in SPLITS[split]}
    return [
        PreferencePair(prompts[pid], images[(pid, b)], images[(pid, w)])
        for pid, b, w in EXPECTED_PAIRS[split]
    ]


def test_both_published_layouts_give_the_ranking_pairs(dataset, encoder):
    kwargs, images = dataset
    datamodule = ImageRewardDataModule(**kwargs, batch_size=4, encoder=encoder)
    datamodule.setup("fit")
    datamodule.setup("test")
    for split in ("train", "validation", "test"):
        assert datamodule.datasets[split].pairs == _expected(split, images)


def test_batches_are_cached_embeddings_of_the_right_images(dataset, encoder):
    kwargs, images = dataset
    datamodule = ImageRewardDataModule(**kwargs, batch_size=3, encoder=encoder)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    assert isinstance(batch, PreferenceBatch) and batch.text.shape == (3, 16)

    image_dir = kwargs.get("image_dir", kwargs["data_dir"])

    def embed(path):
        with Image.open(f"{image_dir}/{path}") as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) / 255.0
        return encoder.encode_images(pixels[None])[0]

    with torch.no_grad():
        for row, pair in enumerate(_expected("validation", images)):
            torch.testing.assert_close(batch.better[row], embed(pair.better))
            torch.testing.assert_close(batch.worse[row], embed(pair.worse))
            torch.testing.assert_close(batch.text[row], encoder.encode_text([pair.prompt])[0])


def test_encoder_runs_once_per_unique_image_and_prompt(tmp_path, encoder, tiny_clip):
    write_hf_layout(tmp_path)
    cache = tmp_path / "cache" / "embeddings.pt"
    datamodule = ImageRewardDataModule(str(tmp_path), encoder=encoder, cache_path=str(cache))
    datamodule.setup("fit")
    assert (encoder.images_encoded, encoder.prompts_encoded) == (9 + 3, 3 + 1)
    datamodule.setup("fit")
    datamodule.setup("validate")
    assert (encoder.images_encoded, encoder.prompts_encoded) == (12, 4)
    datamodule.setup("test")
    assert (encoder.images_encoded, encoder.prompts_encoded) == (14, 5)
    assert cache.is_file()

    # a new run reads the embeddings from disk
    fresh = CountingEmbedder(*tiny_clip)
    again = ImageRewardDataModule(str(tmp_path), encoder=fresh, cache_path=str(cache))
    again.setup("fit")
    again.setup("test")
    assert (fresh.images_encoded, fresh.prompts_encoded) == (0, 0)
    torch.testing.assert_close(again.datasets["test"][0], datamodule.datasets["test"][0])

    images, texts = again.image_text_embeddings("train")
    assert images.shape == texts.shape == (9, 16)

    other = CountingEmbedder(tiny_clip[0], pretrained=None)  # another encoder: the cache is stale
    stale = ImageRewardDataModule(str(tmp_path), encoder=other, cache_path=str(cache))
    with pytest.raises(ValueError, match="random-init.*delete the file"):
        stale.setup("fit")


def test_images_extracted_in_place_are_found(tmp_path, encoder):
    images = write_hf_layout(tmp_path)
    for path in images.values():  # images/train/train_1/x.webp -> images/train/x.webp
        parts = path.split("/")
        shutil.move(tmp_path / path, tmp_path / parts[0] / parts[1] / parts[3])
    datamodule = ImageRewardDataModule(str(tmp_path), encoder=encoder)
    datamodule.setup("fit")
    assert datamodule.datasets["train"].pairs == _expected("train", images)


def test_empty_directory_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metadata-train\.parquet.*train\.json"):
        ImageRewardDataModule(str(tmp_path)).setup("fit")


def test_missing_split_file_is_named(tmp_path, encoder):
    write_hf_layout(tmp_path)
    (tmp_path / "metadata-validation.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="metadata-validation.parquet"):
        ImageRewardDataModule(str(tmp_path), encoder=encoder).setup("fit")


def test_missing_column_is_named(tmp_path):
    write_hf_layout(tmp_path)
    table = pq.read_table(tmp_path / "metadata-train.parquet").drop(["rank"])
    pq.write_table(table, tmp_path / "metadata-train.parquet")
    with pytest.raises(ValueError, match=r"metadata-train\.parquet lacks the columns \['rank'\]"):
        read_parquet_split(tmp_path / "metadata-train.parquet")


def test_missing_image_is_named(tmp_path, encoder):
    images = write_hf_layout(tmp_path)
    (tmp_path / images[("001215-0007", 2)]).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"1 image\(s\) listed in .*metadata-train\.parquet"
        r" are missing, first .*001215-0007-02\.webp",
    ):
        ImageRewardDataModule(str(tmp_path), encoder=encoder).setup("fit")


def test_malformed_json_item_is_named(tmp_path, encoder):
    write_json_layout(tmp_path)
    path = tmp_path / "dataset" / "train.json"
    items = json.loads(path.read_text())
    del items[1]["ranking"]
    path.write_text(json.dumps(items))
    datamodule = ImageRewardDataModule(
        str(tmp_path / "dataset"), image_dir=str(tmp_path / "images"), encoder=encoder
    )
    with pytest.raises(ValueError, match=r"item 1 of .*train\.json lacks the keys \['ranking'\]"):
        datamodule.setup("fit")


def test_without_an_encoder_the_error_says_where_to_get_one(tmp_path):
    write_hf_layout(tmp_path)
    with pytest.raises(RuntimeError, match="encoder=CLIPEmbedder"):
        ImageRewardDataModule(str(tmp_path)).setup("fit")
