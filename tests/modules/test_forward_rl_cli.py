"""DiffusionNFT and AWM through the command line: tiny SD3 and the digits models learn, the LoRA loads in diffusers."""

from pathlib import Path

import pytest
import torch
import yaml

from lightning_sdrl.cli import run_cli
from lightning_sdrl.digits.classifier import DigitsClassifier
from tests.modules.test_grpo_sd3 import assert_pipeline_loads_the_trained_lora, fixed_noise_brightness
from tests.test_config_roundtrip import shrink

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_cli_run_on_tiny_sd3_raises_brightness_and_exports_a_pipeline_lora(algorithm, tmp_path):
    config = str(ROOT / "configs" / "tiny" / f"{algorithm}_sd3.yaml")
    quiet = "--trainer.enable_progress_bar=false"
    cli = run_cli(["fit", "-c", config, f"--trainer.default_root_dir={tmp_path}", quiet])
    assert len(cli.model.reward_history) == 8
    # the same noise through the pretrained (LoRA off) and the trained policy: a paired comparison
    before, after = fixed_noise_brightness(cli.model.policy, False), fixed_noise_brightness(cli.model.policy)
    assert after > before + 0.001, (before, after)
    assert_pipeline_loads_the_trained_lora(cli.model.policy, tmp_path / "trained")


def six_probability(policy, prompt: str, guidance_scale: float, lora_on: bool) -> float:
    """Mean classifier probability of six over 64 fixed-noise ODE samples (paired before/after)."""
    classifier = DigitsClassifier()
    policy.eval()
    context = torch.no_grad() if lora_on else policy.reference()
    with torch.no_grad(), context:
        generator = torch.Generator().manual_seed(4321)
        images = policy.generate([prompt] * 64, num_steps=10, guidance_scale=guidance_scale, generator=generator).images
        return float(classifier(images)[:, 6].mean())


@pytest.mark.parametrize("config", ["digits/nft_shift.yaml", "digits/awm_shift.yaml", "digits/nft_ddim_shift.yaml"])
def test_short_runs_on_the_digits_models_raise_the_share_of_sixes(config, tmp_path, monkeypatch):
    """Four epochs of the shipped R_shift configs (flow model; DDIM model for NFT) move samples towards six."""
    monkeypatch.chdir(tmp_path)
    settings = yaml.safe_load((ROOT / "configs" / config).read_text())
    settings["trainer"].update(max_epochs=4, limit_val_batches=0, callbacks=[], logger=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    cli = run_cli(["fit", "-c", str(path), "--trainer.enable_progress_bar=false", "--cpu_threads=1"])
    guidance = settings["model"]["init_args"]["guidance_scale"]
    before = six_probability(cli.model.policy, "a round digit", guidance, lora_on=False)
    after = six_probability(cli.model.policy, "a round digit", guidance, lora_on=True)
    assert after > before + 0.05, (before, after)


def test_shrunk_configs_exist_for_every_forward_rl_config():
    for name in ["nft_shift", "nft_balance", "awm_shift", "awm_balance", "nft_ddim_shift"]:
        assert shrink(f"digits/{name}.yaml")["model"]["class_path"].endswith(("NFTModule", "AWMModule"))
