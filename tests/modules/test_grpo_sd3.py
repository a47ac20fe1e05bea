"""Flow-GRPO, DDPO and ReFL on the tiny SD3 (flow-matching) policy: CLI runs, DDP groups, LoRA export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from lightning_sdrl.cli import run_cli
from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.modules.grpo import GRPOModule
from lightning_sdrl.modules.refl import ReFLModule
from lightning_sdrl.policies import LoRASettings, RandomStableDiffusion3Policy
from lightning_sdrl.rewards.simple import Brightness
from tests.helpers import lora_snapshot
from tests.modules.test_ddpo import tiny_trainer
from tests.modules.test_grpo import numpy_group_advantages

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny" / "grpo_sd3.yaml")


PROMPTS = ["a bright square", "a dark circle", "a red sun", "a blue sea"]


def fixed_noise_brightness(policy, lora_on=True):
    """Mean brightness of 64 samples from fixed noise (paired before/after: no sampling noise)."""
    policy.eval()
    generator = torch.Generator().manual_seed(1234)
    settings = dict(num_steps=4, eta=0.7, guidance_scale=2.0, generator=generator)
    with torch.no_grad():
        if lora_on:
            return float(policy.sample(PROMPTS * 16, **settings).images.mean())
        with policy.reference():
            return float(policy.sample(PROMPTS * 16, **settings).images.mean())


def assert_pipeline_loads_the_trained_lora(policy, directory):
    """The LoRA in ``directory`` loads into the stock SD3 pipeline and gives the trained transformer's outputs."""
    policy = policy.eval()
    pipe = RandomStableDiffusion3Policy("sd3-tiny", lora=None).components().pipeline()
    pipe.load_lora_weights(directory)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    conditions = policy.encode_prompts(["a bright square", "a dark circle"])
    t = policy.set_num_steps(4)[1].expand(2)
    with torch.no_grad():
        ours = policy.denoise(x, t, conditions)
        theirs = pipe.transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=conditions["encoder_hidden_states"],
            pooled_projections=conditions["pooled_projections"],
        ).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_cli_grpo_on_tiny_sd3_raises_brightness_and_exports_a_pipeline_lora(tmp_path):
    cli = run_cli(["fit", "-c", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    rewards = [float(r) for r in cli.model.reward_history]
    assert len(rewards) == 8
    assert np.mean(rewards[-3:]) > rewards[0], rewards
    # the same noise through the pretrained (LoRA off) and the trained policy: a paired comparison
    before, after = fixed_noise_brightness(cli.model.policy, False), fixed_noise_brightness(cli.model.policy)
    assert after > before + 0.0005, (before, after)
    logged = cli.trainer.logged_metrics
    for key in ("train/group_reward_std", "train/kl_reference", "train/clip_fraction", "train/reward_std"):
        assert torch.isfinite(logged[key]), key
    assert (tmp_path / "samples" / "epoch_0007.png").is_file()
    assert_pipeline_loads_the_trained_lora(cli.model.policy, tmp_path / "trained")


def test_ddpo_runs_on_tiny_sd3_and_changes_the_lora(tmp_path):
    policy = RandomStableDiffusion3Policy("sd3-tiny", lora=LoRASettings(rank=4))
    before = lora_snapshot(policy)
    module = DDPOModule(
        policy, Brightness(), num_steps=3, eta=0.7, guidance_scale=2.0, clip_range=0.5, sample_grid_every_n_epochs=0
    )
    tiny_trainer(tmp_path, 2).fit(module, SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=1))
    after = lora_snapshot(policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert (tmp_path / "trained" / "pytorch_lora_weights.safetensors").is_file()
    fresh = RandomStableDiffusion3Policy("sd3-tiny", lora=LoRASettings(rank=4))
    fresh.load_trained(tmp_path / "trained")
    assert all(torch.equal(lora_snapshot(fresh)[k], after[k]) for k in after)


def test_refl_on_tiny_sd3_raises_brightness(tmp_path):
    lora = LoRASettings(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"])
    module = ReFLModule(
        RandomStableDiffusion3Policy("sd3-tiny", lora=lora),
        Brightness(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.05),
        num_steps=4,
        eta=0.7,
        guidance_scale=2.0,
        grad_step_range=(2, 4),
        reward_weight=1.0,
        kl_weight=0.01,
        save_trained_on_end=False,
    )
    tiny_trainer(tmp_path, 4).fit(module, SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=4))
    rewards = [float(r) for r in module.reward_history]
    assert rewards[-1] > rewards[0] + 0.01, rewards


def test_grpo_with_an_sde_window_and_cps_on_tiny_sd3(tmp_path):
    for sampler in ("sde", "cps"):
        policy = RandomStableDiffusion3Policy("sd3-tiny", lora=LoRASettings(rank=4), sampler=sampler)
        module = GRPOModule(
            policy,
            Brightness(),
            num_steps=6,
            guidance_scale=1.0,  # Flow-GRPO without classifier-free guidance
            clip_range=0.5,
            sde_window_size=2,
            sde_window_range=(0, 4),
            sample_grid_every_n_epochs=0,
            save_trained_on_end=False,
        )
        before = lora_snapshot(policy)
        data = SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=1, group_size=2)
        tiny_trainer(tmp_path / sampler, 1).fit(module, data)
        assert any(not torch.equal(before[k], v) for k, v in lora_snapshot(policy).items())
        trajectory = module.sample(next(iter(data.train_dataloader())))
        assert trajectory.stochastic.sum(dim=1).eq(2).all()
        assert trajectory.stochastic[:, 4:].sum() == 0


def test_two_process_grpo_splits_a_group_across_ranks_and_both_compute_its_advantages(tmp_path):
    """Group 4 of one prompt, batch 2 per process: every group is half on rank 0, half on rank 1."""
    records = tmp_path / "records"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "lightning_sdrl",
        "fit",
        "-c",
        TINY,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_batches_per_epoch=2",
        "--model.init_args.train_batch_size=2",
        "--trainer.callbacks+=tests.helpers.RecordUpdates",
        f"--trainer.callbacks.out_dir={records}",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        assert rank0["sample_sums"] != rank1["sample_sums"]
        assert rank0["advantages"] == rank1["advantages"]
        ids = rank0["prompt_ids"]  # [rank 0's 4, rank 1's 4] in rank order
        assert ids == rank1["prompt_ids"] and len(ids) == 8
        # each of the epoch's two groups (one per batch) has two samples on each process
        first_batch = ids[0:2] + ids[4:6]
        assert len(set(first_batch)) == 1 and first_batch.count(first_batch[0]) == 4
        expected = numpy_group_advantages(ids, rank0["rewards"], 1e-4, False)
        np.testing.assert_allclose(rank0["advantages"], expected, rtol=1e-5, atol=1e-6)
        assert rank0["trainable_sum"] == rank1["trainable_sum"]


def test_cps_last_step_is_deterministic_and_never_trained_on():
    policy = RandomStableDiffusion3Policy("sd3-tiny", lora=LoRASettings(rank=4), sampler="cps").eval()
    trajectory = policy.sample(["a", "b"], num_steps=4, eta=0.7, guidance_scale=1.0)
    assert trajectory.stochastic[:, :3].all() and not trajectory.stochastic[:, 3].any()
    assert torch.equal(trajectory.log_probs[:, 3], torch.zeros(2))
    assert torch.isfinite(trajectory.log_probs).all()
    # the CPS step to sigma = 0 lands on the predicted x0
    policy.set_num_steps(4)
    x, t = trajectory.latents[:, 3], trajectory.timesteps[0, 3]
    with torch.no_grad():
        v = policy.guided_prediction(x, t.expand(2), trajectory.conditions, 1.0)
    torch.testing.assert_close(trajectory.latents[:, 4], x - t / 1000 * v, rtol=1e-5, atol=1e-5)
