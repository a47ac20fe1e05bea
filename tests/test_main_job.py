"""README's main job as a user runs it: fit, then `validate` on its checkpoint, then the LoRA reloaded.

A short version (2 of the 30 epochs) of ``python -m lightning_sdrl fit -c configs/digits/ddpo_balance.yaml``
through the command line in subprocesses, as a fresh shell would run it.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits/ddpo_balance.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

RELOAD = """
import json, sys, torch
from lightning_sdrl.policies import LoRASettings
from lightning_sdrl.digits.policy import DigitsPolicy
from lightning_sdrl.rewards.attribute import BalanceReward, attribute_shares
from lightning_sdrl.digits.classifier import DigitsClassifier

run = sys.argv[1]
policy = DigitsPolicy(lora=LoRASettings(rank=4))
policy.load_trained(run + "/trained")
policy.eval()
# the AttributeTracker's "after" samples: 256 images of the prompt from noise seed 1234
generator = torch.Generator().manual_seed(1234)
images = policy.sample(["a digit with a loop"] * 256, num_steps=20, eta=1.0, guidance_scale=1.5,
                       generator=generator).images
reward = BalanceReward(DigitsClassifier(), threshold=0.7, groups=[[0], [6, 8, 9]])
with torch.no_grad():
    shares = attribute_shares(reward.attribute_probs(images), 0.7).tolist()
print(json.dumps(shares))
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_sdrl", *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits_balance")
    result = cli(
        "fit",
        "-c",
        CONFIG,
        f"--trainer.default_root_dir={run}",
        "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=2",
        "--trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_main_job_writes_a_checkpoint_a_metrics_row_per_epoch_and_readable_figures(main_job):
    run, result = main_job
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    train = [r for r in rows if r["train/reward_mean"]]
    assert [int(r["epoch"]) for r in train] == [0, 1]  # log_every_n_steps does not hide epochs
    summary = json.loads((run / "attributes.json").read_text())
    logged = [float(r["train/reward_mean"]) for r in train]
    assert [r["reward_mean"] for r in summary["history"]] == pytest.approx(logged)
    assert summary["summary_samples"] == 256 and summary["prompt"] == "a digit with a loop"
    assert "before fine-tuning (256 fixed-noise samples)" in result.stderr + result.stdout
    for line in ("Found", "litlogger"):
        assert line not in result.stderr + result.stdout


def test_validate_on_the_written_checkpoint_reproduces_the_fit_validation(main_job):
    run, _ = main_job
    result = cli(
        "validate",
        "-c",
        CONFIG,
        f"--trainer.default_root_dir={run}",
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "--trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    values = [float(r["val/reward_mean"]) for r in rows if r["val/reward_mean"]]
    # one value from the end of fit, one appended by validate: the same policy on the same noise
    assert len(values) == 2 and values[0] == pytest.approx(values[1], abs=1e-6)
    assert "val/reward_mean" in result.stdout


def test_the_trained_lora_as_ckpt_path_is_a_clear_error(main_job):
    run, _ = main_job
    result = cli("validate", "-c", CONFIG, f"--ckpt_path={run / 'trained'}")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "is a trained-weights folder" in last and "checkpoints/last.ckpt" in last and "load_trained" in last


def test_the_trained_lora_reloads_in_a_fresh_process_and_samples_the_after_shares(main_job):
    run, _ = main_job
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(run)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shares = json.loads(result.stdout.strip().splitlines()[-1])
    after = json.loads((run / "attributes.json").read_text())["after"]
    assert shares == pytest.approx(list(after.values()), abs=1e-9)
