"""Sharded training (FSDP2, ``--trainer.strategy=fsdp2``) on 2 gloo CPU processes.

Each run goes through the command line as a user's would (``tests.modules.test_ddpo_ddp.ddp_fit``).
The comparisons sample the same global batch on 1 and 2 processes (``tests.helpers.WorldSizeFreeSeeds``)
and compare what the runs export: the LoRA file (or the fully fine-tuned transformer) the sharded run
gathers on rank 0 against the one-process run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_sdrl.policies import LoRASettings, RandomStableDiffusion3Policy, RandomTextToImagePolicy
from lightning_sdrl.policies.lora import LORA_WEIGHTS_FILE
from lightning_sdrl.policies.sharding import denoiser_blocks
from lightning_sdrl.strategies import FSDP2Strategy
from tests.modules.test_ddpo_ddp import ddp_fit
from tests.policies.test_lora_io import tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
BRIGHTNESS = "lightning_sdrl.rewards.simple.Brightness"
SAME_GLOBAL_BATCH = ["--data=tests.helpers.WorldSizeFreeSeeds", "--data.batch_size=4", "--trainer.logger=false"]


def records(directory, epoch):
    return [json.loads((directory / "records" / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]


def exported(directory, full: bool) -> dict[str, torch.Tensor]:
    trained = directory / "trained"
    if full:
        return load_file(trained / "transformer" / "diffusion_pytorch_model.safetensors")
    return load_file(trained / LORA_WEIGHTS_FILE)


def one_and_two_processes(tmp_path, config):
    """The same global batch of 8 per epoch on 1 process (2 batches) and sharded on 2 (1 batch each)."""
    runs = {}
    for devices, batches in ((2, 1), (1, 2)):
        arguments = [*SAME_GLOBAL_BATCH, f"--data.num_batches_per_epoch={batches}"]
        ddp_fit(tmp_path / f"world{devices}", BRIGHTNESS, config, devices, arguments, strategy="fsdp2")
        runs[devices] = tmp_path / f"world{devices}"
    return runs[2], runs[1]


@pytest.mark.parametrize("fine_tuning", ["lora", "full"])
def test_a_sharded_update_equals_one_process_on_the_global_batch(fine_tuning, tmp_path):
    """DiffusionNFT on the tiny SD3: two epochs (two optimiser steps each, the old policy trailing) sharded
    on 2 processes give the one-process weights up to the order of float32 sums (atol 1e-4, as for DDP)."""
    full, config = fine_tuning == "full", "configs/tiny/nft_sd3.yaml"
    if full:  # the whole transformer trains (and is sharded alike), with a smaller step
        settings = yaml.safe_load((ROOT / config).read_text())
        settings["model"]["init_args"]["policy"]["init_args"]["lora"] = None
        settings["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.001
        settings["model"]["init_args"]["kl_reference_coef"] = 0.1  # a frozen copy of the transformer, sharded too
        config = str(tmp_path / "nft_sd3_full.yaml")
        Path(config).write_text(yaml.safe_dump(settings))
    two, one = one_and_two_processes(tmp_path, config)
    for epoch in range(2):
        rank0, rank1 = records(two, epoch)
        single = json.loads((one / "records" / f"rank0_epoch{epoch}.json").read_text())
        assert rank0["advantages"] == rank1["advantages"]
        assert rank0["advantages"] == pytest.approx(single["advantages"], abs=1e-5)
        assert rank0["sample_sums"] != rank1["sample_sums"]  # each rank sampled its half of the batch
        # each rank holds half of the denoiser (FSDP2 pads the last shard of odd-sized dimensions)
        for record in (rank0, rank1):
            assert record["local_denoiser_numel"] <= record["denoiser_numel"] // 2 + 64
        assert single["local_denoiser_numel"] == single["denoiser_numel"]
        assert rank0["trainable_sum"] == rank1["trainable_sum"]
        assert rank0["old_policy_sum"] == pytest.approx(single["old_policy_sum"], abs=1e-4)
    sharded, reference = exported(two, full), exported(one, full)
    assert set(sharded) == set(reference)
    changed = 0
    for key, value in reference.items():
        # as under DDP: Adam steps of lr 0.02 move weights by ~1e-2, the order of float32 sums by ~1e-5
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-4, msg=key)
        changed += 0 if full else int(not torch.equal(value, torch.zeros_like(value)))
    assert full or changed > 0


def test_grpo_groups_see_both_ranks_and_each_rank_holds_half_of_the_flux_transformer(tmp_path):
    """Flow-GRPO on the tiny FLUX.1 sharded over 2 processes, with activation checkpointing and a batch-level
    reward: both ranks use the same group advantages and the reward scores both ranks' images at once."""
    arguments = ["--data.num_batches_per_epoch=2", "--model.init_args.policy.init_args.gradient_checkpointing=true"]
    ddp_fit(tmp_path, "tests.helpers.BatchRankReward", "configs/tiny/grpo_flux.yaml", 2, arguments, "fsdp2")
    for epoch in range(2):
        rank0, rank1 = records(tmp_path, epoch)
        assert rank0["advantages"] == rank1["advantages"]
        assert len(rank0["advantages"]) == 2 * len(rank0["sample_sums"])  # groups span both ranks
        assert set(rank0["reward_seen"]) == set(rank1["reward_seen"]) == {2 * 4}  # 4 images per rank and batch
        assert rank0["trainable_sum"] == rank1["trainable_sum"]
        assert rank0["local_denoiser_numel"] <= rank0["denoiser_numel"] // 2 + 64
    assert (tmp_path / "trained" / LORA_WEIGHTS_FILE).is_file()


