"""Short version of benchmarks/digits_refl.py: hidden-rule preferences -> reward model -> ReFL."""

from pathlib import Path

import pytest
import torch

from lightning_sdrl.cli import run_cli as main
from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.digits.preferences import stroke_thickness
from lightning_sdrl.rewards.reward_model import PretrainedPreferenceReward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("digits_reward_model")
    run = main(
        [
            "fit",
            "-c",
            str(ROOT / "configs/digits/reward_model.yaml"),
            f"--data.init_args.data_dir={work / 'preferences'}",
            "--data.init_args.groups={train: 24, validation: 8, test: 8}",
            "--data.init_args.num_steps=10",
            f"--trainer.default_root_dir={work}",
            f"--model.init_args.export_dir={work / 'head'}",
            "--trainer.max_epochs=15",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return run, work


def test_reward_model_learns_the_hidden_rule(reward_run):
    run, work = reward_run
    assert run.trainer.checkpoint_callback.best_model_score > 0.8
    test = run.trainer.test(run.model, datamodule=run.datamodule, ckpt_path="best", verbose=False)[0]
    assert test["test/accuracy"] > 0.8
    # the documented command: `test` in a new CLI on the best checkpoint the fit wrote
    best = work / "checkpoints" / "best.ckpt"
    assert best.is_file() and run.trainer.checkpoint_callback.best_model_path == str(best)
    again = main(
        [
            "test",
            "-c",
            str(ROOT / "configs/digits/reward_model.yaml"),
            f"--data.init_args.data_dir={work / 'preferences'}",
            "--data.init_args.groups={train: 24, validation: 8, test: 8}",
            "--data.init_args.num_steps=10",
            f"--trainer.default_root_dir={work / 'test'}",
            "--model.init_args.export_dir=null",
            "--trainer.enable_progress_bar=false",
            f"--ckpt_path={best}",
        ]
    )
    assert again.trainer.callback_metrics["test/accuracy"].item() == pytest.approx(test["test/accuracy"])
    # the exported head is the best checkpoint's, and it ranks thicker digits higher
    reward = PretrainedPreferenceReward(str(work / "head"))
    thin, bold = torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    thin[..., 3:13, 7:9] = 1.0
    bold[..., 3:13, 5:11] = 1.0
    with torch.no_grad():
        assert (reward(bold, ["a handwritten one"] * 2) > reward(thin, ["a handwritten one"] * 2)).all()


def test_refl_with_the_learned_reward_raises_the_rule_score(reward_run, tmp_path):
    _, work = reward_run
    run = main(
        [
            "fit",
            "-c",
            str(ROOT / "configs/digits/refl.yaml"),
            f"--model.init_args.reward.init_args.directory={work / 'head'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=3",
            "--data.init_args.num_batches_per_epoch=6",
            "--data.init_args.batch_size=8",
            # a short run: a higher lr and the report's beta (0.01) so that 3 small epochs move it
            "--model.init_args.optimizer.init_args.lr=0.005",
            "--model.init_args.kl_weight=0.01",
            "--trainer.enable_progress_bar=false",
        ]
    )
    module = run.model
    # what a user gets from `fit`: the LoRA, a checkpoint, the metrics, before/after grids, the curve
    for name in (
        "trained/pytorch_lora_weights.safetensors",
        "checkpoints/last.ckpt",
        "metrics.csv",
        "rewards.json",
        "samples_before.png",
        "samples_after.png",
        "reward_curve.png",
    ):
        assert (tmp_path / name).is_file(), name
    prompts = [f"a handwritten {w}" for w in ("zero", "one", "four", "seven")] * 4
    batch = PromptBatch(prompts, torch.zeros(len(prompts), dtype=torch.long), seed=5)

    def measure():
        images = module.sample(batch).images
        with torch.no_grad():
            return stroke_thickness(images).mean(), module.reward(images, prompts).mean()

    rule_after, reward_after = measure()
    with torch.no_grad(), module.policy.reference():
        rule_before, reward_before = measure()
    print("rule", rule_before, rule_after, "reward", reward_before, reward_after)
    assert reward_after > reward_before + 0.3, (reward_before, reward_after)
    assert rule_after > rule_before, (rule_before, rule_after)
