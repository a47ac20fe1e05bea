"""Per-rank training state with and without sharding: DDP vs FSDP2 (``--trainer.strategy=fsdp2``).

For each tiny config and fine-tuning mode (LoRA, full), one short 2-process run per strategy (gloo on
CPU; NCCL on GPUs with ``--accelerator gpu``) records, on every rank after its first optimiser
step, the bytes that rank holds of the denoiser's parameters, of the trainable parameters and of the
optimiser state (``DTensor`` shards counted by their local part), and on a GPU the peak allocated
memory. Prints a markdown table and writes the records as JSON.

    python benchmarks/sharding_memory.py                     # CPU, 2 processes: docs/sharding.md's table
    python benchmarks/sharding_memory.py --accelerator gpu   # peak memory per GPU too (2+ GPUs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"sd15": "configs/tiny/ddpo.yaml", "sd3": "configs/tiny/nft_sd3.yaml", "flux": "configs/tiny/grpo_flux.yaml"}


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


class Footprint(pl.Callback):
    """Writes ``rank<r>.json``: this rank's denoiser / trainable / optimiser-state bytes after the first epoch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        policy = pl_module.policy
        optimizer = pl_module.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)
        states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        record = {
            "rank": trainer.global_rank,
            "denoiser_bytes": _local_bytes(policy.denoiser.parameters()),
            "trainable_bytes": _local_bytes(policy.trainable_parameters()),
            "optimizer_bytes": _local_bytes(s for s in states if s.dim() > 0),
            "denoiser_parameters": sum(p.numel() for p in policy.denoiser.parameters()),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def measure(config: str, full: bool, strategy: str, accelerator: str, work: Path) -> list[dict]:
    """One 2-process epoch of ``config``; returns both ranks' records."""
    import yaml

    settings = yaml.safe_load((ROOT / config).read_text())
    if full:
        settings["model"]["init_args"]["policy"]["init_args"]["lora"] = None
        settings["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 1e-4
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    records = work / "records"
    command = [
        sys.executable, "-m", "lightning_sdrl", "fit", "-c", str(path),
        f"--trainer.strategy={strategy}", "--trainer.devices=2", f"--trainer.accelerator={accelerator}",
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={work}", "--data.num_batches_per_epoch=1",
        "--trainer.callbacks+=benchmarks.sharding_memory.Footprint", f"--trainer.callbacks.out_dir={records}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--out", default="docs/sharding_memory.json")
    args = parser.parse_args(argv)
    rows, table = [], []
    for model in args.models:
        for full in (False, True):
            measured = {}
            for strategy in ("ddp", "fsdp2"):
                with tempfile.TemporaryDirectory() as work:
                    measured[strategy] = measure(CONFIGS[model], full, strategy, args.accelerator, Path(work))
            rows.append({"model": model, "fine_tuning": "full" if full else "lora", **measured})
            ddp, fsdp = measured["ddp"][0], max(measured["fsdp2"], key=lambda r: r["denoiser_bytes"])
            cells = [model, "full" if full else "LoRA", f"{ddp['denoiser_parameters']:,}"]
            for key in ("denoiser_bytes", "trainable_bytes", "optimizer_bytes"):
                cells.append(f"{ddp[key]:,} / {fsdp[key]:,} ({fsdp[key] / ddp[key]:.2f})")
            if args.accelerator == "gpu":
                cells.append(f"{ddp['peak_gpu_bytes'] / 2**30:.2f} / {fsdp['peak_gpu_bytes'] / 2**30:.2f} GiB")
            table.append("| " + " | ".join(cells) + " |")
    header = ["model", "fine-tuning", "denoiser parameters", "denoiser bytes per rank, DDP / FSDP2 (ratio)"]
    header += ["trainable bytes", "optimiser-state bytes"] + ["peak GPU memory"] * (args.accelerator == "gpu")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(table))
    out = ROOT / args.out
    out.write_text(json.dumps({"accelerator": args.accelerator, "processes": 2, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
