"""ImageRewardDB preference pairs from a local copy, as cached frozen-CLIP embeddings.

Two published layouts are read (``layout="auto"`` picks whichever ``data_dir`` holds):

``"parquet"``: the Hugging Face dataset repository (``THUDM/ImageRewardDB``)::

    data_dir/
      metadata-train.parquet  metadata-validation.parquet  metadata-test.parquet
      images/train/train_1/<uuid>.webp ...  images/validation/...  images/test/...

  One row per image with (at least) the columns ``image_path`` (relative to ``data_dir``, e.g.
  ``images/train/train_1/<uuid>.webp``), ``prompt_id``, ``prompt`` and ``rank`` (1 is best). The
  images ship as ``images/<split>/<shard>.zip``; extract each into a folder of the shard's name
  (``unzip train_1.zip -d train_1``). Archives extracted in place, giving
  ``images/<split>/<uuid>.webp``, are found too.

``"json"``: the files of ImageReward's training scripts (``train.json``, ``valid.json``,
  ``test.json``), each a list of prompts ``{"id", "prompt", "generations", "ranking"}`` where
  ``generations`` lists image paths relative to ``image_dir`` and ``ranking`` their ranks.

Every prompt's ranking becomes ``(better, worse)`` pairs, ties skipped
(:func:`lightning_sdrl.functional.preference.ranking_to_pairs`). CLIP is frozen during reward
training, so each unique image and prompt is encoded once, in :meth:`ImageRewardDataModule.setup`,
and batches are pairs of cached embeddings (:class:`PreferenceBatch`).

Rows are checked as they are read. A missing (null, NaN) or non-integer or non-positive rank, a
missing image path or prompt, one ``prompt_id`` with two prompt texts, and one image listed twice
for a prompt with two different ranks are errors naming the file, the row and the value. An image
listed twice with the same rank is the same judgement repeated: the repeat is skipped (never paired
with itself) and counted. Each split's counts, ties included, are a :class:`LoadReport`.
"""

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from lightning_sdrl.functional.preference import ranking_to_pairs

Split = Literal["train", "validation", "test"]
PARQUET_FILES: dict[str, str] = {
    "train": "metadata-train.parquet",
    "validation": "metadata-validation.parquet",
    "test": "metadata-test.parquet",
}
JSON_FILES: dict[str, str] = {
    "train": "train.json",
    "validation": "valid.json",
    "test": "test.json",
}
PARQUET_COLUMNS = ("image_path", "prompt_id", "prompt", "rank")
JSON_KEYS = ("prompt", "generations", "ranking")


@dataclass(frozen=True)
class RankedPrompt:
    """One prompt with its ranked images.

    Attributes:
        prompt_id: Identifier of the prompt in the dataset.
        prompt: Text of the prompt.
        images: Image paths as written in the metadata (relative to ``image_dir``).
        ranks: Rank of each image, 1 is best; equal ranks are ties.
        duplicate_rows: Rows of the metadata that repeated one of ``images`` with the same rank,
            skipped.
    """

    prompt_id: str
    prompt: str
    images: tuple[str, ...]
    ranks: tuple[int, ...]
    duplicate_rows: int = 0


@dataclass(frozen=True)
class LoadReport:
    """What reading one split's metadata kept and skipped.

    Attributes:
        source: The metadata file.
        prompts: Prompts read.
        images: Images kept, one per distinct image of a prompt.
        pairs: Comparisons made: pairs of images of one prompt with different ranks.
        tied_pairs: Pairs of images of one prompt with equal ranks, skipped (a tie states no
            preference).
        duplicate_rows: Rows repeating an image of the same prompt with the same rank, skipped.
    """

    source: Path
    prompts: int
    images: int
    pairs: int
    tied_pairs: int
    duplicate_rows: int

    def summary(self) -> str:
        """The counts as one line, for the log."""
        return (
            f"{self.source}: {self.prompts} prompts, {self.images} images, {self.pairs} "
            f"comparisons; skipped {self.tied_pairs} tied image pairs and {self.duplicate_rows} "
            "duplicate rows"
        )


