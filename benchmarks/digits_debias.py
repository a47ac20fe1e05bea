"""The experiments of sections IV-B/C of the debiasing paper (docs/references.md), in miniature.

Runs the shipped configs ``configs/digits/ddpo_shift.yaml`` (R_shift) and
``configs/digits/ddpo_balance.yaml`` (R_balance) from the pretrained digits model, then prints
one table:

- R_shift: the under-represented class's share at the start and at the end, and the first epoch
  at which it reaches 90% (target: from < 5% to >= 90% within 15 epochs);
- R_balance: q of eq. (2), the minority attribute's share among classified images, at the start
  and its mean / min / max over the last 10 epochs (target: 50 +- 7%), measured after every epoch
  on 512 samples drawn from the same noise each time (``AttributeTracker(eval_samples=512)``), so
  that the numbers follow the policy rather than the sampling noise of the training batch;
- sample quality: mean classifier confidence on the prompt's classes before and after (target:
  within 10%), and FID in the digit feature network's space against real digits of those classes.

    python benchmarks/digits_debias.py [--out docs] [--balance-seeds 0 1 2]

``--balance-seeds`` repeats the R_balance run with other seeds (``seed_everything`` and the
DataModule's noise seed); each gets its own row.

Writes ``digits_debias.json`` (every per-epoch share) and the plots / sample grids into ``--out``;
the prose and tables of ``docs/digits_debias.md`` are written from them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from lightning_sdrl.callbacks import AttributeTracker, classified_ratio
from lightning_sdrl.cli import run_cli as cli
from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.digits.features import DigitsFeatures
from lightning_sdrl.digits.reference import DigitsReference
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.rewards.attribute import attribute_shares

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {  # config, the prompt's classes, the minority column, fixed-noise samples per epoch
    "shift": ("configs/digits/ddpo_shift.yaml", [0, 6], "6", 0),
    "balance": ("configs/digits/ddpo_balance.yaml", [0, 6, 8, 9], "6+8+9", 512),
}


def with_eval_samples(config: str, eval_samples: int, directory: Path) -> Path:
    """A copy of ``config`` whose AttributeTracker also samples ``eval_samples`` fixed-noise images per epoch."""
    settings = yaml.safe_load((ROOT / config).read_text())
    for callback in settings["trainer"]["callbacks"]:
        if callback["class_path"].endswith("AttributeTracker"):
            callback.setdefault("init_args", {})["eval_samples"] = eval_samples
    path = directory / Path(config).name
    path.write_text(yaml.safe_dump(settings))
    return path


def sample_chunks(module, prompt: str, num: int, seed: int, chunk: int) -> Iterator[torch.Tensor]:
    """``num`` images of ``prompt`` from ``module``, ``chunk`` at a time; chunk ``i`` uses noise seed ``seed + i``."""
    for index, start in enumerate(range(0, num, chunk)):
        size = min(chunk, num - start)
        yield module.sample(PromptBatch([prompt] * size, torch.zeros(size, dtype=torch.long), seed=seed + index)).images


def quality(module, prompt: str, classes: list[int], num: int = 256, seed: int = 99) -> dict[str, float]:
    """Mean classifier confidence on ``classes``, the share the classifier calls "None" (confidence below
    0.7 on all of them) and feature FID against real digits of them."""
    classifier = DigitsClassifier()
    evaluation = GenerationMetrics(DigitsFeatures(), DigitsReference(split="test", classes=classes))
    confidences = []
    for images in sample_chunks(module, prompt, num, seed, 64):
        with torch.no_grad():
            probs = classifier(images)
        confidences.append(probs[:, classes].max(dim=1).values)
        evaluation.update(images)
    values = evaluation.compute()
    confidence = torch.cat(confidences)
    return {
        "confidence": float(confidence.mean()),
        "none": float((confidence < 0.7).float().mean()),
        "fid": float(values["fid"]),
    }


def fresh_ratio(tracker: AttributeTracker, module, prompt: str, column: str, num: int = 1024, seed: int = 7) -> float:
    """q of eq. (2) on ``num`` samples of fresh noise (not the tracker's fixed evaluation noise).

    One fixed noise set of a few hundred images reads the share with an offset of its own (a few
    points) in every epoch; this estimate of the final policy's q shows how large that offset is.
    """
    probs = [tracker.attribute_probs(module, images) for images in sample_chunks(module, prompt, num, seed, 256)]
    shares = attribute_shares(torch.cat(probs), tracker.threshold)
    names = tracker.column_names(module, len(shares) - 1)
    return classified_ratio(dict(zip(names, shares.tolist(), strict=True)), column)


def run(name: str, out: Path, seed: int | None = None) -> dict:
    """Fit experiment ``name`` (with ``seed`` instead of the config's, if given) and measure it."""
    config, classes, column, eval_samples = EXPERIMENTS[name]
    run_dir = out / f"runs_{name}" if seed is None else out / f"runs_{name}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    path = with_eval_samples(config, eval_samples, run_dir) if eval_samples else ROOT / config
    seeding = [] if seed is None else [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
    start = time.perf_counter()
    result = cli(
        [
            "fit",
            "-c",
            str(path),
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false",
            *seeding,
        ]
    )
    seconds = time.perf_counter() - start
    module, prompt = result.model, result.datamodule.prompts[0]
    summary = json.loads((run_dir / "attributes.json").read_text())
    shares = [record["shares"][column] for record in summary["history"]]
    ratios = [classified_ratio(record["shares"], column) for record in summary["history"]]
    eval_ratios = [
        classified_ratio(record["eval_shares"], column) for record in summary["history"] if "eval_shares" in record
    ]
    after = quality(module, prompt, classes)
    tracker = next(c for c in result.trainer.callbacks if isinstance(c, AttributeTracker))
    final_fresh_ratio = fresh_ratio(tracker, module, prompt, column) if eval_samples else None
    with torch.no_grad(), module.policy.reference():
        before = quality(module, prompt, classes)
    if seed is None:
        for figure in ("attributes.png", "samples_before.png", "samples_after.png"):
            shutil.copy(run_dir / figure, out / "figures" / f"digits_{name}_{figure}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "config": config,
        "seed": seed,
        "prompt": prompt,
        "column": column,
        "shares": shares,
        "ratios": ratios,
        "eval_ratios": eval_ratios,
        "eval_samples": eval_samples,
        "final_fresh_ratio": final_fresh_ratio,
        "seconds": seconds,
        "before": before,
        "after": after,
        "grid_before": summary["before"],
        "grid_after": summary["after"],
    }


def balance_row(balance: dict) -> str:
    """The R_balance table row: q at the start and at the end, and over the last 10 epochs."""
    q = balance["eval_ratios"] or balance["ratios"]
    last = q[-10:]
    held = all(abs(value - 0.5) <= 0.07 for value in last)
    seed = "" if balance["seed"] is None else f" (seed {balance['seed']})"
    return (
        f"| R_balance{seed}, '{balance['prompt']}', q = {balance['column']} among classified | "
        f"{100 * q[0]:.1f}% | {100 * q[-1]:.1f}% | 50 +- 7% over the last 10 epochs | "
        f"mean {100 * sum(last) / len(last):.1f}%, min {100 * min(last):.1f}%, "
        f"max {100 * max(last):.1f}% ({'held' if held else 'not held'}); final policy on 1024 fresh-noise "
        f"samples: {100 * balance['final_fresh_ratio']:.1f}% |"
    )


def table(results: dict) -> str:
    shift = results["shift"]
    first90 = next((i for i, s in enumerate(shift["shares"]) if s >= 0.9), None)
    rows = [
        "| experiment | start | end | criterion | result |",
        "| --- | --- | --- | --- | --- |",
        f"| R_shift, '{shift['prompt']}', share of {shift['column']} | {100 * shift['shares'][0]:.1f}% | "
        f"{100 * shift['shares'][-1]:.1f}% | < 5% -> >= 90% within 15 epochs | "
        f"first >= 90% at epoch {first90} |",
        *(balance_row(r) for name, r in results.items() if name.startswith("balance")),
    ]
    rows += [
        "",
        "| experiment | confidence before | confidence after | feature FID before | feature FID after | wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['before']['confidence']:.3f} | {r['after']['confidence']:.3f} | "
            f"{r['before']['fid']:.2f} | {r['after']['fid']:.2f} | {r['seconds']:.0f} s |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--balance-seeds",
        type=int,
        nargs="*",
        default=[],
        help="further seeds for the R_balance run (the config's own seed always runs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    results = {name: run(name, args.out) for name in EXPERIMENTS}
    for seed in args.balance_seeds:
        results[f"balance_seed{seed}"] = run("balance", args.out, seed)
    text = table(results)
    print(text)
    (args.out / "digits_debias.json").write_text(json.dumps(results, indent=2))
    print(f"\nper-epoch shares and quality written to {args.out / 'digits_debias.json'}")


if __name__ == "__main__":
    main()
