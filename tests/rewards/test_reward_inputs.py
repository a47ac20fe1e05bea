"""The input check every reward shares: ``[B, 3, H, W]`` floats in ``[0, 1]``, non-finite images flagged."""

import pytest
import torch
from torch import nn

from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.digits.embedder import DigitsEmbedder
from lightning_sdrl.digits.features import DigitsFeatures
from lightning_sdrl.functional.classifier_rewards import balance_reward, shift_reward
from lightning_sdrl.functional.diversity import marginal_utility, mmd_reward
from lightning_sdrl.functional.image_rewards import jpeg_compressibility
from lightning_sdrl.reference import ReferenceSet
from lightning_sdrl.rewards.aesthetic import AestheticReward, CLIPScoreReward
from lightning_sdrl.rewards.attribute import BalanceReward, ShiftReward, group_probabilities
from lightning_sdrl.rewards.base import check_images, score_finite_images
from lightning_sdrl.rewards.diversity import DiversityReward
from lightning_sdrl.rewards.reward_model import CLIPEmbedder, LearnedPreferenceReward, RewardHead
from lightning_sdrl.rewards.simple import Brightness, JpegCompressibility
from tests.helpers import make_tiny_clip, tiny_clip_config

GROUPS = [[0], [6, 8, 9]]
PROMPTS = ["a cat", "a dog", "a zero", "the digit 8", "two birds", "a handwritten six"]


class TensorReference(ReferenceSet):
    """A reference set from a tensor (tests only)."""

    def __init__(self, images):
        self._init_set(images, "tensor", None)


class UnsureClassifier(nn.Module):
    """A two-class classifier that is never confident: every image is "None"."""

    labels = ["male", "female"]

    def forward(self, images):
        return torch.full((images.shape[0], 2), 0.5)


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    """Every reward class, built from tiny or shipped models."""
    folder = tmp_path_factory.mktemp("reward_inputs")
    name, weights, _ = make_tiny_clip(folder, "tiny-clip-reward-inputs", tiny_clip_config(16, 1))
    head_path = folder / "linear_head.pth"
    torch.save(
        {"weight": torch.randn(1, 16, generator=torch.Generator().manual_seed(3)), "bias": torch.ones(1)}, head_path
    )
    torch.manual_seed(0)
    reference = TensorReference(torch.rand(7, 3, 32, 32))
    return {
        "Brightness": Brightness(),
        "JpegCompressibility": JpegCompressibility(),
        "ShiftReward": ShiftReward(DigitsClassifier(), target="0", groups=GROUPS),
        "BalanceReward": BalanceReward(DigitsClassifier(), groups=GROUPS, threshold=0.3),
        "DiversityReward-mmd": DiversityReward(DigitsFeatures(), reference, kind="mmd"),
        "DiversityReward-gp_mi": DiversityReward(DigitsFeatures(), reference, kind="gp_mi", normalize=True),
        "DiversityReward-set": DiversityReward(DigitsFeatures(), reference, kind="mmd", individual=False),
        "AestheticReward": AestheticReward(str(head_path), name, weights),
        "CLIPScoreReward": CLIPScoreReward(name, weights),
        "LearnedPreferenceReward": LearnedPreferenceReward(
            CLIPEmbedder(name, pretrained=weights), RewardHead(16, (8,), (0.2,)), 0.3, 2.0
        ),
        "LearnedPreferenceReward-digits": LearnedPreferenceReward(DigitsEmbedder(), RewardHead(64, (8,), (0.2,))),
    }


REWARD_NAMES = [
    "Brightness",
    "JpegCompressibility",
    "ShiftReward",
    "BalanceReward",
    "DiversityReward-mmd",
    "DiversityReward-gp_mi",
    "DiversityReward-set",
    "AestheticReward",
    "CLIPScoreReward",
    "LearnedPreferenceReward",
    "LearnedPreferenceReward-digits",
]


def _images(batch_size=6):
    return torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key", REWARD_NAMES)
