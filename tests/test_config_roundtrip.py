"""Every shipped CPU config round-trips through the command line: fit, validate its checkpoint, resume it.

Each config in ``configs/tiny/`` and ``configs/digits/`` (new ones included automatically) is
shrunk to seconds by rewriting its sizes (batches, samples, epochs or steps: :func:`shrink`), then
run as a user would, through :func:`lightning_sdrl.cli.main`, the console script's entry point:

1. ``fit`` one short epoch; it leaves ``checkpoints/last.ckpt``;
2. ``validate --ckpt_path last.ckpt``;
3. ``fit --ckpt_path last.ckpt`` one epoch further.

A checkpoint whose saved hyper-parameters its own class refuses (GRPO's once did) fails 2 and 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_sdrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIGS = sorted([*(ROOT / "configs" / "tiny").glob("*.yaml"), *(ROOT / "configs" / "digits").glob("*.yaml")])

SMALL = {
    "batch_size": 8,
    "train_batch_size": 8,
    "val_batch_size": 8,
    "val_samples_per_prompt": 4,
    "group_size": 4,
    "num_batches_per_epoch": 1,
    "eval_samples": 8,
    "summary_samples": 8,
    "num_samples": 8,
    "generations_per_prompt": 2,
}
"""Sizes lowered to these values wherever a config sets them higher (any class's ``init_args``)."""

EXTRA: dict[str, dict[str, Any]] = {
    # the preference data module samples 320 groups unless told fewer
    "digits/reward_model.yaml": {"data": {"groups": {"train": 4, "validation": 2, "test": 2}}},
}
"""Per-config additions to ``init_args`` (section -> arguments), where a size has no common name."""

NEEDS = {"digits/refl.yaml": "digits/reward_model.yaml"}
"""Configs that read what another config's run writes (ReFL reads the exported reward head)."""


def _shrink_arguments(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: min(value, SMALL[key]) if key in SMALL and isinstance(value, int) else _shrink_arguments(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_shrink_arguments(item) for item in node]
    return node


def shrink(name: str) -> dict[str, Any]:
    """The config ``configs/<name>`` with every size small and one short epoch (or two optimiser steps)."""
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    config = {key: _shrink_arguments(value) if key != "trainer" else value for key, value in config.items()}
    trainer = config["trainer"]
    trainer["callbacks"] = _shrink_arguments(trainer.get("callbacks", []))
    if "max_steps" in trainer:
        trainer["max_steps"] = 2
    trainer.update(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, check_val_every_n_epoch=1, enable_progress_bar=False
    )
    for section, arguments in EXTRA.get(name, {}).items():
        config[section].setdefault("init_args", {}).update(arguments)
    return config


def further(config: dict[str, Any]) -> list[str]:
    """Overrides that continue a run one epoch (or two optimiser steps) past :func:`shrink`'s."""
    if "max_steps" in config["trainer"]:
        return ["--trainer.max_steps=4", "--trainer.max_epochs=-1"]  # step-counted: the steps end it
    return ["--trainer.max_epochs=2"]


def fit_short(name: str, directory: Path) -> tuple[Path, dict[str, Any]]:
    """Write the shrunk config to ``directory`` and fit it there; returns the config's path and content."""
    config = shrink(name)
    path = directory / name.replace("/", "_")
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path), "--cpu_threads=1"]) is None
    return path, config


@pytest.mark.parametrize("name", [str(p.relative_to(ROOT / "configs")) for p in CPU_CONFIGS])
def test_fit_then_validate_and_resume_from_the_checkpoint_through_the_cli(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative run folders land here
    threads = torch.get_num_threads()
    try:
        if name in NEEDS:
            fit_short(NEEDS[name], tmp_path)
        path, config = fit_short(name, tmp_path)
        root = Path(config["trainer"]["default_root_dir"])
        checkpoints = [p for p in tmp_path.rglob("last.ckpt") if root in p.relative_to(tmp_path).parents]
        assert len(checkpoints) == 1, f"{name}: expected one last.ckpt under {root}, found {checkpoints}"
        last = checkpoints[0]
        saved = torch.load(last, weights_only=False)
        assert saved["epoch"] == 0

        assert main(["validate", "-c", str(path), f"--ckpt_path={last}", "--cpu_threads=1"]) is None
        assert main(["fit", "-c", str(path), f"--ckpt_path={last}", "--cpu_threads=1", *further(config)]) is None
        resumed = torch.load(last, weights_only=False)  # it went on, from the checkpoint
        assert resumed["global_step"] > saved["global_step"] and resumed["epoch"] >= 1
    finally:
        torch.set_num_threads(threads)


def test_every_cpu_config_is_covered():
    names = {str(p.relative_to(ROOT / "configs")) for p in CPU_CONFIGS}
    assert {"tiny/ddpo.yaml", "tiny/grpo_sd3.yaml", "digits/grpo_shift.yaml", "digits/pretrain_flow.yaml"} <= names
    assert set(NEEDS) | set(NEEDS.values()) | set(EXTRA) <= names
