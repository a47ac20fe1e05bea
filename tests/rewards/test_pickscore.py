import shutil

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from lightning_sdrl.policies.tokenizers import char_clip_tokenizer
from lightning_sdrl.rewards.pickscore import PickScoreReward, pickscore, resize_shortest_edge_and_crop

SIZE = 32  # the tiny CLIP's input size, as 224 is PickScore's
PROMPTS = ["a cat", "a dog on a red sofa", "two birds"]


def tiny_clip_config() -> CLIPConfig:
    """A 2-layer CLIP of width 32 over the 514-token character vocabulary of ``char_clip_tokenizer``."""
    tokenizer = char_clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": SIZE,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=3.0)


def image_processor_kwargs() -> dict:
    # the published processor's mean and std are OpenAI CLIP's; others show they are read from the config
    return {
        "size": {"shortest_edge": SIZE},
        "crop_size": {"height": SIZE, "width": SIZE},
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3],
    }


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The published layout: a model directory and a separate processor directory (save_pretrained)."""
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config()).eval()
    processor = CLIPProcessor(CLIPImageProcessor(**image_processor_kwargs()), char_clip_tokenizer(77))
    root = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(root / "PickScore_v1")
    processor.save_pretrained(root / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    return root / "PickScore_v1", root / "CLIP-ViT-H-14-laion2B-s32B-b79K", model, processor


@pytest.fixture(scope="module")
def reward(published):
    model_dir, processor_dir, _, _ = published
    return PickScoreReward(str(model_dir), str(processor_dir))


def uint8_images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]


def reference_pickscore(model, processor, pil_images, prompts) -> torch.Tensor:
    """The PickScore reference code (its README), one prompt per image."""
    image_inputs = processor(images=pil_images, return_tensors="pt")
    text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs).pooler_output
        text_embs = model.get_text_features(**text_inputs).pooler_output
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp().detach() * (image_embs * text_embs).sum(dim=-1)


def test_scores_equal_the_reference_at_the_input_size(published, reward):
    _, _, model, processor = published
    pixels = uint8_images(3, SIZE, SIZE)  # no resize: the 8-bit values are exact in both pipelines
    with torch.no_grad():
        scores = reward(pixels.float() / 255, PROMPTS)
    expected = reference_pickscore(model, processor, to_pil(pixels), PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.unique().numel() == 3  # the images and prompts are told apart
    assert reward.model.logit_scale.exp().item() == pytest.approx(20.0855, abs=1e-3)  # exp(3): units of the scale


def test_other_sizes_match_the_processor_up_to_8_bit_resampling(published, reward):
    _, _, model, processor = published
    pixels = uint8_images(3, 41, 52)  # shorter side 41 -> 32, longer int(32 * 52 / 41) = 40, crop 4 px each side
    with torch.no_grad():
        scores = reward(pixels.float() / 255, PROMPTS)
    # transformers' default (torchvision) processor resizes with the same bicubic kernel, but on the
    # uint8 image: it rounds and clamps the result to 8 bits, which our float pipeline does not
    expected = reference_pickscore(model, processor, to_pil(pixels), PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0.02)
    # the PIL processor (transformers 4's default, used by the PickScore authors) resizes with PIL's
    # bicubic (a=-0.5 against torch's a=-0.75) on 8-bit images: a looser match. Both differ by < 0.01
    # here; a bilinear resize, no antialiasing or a crop one pixel off would move the scores by > 0.2
    pil_processor = CLIPProcessor(CLIPImageProcessorPil(**image_processor_kwargs()), processor.tokenizer)
    pil_expected = reference_pickscore(model, pil_processor, to_pil(pixels), PROMPTS)
    torch.testing.assert_close(scores, pil_expected, rtol=0, atol=0.03)


def test_resize_and_crop_follow_the_clip_image_processor():
    pixels = uint8_images(2, 45, 33)
    # same kernel on floats: the torchvision processor without its 8-bit rounding
    processed = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 18})(
        list(pixels.float() / 255), do_rescale=False, do_normalize=False, return_tensors="pt"
    ).pixel_values
    ours = resize_shortest_edge_and_crop(pixels.float() / 255, 20, (16, 18))
    torch.testing.assert_close(ours, processed)


def test_published_layout_with_the_processor_in_the_model_directory(published, reward, tmp_path):
    model_dir, processor_dir, _, _ = published
    shutil.copytree(model_dir, tmp_path / "model")
    for path in processor_dir.iterdir():
        shutil.copy(path, tmp_path / "model")
    alone = PickScoreReward(str(tmp_path / "model"))  # processor_path defaults to model_path
    images = uint8_images(3, SIZE, SIZE).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(alone(images, PROMPTS), reward(images, PROMPTS))
    assert not alone.train().training and not alone.model.training  # frozen in eval mode
    assert not any(p.requires_grad for p in alone.parameters())


def test_gradients_reach_the_images(reward):
    images = (uint8_images(2, 48, 40).float() / 255).requires_grad_(True)
    scores = reward(images, PROMPTS[:2])
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(p.grad is None for p in reward.parameters())


def test_non_finite_images_score_nan(reward):
    images = uint8_images(3, SIZE, SIZE).float() / 255
    with torch.no_grad():
        clean = reward(images, PROMPTS)
        images[1, 0, 3, 3] = float("nan")
        scores = reward(images, PROMPTS)
    assert torch.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all()
    torch.testing.assert_close(scores[[0, 2]], clean[[0, 2]])
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, PROMPTS[:2])


def test_missing_files_are_refused_with_the_fix(published, tmp_path):
    model_dir, processor_dir, _, _ = published
    with pytest.raises(FileNotFoundError, match=r"model_path='.*missing'.*PickScore_v1.*local directory"):
        PickScoreReward(str(tmp_path / "missing"), str(processor_dir))
    with pytest.raises(FileNotFoundError, match=r"processor_path='.*missing'.*laion/CLIP-ViT-H-14"):
        PickScoreReward(str(model_dir), str(tmp_path / "missing"))
    # transformers 5 loads a tokenizer whose files are missing as an empty one (special tokens only)
    shutil.copytree(processor_dir, tmp_path / "processor")
    (tmp_path / "processor" / "tokenizer.json").unlink()
    with pytest.raises(OSError, match=r"processor_path='.*processor' has no vocabulary \(2 tokens\)"):
        PickScoreReward(str(model_dir), str(tmp_path / "processor"))


def test_pickscore_is_the_scaled_cosine():
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    expected = 2.0 * torch.stack([torch.dot(i, t) / (i.norm() * t.norm()) for i, t in zip(image, text, strict=True)])
    torch.testing.assert_close(pickscore(image, text, torch.log(torch.tensor(2.0))), expected)
