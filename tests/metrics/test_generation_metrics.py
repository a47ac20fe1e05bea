import lightning.pytorch as pl
import pytest
import torch

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.digits.features import DigitsFeatures
from lightning_sdrl.digits.reference import DigitsReference
from lightning_sdrl.functional.metrics import attribute_kl, fid_from_features, precision_recall
from lightning_sdrl.metrics.generation import GenerationMetrics
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness


def test_generation_metrics_match_the_functional_values():
    reference = DigitsReference(classes=[0, 6], per_class=20)
    extractor, classifier = DigitsFeatures(), DigitsClassifier()
    metrics = GenerationMetrics(extractor, reference, attribute_classifier=classifier, groups=[[0], [6]])
    generated = DigitsReference(split="train", classes=[0, 6, 8], per_class=10).images
    for chunk in generated.split(7):
        metrics.update(chunk)
    values = metrics.compute()
    with torch.no_grad():
        real, fake = extractor(reference.images), extractor(generated)
        probs = classifier(generated)[:, [0, 6]]
    expected_pr = precision_recall(real, fake, k=3)
    torch.testing.assert_close(values["fid"].double(), fid_from_features(real, fake).double(), rtol=1e-4, atol=1e-4)
    assert values["precision"].item() == pytest.approx(float(expected_pr["precision"]), abs=1e-6)
    assert values["recall"].item() == pytest.approx(float(expected_pr["recall"]), abs=1e-6)
    counts = torch.bincount(probs.argmax(1), minlength=2)
    torch.testing.assert_close(values["attribute_kl"].double(), attribute_kl(counts).double(), rtol=1e-5, atol=1e-6)
    metrics.reset()  # generated images forgotten, the reference kept
    metrics.update(generated)
    torch.testing.assert_close(metrics.compute()["fid"], values["fid"], rtol=1e-5, atol=1e-5)


def test_ddpo_validate_logs_generation_metrics(tmp_path):
    evaluation = GenerationMetrics(
        DigitsFeatures(), DigitsReference(per_class=3), attribute_classifier=DigitsClassifier()
    )
    module = DDPOModule(
        RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=2)),
        Brightness(),
        num_steps=2,
        guidance_scale=1.0,
        evaluation=evaluation,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = SamplingDataModule(prompts=["a", "b"], val_samples_per_prompt=4, val_batch_size=4)
    (metrics,) = trainer.validate(module, data, verbose=False)
    assert {"val/reward_mean", "val/fid", "val/precision", "val/recall", "val/attribute_kl"} <= set(metrics)
    assert metrics["val/fid"] > 0 and 0 <= metrics["val/recall"] <= 1
