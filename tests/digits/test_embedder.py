import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from lightning_sdrl.digits.embedder import DigitsEmbedder
from lightning_sdrl.digits.models import DigitFeatureNet, to_canonical_digits
from lightning_sdrl.digits.policy import DIGITS_DIFFUSION_DIR
from lightning_sdrl.rewards.reward_model import LearnedPreferenceReward, PretrainedPreferenceReward, RewardHead


@pytest.fixture(scope="module")
def embedder():
    return DigitsEmbedder()


def test_pixel_embedding_is_the_8x8_digit_and_differentiable(embedder):
    images = torch.rand(3, 3, 16, 16, requires_grad=True)
    embeds = embedder.encode_images(images)
    expected = F.avg_pool2d(images.mean(dim=1, keepdim=True), 2).flatten(1)
    torch.testing.assert_close(embeds, expected)
    embeds.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in embedder.parameters())


def test_feature_embedding_is_the_feature_network():
    embedder = DigitsEmbedder(image_features="features")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = DigitFeatureNet.from_pretrained()(to_canonical_digits(images))
        torch.testing.assert_close(embedder.encode_images(images), expected)
    assert embedder.cache_key != DigitsEmbedder().cache_key


def test_text_embedding_is_unit_norm_and_tells_prompts_apart(embedder):
    with torch.no_grad():
        text = embedder.encode_text(["a handwritten seven", "a handwritten seven", "the digit 2"])
    assert text.shape == (3, 64)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text[0], text[1])
    assert (text[0] - text[2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="prompts is empty"):
        embedder.encode_text([])


def test_bad_arguments_and_missing_text_encoder_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="image_features='clip'"):
        DigitsEmbedder(image_features="clip")
    broken = tmp_path / "diffusion"
    shutil.copytree(DIGITS_DIFFUSION_DIR, broken)
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"could not load the digits text encoder.*digits/pretrain.yaml"):
        DigitsEmbedder(diffusion_dir=str(broken))


def test_reward_head_on_digits_embeddings_saves_and_loads_without_clip(embedder, tmp_path):
    torch.manual_seed(3)
    head = RewardHead(embed_dim=64, hidden_sizes=(16,), dropout=(0.1,))
    reward = LearnedPreferenceReward(embedder, head, score_mean=0.5, score_std=2.0)
    reward.save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["embedder"]["class_path"] == "lightning_sdrl.digits.embedder.DigitsEmbedder"
    assert "clip_model_name" not in config
    loaded = PretrainedPreferenceReward(str(tmp_path / "head"))
    assert isinstance(loaded.embedder, DigitsEmbedder)
    images, prompts = torch.rand(4, 3, 16, 16), ["a handwritten one"] * 2 + ["the number six"] * 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, prompts), reward(images, prompts), rtol=0, atol=0)
    config["embedder"]["class_path"] = "lightning_sdrl.rewards.no_such_module.Embedder"
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no_such_module.Embedder' cannot be imported"):
        PretrainedPreferenceReward(str(tmp_path / "head"))
