"""A run killed with SIGKILL and resumed from its last checkpoint ends exactly where the uninterrupted run does."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def fit(run: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "lightning_sdrl", "fit", "-c", "configs/tiny/ddpo.yaml",
        f"--trainer.default_root_dir={run}", "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning_sdrl.loggers.RunCSVLogger", "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_on_train_epoch_end=true", *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def test_kill_9_then_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    whole = fit(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = fit(tmp_path / "killed", "--trainer.callbacks+=tests.helpers.KillAtEpoch", "--trainer.callbacks.epoch=2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "trained").exists()  # it died before the end
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1  # two epochs done

    resumed = fit(tmp_path / "killed", f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(tmp_path / "whole" / "trained" / "pytorch_lora_weights.safetensors")
    actual = load_file(tmp_path / "killed" / "trained" / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

    # the metrics log continues: the same rows as the uninterrupted run, epoch by epoch
    def rows(run):
        return [
            (r["epoch"], r["train/reward_mean"], r["train/loss"]) for r in csv.DictReader((run / "metrics.csv").open())
        ]

    assert rows(tmp_path / "killed") == rows(tmp_path / "whole")
