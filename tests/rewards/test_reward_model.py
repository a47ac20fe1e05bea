import json

import open_clip
import pytest
import torch
from torch import nn

from lightning_sdrl.rewards.reward_model import (
    CLIPEmbedder,
    LearnedPreferenceReward,
    PretrainedPreferenceReward,
    RewardHead,
)
from tests.helpers import make_tiny_clip, tiny_clip_config

TINY_CLIP = tiny_clip_config(16, 2)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip config registered as 'tiny-clip-test' and its weights saved to a file."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), "tiny-clip-test", TINY_CLIP)


def test_reward_head_is_the_seed_mlp():
    head = RewardHead()
    kinds = [type(layer) for layer in head.layers]
    assert kinds == [
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]
    linears = [layer for layer in head.layers if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (1536, 1024),
        (1024, 256),
        (256, 128),
        (128, 32),
        (32, 1),
    ]
    assert [layer.p for layer in head.layers if isinstance(layer, nn.Dropout)] == [0.2, 0.2, 0.1]


def test_reward_head_scores_the_concatenation():
    torch.manual_seed(0)
    head = RewardHead(embed_dim=3, hidden_sizes=(5,), dropout=()).eval()
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    expected = head.layers(torch.cat([image, text], dim=1))[:, 0]
    torch.testing.assert_close(head(image, text), expected)
    with pytest.raises(ValueError, match=r"\[4, 2\].*embed_dim"):
        head(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at most 2"):
        RewardHead(embed_dim=3, hidden_sizes=(5,), dropout=(0.1, 0.1, 0.1))


def test_clip_embedder_loads_the_weights_file(tiny_clip):
    name, weights, reference = tiny_clip
    embedder = CLIPEmbedder(name, pretrained=weights)
    assert embedder.embed_dim == 16 and embedder.image_size == (32, 32)
    assert not any(p.requires_grad for p in embedder.parameters())
    embedder.train()
    assert not embedder.training and not embedder.model.training

    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    reference.eval()
    with torch.no_grad():
        expected_image = reference.encode_image((images - mean) / std, normalize=True)
        tokens = open_clip.get_tokenizer(name)(["a red cube", "two dogs"])
        expected_text = reference.encode_text(tokens, normalize=True)
        image_embeds, text_embeds = embedder(images, ["a red cube", "two dogs"])
    torch.testing.assert_close(image_embeds, expected_image)
    torch.testing.assert_close(text_embeds, expected_text)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(2))


def test_preprocess_resizes_the_shorter_side_and_crops_the_centre(tiny_clip):
    name, weights, _ = tiny_clip
    embedder = CLIPEmbedder(name, pretrained=weights)
    # a 64 x 128 image, black in its outer eighths: resized to 32 x 64 and centre-cropped to
    # columns 16:48 it is all white (a corner crop would keep black columns)
    images = torch.zeros(1, 3, 64, 128)
    images[..., 16:112] = 1.0
    pixels = embedder.preprocess(images)
    assert pixels.shape == (1, 3, 32, 32)
    white = (1.0 - embedder.mean) / embedder.std
    torch.testing.assert_close(pixels, white.expand_as(pixels), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\[3, 32, 32\].*\[B, 3, H, W\]"):
        embedder.preprocess(torch.rand(3, 32, 32))


def test_missing_clip_weights_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "ViT-L-14.bin"
    with pytest.raises(FileNotFoundError, match="ViT-L-14.bin.*local file path"):
        CLIPEmbedder("ViT-L-14-quickgelu", pretrained=str(missing))
    with pytest.raises(ValueError, match="not-a-clip.*add_model_config"):
        CLIPEmbedder("not-a-clip")


def _reward(tiny_clip, mean=0.3, std=2.0):
    name, weights, _ = tiny_clip
    torch.manual_seed(1)
    head = RewardHead(embed_dim=16, hidden_sizes=(8,), dropout=(0.2, 0.1))
    return LearnedPreferenceReward(CLIPEmbedder(name, pretrained=weights), head, mean, std)


def test_reward_is_standardised_deterministic_and_differentiable(tiny_clip):
    reward = _reward(tiny_clip)
    reward.train()  # a reward stays in eval mode: dropout off
    images = torch.rand(3, 3, 40, 48, requires_grad=True)
    prompts = ["a cat", "a dog", "a bird"]
    scores = reward(images, prompts, step=7)
    assert scores.shape == (3,)
    image_embeds, text_embeds = reward.embedder(images, prompts)
    torch.testing.assert_close(scores, (reward.head(image_embeds, text_embeds) - 0.3) / 2.0)
    torch.testing.assert_close(reward(images, prompts), scores)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, prompts[:2])


def test_save_and_from_pretrained_give_identical_scores(tiny_clip, tmp_path):
    name, weights, _ = tiny_clip
    reward = _reward(tiny_clip)
    reward.save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["clip_model_name"] == name
    assert config["score_mean"] == pytest.approx(0.3) and config["score_std"] == pytest.approx(2.0)

    loaded = LearnedPreferenceReward.from_pretrained(tmp_path / "head", clip_pretrained=weights)
    from_yaml_form = PretrainedPreferenceReward(str(tmp_path / "head"), clip_pretrained=weights)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(p.requires_grad for p in from_yaml_form.parameters())
    images = torch.rand(4, 3, 32, 32)
    prompts = ["a", "b", "c", "d"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, prompts), reward(images, prompts), rtol=0, atol=0)
        torch.testing.assert_close(from_yaml_form(images, prompts), reward(images, prompts), rtol=0, atol=0)


def test_from_pretrained_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*save_pretrained"):
        LearnedPreferenceReward.from_pretrained(tmp_path / "nowhere", clip_pretrained=None)
