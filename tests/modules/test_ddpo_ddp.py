import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_process_ddp_gloo(tmp_path):
    records = tmp_path / "records"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "lightning_sdrl",
        "fit",
        "-c",
        "configs/tiny/ddpo.yaml",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.reward=tests.helpers.BatchRankReward",
        "--trainer.callbacks+=tests.helpers.RecordUpdates",
        f"--trainer.callbacks.out_dir={records}",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        assert rank0["sample_sums"] != rank1["sample_sums"]  # each rank sampled its own images
        assert rank0["advantages"] == rank1["advantages"]  # ... and all ranks saw the same advantages
        assert len(rank0["advantages"]) == 2 * len(rank0["sample_sums"])
        assert set(rank0["reward_seen"]) == {2 * 4}  # the batch-level reward saw both ranks' batches
