import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lightning_sdrl.data import imagereward_db
from lightning_sdrl.data.imagereward_db import (
    ImageRewardDataModule,
    LoadReport,
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
            items.append({"id": prompt_id, "prompt": prompt, "generations": generations, "ranking": ranks})
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
    return [PreferencePair(prompts[pid], images[(pid, b)], images[(pid, w)]) for pid, b, w in EXPECTED_PAIRS[split]]


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
    datamodule = ImageRewardDataModule(str(tmp_path / "dataset"), image_dir=str(tmp_path / "images"), encoder=encoder)
    with pytest.raises(ValueError, match=r"item 1 of .*train\.json lacks the keys \['ranking'\]"):
        datamodule.setup("fit")


def test_without_an_encoder_the_error_says_where_to_get_one(tmp_path):
    write_hf_layout(tmp_path)
    with pytest.raises(RuntimeError, match="encoder=CLIPEmbedder"):
        ImageRewardDataModule(str(tmp_path)).setup("fit")


def _edit_train_rows(root, edit):
    """Rewrite metadata-train.parquet with ``edit(rows)`` applied to its list of row dicts."""
    path = root / "metadata-train.parquet"
    rows = pq.read_table(path).to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_ties_and_kept_rows_are_counted_and_logged_once_per_split(dataset, encoder, monkeypatch):
    kwargs, _ = dataset
    lines = []
    monkeypatch.setattr(imagereward_db, "rank_zero_info", lines.append)
    datamodule = ImageRewardDataModule(**kwargs, encoder=encoder)
    datamodule.setup("fit")
    datamodule.setup("test")
    datamodule.setup("fit")  # already set up: no second report
    # (prompts, images, comparisons, tied pairs, duplicate rows), counted by hand from SPLITS:
    # train: images 0 and 3 of [2, 1, 3, 2] tie, and the two of [1, 1]
    expected = {"train": (3, 9, 8, 2, 0), "validation": (1, 3, 3, 0, 0), "test": (1, 2, 1, 0, 0)}
    for split, counts in expected.items():
        report = datamodule.reports[split]
        assert report == LoadReport(datamodule.metadata_file(split), *counts)
        assert report.pairs == len(datamodule.datasets[split])
    train = datamodule.metadata_file("train")
    assert lines[0] == f"{train}: 3 prompts, 9 images, 8 comparisons; skipped 2 tied image pairs and 0 duplicate rows"
    assert len(lines) == 3 and [line.split(":")[0] for line in lines] == [
        str(datamodule.metadata_file(split)) for split in ("train", "validation", "test")
    ]


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [
        ("rank", None, "None"),
        ("rank", float("nan"), "nan"),
        ("rank", 2.5, "2.5"),
        ("rank", -1, "-1"),
        ("rank", 0, "0"),
        ("prompt_id", None, "None"),
        ("prompt", None, "None"),
        ("image_path", None, "None"),
    ],
)
def test_invalid_value_names_file_row_column_and_value(tmp_path, column, value, shown):
    write_hf_layout(tmp_path)
    path = _edit_train_rows(tmp_path, lambda rows: rows[5].update({column: value}))
    file, expected = (
        re.escape(str(path)),
        "a positive integer rank" if column == "rank" else "(an id|a non-empty string)",
    )
    with pytest.raises(
        ValueError,
        match=rf"{file}: row 5, column '{column}' is {re.escape(shown)}; expected {expected}.*fix the value or drop",
    ):
        ImageRewardDataModule(str(tmp_path)).setup("fit")


def test_float_rank_column_reads_as_integer_ranks(tmp_path):
    write_hf_layout(tmp_path)
    path = _edit_train_rows(tmp_path, lambda rows: rows[5].update(rank=float("nan")))
    with pytest.raises(ValueError, match=r"row 5, column 'rank' is nan"):
        read_parquet_split(path)
    _edit_train_rows(tmp_path, lambda rows: rows[5].update(rank=2.0))  # the column stays float
    assert pq.read_schema(path).field("rank").type == pa.float64()
    prompts = read_parquet_split(path)
    assert [item.ranks for item in prompts] == [tuple(ranks) for _, _, ranks in SPLITS["train"]]
    assert all(type(rank) is int for item in prompts for rank in item.ranks)


def test_invalid_json_rank_names_file_item_and_position(tmp_path):
    write_json_layout(tmp_path)
    path = tmp_path / "dataset" / "train.json"
    items = json.loads(path.read_text())
    items[1]["ranking"][2] = None
    path.write_text(json.dumps(items))
    datamodule = ImageRewardDataModule(str(tmp_path / "dataset"), image_dir=str(tmp_path / "images"))
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: item 1, 'ranking'\[2\] is None; expected a positive integer"
    ):
        datamodule.setup("fit")


def test_prompt_id_with_two_texts_names_both(tmp_path):
    write_hf_layout(tmp_path)
    path = _edit_train_rows(tmp_path, lambda rows: rows[6].update(prompt="a grey fox"))
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(path))}: prompt_id '001215-0007' has two prompt texts, 'a red fox in the snow' "
        r"\(row 4\) and 'a grey fox' \(row 6\); expected one text per prompt_id",
    ):
        read_parquet_split(path)


def _repeat_image(dataset_kwargs, rank):
    """List image 1 of prompt 001215-0007 (rank 2) a second time, with ``rank``."""
    data_dir = Path(dataset_kwargs["data_dir"])
    if "image_dir" not in dataset_kwargs:  # parquet: row 5 is that image; the copy becomes row 9
        return _edit_train_rows(data_dir, lambda rows: rows.append({**rows[5], "rank": rank}))
    path = data_dir / "train.json"
    items = json.loads(path.read_text())
    items[1]["generations"].append(items[1]["generations"][1])
    items[1]["ranking"].append(rank)
    path.write_text(json.dumps(items))
    return path


def test_repeated_image_row_is_skipped_with_a_count(dataset, encoder):
    kwargs, images = dataset
    _repeat_image(kwargs, rank=2)
    datamodule = ImageRewardDataModule(**kwargs, encoder=encoder)
    with pytest.warns(UserWarning, match=r"8 comparisons; skipped 2 tied image pairs and 1 duplicate rows"):
        datamodule.setup("fit")
    assert datamodule.datasets["train"].pairs == _expected("train", images)
    assert datamodule.reports["train"].duplicate_rows == 1 and datamodule.reports["train"].images == 9
    assert [item.duplicate_rows for item in datamodule.prompts["train"]] == [0, 1, 0]


def test_repeated_image_with_another_rank_is_an_error(dataset):
    kwargs, images = dataset
    path = _repeat_image(kwargs, rank=3)
    where = ("row 5", "row 9") if path.suffix == ".parquet" else ("item 1, position 1", "item 1, position 3")
    file, image = re.escape(str(path)), re.escape(images[("001215-0007", 1)])
    with pytest.raises(
        ValueError,
        match=rf"{file}: prompt_id '001215-0007' lists image '{image}' twice with different "
        rf"ranks, 2 \({where[0]}\) and 3 \({where[1]}\); expected one rank per image",
    ):
        ImageRewardDataModule(**kwargs).setup("fit")
