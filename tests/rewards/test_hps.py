import argparse

import open_clip
import pytest
import torch
import torchvision.transforms.functional as tvF
from PIL import Image
from torchvision.transforms import InterpolationMode

from lightning_sdrl.rewards.hps import HPSv2Reward, load_hps_state_dict, resize_longest_side_and_pad
from tests.helpers import make_tiny_clip, tiny_clip_config

SIZE = 32  # the tiny CLIP's input size, as 224 is ViT-H-14's
PROMPTS = ["a cat", "a dog on a red sofa", "two birds"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip_hps")
    return make_tiny_clip(folder, "tiny-clip-hps", tiny_clip_config(16, 2))


@pytest.fixture(scope="module")
def published(tiny_clip, tmp_path_factory):
    """A checkpoint in the published layout: ``{"state_dict": model.state_dict()}`` (HPS_v2.1_compressed.pt)."""
    _, _, model = tiny_clip
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def reward(tiny_clip, published):
    return HPSv2Reward(published, model_name=tiny_clip[0])


def uint8_images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def hpsv2_eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's ``preprocess_val`` (``image_transform(..., resize_longest_max=True)``) with torchvision."""
    tensor = tvF.to_tensor(image.convert("RGB"))
    height, width = tensor.shape[1:]
    scale = size / max(height, width)
    if scale != 1.0:  # ResizeMaxSize: resize the tensor, pad with black
        new_size = [round(dim * scale) for dim in (height, width)]
        tensor = tvF.resize(tensor, new_size, InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        tensor = tvF.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return tvF.normalize(tensor, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


def reference_hps(name, model, pixels, prompts) -> torch.Tensor:
    """``hpsv2.score``: open_clip forward, ``diag(image_features @ text_features.T)``, one prompt per image."""
    images = torch.stack([hpsv2_eval_transform(Image.fromarray(p.permute(1, 2, 0).numpy()), SIZE) for p in pixels])
    with torch.no_grad():
        image_features, text_features, _ = model(images, open_clip.get_tokenizer(name)(prompts))
    return torch.diagonal(image_features @ text_features.T)


def test_scores_equal_the_reference_at_the_input_size(tiny_clip, reward):
    name, _, model = tiny_clip
    pixels = uint8_images(3, SIZE, SIZE)  # no resize: the 8-bit values are exact in both pipelines
    with torch.no_grad():
        scores = reward(pixels.float() / 255, PROMPTS)
    torch.testing.assert_close(scores, reference_hps(name, model, pixels, PROMPTS))
    assert scores.unique().numel() == 3 and (scores.abs() <= 1).all()  # cosines, told apart


@pytest.mark.parametrize("shape", [(41, 52), (64, 48), (64, 64)])
def test_other_sizes_follow_the_reference_resize_and_pad(tiny_clip, reward, shape):
    name, _, model = tiny_clip
    pixels = uint8_images(3, *shape)
    with torch.no_grad():
        scores = reward(pixels.float() / 255, PROMPTS)
    # HPSv2 resizes the float tensor (after ToTensor) with torchvision, which calls the same
    # antialiased bicubic kernel as ours: no 8-bit rounding, so the match stays tight
    torch.testing.assert_close(scores, reference_hps(name, model, pixels, PROMPTS), rtol=1e-5, atol=1e-5)


def test_open_clip_longest_side_transform_on_pil_images_agrees(tiny_clip, reward):
    name, _, model = tiny_clip
    pixels = uint8_images(3, 41, 52)
    with torch.no_grad():
        scores = reward(pixels.float() / 255, PROMPTS)
        tokens = open_clip.get_tokenizer(name)(PROMPTS)
        for mode, close in (("longest", True), ("shortest", False)):
            transform = open_clip.image_transform(SIZE, is_train=False, resize_mode=mode)
            images = torch.stack([transform(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
            image_features, text_features, _ = model(images, tokens)
            error = (scores - (image_features * text_features).sum(dim=-1)).abs().max()
            # open_clip resizes the PIL image (PIL's bicubic, a=-0.5, on 8 bits; torch's is a=-0.75):
            # ~5e-4 apart with the same padding, ~0.1 with a centre crop instead
            assert error < 2e-3 if close else error > 0.05, (mode, error)


def test_resize_longest_side_and_pad_centres_the_image():
    images = torch.rand(1, 3, 10, 16)
    out = resize_longest_side_and_pad(images, 8)  # 10x16 -> 5x8, 3 rows of padding: 1 above, 2 below
    assert out.shape == (1, 3, 8, 8)
    assert (out[..., :1, :] == 0).all() and (out[..., 6:, :] == 0).all() and (out[..., 1:6, :] != 0).any()
    torch.testing.assert_close(out[..., 1:6, :], tvF.resize(images, [5, 8], InterpolationMode.BICUBIC))


def test_published_and_plain_state_dicts_load(tiny_clip, published, reward, tmp_path):
    name, plain, model = tiny_clip  # make_tiny_clip saved a plain state dict
    assert set(load_hps_state_dict(published)) == set(model.state_dict())
    from_plain = HPSv2Reward(plain, model_name=name)
    images = uint8_images(3, SIZE, SIZE).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(from_plain(images, PROMPTS), reward(images, PROMPTS))
    assert not reward.train().training and not reward.embedder.model.training  # frozen in eval mode
    assert not any(p.requires_grad for p in reward.parameters())


def test_gradients_reach_the_images(reward):
    images = (uint8_images(2, 48, 40).float() / 255).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(p.grad is None for p in reward.parameters())


def test_non_finite_images_score_nan(reward):
    images = uint8_images(3, SIZE, SIZE).float() / 255
    with torch.no_grad():
        clean = reward(images, PROMPTS)
        images[2, 1, 0, 0] = float("inf")
        scores = reward(images, PROMPTS)
    assert torch.isnan(scores[2]) and torch.isfinite(scores[:2]).all()
    torch.testing.assert_close(scores[:2], clean[:2])
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, PROMPTS[:2])


def test_missing_file_and_other_layouts_are_refused(tiny_clip, tmp_path):
    name, _, model = tiny_clip
    with pytest.raises(FileNotFoundError, match=r"checkpoint='.*missing.pt'.*HPS_v2.1_compressed.pt.*local file"):
        HPSv2Reward(str(tmp_path / "missing.pt"), model_name=name)
    torch.save({"model": model.state_dict()}, tmp_path / "other_key.pt")  # not under "state_dict"
    with pytest.raises(ValueError, match=r"holds \['model'\]; expected the published layout \{'state_dict'"):
        HPSv2Reward(str(tmp_path / "other_key.pt"), model_name=name)
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(
        ValueError, match=r"objects other than tensors.*argparse.Namespace.*re-save only the state dict"
    ):
        HPSv2Reward(str(tmp_path / "pickled.pt"), model_name=name)
    one_layer = make_tiny_clip(tmp_path, "tiny-clip-hps-1", tiny_clip_config(16, 1))[2]
    torch.save({"state_dict": one_layer.state_dict()}, tmp_path / "one_layer.pt")
    with pytest.raises(ValueError, match=r"does not fit .*'tiny-clip-hps'.*missing keys \['transformer.resblocks.1"):
        HPSv2Reward(str(tmp_path / "one_layer.pt"), model_name=name)
    narrower = make_tiny_clip(tmp_path, "tiny-clip-hps-8", tiny_clip_config(8, 2))[2]  # same keys, embed_dim 8
    torch.save({"state_dict": narrower.state_dict()}, tmp_path / "embed_8.pt")
    with pytest.raises(ValueError, match="tensors of other shapes than open_clip model_name='tiny-clip-hps'"):
        HPSv2Reward(str(tmp_path / "embed_8.pt"), model_name=name)
