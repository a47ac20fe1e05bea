"""Smoke test of benchmarks/throughput.py in its sd3-tiny (GRPO) mode: a tiny run on the CPU, its table checked."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_sdrl.policies.architectures import sd3_components
from lightning_sdrl.policies.sd3 import FLOW_GRPO_LORA_TARGET_MODULES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
BATCH, STEPS, LORA_RANK = 2, 2, 32
ROWS = {
    "ours": "our sampler (latents + log-probs)",
    "stock": "stock StableDiffusion3Pipeline",
    "train": f"GRPO training (all {STEPS} steps, train batch 4)",
    "epoch": f"GRPO epoch (sample + train, one prompt, group of {BATCH})",
}


def run_benchmark(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(SCRIPT), *arguments]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def output() -> str:
    args = ("--architecture", "sd3-tiny", "--batch", str(BATCH), "--steps", str(STEPS), "--repeats", "1")
    result = run_benchmark(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table(output: str) -> dict[str, list[float]]:
    """Row label -> [images/s, s per batch, TFLOP/s, peak GiB], each label required exactly once."""
    rows = {}
    for key, label in ROWS.items():
        lines = [line for line in output.splitlines() if line.startswith(f"| {label} |")]
        assert len(lines) == 1, f"row {label!r} appears {len(lines)} times in:\n{output}"
        cells = [cell.strip() for cell in lines[0].strip("|").split("|")]
        assert len(cells) == 5, lines[0]
        rows[key] = [float(cell) for cell in cells[1:]]
    return rows


def test_table_has_every_row_with_finite_consistent_figures(output):
    rows = table(output)
    for key, (images_per_s, seconds, tflops, memory) in rows.items():
        assert math.isfinite(images_per_s) and images_per_s > 0, key
        assert math.isfinite(seconds) and seconds > 0, key
        assert math.isfinite(tflops) and tflops > 0, key  # FlopCounterMode saw the matmuls
        assert math.isnan(memory), key  # peak CUDA memory has no meaning on the CPU
        assert images_per_s * seconds == pytest.approx(BATCH, rel=0.01), key  # 3 significant figures each
    # The epoch samples one batch and then trains, so training time is epoch minus sampling time.
    assert rows["epoch"][1] > rows["ours"][1]
    assert rows["train"][1] == pytest.approx(rows["epoch"][1] - rows["ours"][1], rel=0.02, abs=2e-3)
    ratio = float(re.search(r"our sampler / stock pipeline time: ([0-9.]+)", output).group(1))
    assert ratio == pytest.approx(rows["ours"][1] / rows["stock"][1], rel=0.02)


def test_header_states_the_settings(output):
    header = next(line for line in output.splitlines() if line.startswith("## "))
    assert header.startswith(f"## sd3-tiny on CPU, torch.float32, batch {BATCH}, {STEPS} steps, 16x16, CFG 4.5, ")
    assert "noise level 0.7, LoRA rank 32 alpha 64, T5 on" in header


def test_parameter_counts_match_an_independent_build(output):
    transformer = sd3_components("sd3-tiny", seed=0).transformer
    base = sum(p.numel() for p in transformer.parameters())
    # LoRA on each targeted linear layer adds A [r, in] and B [out, r]; peft matches names by suffix.
    lora = sum(
        LORA_RANK * (module.in_features + module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in FLOW_GRPO_LORA_TARGET_MODULES)
    )
    assert lora > 0
    match = re.search(r"transformer parameters: ([0-9,]+) .*; trainable LoRA parameters: ([0-9,]+)", output)
    assert match is not None, output
    assert int(match.group(1).replace(",", "")) == base
    assert int(match.group(2).replace(",", "")) == lora


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.parametrize(
    ("setup", "arguments", "message"),
    [
        ("sd3_setup", {"architecture": "sd35-medium"}, "needs a CUDA device; on CPU use --architecture sd3-tiny"),
        ("sd3_setup", {"architecture": "sd3-tiny", "batch": 1}, "GRPO needs a group of at least 2"),
        ("sd15_setup", {"architecture": "tiny", "no_t5": True}, "drop them for --architecture tiny"),
    ],
)
def test_bad_arguments_raise_a_clear_error_before_building(benchmark, setup, arguments, message):
    args = argparse.Namespace(**{"batch": 16, "resolution": None, "no_t5": False, **arguments})
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(benchmark, setup)(args, torch.device("cpu"), torch.float32)
