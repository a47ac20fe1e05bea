"""Debiasing several prompts and several attributes at once (section V of the debiasing paper), in miniature.

Runs ``configs/digits/ddpo_balance_multi.yaml``: "a digit with a loop" (zero vs {6, 8, 9}) and "an
even digit" (two vs four) balanced in one run with the per-prompt R_balance, and prints one row
per prompt: q of eq. (2) (the prompt's last column among its classified images) at the start and
its mean / min / max over the last 10 epochs on the tracker's fixed-noise samples of that prompt
(target: 50 +- 7%), plus the attribute KL per prompt and over prompts. With ``--joint`` it also runs
``configs/digits/ddpo_balance_joint.yaml`` (digit x stroke thickness, 4 joint classes, 25% each)
and prints its joint shares.

    python benchmarks/digits_debias_multi.py [--out docs] [--joint] [--from-run DIR]

``--from-run DIR`` summarises a finished run of the multi-prompt config (its ``attributes.json``)
instead of fitting again. Writes ``digits_debias_multi.json`` and the per-prompt plot
(``figures/digits_balance_multi_per_prompt.png``) into ``--out``; ``docs/digits_debias_multi.md`` is
written from them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from lightning_sdrl.callbacks import classified_ratio, prompt_bias, prompt_kl
from lightning_sdrl.cli import run_cli as cli

ROOT = Path(__file__).resolve().parents[1]
MULTI, JOINT = "configs/digits/ddpo_balance_multi.yaml", "configs/digits/ddpo_balance_joint.yaml"


def fit(config: str, run_dir: Path) -> float:
    """Fit ``config`` into ``run_dir``; the wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cli(
        [
            "fit",
            "-c",
            str(ROOT / config),
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return time.perf_counter() - start


def prompt_rows(history: list[dict]) -> dict[str, dict]:
    """Per prompt: its fixed-noise q per epoch, the last 10 epochs' statistics and KL to uniform."""
    results = {}
    for prompt in history[0]["prompt_eval_shares"]:
        shares = [record["prompt_eval_shares"][prompt] for record in history]
        column = list(shares[0])[-2]  # the prompt's last attribute column (before "None")
        q = [classified_ratio(s, column) for s in shares]
        last = q[-10:]
        results[prompt] = {
            "column": column,
            "q": q,
            "kl": [prompt_kl(s) for s in shares],
            "bias": [prompt_bias(s) for s in shares],  # Shen et al.'s bias (two classes: |1 - 2 q|)
            "last10_mean": sum(last) / len(last),
            "last10_min": min(last),
            "last10_max": max(last),
            "held": all(abs(value - 0.5) <= 0.07 for value in last),
        }
    return results


def multi_table(results: dict[str, dict]) -> str:
    rows = [
        "| prompt | q = share of | start | end | last 10 epochs (50 +- 7%) | KL start -> end | bias start -> end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for prompt, r in results.items():
        rows.append(
            f"| '{prompt}' | {r['column']} | {100 * r['q'][0]:.1f}% | {100 * r['q'][-1]:.1f}% | "
            f"mean {100 * r['last10_mean']:.1f}%, min {100 * r['last10_min']:.1f}%, max {100 * r['last10_max']:.1f}% "
            f"(**{'held' if r['held'] else 'not held'}**) | {r['kl'][0]:.3f} -> {r['kl'][-1]:.3f} | "
            f"{r['bias'][0]:.3f} -> {r['bias'][-1]:.3f} |"
        )
    kl = torch.tensor([r["kl"] for r in results.values()])
    bias = torch.tensor([r["bias"] for r in results.values()], dtype=torch.float64)
    kl_cell = f"{kl[:, 0].mean():.3f} -> {kl[:, -1].mean():.3f} (worst {kl[:, -1].max():.3f})"
    bias_cell = f"{bias[:, 0].mean():.3f} -> {bias[:, -1].mean():.3f} (worst {bias[:, -1].max():.3f})"
    rows.append(f"| mean over prompts | | | | | {kl_cell} | {bias_cell} |")
    return "\n".join(rows)


def joint_table(history: list[dict]) -> str:
    first, last = history[0]["eval_shares"], history[-1]["eval_shares"]
    rows = ["| joint class | start | end (target 25% of classified) |", "| --- | --- | --- |"]
    for name in first:
        if name != "None":
            rows.append(
                f"| {name} | {100 * classified_ratio(first, name):.1f}% | {100 * classified_ratio(last, name):.1f}% |"
            )
    rows.append(f"| (None, of all) | {100 * first['None']:.1f}% | {100 * last['None']:.1f}% |")
    return "\n".join(rows + [f"| joint bias (Shen et al.) | {prompt_bias(first):.3f} | {prompt_bias(last):.3f} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--joint", action="store_true", help="also run the two-attribute config")
    parser.add_argument("--from-run", type=Path, default=None, help="summarise this finished multi-prompt run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    run_dir, seconds = args.from_run, None
    if run_dir is None:
        run_dir = args.out / "runs_multi"
        seconds = fit(MULTI, run_dir)
    history = json.loads((run_dir / "attributes.json").read_text())["history"]
    results = {"config": MULTI, "seconds": seconds, "prompts": prompt_rows(history)}
    shutil.copy(run_dir / "attributes_per_prompt.png", args.out / "figures" / "digits_balance_multi_per_prompt.png")
    print(multi_table(results["prompts"]))
    if args.joint:
        joint_dir = args.out / "runs_joint"
        results["joint"] = {"config": JOINT, "seconds": fit(JOINT, joint_dir)}
        joint_history = json.loads((joint_dir / "attributes.json").read_text())["history"]
        results["joint"]["eval_shares"] = [record["eval_shares"] for record in joint_history]
        shutil.copy(joint_dir / "attributes.png", args.out / "figures" / "digits_balance_joint_attributes.png")
        print(joint_table(joint_history))
        shutil.rmtree(joint_dir, ignore_errors=True)
    if args.from_run is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    (args.out / "digits_debias_multi.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
