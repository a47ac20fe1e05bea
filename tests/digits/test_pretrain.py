import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_sdrl.digits.captions import BALANCE_PROMPT, DigitsCaptionDataModule, digit_captions
from lightning_sdrl.digits.models import DigitClassifier
from lightning_sdrl.digits.policy import DIGITS_DIFFUSION_DIR, DigitsPolicy
from lightning_sdrl.digits.pretrain import DigitsPretrainModule as DiffusionPretrainModule
from lightning_sdrl.digits.pretrain import evaluate_classes, sample_and_classify
from lightning_sdrl.modules.pretrain import drop_captions, epsilon_loss, forward_diffusion, warmup_cosine
from lightning_sdrl.policies import StableDiffusionPolicy
from lightning_sdrl.policies.pixel import PixelTextToImageArchitecture, pixel_text_to_image_components

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "lightning_sdrl" / "digits" / "assets" / "diffusion_report.json"
DOCS = ROOT / "docs" / "digits_model.md"
TINY = PixelTextToImageArchitecture(
    block_out_channels=(8, 16),
    layers_per_block=(1, 1),
    cross_attention_levels=(False, True),
    attention_heads=2,
    text_hidden_size=16,
    text_layers=1,
    text_heads=2,
    text_intermediate_size=32,
    max_length=24,
)


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


@pytest.fixture(scope="module")
def shipped():
    return DigitsPolicy(lora=None).eval()


def tiny_trainer(tmp_path, **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return pl.Trainer(**{**options, **kwargs})


def fixed_loss(module, batch):
    """The loss on a fixed batch with fixed noise, timesteps and captions."""
    from lightning_sdrl.modules.pretrain import encode_captions

    generator = torch.Generator().manual_seed(0)
    noised = forward_diffusion(module.scheduler, batch.images, generator)
    with torch.no_grad():
        conditions = encode_captions(module.text_encoder, module.tokenizer, batch.captions)
        predicted = module.unet(noised.noisy, noised.timesteps, encoder_hidden_states=conditions).sample
    return epsilon_loss(predicted, noised.noise).item()


# ------------------------------------------------------------------------------ the math
def test_forward_diffusion_is_eq_4_of_ddpm():
    scheduler = pixel_text_to_image_components(TINY).scheduler
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    noised = forward_diffusion(scheduler, images, torch.Generator().manual_seed(0))
    alpha = scheduler.alphas_cumprod[noised.timesteps].view(-1, 1, 1, 1)
    expected = alpha.sqrt() * images + (1 - alpha).sqrt() * noised.noise
    torch.testing.assert_close(noised.noisy, expected)
    # t ~ Uniform{0, ..., 999} and eps ~ N(0, I): the moments of a large seeded draw (3 standard errors)
    many = forward_diffusion(scheduler, torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(1))
    assert abs(many.timesteps.double().mean() - 499.5) < 3 * 288.7 / 4000**0.5
    assert many.timesteps.min() < 5 and many.timesteps.max() > 994
    assert abs(many.noise.mean()) < 3 / 4000**0.5 and abs(many.noise.std() - 1) < 3 / (2 * 4000) ** 0.5


def test_schedule_is_cosine_ddim_without_alpha_to_one():
    config = pixel_text_to_image_components(TINY).scheduler.config
    assert (config.beta_schedule, config.set_alpha_to_one, config.prediction_type, config.clip_sample) == (
        "squaredcos_cap_v2",
        False,
        "epsilon",
        True,
    )


def test_caption_dropout_and_lr_schedule():
    generator = torch.Generator().manual_seed(0)
    dropped = drop_captions(["x"] * 2000, 0.1, generator)
    assert abs(dropped.count("") / 2000 - 0.1) < 0.02 and set(dropped) == {"", "x"}
    assert drop_captions(["x", "y"], 0.0) == ["x", "y"]
    assert warmup_cosine(0, 0, 10) == 1.0 and warmup_cosine(10, 0, 10) == pytest.approx(0.1)


def test_evaluate_classes_counts_none_below_threshold():
    probs = torch.tensor([[0.9] + [0.1 / 9] * 9, [0.5, 0.5] + [0.0] * 8])
    evaluation = evaluate_classes(probs, "p")
    assert evaluation.class_shares["0"] == 0.5 and evaluation.class_shares["None"] == 0.5
    assert sum(evaluation.class_shares.values()) == pytest.approx(1.0)
    assert evaluation.mean_confidence == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers_per_block": (1,)}, "layers_per_block"),
        ({"norm_num_groups": 3}, "norm_num_groups=3"),
        (
            {
                "sample_size": 6,
                "block_out_channels": (8, 8, 8),
                "layers_per_block": (1, 1, 1),
                "cross_attention_levels": (False, False, True),
            },
            "sample_size=6",
        ),
    ],
)
def test_architecture_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PixelTextToImageArchitecture(**{**TINY.__dict__, **kwargs})


