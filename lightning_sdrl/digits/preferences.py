"""A hidden-rule preference dataset of generated digits, in the published ImageRewardDB layout.

ImageRewardDB holds, for each prompt, several images a diffusion model generated and the ranks
human annotators gave them. The digits miniature replaces the annotators with a fixed rule the
reward model never sees: **stroke thickness**, the share of the canonical 16x16 digit's pixels
brighter than 0.5 (:func:`stroke_thickness`; bold digits rank first, equal pixel counts tie). The
rule is piecewise constant in the pixels, so it gives no gradient: ReFL needs the learned reward
to turn it into one, as it needs ImageReward to turn human rankings into one.

:func:`build_digits_preference_db` samples ``generations_per_prompt`` images per prompt group
from the shipped digits model (prompts: the per-digit captions such as "a handwritten seven"),
ranks each group by the rule and writes::

    data_dir/
      metadata-train.parquet  metadata-validation.parquet  metadata-test.parquet
      images/<split>/<prompt_id>/<k>.png
      dataset_info.json          # the settings it was built with

with the columns of the Hugging Face layout (``image_path``, ``prompt_id``, ``prompt``,
``rank``; plus ``rule_score`` for analysis), so the ImageRewardDB loader reads it unchanged.
:class:`DigitsPreferenceDataModule` is that loader, building the dataset first if ``data_dir`` is
empty.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sdrl.data.imagereward_db import PARQUET_FILES, ImageRewardDataModule, Split
from lightning_sdrl.digits.captions import digit_captions
from lightning_sdrl.digits.models import to_canonical_digits
from lightning_sdrl.functional.seeding import derive_seed

__all__ = [
    "DEFAULT_GROUPS",
    "DigitsPreferenceDataModule",
    "build_digits_preference_db",
    "rank_by_score",
    "stroke_thickness",
]

THICKNESS_LEVEL = 0.5
"""Pixel intensity above which a canonical-digit pixel counts as ink for :func:`stroke_thickness`."""

DEFAULT_GROUPS: dict[str, int] = {"train": 240, "validation": 40, "test": 40}
"""Prompt groups per split (each with ``generations_per_prompt`` ranked images)."""

INFO_FILE = "dataset_info.json"
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def stroke_thickness(images: Tensor, level: float = THICKNESS_LEVEL) -> Tensor:
    """The hidden rule: share of the canonical digit's 256 pixels brighter than ``level``.

    Args:
        images: ``[B, C, H, W]`` floats in ``[0, 1]`` (``C`` = 1 or 3; resized to 16x16).
        level: Ink threshold.

    Returns:
        ``[B]`` scores in ``[0, 1]``, multiples of 1/256 (so equal pixel counts tie exactly).

    Example:
        >>> image = torch.zeros(1, 1, 16, 16)
        >>> image[..., 4:12, 6:10] = 1.0  # a 8x4 bar: 32 of 256 pixels
        >>> stroke_thickness(image)
        tensor([0.1250])
    """
    canonical = to_canonical_digits(images)
    return (canonical.flatten(1) > level).float().mean(dim=1)


def rank_by_score(scores: Tensor) -> list[int]:
    """Competition ranks of scores, 1 for the highest; equal scores share a rank (a tie).

    Example:
        >>> rank_by_score(torch.tensor([0.2, 0.5, 0.2, 0.1]))
        [2, 1, 2, 4]
    """
    values = scores.tolist()
    return [1 + sum(other > value for other in values) for value in values]


def _prompt_list(seed: int, count: int) -> list[str]:
    captions = [caption for digit in range(10) for caption in digit_captions(digit)]
    generator = torch.Generator().manual_seed(seed)
    cycles = math.ceil(count / len(captions))
    order = torch.cat([torch.randperm(len(captions), generator=generator) for _ in range(cycles)])
    return [captions[i] for i in order[:count].tolist()]


def _write_split(
    directory: Path,
    split: str,
    policy: nn.Module,
    num_groups: int,
    settings: Mapping[str, Any],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torchvision.utils import save_image

    per_group = settings["generations_per_prompt"]
    prompts = _prompt_list(derive_seed(settings["seed"], _SPLIT_SEEDS[split]), num_groups)
    rows: dict[str, list[Any]] = {"image_path": [], "prompt_id": [], "prompt": [], "rank": [], "rule_score": []}
    groups_per_batch = max(1, settings["batch_size"] // per_group)
    for start in range(0, num_groups, groups_per_batch):
        group_prompts = prompts[start : start + groups_per_batch]
        batch = [prompt for prompt in group_prompts for _ in range(per_group)]
        generator = torch.Generator(policy.device).manual_seed(
            derive_seed(settings["seed"], _SPLIT_SEEDS[split], start)
        )
        with torch.no_grad():
            images = (
                policy.sample(
                    batch,
                    num_steps=settings["num_steps"],
                    eta=settings["eta"],
                    guidance_scale=settings["guidance_scale"],
                    generator=generator,
                )
                .images.float()
                .cpu()
            )
        scores = stroke_thickness(images)
        for offset, prompt in enumerate(group_prompts):
            prompt_id = f"{split}_{start + offset:05d}"
            rows_of_group = slice(offset * per_group, (offset + 1) * per_group)
            ranks = rank_by_score(scores[rows_of_group])
            for k, (image, score, rank) in enumerate(
                zip(images[rows_of_group], scores[rows_of_group].tolist(), ranks, strict=True)
            ):
                path = f"images/{split}/{prompt_id}/{k}.png"
                (directory / path).parent.mkdir(parents=True, exist_ok=True)
                save_image(image, directory / path)
                for key, value in zip(rows, (path, prompt_id, prompt, rank, score), strict=True):
                    rows[key].append(value)
    pq.write_table(pa.table(rows), directory / PARQUET_FILES[split])


def build_digits_preference_db(
    directory: str | Path,
    policy: nn.Module | None = None,
    groups: Mapping[str, int] = DEFAULT_GROUPS,
    generations_per_prompt: int = 8,
    num_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
) -> Path:
    """Sample, rank by :func:`stroke_thickness` and write the dataset (see the module docstring).

    Args:
        directory: Output folder (created; existing split files are overwritten).
        policy: The generator; ``None`` is the shipped digits model without LoRA.
        groups: Prompt groups per split, for ``"train"``, ``"validation"`` and ``"test"``.
        generations_per_prompt: Ranked images per prompt group (ImageRewardDB: 4 to 9).
        num_steps: DDIM steps.
        eta: DDIM noise weight.
        guidance_scale: Classifier-free guidance weight.
        seed: Seed of the prompts and the noise (each split and batch derives its own).
        batch_size: Images sampled per call.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.
    """
    missing = [split for split in PARQUET_FILES if split not in groups]
    if missing or any(count < 1 for count in groups.values()):
        raise ValueError(
            f"groups={dict(groups)}; expected a positive number of prompt groups for {list(PARQUET_FILES)}"
        )
    if generations_per_prompt < 2:
        raise ValueError(f"generations_per_prompt={generations_per_prompt}; a ranking needs at least 2 images")
    if policy is None:
        from lightning_sdrl.digits.policy import DigitsPolicy

        policy = DigitsPolicy(lora=None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {
        "rule": f"stroke_thickness(level={THICKNESS_LEVEL})",
        "groups": {split: int(groups[split]) for split in PARQUET_FILES},
        "generations_per_prompt": generations_per_prompt,
        "num_steps": num_steps,
        "eta": eta,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "batch_size": batch_size,
    }
    was_training = policy.training
    policy.eval()
    try:
        for split in PARQUET_FILES:
            _write_split(directory, split, policy, settings["groups"][split], settings)
    finally:
        policy.train(was_training)
    (directory / INFO_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return directory


class DigitsPreferenceDataModule(ImageRewardDataModule):
    """The hidden-rule digits preferences, built on first use, read as ImageRewardDB.

    ``prepare_data`` (once per machine) builds the dataset into ``data_dir`` with
    :func:`build_digits_preference_db` when ``data_dir`` holds no metadata yet; a ``data_dir``
    built with other settings is an error rather than silently reused.

    Args:
        data_dir: Folder of the dataset (built there if empty).
        groups: Prompt groups per split.
        generations_per_prompt: Ranked images per prompt group.
        num_steps: DDIM steps of the generating model.
        guidance_scale: Guidance of the generating model.
        seed: Seed of the prompts and noise.
        batch_size: Comparisons per batch, per device.
        num_workers: DataLoader processes.
        cache_path: ``.pt`` file caching the embeddings across runs (``None``: in memory).
        encoder: Frozen encoder; ``None`` uses the LightningModule's ``embedder``.
    """

    def __init__(
        self,
        data_dir: str = "runs/digits_preferences",
        groups: dict[str, int] | None = None,
        generations_per_prompt: int = 8,
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 0,
        cache_path: str | None = None,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__(
            data_dir, batch_size=batch_size, num_workers=num_workers, layout="parquet",
            cache_path=cache_path, encoder=encoder,
        )  # fmt: skip
        self.build_args: dict[str, Any] = {
            "groups": dict(DEFAULT_GROUPS if groups is None else groups),
            "generations_per_prompt": generations_per_prompt,
            "num_steps": num_steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
        }

    def prepare_data(self) -> None:
        """Build the dataset if ``data_dir`` has none; check the settings of an existing one."""
        info = self.data_dir / INFO_FILE
        if not info.is_file():
            build_digits_preference_db(self.data_dir, **self.build_args)
            return
        built = json.loads(info.read_text())
        differing = {key: (built.get(key), value) for key, value in self.build_args.items() if built.get(key) != value}
        if differing:
            raise ValueError(
                f"{self.data_dir} holds a digits preference dataset built with other settings "
                f"(built, asked: {differing}); delete the folder to rebuild it or set another data_dir"
            )

    def rule_scores(self, split: Split) -> dict[str, float]:
        """The hidden rule's score of every image of a split, by image path (for reports)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.metadata_file(split), columns=["image_path", "rule_score"]).to_pydict()
        return dict(zip(table["image_path"], table["rule_score"], strict=True))
