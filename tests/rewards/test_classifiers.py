import numpy as np
import open_clip
import pytest
import torch

from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.rewards.classifiers import (
    CLIPZeroShotClassifier,
    HFImageClassifier,
    resize_images,
)
from tests.helpers import make_tiny_clip, tiny_clip_config

TINY_CLIP = tiny_clip_config(16, 1)


def _tiny_vit(folder, processor):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "female", 1: "male"},
        label2id={"female": 0, "male": 1},
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny ViT gender classifier saved like rizvandwiki/gender-classification-2."""
    from transformers import ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny_vit")
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return str(folder), _tiny_vit(folder, processor), processor


def _processor_pixels(processor, images):
    """The Hugging Face processor's own (PIL / numpy) preprocessing of images in [0, 1]."""
    arrays = list((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return processor(images=arrays, return_tensors="pt")["pixel_values"]


def test_hf_classifier_matches_the_model_and_processor(tiny_vit):
    path, model, processor = tiny_vit
    classifier = HFImageClassifier(path, local_files_only=True)
    assert classifier.labels == ["female", "male"]
    assert not any(p.requires_grad for p in classifier.parameters())
    classifier.train()
    assert not classifier.model.training

    # at the model's size only normalisation applies: exact against the processor
    images = torch.randint(0, 256, (3, 3, 32, 32)).float() / 255
    with torch.no_grad():
        expected = model(pixel_values=_processor_pixels(processor, images)).logits.softmax(-1)
        probs = classifier(images)
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs, expected)
    # resizing is done in torch (antialiased bilinear), close to the processor's PIL resize
    large = torch.randint(0, 256, (2, 3, 64, 48)).float() / 255
    pixels = classifier.preprocess(large)
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pixels, _processor_pixels(processor, large), atol=0.03, rtol=0)


def test_hf_classifier_is_differentiable(tiny_vit):
    classifier = HFImageClassifier(tiny_vit[0])
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    classifier(images)[:, 1].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[3, 40, 40\].*\[B, 3, H, W\]"):
        classifier(torch.rand(3, 40, 40))


def test_hf_classifier_shortest_edge_and_centre_crop(tmp_path):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.3, 0.4],
        resample=3,
    )
    _tiny_vit(tmp_path, processor)
    classifier = HFImageClassifier(str(tmp_path))
    assert classifier.shortest_edge == 32 and classifier.crop_size == (32, 32)
    assert classifier.mode == "bicubic"
    images = torch.randint(0, 256, (2, 3, 48, 96)).float() / 255
    pixels = classifier.preprocess(images)
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pixels, _processor_pixels(processor, images), atol=0.1, rtol=0)


def test_hf_classifier_offline_hub_id_names_the_fix():
    with pytest.raises(OSError, match="gender-classification-2.*HF_HUB_OFFLINE.*local folder"):
        HFImageClassifier("rizvandwiki/gender-classification-2", local_files_only=True)


def test_resize_images_needs_one_size():
    with pytest.raises(ValueError, match="exactly one"):
        resize_images(torch.rand(1, 3, 8, 8))
    torch.testing.assert_close(resize_images(torch.ones(1, 3, 8, 4), size=(4, 2)), torch.ones(1, 3, 4, 2))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), "tiny-clip-zeroshot", TINY_CLIP)


def test_clip_zero_shot_is_a_softmax_of_scaled_cosines(tiny_clip):
    name, weights, reference = tiny_clip
    labels = ["man", "woman", "child"]
    classifier = CLIPZeroShotClassifier(labels, "a photo of a {}", name, weights, temperature=50.0)
    assert classifier.labels == labels
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tokens = open_clip.get_tokenizer(name)([f"a photo of a {label}" for label in labels])
    with torch.no_grad():
        image = reference.encode_image((images - mean) / std, normalize=True)
        text = reference.encode_text(tokens, normalize=True)
        probs = classifier(images)
    torch.testing.assert_close(probs, (50.0 * image @ text.T).softmax(dim=-1))
    with pytest.raises(ValueError, match="two distinct"):
        CLIPZeroShotClassifier(["man", "man"], model_name=name, pretrained=weights)
    with pytest.raises(ValueError, match="template='a photo'"):
        CLIPZeroShotClassifier(["a", "b"], "a photo", model_name=name, pretrained=weights)


def test_digits_classifier_recognises_real_digits():
    classifier = DigitsClassifier()
    classifier.train()
    assert not classifier.model.training
    images, labels = digits_split("test")
    with torch.no_grad():
        probs = classifier(images[:100].expand(-1, 3, -1, -1))
    assert probs.shape == (100, 10)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(100))
    assert (probs.argmax(dim=1) == labels[:100]).float().mean() > 0.9
    assert classifier.labels == [str(d) for d in np.arange(10)]