def test_a_sharded_run_resumed_from_its_checkpoint_equals_the_uninterrupted_one(tmp_path):
    """Stop after epoch 1, resume from the sharded checkpoint folder: the exported LoRA is bit-identical."""
    config, arguments = "configs/tiny/nft_sd3.yaml", [*SAME_GLOBAL_BATCH, "--data.num_batches_per_epoch=1"]
    ddp_fit(tmp_path / "whole", BRIGHTNESS, config, 2, arguments, "fsdp2")
    ddp_fit(tmp_path / "first", BRIGHTNESS, config, 2, [*arguments, "--trainer.max_epochs=1"], "fsdp2")
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()  # sharded: a folder of shards
    resumed = [*arguments, f"--ckpt_path={checkpoint}"]
    ddp_fit(tmp_path / "resumed", BRIGHTNESS, config, 2, resumed, "fsdp2")
    whole, again = exported(tmp_path / "whole", False), exported(tmp_path / "resumed", False)
    assert set(whole) == set(again)
    for key, value in whole.items():
        assert torch.equal(again[key], value), key
    assert records(tmp_path / "resumed", 1)[0]["old_policy_sum"] == records(tmp_path / "whole", 1)[0]["old_policy_sum"]


def test_the_gathered_lora_loads_into_the_policy_and_the_stock_pipeline(tmp_path):
    """The LoRA a sharded DDPO run on SD 1.5's UNet exports is a plain diffusers LoRA file."""
    ddp_fit(tmp_path, BRIGHTNESS, "configs/tiny/ddpo.yaml", 2, ["--trainer.max_epochs=1"], "fsdp2")
    policy = RandomTextToImagePolicy("tiny", lora=LoRASettings(rank=4))
    policy.load_trained(tmp_path / "trained")
    pipe = tiny_pipeline()
    pipe.load_lora_weights(tmp_path / "trained")
    x, t = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 500])
    conditions = policy.encode_prompts(["a", "b"])
    with torch.no_grad():
        ours = policy.eval().denoise(x, t, conditions)
        theirs = pipe.unet(x, t, encoder_hidden_states=conditions["encoder_hidden_states"]).sample
        with policy.reference():
            untrained = policy.denoise(x, t, conditions)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (ours - untrained).abs().max() > 0


