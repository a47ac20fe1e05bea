"""The debiasing experiments of ../shared/seeds/ddpo_gender_debiasing.txt (IV-B/C), in miniature.

Runs the shipped configs ``configs/digits/ddpo_shift.yaml`` (R_shift) and
``configs/digits/ddpo_balance.yaml`` (R_balance) from the pretrained digits model, then prints
one table:

- R_shift: the under-represented class's share at the start and at the end, and the first epoch
  at which it reaches 90% (target: from < 5% to >= 90% within 15 epochs);
- R_balance: q of eq. (2), the minority attribute's share among classified images, at the start
  and its mean / min / max over the last 10 epochs (target: 50 +- 7%), measured after every epoch
  on 256 samples drawn from the same noise each time (``AttributeTracker(eval_samples=256)``), so
  that the numbers follow the policy rather than the sampling noise of a 64-image batch;
- sample quality: mean classifier confidence on the prompt's classes before and after (target:
  within 10%), and FID in the digit feature network's space against real digits of those classes.

    python benchmarks/digits_debias.py [--out docs]

Writes ``digits_debias.md`` and the plots / sample grids into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from lightning_sdrl.callbacks import classified_ratio
from lightning_sdrl.cli import main as cli
from lightning_sdrl.data.reference import DigitsReference
from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.rewards.classifiers import DigitsClassifier
from lightning_sdrl.rewards.diversity import DigitsFeatures

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {  # config, the prompt's classes, the minority column, fixed-noise samples per epoch
    "shift": ("configs/digits/ddpo_shift.yaml", [0, 6], "6", 0),
    "balance": ("configs/digits/ddpo_balance.yaml", [0, 6, 8, 9], "6+8+9", 256),
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


def quality(module, prompt: str, classes: list[int], num: int = 256, seed: int = 99) -> dict[str, float]:
    """Mean classifier confidence on ``classes`` and feature FID against real digits of them."""
    classifier = DigitsClassifier()
    evaluation = GenerationMetrics(DigitsFeatures(), DigitsReference(split="test", classes=classes))
    confidences = []
    for index, start in enumerate(range(0, num, 64)):
        size = min(64, num - start)
        batch = PromptBatch([prompt] * size, torch.zeros(size, dtype=torch.long), seed=seed + index)
        images = module.sample(batch).images
        with torch.no_grad():
            probs = classifier(images)
        confidences.append(probs[:, classes].max(dim=1).values)
        evaluation.update(images)
    values = evaluation.compute()
    return {"confidence": float(torch.cat(confidences).mean()), "fid": float(values["fid"])}


def run(name: str, out: Path) -> dict:
    config, classes, column, eval_samples = EXPERIMENTS[name]
    run_dir = out / f"runs_{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    path = with_eval_samples(config, eval_samples, run_dir) if eval_samples else ROOT / config
    start = time.perf_counter()
    result = cli(["fit", "-c", str(path), f"--trainer.default_root_dir={run_dir}",
                  "--trainer.enable_progress_bar=false"])
    seconds = time.perf_counter() - start
    module, prompt = result.model, result.datamodule.prompts[0]
    summary = json.loads((run_dir / "attributes.json").read_text())
    shares = [record["shares"][column] for record in summary["history"]]
    ratios = [classified_ratio(record["shares"], column) for record in summary["history"]]
    eval_ratios = [classified_ratio(record["eval_shares"], column) for record in summary["history"]
                   if "eval_shares" in record]
    after = quality(module, prompt, classes)
    with torch.no_grad(), module.policy.reference():
        before = quality(module, prompt, classes)
    for figure in ("attributes.png", "samples_before.png", "samples_after.png"):
        shutil.copy(run_dir / figure, out / "figures" / f"digits_{name}_{figure}")
    return {"config": config, "prompt": prompt, "column": column, "shares": shares, "ratios": ratios,
            "eval_ratios": eval_ratios, "eval_samples": eval_samples, "seconds": seconds,
            "before": before, "after": after, "grid_before": summary["before"], "grid_after": summary["after"]}


def table(results: dict) -> str:
    shift, balance = results["shift"], results["balance"]
    first90 = next((i for i, s in enumerate(shift["shares"]) if s >= 0.9), None)
    q = balance["eval_ratios"] or balance["ratios"]
    last = q[-10:]
    rows = [
        "| experiment | start | end | criterion | result |",
        "| --- | --- | --- | --- | --- |",
        f"| R_shift, '{shift['prompt']}', share of {shift['column']} | {100 * shift['shares'][0]:.1f}% | "
        f"{100 * shift['shares'][-1]:.1f}% | < 5% -> >= 90% within 15 epochs | "
        f"first >= 90% at epoch {first90} |",
        f"| R_balance, '{balance['prompt']}', q = {balance['column']} among classified | {100 * q[0]:.1f}% | "
        f"{100 * q[-1]:.1f}% | 50 +- 7% over the last 10 epochs | "
        f"mean {100 * sum(last) / len(last):.1f}%, min {100 * min(last):.1f}%, max {100 * max(last):.1f}% |",
    ]
    rows += ["", "| experiment | confidence before | confidence after | feature FID before | feature FID after | "
             "wall time |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['before']['confidence']:.3f} | {r['after']['confidence']:.3f} | "
                    f"{r['before']['fid']:.2f} | {r['after']['fid']:.2f} | {r['seconds']:.0f} s |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    results = {name: run(name, args.out) for name in EXPERIMENTS}
    text = table(results)
    print(text)
    (args.out / "digits_debias.json").write_text(json.dumps(results, indent=2))
    for name in EXPERIMENTS:
        shutil.rmtree(args.out / f"runs_{name}", ignore_errors=True)
    print(f"\nper-epoch shares and quality written to {args.out / 'digits_debias.json'}")


if __name__ == "__main__":
    main()
