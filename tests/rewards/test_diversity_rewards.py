import functools

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sdrl.digits.features import DigitsFeatures
from lightning_sdrl.digits.reference import DigitsReference
from lightning_sdrl.functional.diversity import gp_mi_reward, marginal_utility, mmd_reward
from lightning_sdrl.reference import ReferenceSet
from lightning_sdrl.rewards.diversity import (
    CLIPImageFeatures,
    DiversityReward,
    InceptionFeatures,
)
from tests.helpers import make_tiny_clip, tiny_clip_config

TINY_CLIP = tiny_clip_config(16, 1)


class PooledFeatures(nn.Module):
    """A fixed random projection of 4x4 average-pooled images; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Linear(48, 8)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.projection(F.adaptive_avg_pool2d(images, 4).flatten(1))


class TensorReference(ReferenceSet):
    """A reference set from a tensor (tests only)."""

    def __init__(self, images):
        self._init_set(images, "tensor", None)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    extractor = PooledFeatures().requires_grad_(False)
    reference = TensorReference(torch.rand(7, 3, 16, 16))
    images = torch.rand(6, 3, 16, 16)
    return extractor, reference, images


def test_individual_reward_is_the_marginal_utility_of_the_features(setup):
    extractor, reference, images = setup
    reward = DiversityReward(extractor, reference, kind="mmd", kernel_args={"degree": 2})
    assert reward.batch_level is True
    rewards = reward(images, [""] * 6)
    with torch.no_grad():
        gen, ref = extractor(images), extractor(reference.images)
    expected = marginal_utility(functools.partial(mmd_reward, degree=2), gen, ref)
    torch.testing.assert_close(rewards, expected)
    # the reference features were computed once, then reused
    calls = extractor.calls
    reward(images, [""] * 6)
    assert extractor.calls == calls + 1


def test_gp_mi_and_set_reward_broadcast(setup):
    extractor, reference, images = setup
    with torch.no_grad():
        gen = F.normalize(extractor(images), dim=-1)
        ref = F.normalize(extractor(reference.images), dim=-1)
    individual = DiversityReward(extractor, reference, kind="gp_mi", normalize=True, kernel_args={"lengthscale": 0.5})
    expected = marginal_utility(functools.partial(gp_mi_reward, lengthscale=0.5), gen, ref)
    torch.testing.assert_close(individual(images, []), expected)
    whole = DiversityReward(extractor, reference, kind="gp_mi", individual=False, normalize=True)
    torch.testing.assert_close(whole(images, []), gp_mi_reward(gen, ref).expand(6))


def test_argument_errors_name_the_fix(setup):
    extractor, reference, _ = setup
    with pytest.raises(ValueError, match=r"\['lengthscale'\].*kind='mmd'.*degree"):
        DiversityReward(extractor, reference, kind="mmd", kernel_args={"lengthscale": 1.0})
    with pytest.raises(ValueError, match="kind='kid'"):
        DiversityReward(extractor, reference, kind="kid")
    with pytest.raises(TypeError, match="feature_extractor is a str"):
        DiversityReward("clip", reference)


def test_duplicates_get_lower_rewards_with_digits_features():
    reference = DigitsReference(classes=[0, 6, 8, 9], per_class=5)
    reward = DiversityReward(DigitsFeatures(), reference, kind="gp_mi", normalize=True)
    reward.train()
    assert not reward.feature_extractor.training
    # four copies of one image and one each of three other digits
    batch = torch.cat([reference.images[:1].expand(4, -1, -1, -1), reference.images[[5, 10, 15]]])
    with torch.no_grad():
        rewards = reward(batch, [""] * 7)
    assert rewards.shape == (7,) and torch.isfinite(rewards).all()
    assert rewards[:4].max() < rewards[4:].min()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), "tiny-clip-features", TINY_CLIP)


def test_clip_image_features_are_unit_norm_clip_embeddings(tiny_clip):
    name, weights, model = tiny_clip
    features = CLIPImageFeatures(name, weights)
    images = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(features(images), model.encode_image((images - mean) / std, normalize=True))
    assert features.cache_key == "CLIPImageFeatures:tiny-clip-features:tiny_clip.pt"


def _random_inception_state(aux_logits):
    from torchvision.models import inception_v3

    with torch.device("meta"):
        shapes = inception_v3(weights=None, aux_logits=aux_logits, init_weights=False).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, meta in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = torch.ones(meta.shape)
        elif key.endswith(("running_mean", "bias")):
            state[key] = torch.zeros(meta.shape)
        else:  # He initialisation keeps activations alive through the 90 layers
            fan_in = meta.shape[1:].numel()
            state[key] = torch.randn(meta.shape, generator=generator) * (2.0 / fan_in) ** 0.5
    return state


@pytest.mark.parametrize("aux_logits", [True, False])
def test_inception_features_are_torchvisions_pool_features(tmp_path, aux_logits):
    from torchvision.models import inception_v3

    state = _random_inception_state(aux_logits)
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    features = InceptionFeatures(str(path))
    features.train()
    assert not features.model.training

    with torch.device("meta"):
        reference = inception_v3(weights=None, aux_logits=aux_logits, init_weights=False, transform_input=True)
    reference.load_state_dict(state, assign=True)
    reference.fc = nn.Identity()
    reference.eval()
    images = torch.rand(2, 3, 64, 64)
    resized = F.interpolate(images, size=(299, 299), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        output = features(images)
        expected = reference((resized - mean) / std)
    assert output.shape == (2, 2048)
    assert (output[0] - output[1]).abs().mean() > 1e-3 * output.abs().mean()  # input matters
    torch.testing.assert_close(output, expected)


def test_inception_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path=.*missing.pth.*local file path"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision Inception3 state dict"):
        InceptionFeatures(str(tmp_path / "other.pth"))


def test_yaml_diversity_reward_instantiates_like_lightning_cli():
    from jsonargparse import ArgumentParser

    config = """
reward:
  class_path: lightning_sdrl.rewards.diversity.DiversityReward
  init_args:
    feature_extractor:
      class_path: lightning_sdrl.digits.features.DigitsFeatures
    reference:
      class_path: lightning_sdrl.digits.reference.DigitsReference
      init_args: {classes: [0, 6, 8, 9], per_class: 10}
    kind: gp_mi
    normalize: true
    kernel_args: {lengthscale: 0.5}
"""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=nn.Module)
    reward = parser.instantiate_classes(parser.parse_string(config)).reward
    assert isinstance(reward, DiversityReward) and isinstance(reward.reference, DigitsReference)
    assert len(reward.reference) == 40 and reward.reward_fn.keywords == {"lengthscale": 0.5}
    assert reward(torch.rand(4, 3, 16, 16), [""] * 4).shape == (4,)