def test_a_rank_that_raises_ends_the_sharded_run_with_its_error(tmp_path):
    _, result = ddp_fit(
        tmp_path,
        "tests.helpers.RaiseOnRankOneReward",
        "configs/tiny/nft_sd3.yaml",
        2,
        ["--data.num_batches_per_epoch=1"],
        "fsdp2",
        check=False,
    )
    assert result.returncode != 0
    assert "the reward failed on rank 1" in result.stderr


def test_the_strategy_shards_over_every_rank_and_the_blocks_are_the_denoisers():
    strategy = FSDP2Strategy()
    assert strategy._tensor_parallel_size == 1 and strategy._data_parallel_size == "auto"
    with pytest.raises(ValueError, match="BLOCK_CONTAINERS"):
        denoiser_blocks(torch.nn.Linear(2, 2))
    sd3 = RandomStableDiffusion3Policy("sd3-tiny", lora=LoRASettings(rank=4)).denoiser
    assert denoiser_blocks(sd3) == list(sd3.transformer_blocks)
    unet = RandomTextToImagePolicy("tiny", lora=None).denoiser
    assert denoiser_blocks(unet) == [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def test_a_tensor_parallel_mesh_is_refused_with_the_settings_that_shard(tmp_path):
    """Lightning's own ModelParallelStrategy puts a node's processes on tensor parallelism by default."""
    strategy = ["--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy"]
    _, result = ddp_fit(tmp_path, BRIGHTNESS, "configs/tiny/nft_sd3.yaml", 2, strategy, "fsdp2", check=False)
    assert result.returncode != 0
    assert "--trainer.strategy.data_parallel_size=2 --trainer.strategy.tensor_parallel_size=1" in result.stderr


@pytest.mark.parametrize("name", ["grpo_flux_fsdp2.yaml", "grpo_sd35_large_fsdp2.yaml"])
def test_the_sharded_gpu_configs_use_the_registered_strategy(name):
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_sdrl.cli  # noqa: F401 - registers the strategy name
    from lightning_sdrl.strategies import STRATEGY_NAME

    trainer = yaml.safe_load((ROOT / "configs" / name).read_text())["trainer"]
    assert trainer["strategy"] == STRATEGY_NAME and trainer["devices"] == 8
    assert StrategyRegistry[STRATEGY_NAME]["strategy"] is FSDP2Strategy


def test_shard_denoiser_on_a_one_rank_mesh_and_cpu_offload_refused_on_the_cpu(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_sdrl.policies.sharding import is_sharded, local_numel, shard_denoiser

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        denoiser = RandomStableDiffusion3Policy("sd3-tiny", lora=LoRASettings(rank=4)).denoiser
        with pytest.raises(ValueError, match="use --trainer.strategy=fsdp2 .* with accelerator cpu"):
            shard_denoiser(denoiser, mesh, cpu_offload=True)
        whole = local_numel(denoiser)
        assert shard_denoiser(denoiser, mesh) == len(denoiser.transformer_blocks) + 1
        assert is_sharded(denoiser) and local_numel(denoiser) == whole  # one rank holds everything
        assert shard_denoiser(denoiser, mesh) == 0  # already sharded: nothing to do
    finally:
        torch.distributed.destroy_process_group()


def test_refl_under_sharding_backpropagates_through_the_same_step_on_every_rank(tmp_path):
    """ReFL draws its gradient step per batch seed; sharded, every rank must call the transformer alike
    (each call gathers its blocks), so all ranks take rank 0's step. The run trains and exports its LoRA."""
    ddp_fit(tmp_path, BRIGHTNESS, "configs/tiny/refl_flux.yaml", 2, ["--trainer.callbacks=[]"], "fsdp2")
    trained = exported(tmp_path, False)
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in trained.items())
