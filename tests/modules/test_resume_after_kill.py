"""A run killed with SIGKILL and resumed from its last checkpoint ends exactly where the uninterrupted run does.

Three runs: DDPO on the tiny config, Flow-GRPO on the flow-matching digits model (its shipped
config, shrunk to seconds as the config round-trip test does it), and DiffusionNFT on the tiny SD3
(its old policy is part of the checkpoint).
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_config_roundtrip import shrink

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def fit(config: str, run: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "lightning_sdrl", "fit", "-c", config,
        f"--trainer.default_root_dir={run}", "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning_sdrl.loggers.RunCSVLogger",
        "--trainer.callbacks+=tests.helpers.RecordUpdates", f"--trainer.callbacks.out_dir={run / 'updates'}", *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def grpo_flow_digits(directory: Path) -> str:
    """configs/digits/grpo_shift.yaml (Flow-GRPO, flow-matching digits model), shrunk, validating never."""
    config = shrink("digits/grpo_shift.yaml")
    config["trainer"].update(limit_val_batches=0, check_val_every_n_epoch=None)
    path = directory / "grpo_shift.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("algorithm", ["ddpo_tiny", "grpo_flow_digits", "nft_tiny_sd3"])
def test_kill_9_then_resume_reproduces_the_uninterrupted_run_exactly(algorithm, tmp_path):
    configs = {"ddpo_tiny": "configs/tiny/ddpo.yaml", "nft_tiny_sd3": "configs/tiny/nft_sd3.yaml"}
    config = configs[algorithm] if algorithm in configs else grpo_flow_digits(tmp_path)
    whole = fit(config, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = fit(
        config, tmp_path / "killed", "--trainer.callbacks+=tests.helpers.KillAtEpoch", "--trainer.callbacks.epoch=2"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "trained").exists()  # it died before the end
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1  # two epochs done

    resumed = fit(config, tmp_path / "killed", f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(tmp_path / "whole" / "trained" / "pytorch_lora_weights.safetensors")
    actual = load_file(tmp_path / "killed" / "trained" / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

    # every epoch's samples (image sums), rewards and advantages, before and after the kill
    def updates(run):
        return {p.name: json.loads(p.read_text()) for p in sorted((run / "updates").glob("*.json"))}

    assert len(updates(tmp_path / "whole")) == 4
    assert updates(tmp_path / "killed") == updates(tmp_path / "whole")

    # the metrics log continues: the same rows as the uninterrupted run, epoch by epoch
    def rows(run):
        return [
            (r["epoch"], r["train/reward_mean"], r["train/loss"]) for r in csv.DictReader((run / "metrics.csv").open())
        ]

    assert rows(tmp_path / "killed") == rows(tmp_path / "whole")
