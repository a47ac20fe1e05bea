import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def ddp_fit(tmp_path, reward, config="configs/tiny/ddpo.yaml", devices=2, extra=(), strategy="ddp", check=True):
    """Fit a tiny config for 2 epochs on ``devices`` gloo processes; returns the records directory.

    ``strategy`` is the multi-process one (``"fsdp2"``: sharded); with ``check`` the run must succeed.
    """
    records = tmp_path / "records"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "lightning_sdrl",
        "fit",
        "-c",
        config,
        f"--trainer.strategy={strategy if devices > 1 else 'auto'}",
        f"--trainer.devices={devices}",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.reward={reward}",
        "--trainer.callbacks+=tests.helpers.RecordUpdates",
        f"--trainer.callbacks.out_dir={records}",
        *extra,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return records, result


def test_two_process_ddp_gloo(tmp_path):
    records, _ = ddp_fit(tmp_path, "tests.helpers.BatchRankReward")
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        assert rank0["sample_sums"] != rank1["sample_sums"]  # each rank sampled its own images
        assert rank0["advantages"] == rank1["advantages"]  # ... and all ranks saw the same advantages
        assert len(rank0["advantages"]) == 2 * len(rank0["sample_sums"])
        assert set(rank0["reward_seen"]) == {2 * 4}  # the batch-level reward saw both ranks' batches


def test_ddp_drops_a_nan_sample_of_one_process_and_keeps_the_processes_in_step(tmp_path):
    """Process 0 has one NaN reward per epoch: it trains on 7 samples, process 1 on 8, in lockstep."""
    records, result = ddp_fit(tmp_path, "tests.helpers.NaNOnRankZeroReward")
    assert "dropped 1 of 16 samples with a non-finite reward" in result.stderr
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        advantages = [str(a) for a in rank0["advantages"]]
        assert advantages == [str(a) for a in rank1["advantages"]]
        assert advantages.count("nan") == 1
        assert rank0["trainable_sum"] == rank1["trainable_sum"]  # one all-reduced update on both
    assert rank0["trainable_sum"] != json.loads((records / "rank0_epoch0.json").read_text())["trainable_sum"]


@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_forward_process_modules_train_in_lockstep_under_ddp(algorithm, tmp_path):
    """Each process samples its own images; advantages, updates and the old / EMA policy agree on both."""
    records, _ = ddp_fit(tmp_path, "lightning_sdrl.rewards.simple.Brightness", f"configs/tiny/{algorithm}_sd3.yaml")
    first = json.loads((records / "rank0_epoch0.json").read_text())
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        assert rank0["sample_sums"] != rank1["sample_sums"]
        assert rank0["advantages"] == rank1["advantages"]
        assert len(rank0["advantages"]) == 2 * len(rank0["sample_sums"])
        assert rank0["trainable_sum"] == rank1["trainable_sum"]  # one all-reduced update on both
        assert rank0["old_policy_sum"] == rank1["old_policy_sum"]
    assert rank0["trainable_sum"] != first["trainable_sum"]


@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_forward_process_update_on_two_processes_equals_one_process_on_the_global_batch(algorithm, tmp_path):
    """2 processes with 4 samples each make the update 1 process makes from the same 8 samples.

    Both runs sample the same global batch (``WorldSizeFreeSeeds``) and take one optimiser step per
    epoch on it (DDP averages the two halves' gradients); every sample's training noise and
    timesteps come from its own seed, so only the order of floating-point sums differs.
    """
    config, reward = f"configs/tiny/{algorithm}_sd3.yaml", "lightning_sdrl.rewards.simple.Brightness"
    common = ["--data=tests.helpers.WorldSizeFreeSeeds", "--data.batch_size=4", "--trainer.logger=false"]
    runs = {}
    for devices, batches, train_batch in ((2, 1, 4), (1, 2, 8)):
        per_run = [f"--data.num_batches_per_epoch={batches}", f"--model.init_args.train_batch_size={train_batch}"]
        records, _ = ddp_fit(tmp_path / f"world{devices}", reward, config, devices, [*common, *per_run])
        epochs = [json.loads((records / f"rank0_epoch{epoch}.json").read_text()) for epoch in range(2)]
        checkpoint = torch.load(tmp_path / f"world{devices}" / "checkpoints" / "last.ckpt", weights_only=False)
        runs[devices] = (epochs, checkpoint)
    (two, two_checkpoint), (one, one_checkpoint) = runs[2], runs[1]
    assert two[0]["advantages"] == one[0]["advantages"]  # the same global batch, sampled by the same weights
    assert two[1]["advantages"] == pytest.approx(one[1]["advantages"], abs=1e-4)  # ... by nearly the same
    assert set(two_checkpoint["state_dict"]) == set(one_checkpoint["state_dict"])
    for name in ("state_dict", "old_policy"):
        for key, value in two_checkpoint[name].items():
            # two Adam steps of lr 0.05 / 0.02 move the weights by ~1e-2; sum order moves them by ~1e-5
            torch.testing.assert_close(value, one_checkpoint[name][key], rtol=0, atol=1e-4, msg=f"{name} {key}")


def test_a_multi_reward_under_ddp_combines_the_epoch_of_both_processes_in_the_background(tmp_path):
    """Components of both ranks gathered, combined over the epoch's prompt groups; the batch-level
    component sees both ranks' images; a background component moves the whole scoring to the worker."""
    from tests.rewards.test_combination import hand_combination

    reward = {
        "class_path": "lightning_sdrl.rewards.combination.MultiReward",
        "init_args": {
            "rewards": {
                "batch": {"class_path": "tests.helpers.BatchRankReward"},
                "bright": {"class_path": "tests.helpers.ThreadRecordingBrightness", "init_args": {"background": True}},
            },
            "weights": {"batch": 1.0, "bright": -0.5},
            "normalize": "group",
        },
    }
    records, _ = ddp_fit(tmp_path, json.dumps(reward))
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        assert rank0["components"] == rank1["components"] and len(rank0["components"]) == 16
        assert rank0["rewards"] == rank1["rewards"]
        expected = hand_combination(rank0["components"], [1.0, -0.5], rank0["prompt_ids"], eps=1e-4)
        torch.testing.assert_close(torch.tensor(rank0["rewards"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-5)
        assert set(rank0["reward_seen"]) == {2 * 4}  # the batch-level component saw both ranks' batches
