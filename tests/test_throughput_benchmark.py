"""Smoke test of benchmarks/throughput.py in its sd3-tiny (GRPO) mode: a tiny run on the CPU, its table checked.

The run compares two weight dtypes (the policy's ``torch_dtype``) and two timestep batches; the
compiled variant (``--compile``) is left to GPU runs (inductor needs minutes to compile on a CPU).
"""

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

from lightning_sdrl.policies.architectures import flux_components, sd3_components, sdxl_components
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
VARIANTS = ["float32 weights, eager", "bfloat16 weights, eager"]
TIMESTEP_BATCHES = ["1", "2"]


def run_benchmark(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(SCRIPT), *arguments]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def output() -> str:
    args = ("--architecture", "sd3-tiny", "--batch", str(BATCH), "--steps", str(STEPS), "--repeats", "1")
    variants = ("--weights-dtype", "float32", "bfloat16", "--timestep-batch", *TIMESTEP_BATCHES)
    result = run_benchmark(*args, *variants)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table(output: str) -> dict[tuple[str, str, str], list[float]]:
    """(row key, variant, timestep batch) -> [images/s, s per batch, TFLOP/s, MFU, peak GiB], each row exactly once."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] not in ROWS.values():
            continue
        assert len(cells) == 8, line
        key = (next(k for k, label in ROWS.items() if label == cells[0]), cells[1], cells[2])
        assert key not in rows, f"row {key} appears twice in:\n{output}"
        rows[key] = [float(cell) for cell in cells[3:]]
    expected = {(key, variant, "-") for key in ("ours", "stock") for variant in VARIANTS}
    expected |= {(key, v, b) for key in ("train", "epoch") for v in VARIANTS for b in TIMESTEP_BATCHES}
    assert set(rows) == expected, output
    return rows


def test_table_has_every_row_with_finite_consistent_figures(output):
    rows = table(output)
    for key, (images_per_s, seconds, tflops, mfu, memory) in rows.items():
        assert math.isfinite(images_per_s) and images_per_s > 0, key
        assert math.isfinite(seconds) and seconds > 0, key
        assert math.isfinite(tflops) and tflops > 0, key  # FlopCounterMode saw the matmuls
        assert math.isnan(mfu) and math.isnan(memory), key  # no peak given; peak CUDA memory means nothing on CPU
        assert images_per_s * seconds == pytest.approx(BATCH, rel=0.01), key  # 3 significant figures each
    for variant in VARIANTS:
        ours = rows["ours", variant, "-"]
        for batch in TIMESTEP_BATCHES:
            # The epoch samples one batch and then trains, so training time is epoch minus sampling time.
            epoch, train = rows["epoch", variant, batch], rows["train", variant, batch]
            assert epoch[1] > ours[1]
            assert train[1] == pytest.approx(epoch[1] - ours[1], rel=0.02, abs=2e-3)
            # scoring two steps per denoiser call performs the same FLOPs as one at a time
            flops = train[1] * train[2]
            assert flops == pytest.approx(rows["train", variant, "1"][1] * rows["train", variant, "1"][2], rel=0.02)
        match = re.search(rf"our sampler / stock pipeline time \({variant}\): ([0-9.]+)", output)
        assert float(match.group(1)) == pytest.approx(ours[1] / rows["stock", variant, "-"][1], rel=0.02)


def test_header_states_the_settings(output):
    header = next(line for line in output.splitlines() if line.startswith("## "))
    assert header.startswith(
        f"## sd3-tiny on CPU, torch.float32 compute, batch {BATCH}, {STEPS} steps, 16x16, CFG 4.5, "
    )
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
        ("sdxl_setup", {"architecture": "sdxl"}, "needs a CUDA device; on CPU use --architecture sdxl-tiny"),
        ("sdxl_setup", {"architecture": "sdxl-tiny", "no_t5": True}, "SDXL has no T5: drop it"),
        ("flux_setup", {"architecture": "flux-dev"}, "needs a CUDA device; on CPU use --architecture flux-tiny"),
        ("flux_setup", {"architecture": "flux-tiny", "no_t5": True}, "FLUX.1's prompt is T5's: drop it"),
        ("flux_setup", {"architecture": "flux-tiny", "batch": 1}, "GRPO needs a group of at least 2"),
    ],
)
def test_bad_arguments_raise_a_clear_error_before_building(benchmark, setup, arguments, message):
    args = argparse.Namespace(**{"batch": 16, "resolution": None, "no_t5": False, **arguments})
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(benchmark, setup)(args, torch.device("cpu"), benchmark.Variant(torch.float32, compiled=False))


def test_flops_are_counted_eagerly_and_compile_is_restored(benchmark):
    class Policy:
        compile_mode = "max-autotune"

    policy = Policy()
    seen = []
    flops = benchmark.count_flops(lambda: seen.append(policy.compile_mode) or torch.ones(4, 8) @ torch.ones(8, 2))
    assert flops == 2 * 4 * 8 * 2  # one [4, 8] x [8, 2] matmul: 2 m n k
    with benchmark.eager(policy):
        seen.append(policy.compile_mode)
    assert seen == ["max-autotune", None] and policy.compile_mode == "max-autotune"


def test_sdxl_tiny_compares_with_the_stock_sdxl_pipeline_and_counts_the_unet():
    result = run_benchmark("--architecture", "sdxl-tiny", "--batch", "2", "--steps", "2", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("## "))
    assert header.startswith("## sdxl-tiny on CPU, torch.float32 compute, batch 2, 2 steps, 16x16, CFG 5.0, eta 1.0")
    labels = {line.split("|")[1].strip() for line in lines if line.startswith("| ")}
    assert {"stock StableDiffusionXLPipeline", "DDPO epoch (sample + train)"} <= labels, result.stdout
    unet = sdxl_components("sdxl-tiny", seed=0).unet
    match = re.search(r"UNet parameters: ([0-9,]+) ", result.stdout)
    assert int(match.group(1).replace(",", "")) == sum(p.numel() for p in unet.parameters())


def test_flux_tiny_compares_with_the_stock_flux_pipeline_and_counts_the_transformer():
    result = run_benchmark("--architecture", "flux-tiny", "--batch", "2", "--steps", "2", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("## "))
    assert header.startswith(
        "## flux-tiny on CPU, torch.float32 compute, batch 2, 2 steps, 16x16, guidance embedding 3.5"
    )
    labels = {line.split("|")[1].strip() for line in lines if line.startswith("| ")}
    assert {"stock FluxPipeline", "GRPO epoch (sample + train, one prompt, group of 2)"} <= labels, result.stdout
    transformer = flux_components("flux-tiny", seed=0).transformer
    match = re.search(r"transformer parameters: ([0-9,]+) ", result.stdout)
    assert int(match.group(1).replace(",", "")) == sum(p.numel() for p in transformer.parameters())
