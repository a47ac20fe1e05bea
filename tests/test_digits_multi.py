"""Short versions of the multi-prompt and two-attribute digits runs (long: benchmarks/digits_debias_multi.py)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_sdrl.callbacks import classified_ratio, prompt_kl
from lightning_sdrl.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
FAST = [  # Adam at a large rate on small batches moves the prompts in a few cheap epochs
    "--model.init_args.optimizer=torch.optim.AdamW",
    "--model.init_args.optimizer.lr=0.03",
    "--model.init_args.lr_scheduler=null",
    "--model.init_args.max_grad_norm=1.0",
    "--model.init_args.train_batch_size=32",
    "--model.init_args.timestep_fraction=1.0",
]


def fit(config: str, tmp_path: Path, epochs: int, eval_samples: int, *extra: str, summary_samples: int = 32, fast=True):
    """Fit a shipped config for a few epochs, its AttributeTracker with fewer fixed-noise samples.

    ``fast`` swaps in :data:`FAST`'s optimiser; otherwise the config's own trains.
    """
    settings = yaml.safe_load((ROOT / "configs" / "digits" / config).read_text())
    tracker = next(c for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("AttributeTracker"))
    tracker["init_args"].update(eval_samples=eval_samples, summary_samples=summary_samples, num_grid_images=8)
    path = tmp_path / config
    path.write_text(yaml.safe_dump(settings))
    result = run_cli(
        [
            "fit",
            "-c",
            str(path),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.max_epochs={epochs}",
            "--trainer.enable_progress_bar=false",
            *(FAST if fast else ()),
            *extra,
        ]
    )
    return result, json.loads((tmp_path / "attributes.json").read_text())["history"]


def test_multi_prompt_balance_moves_every_prompt_towards_its_own_balance(tmp_path):
    _, history = fit(
        "ddpo_balance_multi.yaml",
        tmp_path,
        4,
        64,
        "--data.init_args.batch_size=64",
        "--data.init_args.group_size=32",
    )
    assert (tmp_path / "attributes_per_prompt.png").stat().st_size > 0
    columns = {"a digit with a loop": "6+8+9", "an even digit": "4"}
    for prompt, column in columns.items():
        shares = [record["prompt_eval_shares"][prompt] for record in history]
        assert set(shares[0]) == {list(shares[0])[0], column, "None"}
        q = [classified_ratio(s, column) for s in shares]
        kl = [prompt_kl(s) for s in shares]
        assert q[0] < 0.4, (prompt, q)  # the shipped model's bias on both prompts
        assert max(q[1:]) > q[0] + 0.1 and min(kl[1:]) < kl[0], (prompt, q, kl)
        # the fairness bias the tracker records: two classes, so |f_a - f_b| = |1 - 2 q|
        bias = [record["prompt_eval_bias"][prompt] for record in history]
        assert bias == pytest.approx([abs(1 - 2 * value) for value in q])
        assert min(bias[1:]) < bias[0]


def test_joint_balance_run_scores_the_joint_classes_of_digit_and_thickness(tmp_path):
    from lightning_sdrl.digits.classifier import DigitsClassifier
    from lightning_sdrl.digits.thickness import StrokeThicknessClassifier
    from lightning_sdrl.functional.classifier_rewards import group_probabilities, joint_balance_reward

    result, history = fit(
        "ddpo_balance_joint.yaml",
        tmp_path,
        1,
        16,
        "--data.init_args.batch_size=32",
    )
    names = ["0 & thin", "0 & bold", "6+8+9 & thin", "6+8+9 & bold", "None"]
    assert list(history[0]["shares"]) == list(history[0]["eval_shares"]) == names
    # the epoch's rewards are eq. (2)-(3) over the 4 joint classes, computed here from the judges
    update = result.model.last_update
    digit = group_probabilities(DigitsClassifier()(update.images), [[0], [6, 8, 9]])
    thickness = StrokeThicknessClassifier()(update.images)
    expected = joint_balance_reward([digit, thickness], 0.7, shaping="expected_log_ratio")
    torch.testing.assert_close(update.rewards, expected)


JOINT_CLASSES = ["0 & thin", "0 & bold", "6+8+9 & thin", "6+8+9 & bold"]


def test_a_short_joint_run_moves_every_joint_class_towards_its_target(tmp_path):
    """The shipped joint config, its own optimiser, 6 epochs: each of the 4 pairs ends closer to 25% of the
    classified images on the same 256 noises drawn before and after (paired), and the joint bias falls."""
    from lightning_sdrl.functional.metrics import pairwise_bias

    fit("ddpo_balance_joint.yaml", tmp_path, 6, 16, summary_samples=256, fast=False)
    summary = json.loads((tmp_path / "attributes.json").read_text())

    def classified(shares):
        return torch.tensor([shares[name] for name in JOINT_CLASSES]) / (1 - shares["None"])

    before, after = classified(summary["before"]), classified(summary["after"])
    assert ((after - 0.25).abs() < (before - 0.25).abs()).all(), (before, after)
    assert pairwise_bias(after) < pairwise_bias(before) - 0.05, (before, after)
