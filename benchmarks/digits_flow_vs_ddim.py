"""DDPO, GRPO, DiffusionNFT and AWM on the digits models: the debiasing goals, side by side.

Runs, on several seeds, the shipped configs

- ``configs/digits/ddpo_shift.yaml`` / ``ddpo_balance.yaml``: DDPO on the DDIM digits model
  (``DigitsPolicy``, 20 DDIM steps, guidance 1.5);
- ``configs/digits/grpo_shift.yaml`` / ``grpo_balance.yaml``: Flow-GRPO on the flow-matching digits
  model (``DigitsFlowPolicy``, 10 SDE steps at noise level 0.7, no guidance);
- ``configs/digits/nft_*.yaml`` / ``awm_*.yaml``: DiffusionNFT and Advantage Weighted Matching
  (forward-process RL) on the flow-matching digits model (10-step ODE rollouts, no guidance);
  ``nft_ddim`` runs ``nft_ddim_shift.yaml`` on the DDIM model (R_shift only);

and prints one table: for R_shift the epoch, images sampled and wall time at which the under-represented class
first reaches 90% of the epoch's samples (goal: from < 5% to >= 90% within 15 epochs); for
R_balance the epoch and wall time at which q of eq. (2) enters 50 +- 7% for good, and whether it
holds over the last 10 epochs, q measured after every epoch on fixed-noise samples
(``AttributeTracker(eval_samples=...)``, as ``benchmarks/digits_debias.py`` does); and the mean
classifier confidence, the "None" share and digits-feature FID before (LoRA off) and after. Each
method samples (and is measured) with its own sampler: the SDE for GRPO, the ODE for NFT and AWM.

    python benchmarks/digits_flow_vs_ddim.py [--methods ddpo grpo nft awm] [--rewards shift balance]
        [--seeds 0 1 2] [--out docs] [--balance-eval-samples 512]

Each method's runs go to ``<out>/digits_flow_vs_ddim_<method>.json`` (a run of some rewards
replaces those rewards' records and keeps the others), so methods can run as separate processes
(one CPU thread each) and the table is printed from whatever results are there (``--table-only``
prints it without running anything). The reward-curve figure (every method and seed) goes to
``<out>/figures/digits_flow_vs_ddim.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits_debias import fresh_ratio, quality, with_eval_samples

from lightning_sdrl.callbacks import AttributeTracker, classified_ratio
from lightning_sdrl.cli import run_cli as cli

ROOT = Path(__file__).resolve().parents[1]
REWARDS = {  # the prompt's classes, the minority column, fixed-noise samples per epoch (--balance-eval-samples)
    "shift": ([0, 6], "6", 0),
    "balance": ([0, 6, 8, 9], "6+8+9", 512),
}
METHODS = {
    "ddpo": "DDPO, DDIM model",
    "grpo": "GRPO, flow model",
    "nft": "NFT, flow model",
    "awm": "AWM, flow model",
    "nft_ddim": "NFT, DDIM model",
}
COLOURS = {"ddpo": "tab:blue", "grpo": "tab:orange", "nft": "tab:green", "awm": "tab:red", "nft_ddim": "tab:purple"}
SHIFT_GOAL, SHIFT_EPOCHS = 0.9, 15
BALANCE_TOLERANCE, BALANCE_HOLD = 0.07, 10


class EpochClock(pl.Callback):
    """Seconds since the start of fitting at the end of every training epoch."""

    def __init__(self) -> None:
        self.start, self.times = 0.0, []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start, self.times = time.perf_counter(), []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self.start)


def with_clock(path: Path, eval_samples: int, directory: Path) -> Path:
    """A copy of config ``path`` with :class:`EpochClock` (and ``eval_samples`` fixed-noise samples per epoch)."""
    import yaml

    copy = with_eval_samples(str(path), eval_samples, directory)
    settings = yaml.safe_load(copy.read_text())
    settings["trainer"]["callbacks"].append({"class_path": "digits_flow_vs_ddim.EpochClock"})
    copy.write_text(yaml.safe_dump(settings))
    return copy


def run(method: str, reward: str, seed: int, out: Path) -> dict:
    """Fit ``configs/digits/<method>_<reward>.yaml`` with ``seed`` and measure it."""
    classes, column, eval_samples = REWARDS[reward]
    config = f"configs/digits/{method}_{reward}.yaml"
    if not (ROOT / config).is_file():
        raise FileNotFoundError(f"{config} does not exist: method {method!r} has no {reward!r} config")
    run_dir = out / f"runs_{method}_{reward}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    path = with_clock(ROOT / config, eval_samples, run_dir)
    start = time.perf_counter()
    result = cli(
        [
            "fit",
            "-c",
            str(path),
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false",
            f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}",
        ]
    )
    seconds = time.perf_counter() - start
    module, prompt = result.model, result.datamodule.prompts[0]
    samples_per_epoch = result.datamodule.batch_size * result.datamodule.num_batches_per_epoch
    history = json.loads((run_dir / "attributes.json").read_text())["history"]
    clock = next(c for c in result.trainer.callbacks if type(c).__name__ == "EpochClock")
    tracker = next(c for c in result.trainer.callbacks if isinstance(c, AttributeTracker))
    after = quality(module, prompt, classes)
    final_fresh_ratio = fresh_ratio(tracker, module, prompt, column) if eval_samples else None
    with torch.no_grad(), module.policy.reference():
        before = quality(module, prompt, classes)
    if seed == 0:
        for figure in ("samples_before.png", "samples_after.png"):
            shutil.copy(run_dir / figure, out / "figures" / f"digits_{method}_{reward}_{figure}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "config": config,
        "seed": seed,
        "prompt": prompt,
        "column": column,
        "rewards": [record["reward_mean"] for record in history],
        "shares": [record["shares"][column] for record in history],
        "none_shares": [record["shares"].get("None", 0.0) for record in history],
        "ratios": [classified_ratio(record["shares"], column) for record in history],
        "eval_ratios": [classified_ratio(r["eval_shares"], column) for r in history if "eval_shares" in r],
        "eval_samples": eval_samples,
        "final_fresh_ratio": final_fresh_ratio,
        "epoch_seconds": clock.times,
        "samples_per_epoch": samples_per_epoch,
        "seconds": seconds,
        "before": before,
        "after": after,
    }


def goal_epoch(reward: str, record: dict) -> int | None:
    """The epoch (0-based) at which the goal is reached (for R_balance: entered for good), or ``None``."""
    if reward == "shift":
        return next((i for i, s in enumerate(record["shares"]) if s >= SHIFT_GOAL), None)
    inside = [abs(q - 0.5) <= BALANCE_TOLERANCE for q in record["eval_ratios"]]
    if not inside or not inside[-1]:
        return None
    first = len(inside)
    while first > 0 and inside[first - 1]:
        first -= 1
    return first


def row(method: str, reward: str, record: dict) -> str:
    """One table row: start, end, goal epoch and time, quality before/after."""
    epoch = goal_epoch(reward, record)
    per_epoch = record.get("samples_per_epoch")
    images = f", {(epoch + 1) * per_epoch} images" if per_epoch and epoch is not None else ""
    reached = "not reached" if epoch is None else f"epoch {epoch} ({record['epoch_seconds'][epoch]:.0f} s{images})"
    if reward == "shift":
        values = record["shares"]
        met = epoch is not None and epoch < SHIFT_EPOCHS and values[0] < 0.05
        detail = f"max {100 * max(values):.1f}%; final 'None' {100 * record['none_shares'][-1]:.1f}%"
    else:
        values = record["eval_ratios"]
        last = values[-BALANCE_HOLD:]
        met = all(abs(q - 0.5) <= BALANCE_TOLERANCE for q in last)
        worst = max(abs(q - 0.5) for q in last)
        detail = (
            f"last {BALANCE_HOLD}: {100 * min(last):.1f}-{100 * max(last):.1f}% (worst {100 * worst:.1f} points off); "
            f"1024 fresh-noise samples {100 * record['final_fresh_ratio']:.1f}%"
        )
    before, after = record["before"], record["after"]
    change = after["confidence"] / before["confidence"] - 1
    none = f" | {100 * before['none']:.1f}% -> {100 * after['none']:.1f}%" if "none" in before else " | -"
    return (
        f"| {METHODS[method]} | {reward} | {record['seed']} | {100 * values[0]:.1f}% | {100 * values[-1]:.1f}% | "
        f"{reached} | {'**met**' if met else 'missed'} ({detail}) | {before['confidence']:.3f} -> "
        f"{after['confidence']:.3f} ({100 * change:+.1f}%){none} | {before['fid']:.1f} -> {after['fid']:.1f} | "
        f"{record['seconds']:.0f} s |"
    )


def table(results: dict[str, dict]) -> str:
    """The Markdown table of every run in ``results`` (``{method: {reward: [records]}}``)."""
    lines = [
        "| method | reward | seed | start | end | goal reached | goal | confidence before -> after | "
        "'None' before -> after | feature FID before -> after | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, by_reward in results.items():
        for reward, records in by_reward.items():
            lines += [row(method, reward, record) for record in records]
    return "\n".join(lines)


def figure(results: dict[str, dict], path: Path) -> None:
    """Target share (R_shift) and q (R_balance) per epoch, every method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, reward in zip(axes, REWARDS, strict=True):
        for method, by_reward in results.items():
            for index, record in enumerate(by_reward.get(reward, [])):
                values = record["shares"] if reward == "shift" else record["eval_ratios"]
                label = METHODS[method] if index == 0 else None
                axis.plot(range(len(values)), [100 * v for v in values], color=COLOURS[method], alpha=0.7, label=label)
        if reward == "shift":
            axis.axhline(100 * SHIFT_GOAL, color="gray", linestyle="--", linewidth=0.8)
            axis.set_title("R_shift, 'a round digit': share of 6 per epoch")
        else:
            axis.axhspan(100 * (0.5 - BALANCE_TOLERANCE), 100 * (0.5 + BALANCE_TOLERANCE), color="gray", alpha=0.2)
            axis.set_title("R_balance, 'a digit with a loop': q (fixed noise)")
        axis.set_xlabel("epoch")
        axis.set_ylabel("%")
        axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(out: Path) -> dict[str, dict]:
    """Every method's results written so far."""
    results = {}
    for method in METHODS:
        part = out / f"digits_flow_vs_ddim_{method}.json"
        if part.is_file():
            results[method] = json.loads(part.read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--rewards", nargs="*", choices=list(REWARDS), default=list(REWARDS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--balance-eval-samples", type=int, default=512, help="fixed-noise samples per epoch")
    parser.add_argument("--table-only", action="store_true", help="print the table of the results already written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    classes, column, _ = REWARDS["balance"]
    REWARDS["balance"] = (classes, column, args.balance_eval_samples)
    if not args.table_only:
        for method in args.methods:
            part = args.out / f"digits_flow_vs_ddim_{method}.json"
            for reward in args.rewards:
                if (ROOT / f"configs/digits/{method}_{reward}.yaml").is_file():
                    records = [run(method, reward, seed, args.out) for seed in args.seeds]
                    # read again just before writing: another process may have written other rewards
                    results = json.loads(part.read_text()) if part.is_file() else {}
                    part.write_text(json.dumps({**results, reward: records}, indent=1) + "\n")
    results = load(args.out)
    print(table(results))
    figure(results, args.out / "figures" / "digits_flow_vs_ddim.png")


if __name__ == "__main__":
    main()