def test_8_bit_images_are_refused_with_the_conversion(rewards, key):
    reward = rewards[key]
    images = (_images() * 255).round().to(torch.uint8)
    with pytest.raises(
        TypeError, match=rf"{type(reward).__name__} got images of dtype torch.uint8.*images.float\(\) / 255"
    ):
        reward(images, PROMPTS)


@pytest.mark.parametrize("key", REWARD_NAMES)
@pytest.mark.parametrize(("scale", "shift", "fix"), [(255.0, 0.0, r"x / 255"), (2.0, -1.0, r"\(x \+ 1\) / 2")])
def test_images_outside_0_1_are_refused_with_the_range_and_the_fix(rewards, key, scale, shift, fix):
    reward = rewards[key]
    images = _images() * scale + shift
    low, high = images.min().item(), images.max().item()
    with pytest.raises(
        ValueError, match=rf"{type(reward).__name__} got images with values in \[{low:.4g}, {high:.4g}\]"
    ):
        reward(images, PROMPTS)
    with pytest.raises(ValueError, match=rf"expected \[0, 1\]: rescale them.*{fix}"):
        reward(images, PROMPTS)


@pytest.mark.parametrize("key", REWARD_NAMES)
@pytest.mark.parametrize("shape", [(6, 1, 32, 32), (3, 32, 32), (6, 4, 32, 32)])
def test_images_of_the_wrong_shape_are_refused(rewards, key, shape):
    reward = rewards[key]
    images = torch.rand(shape)
    with pytest.raises(
        ValueError, match=rf"{type(reward).__name__} got images of shape \[{', '.join(map(str, shape))}\]; "
    ):
        reward(images, PROMPTS)


