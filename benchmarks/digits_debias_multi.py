"""Debiasing several prompts and several attributes at once (section V of the debiasing paper), in miniature.

Runs ``configs/digits/ddpo_balance_multi.yaml``: "a digit with a loop" (zero vs {6, 8, 9}) and "an
even digit" (two vs four) balanced in one run with the per-prompt R_balance, and prints one row
per prompt: q of eq. (2) (the prompt's last column among its classified images) at the start and
its mean / min / max over the last 10 epochs on the tracker's fixed-noise samples of that prompt
(target: 50 +- 7%), plus the attribute KL per prompt and over prompts.

With ``--joint`` it also runs ``configs/digits/ddpo_balance_joint.yaml`` (digit x stroke thickness,
4 joint classes, 25% each of the classified images) once per seed of ``--seeds``; with
``--joint-multi`` ``configs/digits/ddpo_balance_joint_multi.yaml`` (the same two attributes for two
prompts, each prompt over its own 4 joint classes) once per seed. Each joint run (or run x prompt)
gets one row (:func:`joint_summary`): every joint class's mean (min-max) share over the last 10
epochs, whether all stayed within 25 +- 7 points in each of them, the joint bias of Shen et al.,
the bias of each attribute's marginal, the KL to the target and the "None" share.

    python benchmarks/digits_debias_multi.py [--out docs] [--from-run DIR] [--no-multi]
        [--joint] [--joint-multi] [--seeds 0 1 2]
        [--joint-from-run DIR [DIR ...]] [--joint-multi-from-run DIR [DIR ...]]

``--from-run DIR`` summarises a finished run of the multi-prompt config (its ``attributes.json``)
instead of fitting again; ``--joint-from-run`` / ``--joint-multi-from-run`` do the same for joint
runs (each labelled by its directory name, its seed read from its ``config.yaml``). Given only
``--*-from-run`` options, nothing is fitted; ``--no-multi`` skips the multi-prompt single-attribute
run. Writes ``digits_debias_multi.json`` into ``--out``, replacing only the parts produced this time
(``"prompts"``, ``"joint"``, ``"joint_multi"``), and the first run's plots into ``--out/figures``;
``docs/digits_debias_multi.md`` is written from them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_sdrl.callbacks import classified_ratio, prompt_bias, prompt_kl
from lightning_sdrl.cli import run_cli as cli
from lightning_sdrl.functional.metrics import pairwise_bias

ROOT = Path(__file__).resolve().parents[1]
MULTI, JOINT = "configs/digits/ddpo_balance_multi.yaml", "configs/digits/ddpo_balance_joint.yaml"
JOINT_MULTI = "configs/digits/ddpo_balance_joint_multi.yaml"
JOINER = " & "  # how the AttributeTracker names a joint class: "6+8+9 & thin"


def fit(config: str, run_dir: Path, *overrides: str) -> float:
    """Fit ``config`` into ``run_dir`` on one CPU thread, with CLI ``overrides``; the wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    cli(
        [
            "fit",
            "-c",
            str(ROOT / config),
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false",
            *overrides,
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


def attribute_marginals(shares: dict[str, float]) -> list[dict[str, float]]:
    """Each attribute's share of every value among the classified images: joint classes summed over the others.

    Args:
        shares: one record's shares by joint class name (attributes joined by ``" & "``) and ``"None"``.

    Returns:
        One ``{value: share}`` per attribute, in the names' order; all 0 if no image is classified.

    Example:
        >>> attribute_marginals({"0 & thin": 0.2, "0 & bold": 0.4, "6 & thin": 0.1, "6 & bold": 0.1, "None": 0.2})
        [{'0': 0.75, '6': 0.25}, {'thin': 0.375, 'bold': 0.625}]
    """
    names = [name for name in shares if name != "None"]
    classified = sum(shares[name] for name in names)
    marginals: list[dict[str, float]] = [{} for _ in names[0].split(JOINER)]
    for name in names:
        values = name.split(JOINER)
        if len(values) != len(marginals):
            raise ValueError(
                f"joint class {name!r} has {len(values)} attributes, {names[0]!r} {len(marginals)}; "
                f"expected every name to join the same attributes with {JOINER!r}"
            )
        for marginal, value in zip(marginals, values, strict=True):
            marginal[value] = marginal.get(value, 0.0) + (shares[name] / classified if classified else 0.0)
    return marginals


def _bias(frequencies: Sequence[float]) -> float | None:
    """Shen et al.'s bias of ``frequencies``; ``None`` if all are 0 (no image classified; JSON has no NaN)."""
    return float(pairwise_bias(torch.tensor(frequencies, dtype=torch.float64))) if sum(frequencies) > 0 else None


def _over(values: Sequence[float | None], reduce: Callable[[Sequence[float]], float]) -> float | None:
    """``reduce(values)``, or ``None`` if an epoch had no classified image (``None``)."""
    return None if any(value is None for value in values) else reduce(values)


def _kl(shares: dict[str, float], target: Sequence[float]) -> float | None:
    kl = prompt_kl(shares, target)
    return None if math.isnan(kl) else kl  # NaN: no image classified; JSON has no NaN


@dataclass(frozen=True)
class JointSummary:
    """How close one prompt's joint classes came to their target shares, on fixed-noise samples per epoch.

    Shares are of the classified images (``q`` of eq. (2) for each joint class); "last" statistics
    are over the last ``window`` epochs; a bias or KL is ``None`` where no image was classified.
    """

    classes: list[str]
    """The joint class names (``"0 & thin"``, ...), ``"None"`` left out."""
    target: dict[str, float]
    """Target share of each class (uniform ``1 / K`` unless given)."""
    window: int
    """How many final epochs the "last" statistics and ``held`` cover."""
    tolerance: float
    """How far (as a share, 0.07 = 7 points) a class may be from its target for ``held``."""
    start: dict[str, float]
    """Each class's share at the first epoch."""
    end: dict[str, float]
    """Each class's share at the last epoch."""
    last_mean: dict[str, float]
    """Each class's mean share over the last ``window`` epochs."""
    last_min: dict[str, float]
    """Each class's smallest share over the last ``window`` epochs."""
    last_max: dict[str, float]
    """Each class's largest share over the last ``window`` epochs."""
    held: bool
    """Every class within ``tolerance`` of its target in every one of the last ``window`` epochs."""
    bias_start: float | None
    """Shen et al.'s bias over the joint classes at the first epoch."""
    bias_end: float | None
    """Shen et al.'s bias over the joint classes at the last epoch."""
    bias_last_mean: float | None
    """The joint bias's mean over the last ``window`` epochs."""
    bias_last_max: float | None
    """The joint bias's largest value over the last ``window`` epochs."""
    attribute_bias_end: list[float | None]
    """Per attribute (in the names' order) the bias of its marginal at the last epoch."""
    attribute_bias_last_mean: list[float | None]
    """Per attribute the bias of its marginal, mean over the last ``window`` epochs."""
    kl_start: float | None
    """``KL(p || target)`` (nats) of the classified shares at the first epoch."""
    kl_end: float | None
    """``KL(p || target)`` at the last epoch."""
    none_end: float
    """The share of all images that no class took ("None") at the last epoch."""


def joint_summary(
    shares_per_epoch: list[dict[str, float]],
    window: int = 10,
    tolerance: float = 0.07,
    target: dict[str, float] | None = None,
) -> JointSummary:
    """Summarise one prompt's joint class shares per epoch against the benchmark's goal (25 +- 7 points each).

    Args:
        shares_per_epoch: per epoch, shares of all images by joint class name and ``"None"`` (the
            ``eval_shares`` of ``attributes.json``, or one prompt's ``prompt_eval_shares``).
        window: how many final epochs must hold the balance (the issue's goal: 10).
        tolerance: allowed distance from the target share, in shares (0.07 = 7 points).
        target: target share of each joint class among the classified images; ``None`` for uniform.

    Returns:
        The :class:`JointSummary`.

    Raises:
        ValueError: If there are fewer epochs than ``window``, or ``target`` names other classes.

    Example:
        >>> first = {"0 & thin": 0.2, "0 & bold": 0.4, "6 & thin": 0.1, "6 & bold": 0.1, "None": 0.2}
        >>> balanced = {"0 & thin": 0.2, "0 & bold": 0.2, "6 & thin": 0.2, "6 & bold": 0.2, "None": 0.2}
        >>> summary = joint_summary([first, balanced, balanced], window=2)
        >>> summary.start["0 & bold"], summary.last_mean["0 & bold"], summary.held, summary.none_end
        (0.5, 0.25, True, 0.2)
        >>> round(summary.bias_start, 4), summary.bias_end, summary.attribute_bias_end
        (0.2083, 0.0, [0.0, 0.0])
    """
    if window < 1 or len(shares_per_epoch) < window:
        raise ValueError(
            f"shares_per_epoch has {len(shares_per_epoch)} epochs and window={window}; "
            "expected window >= 1 and at least window epochs (pass a smaller window)"
        )
    names = [name for name in shares_per_epoch[0] if name != "None"]
    target = {name: 1 / len(names) for name in names} if target is None else target
    if sorted(target) != sorted(names):
        raise ValueError(f"target names {sorted(target)}; expected the joint classes {names}")
    # 1. q of eq. (2) for every joint class, per epoch, and its last `window` epochs
    ratios = {name: [classified_ratio(shares, name) for shares in shares_per_epoch] for name in names}
    last = {name: values[-window:] for name, values in ratios.items()}
    # 2. Shen et al.'s bias over the joint classes and over each attribute's marginal, per epoch
    bias = [prompt_bias(shares) for shares in shares_per_epoch]
    attribute_bias = [
        [_bias(list(marginal.values())) for marginal in attribute_marginals(shares)] for shares in shares_per_epoch
    ]
    targets = [target[name] for name in names]
    return JointSummary(
        classes=names,
        target=target,
        window=window,
        tolerance=tolerance,
        start={name: values[0] for name, values in ratios.items()},
        end={name: values[-1] for name, values in ratios.items()},
        last_mean={name: statistics.fmean(values) for name, values in last.items()},
        last_min={name: min(values) for name, values in last.items()},
        last_max={name: max(values) for name, values in last.items()},
        held=all(abs(value - target[name]) <= tolerance for name, values in last.items() for value in values),
        bias_start=bias[0],
        bias_end=bias[-1],
        bias_last_mean=_over(bias[-window:], statistics.fmean),
        bias_last_max=_over(bias[-window:], max),
        attribute_bias_end=attribute_bias[-1],
        attribute_bias_last_mean=[
            _over(column, statistics.fmean) for column in zip(*attribute_bias[-window:], strict=True)
        ],
        kl_start=_kl(shares_per_epoch[0], targets),
        kl_end=_kl(shares_per_epoch[-1], targets),
        none_end=shares_per_epoch[-1]["None"],
    )


def _number(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def joint_table(lead: list[str], rows: list[tuple[list[str], JointSummary]]) -> str:
    """One markdown row per summary: ``lead`` cells (run, prompt, ...) then its balance columns.

    The class columns are named after the classes when every row has the same ones; otherwise
    (prompts with their own classes) they are numbered and each cell names its class.
    """
    classes = rows[0][1].classes
    same = all(summary.classes == classes for _, summary in rows)
    window = rows[0][1].window
    headers = [*lead, *(classes if same else [f"class {i + 1}" for i in range(len(classes))])]
    headers += [
        f"all within target +- {100 * rows[0][1].tolerance:.0f} pts, last {window}",
        f"joint bias end (last-{window} mean, max)",
        "per-attribute bias end (in name order)",
        "KL start -> end",
        "None end",
    ]
    lines = [
        f"Joint classes: % of the classified images, mean (min-max) over the last {window} epochs.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + " --- |" * len(headers),
    ]
    for lead_cells, s in rows:
        shares = [
            f"{100 * s.last_mean[name]:.1f} ({100 * s.last_min[name]:.1f}-{100 * s.last_max[name]:.1f})"
            for name in s.classes
        ]
        cells = [*lead_cells, *(shares if same else [f"{n}: {c}" for n, c in zip(s.classes, shares, strict=True)])]
        cells += [
            "yes" if s.held else "no",
            f"{_number(s.bias_end)} ({_number(s.bias_last_mean)}, {_number(s.bias_last_max)})",
            " / ".join(_number(b) for b in s.attribute_bias_end),
            f"{_number(s.kl_start)} -> {_number(s.kl_end)}",
            f"{100 * s.none_end:.1f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seed(run: dict[str, Any]) -> str:
    return "?" if run["seed"] is None else str(run["seed"])


def config_seed(run_dir: Path) -> int | None:
    """``seed_everything`` of the run's saved ``config.yaml``; ``None`` if it has none."""
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()).get("seed_everything") if path.exists() else None


def joint_runs(
    config: str, seeds: list[int], finished: list[Path], out: Path
) -> list[tuple[Path, int | None, float | None]]:
    """Fit ``config`` once per seed (``out/runs_<config>_seed<N>``), then list the finished runs too.

    Returns:
        ``(run directory, seed, seconds fitting)`` per run, ``seconds`` ``None`` for a finished one.
    """
    runs = []
    for seed in seeds:
        run_dir = out / f"runs_{Path(config).stem}_seed{seed}"
        seconds = fit(config, run_dir, f"--seed_everything={seed}", f"--data.init_args.seed={seed}")
        runs.append((run_dir, seed, seconds))
    return runs + [(run_dir, config_seed(run_dir), None) for run_dir in finished]


def joint_results(config: str, runs: list[tuple[Path, int | None, float | None]], per_prompt: bool) -> list[dict]:
    """Per run: label, seed, config, seconds, and its fixed-noise shares' summary (per prompt if ``per_prompt``)."""
    results = []
    for run_dir, seed, seconds in runs:
        history = json.loads((run_dir / "attributes.json").read_text())["history"]
        result: dict[str, Any] = {"label": run_dir.name, "seed": seed, "config": config, "seconds": seconds}
        if per_prompt:
            result["prompts"] = {}
            for prompt in history[0]["prompt_eval_shares"]:
                shares = [record["prompt_eval_shares"][prompt] for record in history]
                result["prompts"][prompt] = {"summary": asdict(joint_summary(shares)), "eval_shares": shares}
        else:
            shares = [record["eval_shares"] for record in history]
            result.update(summary=asdict(joint_summary(shares)), eval_shares=shares)
        results.append(result)
    return results


def multi_part(from_run: Path | None, out: Path) -> dict[str, Any]:
    """Fit the multi-prompt config (or read ``from_run``), print its table; its JSON keys."""
    run_dir, seconds = from_run, None
    if run_dir is None:
        run_dir = out / "runs_multi"
        seconds = fit(MULTI, run_dir)
    history = json.loads((run_dir / "attributes.json").read_text())["history"]
    results = {"config": MULTI, "seconds": seconds, "prompts": prompt_rows(history)}
    shutil.copy(run_dir / "attributes_per_prompt.png", out / "figures" / "digits_balance_multi_per_prompt.png")
    print(multi_table(results["prompts"]))
    if from_run is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    return results


def remove_fitted(runs: list[tuple[Path, int | None, float | None]]) -> None:
    """Delete the directories of the runs fitted here (finished runs given on the command line stay)."""
    for run_dir, _, seconds in runs:
        if seconds is not None:
            shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--from-run", type=Path, default=None, help="summarise this finished multi-prompt run")
    parser.add_argument("--no-multi", action="store_true", help="skip the multi-prompt single-attribute run")
    parser.add_argument("--joint", action="store_true", help=f"also run {JOINT} once per seed")
    parser.add_argument("--joint-multi", action="store_true", help=f"also run {JOINT_MULTI} once per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the --joint / --joint-multi runs")
    parser.add_argument("--joint-from-run", type=Path, nargs="+", default=[], help="summarise finished joint runs")
    parser.add_argument(
        "--joint-multi-from-run", type=Path, nargs="+", default=[], help="summarise finished joint multi runs"
    )
    args = parser.parse_args(argv)
    joint, joint_multi = args.joint or args.joint_from_run, args.joint_multi or args.joint_multi_from_run
    summaries_only = bool(args.joint_from_run or args.joint_multi_from_run) and not (args.joint or args.joint_multi)
    multi = args.from_run is not None or not (args.no_multi or summaries_only)
    if not (multi or joint or joint_multi):
        parser.error("--no-multi without --joint, --joint-multi or a --joint*-from-run: nothing to run")
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    produced = multi_part(args.from_run, args.out) if multi else {}
    if joint:
        runs = joint_runs(JOINT, args.seeds if args.joint else [], args.joint_from_run, args.out)
        produced["joint"] = joint_results(JOINT, runs, per_prompt=False)
        shutil.copy(runs[0][0] / "attributes.png", args.out / "figures" / "digits_balance_joint_attributes.png")
        rows = [([run["label"], _seed(run)], JointSummary(**run["summary"])) for run in produced["joint"]]
        print(joint_table(["run", "seed"], rows))
        remove_fitted(runs)
    if joint_multi:
        runs = joint_runs(JOINT_MULTI, args.seeds if args.joint_multi else [], args.joint_multi_from_run, args.out)
        produced["joint_multi"] = joint_results(JOINT_MULTI, runs, per_prompt=True)
        figure = args.out / "figures" / "digits_balance_joint_multi_per_prompt.png"
        shutil.copy(runs[0][0] / "attributes_per_prompt.png", figure)
        rows = [
            ([run["label"], _seed(run), f"'{prompt}'"], JointSummary(**result["summary"]))
            for run in produced["joint_multi"]
            for prompt, result in run["prompts"].items()
        ]
        print(joint_table(["run", "seed", "prompt"], rows))
        remove_fitted(runs)
    path = args.out / "digits_debias_multi.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(produced)  # parts not run this time keep what an earlier run wrote
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
