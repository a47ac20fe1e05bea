"""Short versions of the digits debiasing experiments (the long ones: benchmarks/digits_debias.py)."""

import json
from pathlib import Path

from lightning_sdrl.callbacks import classified_ratio
from lightning_sdrl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, tmp_path: Path, epochs: int, *extra: str) -> list[dict]:
    main(
        [
            "fit",
            "-c",
            str(ROOT / "configs" / "digits" / config),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.max_epochs={epochs}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )
    summary = json.loads((tmp_path / "attributes.json").read_text())
    assert (tmp_path / "attributes.png").is_file() and (tmp_path / "samples_after.png").is_file()
    assert (tmp_path / "trained" / "pytorch_lora_weights.safetensors").is_file()
    return summary["history"]


def test_balance_reward_moves_the_biased_prompt_towards_balance(tmp_path):
    # The shipped run (SGD, 128 samples per epoch, 30 epochs; benchmarks/digits_debias.py) only
    # starts to move in 4 epochs; Adam at a large rate on 64 samples moves it in 4 cheap ones.
    history = run(
        "ddpo_balance.yaml",
        tmp_path,
        4,
        "--model.init_args.optimizer=torch.optim.AdamW",
        "--model.init_args.optimizer.lr=0.03",
        "--model.init_args.lr_scheduler=null",
        "--model.init_args.max_grad_norm=1.0",
        "--data.init_args.batch_size=64",
        "--model.init_args.train_batch_size=32",
        "--model.init_args.timestep_fraction=1.0",
    )
    ratios = [classified_ratio(r["shares"], "6+8+9") for r in history]
    assert ratios[0] < 0.3  # the shipped model's bias: "a digit with a loop" is mostly zeros
    assert max(ratios[1:]) > ratios[0] + 0.15, ratios


def test_shift_reward_raises_the_under_represented_class(tmp_path):
    history = run("ddpo_shift.yaml", tmp_path, 5, "--model.init_args.optimizer.init_args.lr=0.03")
    rewards = [r["reward_mean"] for r in history]
    assert history[0]["shares"]["6"] < 0.05
    assert rewards[-1] > rewards[0] + 0.1, rewards


def test_grpo_shift_raises_the_under_represented_class_of_the_flow_model(tmp_path):
    # configs/digits/grpo_shift.yaml (Flow-GRPO on the flow-matching digits model) in 4 epochs
    history = run("grpo_shift.yaml", tmp_path, 4, "--model.init_args.optimizer.init_args.lr=0.05")
    rewards = [r["reward_mean"] for r in history]
    assert history[0]["shares"]["6"] < 0.1  # the shipped flow model's bias: "a round digit" is zeros
    assert rewards[-1] > rewards[0] + 0.1, rewards


def test_grpo_balance_moves_the_flow_models_biased_prompt_towards_balance(tmp_path):
    # configs/digits/grpo_balance.yaml on 64 samples per epoch at a larger rate, 4 epochs
    history = run(
        "grpo_balance.yaml",
        tmp_path,
        4,
        "--model.init_args.optimizer.init_args.lr=0.03",
        "--model.init_args.lr_scheduler=null",
        "--data.init_args.batch_size=64",
        "--data.init_args.group_size=64",
        "--model.init_args.train_batch_size=32",
    )
    ratios = [classified_ratio(r["shares"], "6+8+9") for r in history]
    assert ratios[0] < 0.35  # "a digit with a loop" is mostly zeros
    assert max(ratios[1:]) > ratios[0] + 0.15, ratios