@pytest.mark.parametrize("key", REWARD_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_image_gets_nan_and_the_others_their_reward(rewards, key, bad):
    reward = rewards[key]
    images = _images()
    clean = reward(images, PROMPTS)
    images[2, 1, 5, 7] = bad
    with torch.no_grad():
        scores = reward(images, PROMPTS)
    assert scores.shape == (6,)
    assert torch.isnan(scores[2])
    keep = torch.tensor([True, True, False, True, True, True])
    assert torch.isfinite(scores[keep]).all()
    if reward.batch_level:  # the batch statistic is that of the finite images alone
        expected = reward(images[keep], [p for p, k in zip(PROMPTS, keep.tolist(), strict=True) if k])
    else:
        expected = clean[keep]
    torch.testing.assert_close(scores[keep], expected)


@pytest.mark.parametrize("key", REWARD_NAMES)
def test_a_batch_of_nan_images_is_all_nan(rewards, key):
    images = torch.full((6, 3, 32, 32), float("nan"))
    assert torch.isnan(rewards[key](images, PROMPTS)).all()


def test_valid_images_score_exactly_as_the_functional_math(rewards):
    images = _images()
    with torch.no_grad():
        assert torch.equal(rewards["Brightness"](images, PROMPTS), images.mean(dim=(1, 2, 3)))
        assert torch.equal(rewards["JpegCompressibility"](images, PROMPTS), jpeg_compressibility(images))
        probs = group_probabilities(DigitsClassifier()(images), GROUPS)
        assert torch.equal(rewards["ShiftReward"](images, PROMPTS), shift_reward(probs, 0))
        assert torch.equal(rewards["BalanceReward"](images, PROMPTS), balance_reward(probs, 0.3))
        diversity = rewards["DiversityReward-mmd"]
        expected = marginal_utility(mmd_reward, DigitsFeatures()(images), diversity.reference_features())
        assert torch.equal(diversity(images, PROMPTS), expected)


def test_jpeg_compressibility_of_a_nan_image_is_nan():
    images = _images(3)
    images[1] = float("nan")
    scores = JpegCompressibility()(images, PROMPTS[:3])
    assert torch.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all()
    # the functional form too: a NaN image has no 8-bit version, hence no JPEG size
    direct = jpeg_compressibility(images)
    assert torch.isnan(direct[1])
    assert torch.equal(direct[[0, 2]], jpeg_compressibility(images[[0, 2]]))


@pytest.mark.parametrize("key", ["ShiftReward", "AestheticReward", "LearnedPreferenceReward-digits"])
def test_gradients_skip_the_nan_image(rewards, key):
    images = digits_split("test")[0][:6].expand(-1, 3, -1, -1).clone().requires_grad_(True)
    with torch.no_grad():
        images[4] = float("nan")
    rewards[key](images, PROMPTS)[[0, 1, 2, 3, 5]].sum().backward()
    assert torch.isfinite(images.grad).all()
    assert (images.grad[4] == 0).all()
    assert (images.grad[[0, 1, 2, 3, 5]].abs().flatten(1).sum(dim=1) > 0).all()


def test_balance_reward_of_an_all_none_batch_is_its_worst_value():
    # q of eq. (2) is 0 / 0: not balanced, so the -1/2 of q = 0 or 1, not the 0 of q = 1/2
    scores = BalanceReward(UnsureClassifier())(_images(4), PROMPTS[:4])
    torch.testing.assert_close(scores, torch.full((4,), -0.5))


def test_balance_reward_counts_only_the_finite_images(rewards):
    reward = rewards["BalanceReward"]
    images = _images()
    images[[0, 3]] = float("nan")
    scores = reward(images, PROMPTS)
    assert torch.isnan(scores[[0, 3]]).all()
    with torch.no_grad():
        probs = group_probabilities(DigitsClassifier()(images[[1, 2, 4, 5]]), GROUPS)
    assert torch.equal(scores[[1, 2, 4, 5]], balance_reward(probs, 0.3))


def test_diversity_reward_with_too_few_finite_images_is_all_nan(rewards):
    images = _images(4)
    images[[1, 2]] = float("nan")  # 2 finite images; mmd's marginal utility needs 3
    assert torch.isnan(rewards["DiversityReward-mmd"](images, PROMPTS[:4])).all()
    scores = rewards["DiversityReward-gp_mi"](images, PROMPTS[:4])  # gp_mi needs 2
    assert torch.isnan(scores[[1, 2]]).all() and torch.isfinite(scores[[0, 3]]).all()
    with pytest.raises(ValueError, match=r"gen_feats has shape \[2, 64\]"):  # an all-finite batch too small: an error
        rewards["DiversityReward-mmd"](images[[0, 3]], PROMPTS[:2])


def test_check_images_flags_non_finite_images_and_tolerates_rounding():
    images = _images(3)
    images[0, 0, 0, 0] = 1.0 + 1e-7
    images[1, 2, 3, 4] = float("-inf")
    assert check_images(images).tolist() == [True, False, True]
    with pytest.raises(TypeError, match="MyReward got images of type list"):
        check_images([[0.5]], "MyReward")
    with pytest.raises(ValueError, match=r"values in \[-0.01, 1\]"):
        check_images(torch.cat([images[[0]], torch.full((1, 3, 32, 32), -0.01)]), "MyReward")
    # a non-finite image does not hide the range of the others
    bad = torch.cat([torch.full((1, 3, 2, 2), float("nan")), torch.full((1, 3, 2, 2), 2.0)])
    with pytest.raises(ValueError, match=r"values in \[2, 2\]"):
        check_images(bad)


def test_score_finite_images_per_image_and_batch_level():
    images = torch.tensor([0.2, float("nan"), 0.6, 1.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    finite = check_images(images)
    seen = []

    def centred(x):
        seen.append(len(x))
        return x.mean(dim=(1, 2, 3)) - x.mean()

    # batch level: the statistic of the 3 finite images; per image: a black image stands in
    torch.testing.assert_close(
        score_finite_images(centred, images, finite, batch_level=True),
        torch.tensor([-0.4, float("nan"), 0.0, 0.4]),
        equal_nan=True,
    )
    torch.testing.assert_close(
        score_finite_images(centred, images, finite), torch.tensor([-0.25, float("nan"), 0.15, 0.55]), equal_nan=True
    )
    assert seen == [3, 4]
    nothing = score_finite_images(centred, images[[1]], finite[[1]])
    assert torch.isnan(nothing).all() and seen == [3, 4]
