"""benchmarks/digits_debias_multi.py's joint balance summary and its --joint / --*-from-run paths (no training)."""

from __future__ import annotations

import doctest
import importlib.util
import itertools
import json
import math
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("digits_debias_multi", ROOT / "benchmarks" / "digits_debias_multi.py")
bench = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = bench  # dataclasses look their module up while the class is built
SPEC.loader.exec_module(bench)

LOOP = ["0 & thin", "0 & bold", "6+8+9 & thin", "6+8+9 & bold"]
EVEN = ["2 & thin", "2 & bold", "4 & thin", "4 & bold"]
START = [0.10, 0.40, 0.20, 0.30]  # classified shares at epoch 0: thin loop digits rare
EXCURSION = [0.17, 0.33, 0.25, 0.25]  # 8 points off for two classes


def classified_shares(epoch: int, excursion_at: int | None = None) -> list[float]:
    """Within 25 +- 7 points from epoch 1 on (a wobble of at most 5 points), except at ``excursion_at``."""
    if epoch == 0:
        return START
    if epoch == excursion_at:
        return EXCURSION
    wobble = 0.05 * (-1) ** epoch * (1 - epoch / 24)
    return [0.25 + wobble, 0.25 - wobble, 0.25 - wobble / 2, 0.25 + wobble / 2]


def record_shares(names: list[str], classified: list[float], none: float) -> dict[str, float]:
    """Shares of all images, as the tracker records them: the classified shares scaled, then "None"."""
    return {**{name: q * (1 - none) for name, q in zip(names, classified, strict=True)}, "None": none}


def history(names: list[str] = LOOP, excursion_at: int | None = None, epochs: int = 12) -> list[dict[str, float]]:
    return [record_shares(names, classified_shares(e, excursion_at), 0.2 - 0.01 * e) for e in range(epochs)]


def by_hand(shares: dict[str, float]) -> dict[str, float]:
    classified = 0.0
    for name, value in shares.items():
        if name != "None":
            classified += value
    return {name: value / classified for name, value in shares.items() if name != "None"}


def shen_bias(frequencies: list[float]) -> float:
    pairs = list(itertools.combinations(frequencies, 2))
    return sum(abs(a - b) for a, b in pairs) / len(pairs)


def marginals_by_hand(q: dict[str, float]) -> tuple[list[float], list[float]]:
    digit = [q["0 & thin"] + q["0 & bold"], q["6+8+9 & thin"] + q["6+8+9 & bold"]]
    thickness = [q["0 & thin"] + q["6+8+9 & thin"], q["0 & bold"] + q["6+8+9 & bold"]]
    return digit, thickness


def test_doctests_of_the_script_pass():
    assert doctest.testmod(bench).failed == 0


def test_joint_summary_matches_an_independent_computation():
    shares = history()
    summary = bench.joint_summary(shares)
    q = [by_hand(s) for s in shares]
    last = q[-10:]
    assert summary.classes == LOOP
    assert summary.target == pytest.approx(dict.fromkeys(LOOP, 0.25))
    for i, name in enumerate(LOOP):
        assert summary.start[name] == pytest.approx(START[i])
        assert summary.end[name] == pytest.approx(q[-1][name])
        assert summary.last_mean[name] == pytest.approx(statistics.mean(r[name] for r in last))
        assert summary.last_min[name] == pytest.approx(min(r[name] for r in last))
        assert summary.last_max[name] == pytest.approx(max(r[name] for r in last))
    assert summary.held
    biases = [shen_bias(list(r.values())) for r in q]
    assert summary.bias_start == pytest.approx(shen_bias(START))
    assert summary.bias_start == pytest.approx((0.3 + 0.1 + 0.2 + 0.2 + 0.1 + 0.1) / 6)  # |f_i - f_j| over 6 pairs
    assert summary.bias_end == pytest.approx(biases[-1])
    assert summary.bias_last_mean == pytest.approx(statistics.mean(biases[-10:]))
    assert summary.bias_last_max == pytest.approx(max(biases[-10:]))
    attribute_biases = [[shen_bias(m) for m in marginals_by_hand(r)] for r in q]
    assert summary.attribute_bias_end == pytest.approx(attribute_biases[-1])
    assert summary.attribute_bias_last_mean == pytest.approx(
        [statistics.mean(b[a] for b in attribute_biases[-10:]) for a in range(2)]
    )
    assert summary.kl_start == pytest.approx(sum(p * math.log(p / 0.25) for p in START))
    assert summary.kl_end == pytest.approx(sum(p * math.log(p / 0.25) for p in q[-1].values()))
    assert summary.none_end == pytest.approx(0.2 - 0.11)