# ------------------------------------------------------------------------------ training and export
def test_short_fit_lowers_the_loss_and_exports_a_loadable_model(tmp_path):
    pl.seed_everything(0)
    export = tmp_path / "export"
    module = DiffusionPretrainModule(TINY, lr=1e-2, warmup_steps=0, export_dir=str(export))
    data = DigitsCaptionDataModule(batch_size=32)
    batch = next(iter(data.train_dataloader()))
    before = fixed_loss(module, batch)
    tiny_trainer(tmp_path, max_steps=3).fit(module, data)
    assert fixed_loss(module, batch) < before
    assert {p.name for p in export.iterdir()} == {"unet", "text_encoder", "tokenizer", "scheduler", "model_index.json"}
    policy = StableDiffusionPolicy(str(export), lora=None)
    for name, parameter in module.unet.state_dict().items():
        torch.testing.assert_close(policy.unet.state_dict()[name], parameter)
    assert policy.vae is None and policy.sample_shape == (1, 16, 16)
    trajectory = policy.sample(["a handwritten two", ""], num_steps=2, generator=torch.Generator().manual_seed(0))
    assert trajectory.images.shape == (2, 3, 16, 16)
    assert DigitsPolicy(str(export), lora=None).tokenizer.model_max_length == TINY.max_length


def test_text_encoder_trains_with_the_unet(tmp_path):
    pl.seed_everything(0)
    module = DiffusionPretrainModule(TINY, export_dir=str(tmp_path / "export"))
    text_before = [p.detach().clone() for p in module.text_encoder.parameters()]
    tiny_trainer(tmp_path, max_steps=1).fit(module, DigitsCaptionDataModule(batch_size=16))
    changed = [not torch.equal(a, b) for a, b in zip(text_before, module.text_encoder.parameters(), strict=True)]
    assert any(changed)
    assert all(not p.requires_grad for p in module.classifier.parameters())


def test_validation_logs_digit_agreement(tmp_path, shipped):
    # The shipped weights, so that most samples show their digit and a wrong label or seed would show.
    module = DiffusionPretrainModule(val_num_steps=5, export_dir=str(tmp_path / "export"))
    module.unet.load_state_dict(shipped.unet.state_dict())
    module.text_encoder.load_state_dict(shipped.text_encoder.state_dict())
    data = DigitsCaptionDataModule(val_samples_per_prompt=1, val_batch_size=5)
    metrics = tiny_trainer(tmp_path, limit_val_batches=None).validate(module, data, verbose=False)[0]
    # by hand: sample each batch with its seed, classify, count "top probability >= 0.7 and the named digit"
    classifier, agree, confidence = DigitClassifier.from_pretrained(), [], []
    for batch in data.val_dataloader():
        generator = torch.Generator().manual_seed(batch.seed)
        images = shipped.sample(batch.prompts, num_steps=5, eta=1.0, guidance_scale=3.0, generator=generator).images
        top, digit = classifier.predict_proba(images).max(dim=1)
        agree.append(((top >= 0.7) & (digit == batch.prompt_ids)).double())
        confidence.append(top.double())
    assert len(agree) == 2 and torch.cat(agree).sum() >= 7  # 10 samples, chance is 1 in 10
    assert metrics["val/digit_agreement"] == pytest.approx(torch.cat(agree).mean().item(), abs=1e-6)
    assert metrics["val/confidence"] == pytest.approx(torch.cat(confidence).mean().item(), abs=1e-6)


def test_invalid_module_arguments_are_named():
    with pytest.raises(ValueError, match="caption_dropout=1.5"):
        DiffusionPretrainModule(TINY, caption_dropout=1.5)


# ------------------------------------------------------------------------------ the shipped model
def test_shipped_model_is_small_and_documented(report):
    sizes = sum(p.stat().st_size for p in DIGITS_DIFFUSION_DIR.rglob("*.safetensors"))
    assert sizes <= 3 * 2**20 and sizes == report["weights_bytes"]
    docs = DOCS.read_text()
    summary = report["summary"]
    assert f"{summary['mean_digit_agreement']:.1%}" in docs, "docs/digits_model.md is out of date"
    assert summary["mean_digit_agreement"] >= 0.8
    assert summary["balance_zero_share"] >= 0.8
    assert summary["shift_six_share"] < 0.05
    multiclass = report["prompts"]["an even digit"]["class_shares"]
    assert sum(share >= 0.02 for digit, share in multiclass.items() if digit != "None") > 2


def test_shipped_model_reproduces_the_documented_small_sample(shipped, report):
    check = report["test_check"]
    classifier = DigitClassifier.from_pretrained()
    for prompt in check["prompts"]:
        evaluation, images = sample_and_classify(
            shipped,
            classifier,
            prompt,
            check["num_samples"],
            check["num_steps"],
            report["settings"]["guidance_scale"],
            report["settings"]["eta"],
            check["seed"],
        )
        assert images.shape == (check["num_samples"], 3, 16, 16)
        for digit, share in check["class_shares"][prompt].items():  # same seeds: within 2 samples of 32
            assert abs(evaluation.class_shares[digit] - share) <= 2 / 32 + 1e-9, (prompt, digit)
    seven = check["class_shares"][digit_captions(7)[0]]["7"]
    assert seven >= report["prompts"][digit_captions(7)[0]]["class_shares"]["7"] - 0.2
    balance = check["class_shares"][BALANCE_PROMPT]
    assert balance["0"] >= 0.7


def test_missing_or_corrupt_shipped_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/digits/pretrain.yaml"):
        DigitsPolicy(str(tmp_path / "nowhere"))
    copy = tmp_path / "diffusion"
    shutil.copytree(DIGITS_DIFFUSION_DIR, copy)
    shutil.rmtree(copy / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder.*configs/digits/pretrain.yaml"):
        DigitsPolicy(str(copy))
    shutil.copytree(DIGITS_DIFFUSION_DIR / "text_encoder", copy / "text_encoder")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="unet.*configs/digits/pretrain.yaml"):
        DigitsPolicy(str(copy))