def load_report(prompts: Iterable[RankedPrompt], source: str | Path) -> LoadReport:
    """Count the prompts, images, comparisons, ties and skipped rows of one split.

    Example:
        >>> prompt = RankedPrompt("p0", "a cat", ("a.webp", "b.webp", "c.webp"), (2, 1, 2), 1)
        >>> load_report([prompt], "train.json").summary()
        'train.json: 1 prompts, 3 images, 2 comparisons; skipped 1 tied image pairs and 1 duplicate rows'
    """
    prompts = list(prompts)
    images = sum(len(item.images) for item in prompts)
    all_pairs = sum(len(item.images) * (len(item.images) - 1) // 2 for item in prompts)
    # n images sharing a rank make n * (n - 1) / 2 tied pairs
    tied = sum(n * (n - 1) // 2 for item in prompts for n in Counter(item.ranks).values())
    duplicates = sum(item.duplicate_rows for item in prompts)
    return LoadReport(Path(source), len(prompts), images, all_pairs - tied, tied, duplicates)


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: annotators preferred ``better`` to ``worse`` for ``prompt``."""

    prompt: str
    better: str
    worse: str


class PreferenceBatch(NamedTuple):
    """Embeddings of comparisons; ``[D]`` per item, ``[B, D]`` once collated.

    Attributes:
        text: CLIP embedding of the prompt.
        better: CLIP embedding of the preferred image.
        worse: CLIP embedding of the other image.
    """

    text: Tensor
    better: Tensor
    worse: Tensor


def preference_pairs(prompts: Iterable[RankedPrompt]) -> list[PreferencePair]:
    """All ``(better, worse)`` comparisons of ranked prompts, ties skipped.

    Example:
        >>> prompt = RankedPrompt("p0", "a cat", ("a.webp", "b.webp", "c.webp"), (2, 1, 2))
        >>> [(p.better, p.worse) for p in preference_pairs([prompt])]
        [('b.webp', 'a.webp'), ('b.webp', 'c.webp')]
    """
    return [
        PreferencePair(item.prompt, item.images[better], item.images[worse])
        for item in prompts
        for better, worse in ranking_to_pairs(item.ranks)
    ]


def _check_rank(value: object, where: str) -> int:
    """``value`` as a rank (a positive integer; a float column's ``2.0`` is ``2``), else an error."""
    integral = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    if not integral or value < 1:  # NaN, inf and None are not integral
        raise ValueError(
            f"{where} is {value!r}; expected a positive integer rank (1 is the best image, equal "
            "ranks are ties): fix the value or drop the row"
        )
    return int(value)


def _check_text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} is {value!r}; expected a non-empty string: fix the value or drop the row")
    return value


def _ranked_prompt(prompt_id: str, prompt: str, rows: Sequence[tuple[str, int, str]], source: Path) -> RankedPrompt:
    """One prompt from its ``(image, rank, where)`` rows, repeats of an image and rank skipped.

    Raises:
        ValueError: If one image has two different ranks; the data contradicts itself.
    """
    ranks: dict[str, tuple[int, str]] = {}
    duplicates = 0
    for image, rank, where in rows:
        if image not in ranks:
            ranks[image] = (rank, where)
            continue
        first_rank, first_where = ranks[image]
        if rank != first_rank:
            raise ValueError(
                f"{source}: prompt_id {prompt_id!r} lists image {image!r} twice with different "
                f"ranks, {first_rank} ({first_where}) and {rank} ({where}); expected one rank per "
                "image: drop the wrong row"
            )
        duplicates += 1
    return RankedPrompt(prompt_id, prompt, tuple(ranks), tuple(rank for rank, _ in ranks.values()), duplicates)


def _check_parquet_row(row: Mapping[str, object], where: str) -> tuple[str, str, str, int]:
    """``(prompt_id, prompt, image_path, rank)`` of one metadata row, checked."""
    prompt_id = row["prompt_id"]
    if prompt_id is None or prompt_id != prompt_id:  # null or NaN
        raise ValueError(f"{where}, column 'prompt_id' is {prompt_id!r}; expected an id: fix the value or drop the row")
    return (
        str(prompt_id),
        _check_text(row["prompt"], f"{where}, column 'prompt'"),
        _check_text(row["image_path"], f"{where}, column 'image_path'"),
        _check_rank(row["rank"], f"{where}, column 'rank'"),
    )


def read_parquet_split(metadata_file: str | Path) -> list[RankedPrompt]:
    """Read one ``metadata-<split>.parquet`` of the Hugging Face layout, grouped by prompt.

    Prompts keep the order of their first row; images keep row order within a prompt. A row
    repeating an image of its prompt with the same rank is skipped (counted in
    :attr:`RankedPrompt.duplicate_rows`).

    Raises:
        FileNotFoundError: If ``metadata_file`` does not exist.
        ValueError: Naming the row, the column and the value, for a missing column, a missing or
            invalid rank, image path or prompt, a ``prompt_id`` with two prompt texts, or an image
            of one prompt with two ranks.
    """
    import pyarrow.parquet as pq  # only this layout needs pyarrow

    metadata_file = Path(metadata_file)
    if not metadata_file.is_file():
        raise FileNotFoundError(
            f"ImageRewardDB metadata not found: {metadata_file}; expected the published "
            f"{metadata_file.name} from THUDM/ImageRewardDB in this folder"
        )
    columns = pq.read_schema(metadata_file).names
    missing = [c for c in PARQUET_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{metadata_file} lacks the columns {missing} (has {columns}); expected ImageRewardDB "
            f"metadata with the columns {list(PARQUET_COLUMNS)}"
        )
    rows = pq.read_table(metadata_file, columns=list(PARQUET_COLUMNS)).to_pylist()
    # prompt_id -> (prompt, its first row, its (image, rank, where) rows)
    grouped: dict[str, tuple[str, int, list[tuple[str, int, str]]]] = {}
    for index, row in enumerate(rows):
        prompt_id, prompt, image, rank = _check_parquet_row(row, f"{metadata_file}: row {index}")
        known, first_row, images = grouped.setdefault(prompt_id, (prompt, index, []))
        if prompt != known:
            raise ValueError(
                f"{metadata_file}: prompt_id {prompt_id!r} has two prompt texts, {known!r} (row "
                f"{first_row}) and {prompt!r} (row {index}); expected one text per prompt_id: fix "
                "the prompt_id or the text"
            )
        images.append((image, rank, f"row {index}"))
    return [
        _ranked_prompt(prompt_id, prompt, images, metadata_file) for prompt_id, (prompt, _, images) in grouped.items()
    ]


def read_json_split(json_file: str | Path) -> list[RankedPrompt]:
    """Read one ``{train,valid,test}.json`` of ImageReward's training scripts.

    An image listed twice in one item with the same rank is skipped (counted in
    :attr:`RankedPrompt.duplicate_rows`).

    Raises:
        FileNotFoundError: If ``json_file`` does not exist.
        ValueError: Naming the item, the key and the value, for a missing key, a missing or
            invalid rank, image path or prompt, unequal numbers of generations and ranks, or an
            image listed twice with two ranks.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise FileNotFoundError(
            f"ImageRewardDB split file not found: {json_file}; expected a JSON list of "
            f'{{"id", "prompt", "generations", "ranking"}} items as used by ImageReward training'
        )
    items = json.loads(json_file.read_text())
    prompts = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(
                f"item {index} of {json_file} is {item!r}; expected an object with the keys "
                f"{list(JSON_KEYS)} (and optionally 'id')"
            )
        missing = [key for key in JSON_KEYS if key not in item]
        if missing:
            raise ValueError(
                f"item {index} of {json_file} lacks the keys {missing}; expected each item to "
                f"carry {list(JSON_KEYS)} (and optionally 'id')"
            )
        for key in ("generations", "ranking"):
            if not isinstance(item[key], list):
                raise ValueError(f"item {index} of {json_file}: {key!r} is {item[key]!r}; expected a list")
        if len(item["generations"]) != len(item["ranking"]):
            raise ValueError(
                f"item {index} of {json_file} has {len(item['generations'])} generations but "
                f"{len(item['ranking'])} ranks; expected one rank per generated image"
            )
        where = f"{json_file}: item {index}"
        rows = [
            (
                _check_text(image, f"{where}, 'generations'[{k}]"),
                _check_rank(rank, f"{where}, 'ranking'[{k}]"),
                f"item {index}, position {k}",
            )
            for k, (image, rank) in enumerate(zip(item["generations"], item["ranking"], strict=True))
        ]
        prompt = _check_text(item["prompt"], f"{where}, 'prompt'")
        prompts.append(_ranked_prompt(str(item.get("id", index)), prompt, rows, json_file))
    return prompts


def resolve_image_files(prompts: Iterable[RankedPrompt], image_dir: str | Path, source: str | Path) -> dict[str, Path]:
    """Map every image path of ``prompts`` to its file under ``image_dir``.

    ``image_dir / path`` is tried first, then, for the Hugging Face layout's
    ``images/<split>/<shard>/<name>``, the in-place extraction ``images/<split>/<name>``.

    Raises:
        FileNotFoundError: Naming the first missing image, how many are missing and ``source``.
    """
    image_dir = Path(image_dir)
    files, missing = {}, []
    for path in dict.fromkeys(image for item in prompts for image in item.images):
        candidates = [image_dir / path]
        parts = Path(path).parts
        if len(parts) == 4 and parts[0] == "images":
            candidates.append(image_dir.joinpath(*parts[:2], parts[3]))
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(candidates[0])
        else:
            files[path] = found
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {source} are missing, first {missing[0]}; "
            f"expected the image files under image_dir={str(image_dir)!r} (extract the "
            "ImageRewardDB image archives, or point image_dir at the folder the paths are "
            "relative to)"
        )
    return files


class _ImageFiles(Dataset[Tensor]):
    """Images ``[3, H, W]`` in ``[0, 1]`` read from files, for the one-off encoding pass."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        with Image.open(self.files[index]) as image:
            return pil_to_tensor(image.convert("RGB")).float() / 255.0


class EmbeddingCache:
    """Frozen-encoder embeddings of images (keyed by metadata path) and prompts (keyed by text).

    Kept in memory; with ``path`` also saved to and loaded from one ``.pt`` file holding the
    encoder's ``cache_key``, the keys and the stacked embeddings.

    Args:
        path: Optional ``.pt`` file to load from and save to.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.encoder_key: str | None = None
        self.images: dict[str, Tensor] = {}
        self.texts: dict[str, Tensor] = {}
        if self.path is not None and self.path.is_file():
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            self.encoder_key = state["encoder"]
            self.images = dict(zip(state["image_keys"], state["image_embeds"], strict=True))
            self.texts = dict(zip(state["text_keys"], state["text_embeds"], strict=True))

    def check(self, encoder: nn.Module) -> None:
        """Raise if the cached embeddings come from another encoder than ``encoder``."""
        if self.encoder_key not in (None, encoder.cache_key):
            raise ValueError(
                f"embedding cache {self.path} was built with {self.encoder_key!r} but the encoder "
                f"is {encoder.cache_key!r}; delete the file or set another cache_path"
            )

    def update(
        self,
        encoder: nn.Module,
        image_files: Mapping[str, Path],
        prompts: Iterable[str],
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        """Encode the images and prompts not cached yet, each once.

        Args:
            encoder: Frozen encoder with ``cache_key``, ``device``, ``preprocess``, ``encode_pixels``
                and ``encode_text`` (a :class:`CLIPEmbedder` or e.g. a ``DigitsEmbedder``).
            image_files: Image key -> file.
            prompts: Prompt texts.
            batch_size: Images or prompts per encoder call.
            num_workers: Processes reading image files.
        """
        self.check(encoder)
        self.encoder_key = encoder.cache_key
        new_images = [key for key in image_files if key not in self.images]
        new_prompts = [p for p in dict.fromkeys(prompts) if p not in self.texts]
        device = encoder.device
        with torch.no_grad():
            loader = DataLoader(
                _ImageFiles([image_files[key] for key in new_images]),
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=list,
            )
            start = 0
            for images in loader:
                # images differ in size: preprocess one by one, encode as a batch
                pixels = torch.cat([encoder.preprocess(im[None].to(device)) for im in images])
                embeds = encoder.encode_pixels(pixels).float().cpu()
                self.images.update(zip(new_images[start : start + len(images)], embeds, strict=True))
                start += len(images)
            for start in range(0, len(new_prompts), batch_size):
                chunk = new_prompts[start : start + batch_size]
                self.texts.update(zip(chunk, encoder.encode_text(chunk).float().cpu(), strict=True))

    def save(self) -> None:
        """Write the cache to ``path``."""
        if self.path is None:
            raise ValueError("EmbeddingCache(path=None) has no file to save to; give a path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "encoder": self.encoder_key,
            "image_keys": list(self.images),
            "image_embeds": _stack(self.images.values()),
            "text_keys": list(self.texts),
            "text_embeds": _stack(self.texts.values()),
        }
        torch.save(state, self.path)


def _stack(tensors: Iterable[Tensor]) -> Tensor:
    tensors = list(tensors)
    return torch.stack(tensors) if tensors else torch.empty(0)


class ImageRewardPairs(Dataset[PreferenceBatch]):
    """Comparisons of ImageRewardDB as embedding triples ``(prompt, better, worse)``.

    Args:
        pairs: The comparisons.
        image_embeddings: Embedding ``[D]`` of every image key in ``pairs``.
        text_embeddings: Embedding ``[D]`` of every prompt in ``pairs``.
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        image_embeddings: Mapping[str, Tensor],
        text_embeddings: Mapping[str, Tensor],
    ) -> None:
        self.pairs = list(pairs)
        image_keys = list(dict.fromkeys(k for p in self.pairs for k in (p.better, p.worse)))
        prompts = list(dict.fromkeys(p.prompt for p in self.pairs))
        missing = [k for k in image_keys if k not in image_embeddings]
        missing += [p for p in prompts if p not in text_embeddings]
        if missing:
            raise KeyError(
                f"no embedding for {len(missing)} image(s)/prompt(s), first {missing[0]!r}; "
                "expected image_embeddings and text_embeddings to cover every pair"
            )
        row = {key: i for i, key in enumerate(image_keys)}
        text_row = {prompt: i for i, prompt in enumerate(prompts)}
        self.image_embeds = _stack(image_embeddings[k] for k in image_keys)
        self.text_embeds = _stack(text_embeddings[p] for p in prompts)
        self.index = torch.tensor(
            [(text_row[p.prompt], row[p.better], row[p.worse]) for p in self.pairs],
            dtype=torch.long,
        ).view(-1, 3)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferenceBatch:
        text, better, worse = self.index[index].tolist()
        return PreferenceBatch(self.text_embeds[text], self.image_embeds[better], self.image_embeds[worse])


class ImageRewardDataModule(pl.LightningDataModule):
    """ImageRewardDB comparisons as batches of cached CLIP embeddings (:class:`PreferenceBatch`).

    ``setup`` reads the split metadata, checks that every image exists, and encodes each unique
    image and prompt once with a frozen encoder: ``encoder`` if given, else the ``embedder`` of the
    LightningModule the Trainer runs (so only one CLIP is loaded), on the Trainer's device.

    Args:
        data_dir: Folder holding the metadata of the chosen ``layout`` (see the module docstring).
        batch_size: Comparisons per batch (the reward-model report uses 256), per device.
        num_workers: DataLoader processes, for the comparison batches and the image reading.
        layout: ``"parquet"`` (Hugging Face ``metadata-<split>.parquet``), ``"json"`` (ImageReward
            training ``train.json``/``valid.json``/``test.json``), or ``"auto"`` to detect.
        image_dir: Folder the image paths in the metadata are relative to; ``None`` is
            ``data_dir``.
        cache_path: ``.pt`` file caching the embeddings across runs; ``None`` keeps them in memory.
        encode_batch_size: Images or prompts per encoder call while caching.
        encoder: Frozen encoder; ``None`` uses the LightningModule's ``embedder``.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 256,
        num_workers: int = 0,
        layout: Literal["auto", "parquet", "json"] = "auto",
        image_dir: str | None = None,
        cache_path: str | None = None,
        encode_batch_size: int = 64,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.layout = layout
        self.image_dir = Path(image_dir) if image_dir is not None else self.data_dir
        self.encode_batch_size = encode_batch_size
        self.encoder = encoder
        self.cache = EmbeddingCache(cache_path)
        self.prompts: dict[str, list[RankedPrompt]] = {}
        self.datasets: dict[str, ImageRewardPairs] = {}
        self.reports: dict[str, LoadReport] = {}

    def resolved_layout(self) -> Literal["parquet", "json"]:
        """The layout in use; ``"auto"`` picks the one whose files ``data_dir`` holds."""
        if self.layout != "auto":
            return self.layout
        if any((self.data_dir / name).is_file() for name in PARQUET_FILES.values()):
            return "parquet"
        if any((self.data_dir / name).is_file() for name in JSON_FILES.values()):
            return "json"
        raise FileNotFoundError(
            f"no ImageRewardDB metadata in data_dir={str(self.data_dir)!r}; expected "
            f"{', '.join(PARQUET_FILES.values())} (Hugging Face layout) or "
            f"{', '.join(JSON_FILES.values())} (ImageReward training layout)"
        )

    def metadata_file(self, split: Split) -> Path:
        """The file listing one split's prompts, images and ranks."""
        files = PARQUET_FILES if self.resolved_layout() == "parquet" else JSON_FILES
        return self.data_dir / files[split]

    def read_split(self, split: Split) -> list[RankedPrompt]:
        """Ranked prompts of one split, read from ``data_dir``."""
        if self.resolved_layout() == "parquet":
            return read_parquet_split(self.metadata_file(split))
        return read_json_split(self.metadata_file(split))

    def setup(self, stage: str) -> None:
        """Read the splits ``stage`` needs and cache their embeddings.

        Each split's counts are kept in :attr:`reports` and logged as one line (a warning when
        duplicate rows were skipped).
        """
        splits: dict[str, tuple[Split, ...]] = {
            "fit": ("train", "validation"),
            "validate": ("validation",),
            "test": ("test",),
        }
        if stage not in splits:
            raise ValueError(f"stage={stage!r} is not supported; expected one of {list(splits)}")
        needed = [split for split in splits[stage] if split not in self.datasets]
        image_files: dict[str, Path] = {}
        for split in needed:
            self.prompts[split] = self.read_split(split)
            report = load_report(self.prompts[split], self.metadata_file(split))
            (rank_zero_warn if report.duplicate_rows else rank_zero_info)(report.summary())
            self.reports[split] = report
            image_files.update(resolve_image_files(self.prompts[split], self.image_dir, self.metadata_file(split)))
        prompts = [item.prompt for split in needed for item in self.prompts[split]]
        self._cache_embeddings(image_files, prompts)
        for split in needed:
            pairs = preference_pairs(self.prompts[split])
            self.datasets[split] = ImageRewardPairs(pairs, self.cache.images, self.cache.texts)

    def _cache_embeddings(self, image_files: Mapping[str, Path], prompts: Sequence[str]) -> None:
        encoder = self.encoder
        if encoder is None and self.trainer is not None:
            encoder = getattr(self.trainer.lightning_module, "embedder", None)
        if encoder is not None:
            self.cache.check(encoder)
        missing = any(k not in self.cache.images for k in image_files)
        if not missing and all(p in self.cache.texts for p in prompts):
            return
        if encoder is None:
            raise RuntimeError(
                "ImageRewardDataModule has embeddings to compute but no encoder; pass "
                "encoder=CLIPEmbedder(...) or run it in a Trainer with a LightningModule that has "
                "an `embedder` (e.g. RewardModelModule)"
            )
        home = encoder.device
        if self.trainer is not None:  # encode on the Trainer's device, then hand CLIP back
            encoder.to(self.trainer.strategy.root_device)
        try:
            self.cache.update(encoder, image_files, prompts, self.encode_batch_size, self.num_workers)
        finally:
            encoder.to(home)
        # with several devices every process encodes, and one writes the file
        if self.cache.path is not None and (self.trainer is None or self.trainer.is_global_zero):
            self.cache.save()

    def image_text_embeddings(self, split: Split = "train") -> tuple[Tensor, Tensor]:
        """Embeddings of every image of a split set up so far and of its prompt.

        Returns:
            Image embeddings ``[N, D]`` and the matching prompt embeddings ``[N, D]``, one row per
            unique image (used for the reward's score statistics).
        """
        if split not in self.prompts:
            raise RuntimeError(f"split {split!r} is not set up; call setup() with a stage that reads it first")
        rows = {image: item.prompt for item in self.prompts[split] for image in item.images}
        return (
            _stack(self.cache.images[image] for image in rows),
            _stack(self.cache.texts[prompt] for prompt in rows.values()),
        )

    def _loader(self, split: Split, shuffle: bool) -> DataLoader[PreferenceBatch]:
        if split not in self.datasets:
            raise RuntimeError(f"split {split!r} is not set up; call setup() first")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader[PreferenceBatch]:
        """Shuffled training comparisons."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[PreferenceBatch]:
        """Validation comparisons."""
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader[PreferenceBatch]:
        """Test comparisons (466 prompts, 6,399 comparisons in the reward-model report's Table 1)."""
        return self._loader("test", shuffle=False)
