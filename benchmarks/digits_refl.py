"""Reward model from hidden-rule preferences, then ReFL with it, on the digits default.

The chain of the reward-model report (docs/references.md) in miniature:

1. ``configs/digits/reward_model.yaml``: build the hidden-rule preference dataset (8 generations
   per prompt group ranked by stroke thickness), train the report's MLP head on DigitsEmbedder
   embeddings with the pairwise loss, keep the head best on the validation pairs, and report its
   preference accuracy on the held-out test pairs (target >= 90%);
2. ``configs/digits/refl.yaml``: ReFL with that learned reward;
3. before / after (LoRA off / on, same prompts and noise): the hidden rule's score, the learned
   reward, and whether the digit classifier still recognises the prompt's digit.

    python benchmarks/digits_refl.py [--out docs] [--work runs/digits_refl_benchmark] [--kl-weights 0.01 0.1 1.0]

Prints the table and writes ``digits_refl.json`` and before/after grids into ``--out``;
``--kl-weights`` also runs ReFL with other KL weights (beta of eq. 5) and prints the trade-off.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_sdrl.cli import run_cli as cli
from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.digits.captions import DIGIT_WORDS
from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.digits.preferences import stroke_thickness

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_DIGIT = 32


def train_reward_model(work: Path) -> dict:
    """Fit the head (building the dataset first), test the best checkpoint on held-out pairs."""
    start = time.perf_counter()
    run = cli(
        [
            "fit",
            "-c",
            str(ROOT / "configs/digits/reward_model.yaml"),
            f"--data.init_args.data_dir={work / 'preferences'}",
            f"--trainer.default_root_dir={work / 'reward_model'}",
            f"--model.init_args.export_dir={work / 'reward_model' / 'head'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    seconds = time.perf_counter() - start
    best = run.trainer.checkpoint_callback
    test = run.trainer.test(run.model, datamodule=run.datamodule, ckpt_path="best", verbose=False)[0]
    pairs = {split: len(run.datamodule.datasets[split]) for split in ("train", "validation")}
    return {
        "val_accuracy": float(best.best_model_score),
        "test_accuracy": test["test/accuracy"],
        "test_pairs": len(run.datamodule.datasets["test"]),
        "pairs": pairs,
        "seconds": seconds,
        "head": str(work / "reward_model" / "head"),
    }


def evaluate(module, seed: int = 123) -> dict:
    """Rule score, learned reward and classifier agreement of fixed-noise samples of every digit."""
    classifier = DigitsClassifier()
    prompts = [f"a handwritten {word}" for word in DIGIT_WORDS for _ in range(SAMPLES_PER_DIGIT)]
    labels = torch.arange(10).repeat_interleave(SAMPLES_PER_DIGIT)
    batch = PromptBatch(prompts, torch.zeros(len(prompts), dtype=torch.long), seed=seed)
    images = module.sample(batch).images.float()
    with torch.no_grad():
        probs = classifier(images)
        learned = module.reward(images, prompts)
    confidence, predicted = probs.max(dim=1)
    return {
        "rule_score": float(stroke_thickness(images).mean()),
        "learned_reward": float(learned.mean()),
        "classifier_agreement": float((predicted == labels).float().mean()),
        "confident_agreement": float(((predicted == labels) & (confidence >= 0.7)).float().mean()),
        "images": images[:: SAMPLES_PER_DIGIT // 2].cpu(),  # two per digit, for the grid
    }


def refl(work: Path, head: str, kl_weight: float | None = None) -> dict:
    """ReFL with ``configs/digits/refl.yaml`` (``kl_weight`` overrides its beta); before/after."""
    start = time.perf_counter()
    extra = [] if kl_weight is None else [f"--model.init_args.kl_weight={kl_weight}"]
    name = "refl" if kl_weight is None else f"refl_kl{kl_weight:g}"
    run = cli(
        [
            "fit",
            "-c",
            str(ROOT / "configs/digits/refl.yaml"),
            f"--model.init_args.reward.init_args.directory={head}",
            f"--trainer.default_root_dir={work / name}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )
    seconds = time.perf_counter() - start
    module = run.model
    after = evaluate(module)
    with torch.no_grad(), module.policy.reference():
        before = evaluate(module)
    return {"kl_weight": module.settings.kl_weight, "before": before, "after": after, "seconds": seconds}


def table(reward_model: dict, result: dict) -> str:
    before, after = result["before"], result["after"]
    rows = [
        "| reward model | held-out pairs | preference accuracy (test) | best validation accuracy | fit time |",
        "| --- | --- | --- | --- | --- |",
        f"| MLP head on DigitsEmbedder (8x8 pixels + text) | {reward_model['test_pairs']} | "
        f"{100 * reward_model['test_accuracy']:.1f}% | {100 * reward_model['val_accuracy']:.1f}% | "
        f"{reward_model['seconds']:.0f} s (incl. building the dataset) |",
        "",
        "| ReFL, 'a handwritten <digit>' x 32 per digit | before | after |",
        "| --- | --- | --- |",
        f"| hidden rule: stroke thickness (share of ink pixels) | {before['rule_score']:.3f} | "
        f"{after['rule_score']:.3f} |",
        f"| learned reward (standardised) | {before['learned_reward']:+.2f} | {after['learned_reward']:+.2f} |",
        f"| classifier recognises the prompt's digit | {100 * before['classifier_agreement']:.1f}% | "
        f"{100 * after['classifier_agreement']:.1f}% |",
        f"| ... with confidence >= 0.7 | {100 * before['confident_agreement']:.1f}% | "
        f"{100 * after['confident_agreement']:.1f}% |",
        f"| ReFL wall time | | {result['seconds']:.0f} s |",
    ]
    return "\n".join(rows)


def sweep_table(results: list[dict]) -> str:
    """One row per ReFL run: the KL weight's trade-off between rule score and recognisability."""
    rows = [
        "| kl_weight (beta) | stroke thickness before -> after | learned reward after | recognised after "
        "| ... confidence >= 0.7 | ReFL wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in sorted(results, key=lambda r: r["kl_weight"]):
        before, after = result["before"], result["after"]
        rows.append(
            f"| {result['kl_weight']:g} | {before['rule_score']:.3f} -> {after['rule_score']:.3f} | "
            f"{after['learned_reward']:+.2f} | {100 * after['classifier_agreement']:.1f}% | "
            f"{100 * after['confident_agreement']:.1f}% | {result['seconds']:.0f} s |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "digits_refl_benchmark")
    parser.add_argument(
        "--kl-weights",
        type=float,
        nargs="*",
        default=[],
        help="also run ReFL with these kl_weight values and print the trade-off table",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    reward_model = train_reward_model(args.work)
    result = refl(args.work, reward_model["head"])
    from torchvision.utils import save_image

    for name in ("before", "after"):
        save_image(result[name].pop("images"), args.out / "figures" / f"digits_refl_samples_{name}.png", nrow=10)
    sweep = [refl(args.work, reward_model["head"], kl_weight) for kl_weight in args.kl_weights]
    for run in sweep:
        for name in ("before", "after"):
            run[name].pop("images")
    text = table(reward_model, result)
    if sweep:
        text += "\n\n" + sweep_table([result, *sweep])
    print(text)
    summary = {"reward_model": reward_model, "refl": result, "kl_sweep": sweep}
    (args.out / "digits_refl.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
