import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_sdrl.digits import train_digits
from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.digits.models import (
    ASSETS_DIR,
    DigitClassifier,
    DigitFeatureNet,
    to_canonical_digits,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "digits_feedback.md"


@pytest.fixture(scope="module")
def report():
    return json.loads((ASSETS_DIR / "report.json").read_text())


@pytest.fixture(scope="module")
def test_split():
    return digits_split("test")


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier.from_pretrained()


@pytest.fixture
def one_thread():
    # Small networks train fastest on one thread when the CPU is shared; restore afterwards.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def accuracy(logits, labels):
    return (logits.argmax(dim=1) == labels).double().mean().item()


def test_shipped_classifier_reproduces_documented_accuracy(report, test_split, classifier):
    documented = report["classifier"]["test_accuracy"]
    assert f"{documented:.2%}" in DOCS.read_text(), "docs/digits_feedback.md is out of date"
    images, labels = test_split
    assert not classifier.training
    with torch.no_grad():
        assert accuracy(classifier(images), labels) >= documented - 0.005
    assert documented >= 0.97


def test_shipped_feature_net_embeds_digits(report, test_split):
    net = DigitFeatureNet.from_pretrained()
    train_images, train_labels = digits_split("train")
    result = train_digits.evaluate_feature_net(net, train_images, train_labels, *test_split)
    assert result["feature_dim"] == 64
    assert result["knn1_test_accuracy"] >= report["feature_net"]["knn1_test_accuracy"] - 0.005


def test_classifier_accepts_rgb_32x32_and_gray_16x16(classifier, test_split):
    images, labels = test_split
    gray = images[:64]
    rgb = F.interpolate(gray, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    with torch.no_grad():
        logits_gray, logits_rgb = classifier(gray), classifier(rgb)
        probs = classifier.predict_proba(rgb)
    assert logits_gray.shape == logits_rgb.shape == probs.shape == (64, 10)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(64))
    assert accuracy(logits_rgb, labels[:64]) >= 0.95
    assert (logits_gray.argmax(1) == logits_rgb.argmax(1)).double().mean() >= 0.95


def test_to_canonical_digits_is_channel_mean_and_identity_at_16():
    images = torch.rand(2, 1, 16, 16)
    assert torch.equal(to_canonical_digits(images), images)
    rgb = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(to_canonical_digits(rgb), rgb.mean(dim=1, keepdim=True))
    with pytest.raises(ValueError, match=r"shape \[2, 4, 16, 16\]"):
        to_canonical_digits(torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        to_canonical_digits(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_classifier_is_differentiable_in_the_images(classifier, test_split):
    digits = F.interpolate(test_split[0][:2], size=24, mode="bilinear", align_corners=False)
    images = digits.expand(-1, 3, -1, -1).clone().requires_grad_(True)
    classifier.predict_proba(images)[:, 3].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: DigitClassifier(channels=(4, 8, 8), hidden_features=16, dropout=0.1),
        lambda: DigitFeatureNet(channels=(4, 8, 8), feature_dim=12),
    ],
    ids=["classifier", "feature_net"],
)
def test_save_pretrained_round_trip_gives_identical_outputs(make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    model.save_pretrained(tmp_path / "model")
    loaded = type(model).from_pretrained(tmp_path / "model")
    assert loaded.config == model.config and not loaded.training
    images = torch.rand(3, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_missing_directory_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*train_digits --out DIR"):
        DigitClassifier.from_pretrained(missing)


def test_missing_weights_file_names_it(tmp_path):
    DigitFeatureNet(channels=(2, 2, 2), feature_dim=4).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        DigitFeatureNet.from_pretrained(tmp_path)


def test_corrupt_safetensors_file_gives_value_error(tmp_path):
    DigitClassifier(channels=(2, 2, 2), hidden_features=4).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors is corrupt.*re-install lightning_sdrl"):
        DigitClassifier.from_pretrained(tmp_path)


def test_weights_of_another_shape_or_model_give_value_error(tmp_path):
    DigitClassifier(channels=(2, 2, 2), hidden_features=4).save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match="model_type is 'DigitClassifier'"):
        DigitFeatureNet.from_pretrained(tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    config["hidden_features"] = 5
    (tmp_path / "clf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        DigitClassifier.from_pretrained(tmp_path / "clf")


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"channels=\(4, 8\)"):
        DigitClassifier(channels=(4, 8))
    with pytest.raises(ValueError, match="dropout=1.5"):
        DigitClassifier(dropout=1.5)
    with pytest.raises(ValueError, match="feature_dim=0"):
        DigitFeatureNet(feature_dim=0)


def test_short_training_run_beats_chance(test_split, one_thread):
    train_images, train_labels = digits_split("train")
    model = train_digits.train_classifier(train_images[:400], train_labels[:400], epochs=4, batch_size=16)
    images, labels = test_split
    with torch.no_grad():
        assert accuracy(model(images), labels) > 0.5  # chance is 0.1
    again = train_digits.train_classifier(train_images[:400], train_labels[:400], epochs=4, batch_size=16)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_command_line_writes_models_report_and_figure(tmp_path, one_thread):
    report = train_digits.main(["--out", str(tmp_path), "--epochs", "1"])
    assert set(report["classifier"]) >= {"test_accuracy", "confusion_matrix", "none_fraction"}
    assert torch.tensor(report["classifier"]["confusion_matrix"]).sum() == 360
    assert torch.tensor(report["classifier"]["confusion_matrix_with_none"]).shape == (10, 11)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    DigitClassifier.from_pretrained(tmp_path / "classifier")
    DigitFeatureNet.from_pretrained(tmp_path / "feature_net")


def test_augmentations_are_small_and_seeded(test_split):
    images = test_split[0][:16]
    first = train_digits.augment_digits(images, torch.Generator().manual_seed(0))
    second = train_digits.augment_digits(images, torch.Generator().manual_seed(0))
    assert torch.equal(first, second)
    assert (first - images).abs().mean() < 0.2