def test_marginals_of_the_start_sum_the_joint_classes():
    digit, thickness = marginals_by_hand(dict(zip(LOOP, START, strict=True)))
    marginals = bench.attribute_marginals(history()[0])
    assert marginals[0] == pytest.approx({"0": digit[0], "6+8+9": digit[1]})  # 50% / 50%
    assert marginals[1] == pytest.approx({"thin": thickness[0], "bold": thickness[1]})  # 30% / 70%
    assert [bench._bias(list(m.values())) for m in marginals] == pytest.approx([0.0, 0.4])


@pytest.mark.parametrize(("excursion_at", "held"), [(None, True), (5, False), (2, False), (11, False), (1, True)])
def test_held_only_if_every_class_stays_within_seven_points_in_each_of_the_last_ten_epochs(excursion_at, held):
    # 12 epochs: the last 10 are epochs 2-11; an excursion at epoch 1 (or the start at 0) does not count
    assert bench.joint_summary(history(excursion_at=excursion_at)).held is held


def test_a_target_other_than_uniform_and_the_errors():
    target = {"0 & thin": 0.1, "0 & bold": 0.4, "6+8+9 & thin": 0.2, "6+8+9 & bold": 0.3}
    summary = bench.joint_summary(history(), target=target)
    assert not summary.held  # the history is balanced, the target is not
    assert summary.kl_start == pytest.approx(0.0)
    with pytest.raises(ValueError, match="target names"):
        bench.joint_summary(history(), target={"0 & thin": 1.0})
    with pytest.raises(ValueError, match="5 epochs and window=10"):
        bench.joint_summary(history(epochs=5))


def test_no_classified_image_gives_none_not_nan():
    shares = history()
    shares[-1] = {**dict.fromkeys(LOOP, 0.0), "None": 1.0}
    summary = bench.joint_summary(shares)
    assert not summary.held
    assert summary.bias_end is None and summary.bias_last_mean is None and summary.kl_end is None
    assert summary.attribute_bias_end == [None, None]


def write_run(run_dir: Path, records: list[dict], plot: str, seed: int | None) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "attributes.json").write_text(json.dumps({"history": records}))
    (run_dir / plot).write_bytes(b"png of " + run_dir.name.encode())
    if seed is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed_everything": seed, "trainer": {"max_epochs": 12}}))
    return run_dir


def joint_records(excursion_at: int | None) -> list[dict]:
    return [{"epoch": e, "eval_shares": s} for e, s in enumerate(history(excursion_at=excursion_at))]


def joint_multi_records() -> list[dict]:
    loop, even = history(LOOP), history(EVEN, excursion_at=6)
    return [{"epoch": e, "prompt_eval_shares": {"a digit with a loop": a, "an even digit": b}} for e, (a, b) in
            enumerate(zip(loop, even, strict=True))]  # fmt: skip


def multi_records() -> list[dict]:
    shares = {"a": {"0": 0.4, "6+8+9": 0.4, "None": 0.2}, "b": {"2": 0.3, "4": 0.6, "None": 0.1}}
    return [{"epoch": e, "prompt_eval_shares": shares} for e in range(12)]


def no_fitting(*args):
    raise AssertionError(f"fitted {args}; only finished runs were given")


