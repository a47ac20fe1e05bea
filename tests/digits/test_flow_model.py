"""The shipped flow-matching digits model: loads through the SD3 policy, matches its report and docs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from lightning_sdrl.digits.captions import BALANCE_PROMPT, SHIFT_PROMPT, digit_captions
from lightning_sdrl.digits.flow_policy import DIGITS_FLOW_DIFFUSION_DIR, DigitsFlowPolicy
from lightning_sdrl.digits.models import DigitClassifier
from lightning_sdrl.digits.pretrain import sample_and_classify
from lightning_sdrl.policies.pixel_flow import PixelFlowArchitecture
from lightning_sdrl.policies.sd3 import StableDiffusion3Policy

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "lightning_sdrl" / "digits" / "assets" / "flow_diffusion_report.json"
DOCS = ROOT / "docs" / "digits_flow_model.md"


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


@pytest.fixture(scope="module")
def shipped():
    return DigitsFlowPolicy(lora=None).eval()


def test_shipped_flow_model_is_a_pixel_space_sd3(shipped):
    assert isinstance(shipped, StableDiffusion3Policy)
    assert isinstance(shipped.transformer, SD3Transformer2DModel)
    assert isinstance(shipped.scheduler, FlowMatchEulerDiscreteScheduler)
    assert shipped.vae is None and shipped.text_encoder_3 is None
    assert shipped.sample_shape == (1, 16, 16)
    architecture = PixelFlowArchitecture()
    assert shipped.transformer.config.num_layers == architecture.num_layers
    assert shipped.tokenizer.model_max_length == shipped.text_encoder.config.max_position_embeddings


def test_shipped_flow_model_is_small_and_documented(report):
    sizes = sum(p.stat().st_size for p in DIGITS_FLOW_DIFFUSION_DIR.rglob("*.safetensors"))
    assert sizes <= 4 * 2**20 and sizes == report["weights_bytes"]
    summary = report["summary"]
    docs = DOCS.read_text()
    assert f"{summary['mean_digit_agreement']:.1%}" in docs, "docs/digits_flow_model.md is out of date"
    assert f"{summary['min_digit_agreement']:.1%}" in docs, "docs/digits_flow_model.md is out of date"
    assert summary["min_digit_agreement"] >= 0.95  # every per-digit prompt recognised >= 95%
    assert report["train_seconds"] <= 20 * 60
    # the biased group prompts, without guidance (what the GRPO configs sample with)
    unguided = report["unguided_group_prompts"]
    loop = unguided[BALANCE_PROMPT]
    assert loop["0"] / (loop["0"] + loop["6"] + loop["8"] + loop["9"]) >= 0.7
    assert unguided[SHIFT_PROMPT]["6"] < 0.05


def test_shipped_flow_model_reproduces_the_documented_small_sample(shipped, report):
    check = report["test_check"]
    classifier = DigitClassifier.from_pretrained()
    settings = report["settings"]
    for prompt in check["prompts"]:
        evaluation, images = sample_and_classify(
            shipped,
            classifier,
            prompt,
            check["num_samples"],
            check["num_steps"],
            settings["guidance_scale"],
            settings["eta"],
            check["seed"],
        )
        assert images.shape == (check["num_samples"], 3, 16, 16) and torch.isfinite(images).all()
        for digit, share in check["class_shares"][prompt].items():  # same seeds: within 2 samples of 32
            assert abs(evaluation.class_shares[digit] - share) <= 2 / 32 + 1e-9, (prompt, digit)
    assert check["class_shares"][digit_captions(7)[0]]["7"] >= 0.9


def test_missing_or_corrupt_shipped_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/digits/pretrain_flow.yaml"):
        DigitsFlowPolicy(str(tmp_path / "nowhere"))
    copy = tmp_path / "flow_diffusion"
    shutil.copytree(DIGITS_FLOW_DIFFUSION_DIR, copy)
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2.*configs/digits/pretrain_flow.yaml"):
        DigitsFlowPolicy(str(copy))
    shutil.copytree(DIGITS_FLOW_DIFFUSION_DIR / "text_encoder_2", copy / "text_encoder_2")
    (copy / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="transformer.*configs/digits/pretrain_flow.yaml"):
        DigitsFlowPolicy(str(copy))
    shutil.copytree(DIGITS_FLOW_DIFFUSION_DIR / "transformer", copy / "transformer", dirs_exist_ok=True)
    (copy / "tokenizer_2" / "tokenizer_config.json").unlink()
    with pytest.raises(OSError, match="pretrain_flow.yaml"):
        DigitsFlowPolicy(str(copy))
