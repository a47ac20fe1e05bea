import open_clip
import pytest
import torch
from torch import nn

from lightning_sdrl.rewards.aesthetic import (
    AestheticMLP,
    AestheticReward,
    CLIPScoreReward,
    load_aesthetic_head,
)
from tests.helpers import make_tiny_clip, tiny_clip_config

# a tiny CLIP with ViT-L/14's embedding size, so the published head shapes fit
TINY_CLIP_768 = tiny_clip_config(768, 1)
# the published sac+logos+ava1-l14-linearMSE.pth: nn.Sequential indices of the five Linears
PUBLISHED_SHAPES = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), "tiny-clip-aesthetic", TINY_CLIP_768)


@pytest.fixture(scope="module")
def published_head(tmp_path_factory):
    """A state dict in the published key layout with random values."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for index, (out_features, in_features) in PUBLISHED_SHAPES.items():
        scale = in_features**-0.5
        state[f"layers.{index}.weight"] = torch.randn(out_features, in_features, generator=generator) * scale
        state[f"layers.{index}.bias"] = torch.randn(out_features, generator=generator) * 0.1
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    return str(path), state


def _clip_embeds(model, images):
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.encode_image((images - mean) / std, normalize=True)


def test_published_head_layout_loads_and_scores_like_the_original(tiny_clip, published_head):
    name, weights, model = tiny_clip
    path, state = published_head
    head = load_aesthetic_head(path)
    assert isinstance(head, AestheticMLP) and not head.training
    assert set(head.state_dict()) == set(state)

    reward = AestheticReward(path, clip_model_name=name, clip_pretrained=weights)
    reward.train()  # dropout stays off
    images = torch.rand(3, 3, 32, 32)
    # the original: MLP(normalized(clip.encode_image(x))), five affine maps without activations
    x = _clip_embeds(model, images)
    for index in PUBLISHED_SHAPES:
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    with torch.no_grad():
        scores = reward(images, ["a", "b", "c"])
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, x[:, 0])


def test_linear_head_and_gradients(tiny_clip, tmp_path):
    name, weights, model = tiny_clip
    linear = {"weight": torch.randn(1, 768), "bias": torch.tensor([5.0])}
    torch.save(linear, tmp_path / "sa_0_4_vit_l_14_linear.pth")
    reward = AestheticReward(str(tmp_path / "sa_0_4_vit_l_14_linear.pth"), name, weights)
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    scores = reward(images, ["", ""])
    with torch.no_grad():  # 40x40 images are resized and cropped by the embedder first
        embeds = model.encode_image(reward.embedder.preprocess(images), normalize=True)
    torch.testing.assert_close(scores.detach(), embeds @ linear["weight"][0] + 5.0)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_head_file_errors(tiny_clip, tmp_path):
    name, weights, _ = tiny_clip
    with pytest.raises(FileNotFoundError, match="head_weights=.*missing.pth.*local file path"):
        AestheticReward(str(tmp_path / "missing.pth"), name, weights)
    relu_layout = nn.Module()  # a reluMSE-like head: the ReLUs shift the layer indices
    relu_layout.layers = nn.Sequential(nn.Linear(768, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 1))
    torch.save(relu_layout.state_dict(), tmp_path / "relu.pth")
    with pytest.raises(ValueError, match="keys.*layers.3.bias.*improved aesthetic predictor"):
        load_aesthetic_head(str(tmp_path / "relu.pth"))
    torch.save({"weight": torch.zeros(1, 512), "bias": torch.zeros(1)}, tmp_path / "b32.pth")
    with pytest.raises(ValueError, match="reads 512-dim embeddings.*gives 768"):
        AestheticReward(str(tmp_path / "b32.pth"), name, weights)


def test_clip_score_is_100_times_the_clipped_cosine(tiny_clip):
    name, weights, model = tiny_clip
    reward = CLIPScoreReward(name, weights)
    images = torch.rand(4, 3, 32, 32)
    prompts = ["a cat", "a dog", "a red car", "two birds on a wire"]
    image = _clip_embeds(model, images)
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(name)(prompts), normalize=True)
        scores = reward(images, prompts)
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0))
    assert (scores >= 0).all() and (scores <= 100).all()
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        reward(images, prompts[:3])