def test_joint_from_run_and_joint_multi_from_run_write_their_parts_and_keep_the_others(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "fit", no_fitting)
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"config": bench.MULTI, "seconds": 12.0, "prompts": {"kept": True}, "joint_multi": "earlier"}
    (out / "digits_debias_multi.json").write_text(json.dumps(earlier))
    first = write_run(tmp_path / "joint_seed1", joint_records(None), "attributes.png", seed=1)
    second = write_run(tmp_path / "joint_unseeded", joint_records(5), "attributes.png", seed=None)

    bench.main(["--out", str(out), "--joint-from-run", str(first), str(second)])
    written = json.loads((out / "digits_debias_multi.json").read_text())
    assert {key: written[key] for key in earlier} == earlier  # the multi-prompt part and joint_multi kept
    runs = written["joint"]
    assert [(r["label"], r["seed"], r["config"], r["seconds"]) for r in runs] == [
        ("joint_seed1", 1, bench.JOINT, None),
        ("joint_unseeded", None, bench.JOINT, None),
    ]
    assert runs[0]["eval_shares"] == history()  # JSON keeps floats exactly
    assert runs[0]["summary"] == json.loads(json.dumps(asdict(bench.joint_summary(history()))))
    assert [r["summary"]["held"] for r in runs] == [True, False]
    assert (out / "figures" / "digits_balance_joint_attributes.png").read_bytes() == b"png of joint_seed1"
    table = capsys.readouterr().out
    assert "| run | seed | 0 & thin | 0 & bold | 6+8+9 & thin | 6+8+9 & bold |" in table
    assert "| joint_seed1 | 1 | 25.1 (20.6-29.6) |" in table and "| joint_unseeded | ? |" in table
    print(table)  # shown with pytest -s

    loop_and_even = write_run(tmp_path / "joint_multi_seed2", joint_multi_records(), "attributes_per_prompt.png", 2)
    bench.main(["--out", str(out), "--joint-multi-from-run", str(loop_and_even)])
    rewritten = json.loads((out / "digits_debias_multi.json").read_text())
    assert rewritten["joint"] == runs and rewritten["prompts"] == {"kept": True}
    (run,) = rewritten["joint_multi"]
    assert (run["label"], run["seed"], run["config"]) == ("joint_multi_seed2", 2, bench.JOINT_MULTI)
    assert list(run["prompts"]) == ["a digit with a loop", "an even digit"]
    even = run["prompts"]["an even digit"]
    assert even["eval_shares"] == history(EVEN, excursion_at=6)
    assert even["summary"]["classes"] == EVEN and even["summary"]["held"] is False
    assert run["prompts"]["a digit with a loop"]["summary"]["held"] is True
    figure = out / "figures" / "digits_balance_joint_multi_per_prompt.png"
    assert figure.read_bytes() == b"png of joint_multi_seed2"
    table = capsys.readouterr().out
    assert "| joint_multi_seed2 | 2 | 'an even digit' | 2 & thin: " in table
    print(table)


def test_joint_fits_each_seed_with_its_overrides_and_removes_the_fitted_runs(tmp_path, monkeypatch):
    calls = []

    def fake_fit(config, run_dir, *overrides):  # writes what a finished run leaves behind
        calls.append((config, run_dir.name, overrides))
        write_run(run_dir, joint_records(None), "attributes.png", seed=None)
        return 1.5

    monkeypatch.setattr(bench, "fit", fake_fit)
    out = tmp_path / "out"
    bench.main(["--out", str(out), "--no-multi", "--joint", "--seeds", "0", "2"])
    assert calls == [
        (bench.JOINT, "runs_ddpo_balance_joint_seed0", ("--seed_everything=0", "--data.init_args.seed=0")),
        (bench.JOINT, "runs_ddpo_balance_joint_seed2", ("--seed_everything=2", "--data.init_args.seed=2")),
    ]
    written = json.loads((out / "digits_debias_multi.json").read_text())
    assert list(written) == ["joint"]
    assert [(r["label"], r["seed"], r["seconds"]) for r in written["joint"]] == [
        ("runs_ddpo_balance_joint_seed0", 0, 1.5),
        ("runs_ddpo_balance_joint_seed2", 2, 1.5),
    ]
    assert not any(out.glob("runs_*"))
    assert (out / "figures" / "digits_balance_joint_attributes.png").exists()


def test_the_multi_prompt_part_still_works_alone_and_no_multi_alone_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "fit", no_fitting)
    out = tmp_path / "out"
    out.mkdir()
    (out / "digits_debias_multi.json").write_text(json.dumps({"joint": "earlier", "joint_multi": "earlier too"}))
    run = write_run(tmp_path / "multi", multi_records(), "attributes_per_prompt.png", seed=0)
    bench.main(["--out", str(out), "--from-run", str(run)])
    written = json.loads((out / "digits_debias_multi.json").read_text())
    assert written["joint"] == "earlier" and written["joint_multi"] == "earlier too"
    assert written["config"] == bench.MULTI and written["seconds"] is None
    assert written["prompts"]["b"]["column"] == "4" and written["prompts"]["b"]["q"][0] == pytest.approx(2 / 3)
    assert written["prompts"]["a"]["held"] and not written["prompts"]["b"]["held"]
    assert "| 'b' | 4 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--out", str(out), "--no-multi"])
