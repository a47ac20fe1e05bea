from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.functional.classifier_rewards import (
    balance_reward,
    expected_log_ratio_reward,
    grouped_balance_reward,
    joint_balance_reward,
    shift_reward,
)
from lightning_sdrl.rewards.attribute import (
    BalanceReward,
    JointBalanceReward,
    ShiftReward,
    attribute_shares,
    group_probabilities,
)

# hand-made probabilities of a 4-class classifier for 6 images
PROBS = torch.tensor(
    [
        [0.80, 0.10, 0.05, 0.05],
        [0.05, 0.60, 0.30, 0.05],
        [0.10, 0.10, 0.10, 0.70],
        [0.40, 0.20, 0.20, 0.20],
        [0.90, 0.05, 0.03, 0.02],
        [0.05, 0.05, 0.85, 0.05],
    ]
)


class FixedClassifier(nn.Module):
    """Returns PROBS whatever the images: the rewards are checked against the functional math."""

    labels = ["cat", "dog", "fox", "owl"]

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, to see it frozen

    def forward(self, images):
        return PROBS[: images.shape[0]] * self.scale


def _images(n=6):
    return torch.rand(n, 3, 8, 8)


def test_group_probabilities_sums_the_classes_of_each_group():
    grouped = group_probabilities(PROBS, [[0], [1, 2]])
    torch.testing.assert_close(grouped, torch.stack([PROBS[:, 0], PROBS[:, 1] + PROBS[:, 2]], 1))
    assert group_probabilities(PROBS, None) is PROBS
    with pytest.raises(ValueError, match="two columns"):
        group_probabilities(PROBS, [[0, 1], [1]])
    with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
        group_probabilities(PROBS, [[0], [4]])
    with pytest.raises(ValueError, match="at least two non-empty"):
        group_probabilities(PROBS, [[0, 1]])


def test_shift_reward_with_groups_equals_the_functional_value():
    groups = [[0], [1, 2]]
    grouped = torch.stack([PROBS[:, 0], PROBS[:, 1] + PROBS[:, 2]], dim=1)
    reward = ShiftReward(FixedClassifier(), target=1, groups=groups)
    assert reward.batch_level is False
    assert not any(p.requires_grad for p in reward.parameters())
    torch.testing.assert_close(reward(_images(), ["p"] * 6), shift_reward(grouped, 1))
    # a class name selects the group that contains it
    assert ShiftReward(FixedClassifier(), target="fox", groups=groups).target == 1
    assert ShiftReward(FixedClassifier(), target="owl").target == 3
    assert reward.attribute_names == ["cat", "dog+fox"]
    torch.testing.assert_close(ShiftReward(FixedClassifier(), target="dog")(_images(), []), PROBS[:, 1])


def test_shift_reward_target_errors_name_the_value():
    with pytest.raises(ValueError, match="target='owl'.*none of groups"):
        ShiftReward(FixedClassifier(), target="owl", groups=[[0], [1, 2]])
    with pytest.raises(ValueError, match="target='horse'.*labels"):
        ShiftReward(FixedClassifier(), target="horse")
    with pytest.raises(ValueError, match=r"target=2; expected a column index in \[0, 1\]"):
        ShiftReward(FixedClassifier(), target=2, groups=[[0], [1]])
    with pytest.raises(TypeError, match="classifier is a str"):
        ShiftReward("gender", target=0)


def test_balance_reward_with_groups_equals_the_functional_value():
    groups = [[0], [1, 2]]
    grouped = torch.stack([PROBS[:, 0], PROBS[:, 1] + PROBS[:, 2]], dim=1)
    reward = BalanceReward(FixedClassifier(), threshold=0.7, groups=groups)
    assert reward.batch_level is True
    rewards = reward(_images(), ["p"] * 6)
    expected = balance_reward(grouped, threshold=0.7)
    torch.testing.assert_close(rewards, expected)
    # two "cat" images, two "dog+fox" images, two "None" (rows 2 and 3): balanced, all zero
    torch.testing.assert_close(rewards, torch.zeros(6))
    target = [0.25, 0.75]
    skewed = BalanceReward(FixedClassifier(), groups=groups, target_distribution=target)
    torch.testing.assert_close(skewed(_images(), []), balance_reward(grouped, 0.7, torch.tensor(target)))
    # without groups: four columns
    torch.testing.assert_close(
        BalanceReward(FixedClassifier(), threshold=0.6)(_images(), []),
        balance_reward(PROBS, threshold=0.6),
    )


def test_balance_reward_argument_errors():
    with pytest.raises(ValueError, match="threshold=0"):
        BalanceReward(FixedClassifier(), threshold=0.0)
    with pytest.raises(ValueError, match=r"target_distribution=\[0.5, 0.5\]; expected 4"):
        BalanceReward(FixedClassifier(), target_distribution=[0.5, 0.5])


def test_attribute_shares_counts_columns_and_none():
    shares = attribute_shares(group_probabilities(PROBS, [[0], [1, 2]]), threshold=0.7)
    torch.testing.assert_close(shares, torch.tensor([2 / 6, 2 / 6, 2 / 6]))
    torch.testing.assert_close(attribute_shares(PROBS, 0.5), torch.tensor([2, 1, 1, 1, 1]) / 6)


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_split("test")
    return images.expand(-1, 3, -1, -1), labels


def test_digit_groups_reward_zero_against_other_loop_digits(digits):
    images, labels = digits
    # three zeros, one eight, one three (in no group: "None")
    batch = torch.cat([images[labels == 0][:3], images[labels == 8][:1], images[labels == 3][:1]])
    classifier = DigitsClassifier()
    reward = BalanceReward(classifier, groups=[[0], [6, 8, 9]])
    with torch.no_grad():
        grouped = group_probabilities(classifier(batch), [[0], [6, 8, 9]])
    rewards = reward(batch, [""] * 5)
    torch.testing.assert_close(rewards, balance_reward(grouped))
    # q = 1/4: zeros are over-represented (-1/4), the eight under-represented (+1/4)
    torch.testing.assert_close(rewards, torch.tensor([-0.25, -0.25, -0.25, 0.25, -0.25]))
    assert reward.attribute_names == ["0", "6+8+9"]
    torch.testing.assert_close(attribute_shares(grouped), torch.tensor([0.6, 0.2, 0.2]))


def test_shift_reward_is_differentiable(digits):
    images = digits[0][:4].clone().requires_grad_(True)
    reward = ShiftReward(DigitsClassifier(), target="0", groups=[[0], [6, 8, 9]])
    reward(images, [""] * 4).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_yaml_reward_config_instantiates_like_lightning_cli():
    from jsonargparse import ArgumentParser

    config = """
reward:
  class_path: lightning_sdrl.rewards.attribute.BalanceReward
  init_args:
    classifier:
      class_path: lightning_sdrl.digits.classifier.DigitsClassifier
    groups: [[0], [6, 8, 9]]
    threshold: 0.8
"""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=nn.Module)
    reward = parser.instantiate_classes(parser.parse_string(config)).reward
    assert isinstance(reward, BalanceReward) and isinstance(reward.classifier, DigitsClassifier)
    assert reward.groups == [[0], [6, 8, 9]] and reward.threshold == 0.8
    assert reward(torch.rand(4, 3, 16, 16), [""] * 4).shape == (4,)


def test_ddpo_config_with_the_balance_reward_parses(tmp_path, capsys):
    import yaml

    from lightning_sdrl.cli import main

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "configs" / "tiny" / "ddpo.yaml").read_text())
    config["model"]["init_args"]["reward"] = {
        "class_path": "lightning_sdrl.rewards.attribute.BalanceReward",
        "init_args": {
            "classifier": {"class_path": "lightning_sdrl.digits.classifier.DigitsClassifier"},
            "groups": [[0], [6, 8, 9]],
        },
    }
    path = tmp_path / "ddpo_balance.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(path), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    reward = printed["model"]["init_args"]["reward"]
    assert reward["class_path"] == "lightning_sdrl.rewards.attribute.BalanceReward"
    assert reward["init_args"]["groups"] == [[0], [6, 8, 9]]
    assert reward["init_args"]["threshold"] == 0.7


# ---------------------------------------------------------------- per prompt and joint (section V)
class MeanPixelClassifier(nn.Module):
    """Column 1 is the image's mean pixel: images are made to be classified as wanted."""

    labels = ["dark", "light"]

    def forward(self, images):
        light = images.mean(dim=(1, 2, 3))
        return torch.stack([1 - light, light], dim=1)


def _shaded(values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)


def test_per_prompt_balance_reward_equals_the_grouped_functional_value():
    # the batch is 4 dark : 4 light, but prompt "a" is 3 : 1 and "b" 1 : 3
    images = _shaded([0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.1])
    prompts = ["a"] * 4 + ["b"] * 4
    whole = BalanceReward(MeanPixelClassifier())(images, prompts)
    torch.testing.assert_close(whole, torch.zeros(8))
    per_prompt = BalanceReward(MeanPixelClassifier(), per_prompt=True)(images, prompts)
    probs = MeanPixelClassifier()(images)
    torch.testing.assert_close(per_prompt, grouped_balance_reward(probs, prompts))
    # each prompt's minority image is rewarded (+1/4), its majority penalised (-1/4)
    torch.testing.assert_close(per_prompt, torch.tensor([-1, -1, -1, 1, -1, -1, -1, 1]) / 4)
    with pytest.raises(ValueError, match="got 3 prompts for 8 images"):
        BalanceReward(MeanPixelClassifier(), per_prompt=True)(images, prompts[:3])


def test_per_prompt_balance_reward_leaves_non_finite_images_out_with_their_prompts():
    images = _shaded([0.1, float("nan"), 0.9, 0.9])
    rewards = BalanceReward(MeanPixelClassifier(), per_prompt=True)(images, ["a", "a", "a", "b"])
    assert rewards[1].isnan()
    expected = grouped_balance_reward(MeanPixelClassifier()(images[[0, 2, 3]]), ["a", "a", "b"])
    torch.testing.assert_close(rewards[[0, 2, 3]], expected)


def test_prompt_groups_balance_each_prompt_over_its_own_classes():
    reward = BalanceReward(FixedClassifier(), groups=[[0], [1, 2]], per_prompt=True, prompt_groups={"q": [[3], [2]]})
    prompts = ["p", "p", "p", "q", "q", "q"]
    probs = torch.cat(
        [group_probabilities(PROBS[:3], [[0], [1, 2]]), group_probabilities(PROBS[3:], [[3], [2]])], dim=0
    )
    torch.testing.assert_close(reward.attribute_probs(_images(), prompts), probs)
    torch.testing.assert_close(reward(_images(), prompts), grouped_balance_reward(probs, prompts))
    assert reward.prompt_attribute_names("q") == ["owl", "fox"]
    assert reward.prompt_attribute_names("p") == reward.attribute_names == ["cat", "dog+fox"]
    with pytest.raises(ValueError, match="different numbers of attribute columns"):
        BalanceReward(FixedClassifier(), groups=[[0], [1]], prompt_groups={"q": [[0], [1], [2]]})
    with pytest.raises(ValueError, match="pass the images' prompts"):
        reward.attribute_probs(_images())


def test_joint_balance_reward_equals_the_functional_value_over_grouped_classifiers():
    reward = JointBalanceReward(
        [FixedClassifier(), MeanPixelClassifier()], groups=[[[0], [1, 2]], None], marginals=[[0.5, 0.5], [0.25, 0.75]]
    )
    assert reward.batch_level is True
    images = _shaded([0.1, 0.9, 0.9, 0.1, 0.9, 0.2])
    expected = joint_balance_reward(
        [group_probabilities(PROBS, [[0], [1, 2]]), MeanPixelClassifier()(images)],
        0.7,
        torch.tensor([0.125, 0.375, 0.125, 0.375], dtype=torch.float64),
    )
    torch.testing.assert_close(reward(images, ["p"] * 6), expected)
    assert reward.attribute_names == ["cat & dark", "cat & light", "dog+fox & dark", "dog+fox & light"]
    per_prompt = JointBalanceReward([FixedClassifier(), MeanPixelClassifier()], per_prompt=True)
    prompts = ["a", "b"] * 3
    expected = joint_balance_reward([PROBS, MeanPixelClassifier()(images)], keys=prompts)
    torch.testing.assert_close(per_prompt(images, prompts), expected)


def test_joint_balance_reward_shapings_equal_the_functional_values():
    images = _shaded([0.1, 0.9, 0.9, 0.9, 0.9, 0.9])  # not balanced: the two shapings differ
    reward = JointBalanceReward([FixedClassifier(), MeanPixelClassifier()], groups=[[[0], [1, 2]], None])
    assert reward.shaping == "balance"
    shaped = JointBalanceReward(
        [FixedClassifier(), MeanPixelClassifier()], groups=[[[0], [1, 2]], None], shaping="log_ratio"
    )
    probs = [group_probabilities(PROBS, [[0], [1, 2]]), MeanPixelClassifier()(images)]
    torch.testing.assert_close(shaped(images, ["p"] * 6), joint_balance_reward(probs, shaping="log_ratio"))
    assert not torch.allclose(shaped(images, ["p"] * 6), reward(images, ["p"] * 6))
    expected = JointBalanceReward(
        [FixedClassifier(), MeanPixelClassifier()], groups=[[[0], [1, 2]], None], shaping="expected_log_ratio"
    )
    torch.testing.assert_close(expected(images, ["p"] * 6), expected_log_ratio_reward(probs))


def test_joint_balance_reward_argument_errors():
    with pytest.raises(ValueError, match="shaping='chi2'"):
        JointBalanceReward([MeanPixelClassifier()], shaping="chi2")
    with pytest.raises(ValueError, match="classifiers is empty"):
        JointBalanceReward([])
    with pytest.raises(ValueError, match="1 groups for 2 classifiers"):
        JointBalanceReward([FixedClassifier(), MeanPixelClassifier()], groups=[None])
    with pytest.raises(ValueError, match="both set"):
        JointBalanceReward([MeanPixelClassifier()], marginals=[None], target_distribution=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"expected 8 positive shares"):
        JointBalanceReward([FixedClassifier(), MeanPixelClassifier()], target_distribution=[0.5, 0.5])


JOINT_PROMPTS = ["p", "p", "p", "q", "q", "q"]
JOINT_IMAGES = [0.1, 0.9, 0.9, 0.1, 0.9, 0.9]  # the MeanPixelClassifier's "light" probability


def _joint_probs_by_hand():
    """The two attributes of the joint prompt_groups tests, grouped per prompt with plain sums.

    "p" (rows 0-2) keeps groups [[0], [1, 2]]: cat vs dog+fox; "q" (rows 3-5) has [[1], [0, 2]]:
    dog vs cat+fox; the MeanPixelClassifier's two classes are kept for both.
    """
    p, q = PROBS[:3], PROBS[3:]
    animal = torch.cat(
        [torch.stack([p[:, 0], p[:, 1] + p[:, 2]], dim=1), torch.stack([q[:, 1], q[:, 0] + q[:, 2]], dim=1)]
    )
    light = torch.tensor(JOINT_IMAGES)
    return animal, torch.stack([1 - light, light], dim=1)


@pytest.mark.parametrize("shaping", ["balance", "expected_log_ratio"])
def test_joint_prompt_groups_balance_each_prompt_over_its_own_joint_classes(shaping):
    reward = JointBalanceReward(
        [FixedClassifier(), MeanPixelClassifier()],
        groups=[[[0], [1, 2]], None],
        per_prompt=True,
        shaping=shaping,
        prompt_groups={"q": [[[1], [0, 2]], None]},
    )
    images = _shaded(JOINT_IMAGES)
    animal, light = _joint_probs_by_hand()
    probs = reward.attribute_probs_list(images, JOINT_PROMPTS)
    torch.testing.assert_close(probs[0], animal)
    torch.testing.assert_close(probs[1], light)
    # each prompt's rewards are the functional joint balance of its own rows alone
    expected = torch.cat(
        [joint_balance_reward([animal[rows], light[rows]], 0.7, shaping=shaping) for rows in (slice(0, 3), slice(3, 6))]
    )
    torch.testing.assert_close(reward(images, JOINT_PROMPTS), expected)
    # without per_prompt the prompts still pick the columns, and the whole batch is balanced
    whole = JointBalanceReward(
        [FixedClassifier(), MeanPixelClassifier()],
        groups=[[[0], [1, 2]], None],
        shaping=shaping,
        prompt_groups={"q": [[[1], [0, 2]], None]},
    )
    torch.testing.assert_close(
        whole(images, JOINT_PROMPTS), joint_balance_reward([animal, light], 0.7, shaping=shaping)
    )
    plain = JointBalanceReward(
        [FixedClassifier(), MeanPixelClassifier()], groups=[[[0], [1, 2]], None], shaping=shaping
    )
    assert not torch.allclose(whole(images, JOINT_PROMPTS), plain(images, JOINT_PROMPTS))


def test_joint_prompt_groups_name_each_prompt_s_joint_classes():
    reward = JointBalanceReward(
        [FixedClassifier(), MeanPixelClassifier()],
        groups=[[[0], [1, 2]], None],
        per_prompt=True,
        prompt_groups={"q": [[[1], [0, 2]], None], "r": [None, [[1], [0]]]},
    )
    assert reward.prompt_attribute_names("q") == ["dog & dark", "dog & light", "cat+fox & dark", "cat+fox & light"]
    assert reward.prompt_attribute_names("r") == ["cat & light", "cat & dark", "dog+fox & light", "dog+fox & dark"]
    assert reward.prompt_attribute_names("p") == reward.attribute_names
    assert reward.attribute_names == ["cat & dark", "cat & light", "dog+fox & dark", "dog+fox & light"]
    # the joint classes are those of the per-prompt columns, row-major (the animal slowest)
    classes = reward.attribute_classes(_shaded(JOINT_IMAGES), prompts=["p", "p", "p", "q", "q", "r"])
    animal, light = _joint_probs_by_hand()
    animal[5] = group_probabilities(PROBS[5:], [[0], [1, 2]])[0]
    light[5] = light[5].flip(0)
    by_hand = []
    for a, b in zip(animal.tolist(), light.tolist(), strict=True):
        i, j = max(range(2), key=a.__getitem__), max(range(2), key=b.__getitem__)
        by_hand.append(2 * i + j if a[i] >= 0.7 and b[j] >= 0.7 else -1)
    assert classes.tolist() == by_hand


def test_joint_prompt_groups_errors_name_the_fix():
    classifiers = [FixedClassifier(), MeanPixelClassifier()]
    with pytest.raises(ValueError, match=r"prompt_groups\['q'\].*one entry per classifier \(2\)"):
        JointBalanceReward(classifiers, prompt_groups={"q": [[[0], [1]]]})
    with pytest.raises(ValueError, match="different numbers of attribute columns"):
        JointBalanceReward(classifiers, groups=[[[0], [1]], None], prompt_groups={"q": [[[0], [1], [2]], None]})
    reward = JointBalanceReward(classifiers, groups=[[[0], [1]], None], prompt_groups={"q": [[[2], [3]], None]})
    with pytest.raises(ValueError, match="pass the images' prompts to attribute_probs_list"):
        reward.attribute_probs_list(_images())
    with pytest.raises(ValueError, match="pass the images' prompts"):
        reward.attribute_classes(_images())
    with pytest.raises(ValueError, match="got 3 prompts for 6 images"):  # per_prompt off: prompts pick the columns
        reward(_images(), JOINT_PROMPTS[:3])


def test_stroke_thickness_judge_matches_the_hidden_rule(digits):
    from lightning_sdrl.digits.preferences import stroke_thickness
    from lightning_sdrl.digits.thickness import StrokeThicknessClassifier

    images, _ = digits
    images = images[:64]
    judge = StrokeThicknessClassifier(boundary=0.35, temperature=0.02)
    probs = judge(images)
    thickness = stroke_thickness(images).double()
    bold = 1 / (1 + torch.exp(-(thickness - 0.35) / 0.02))
    torch.testing.assert_close(probs.double(), torch.stack([1 - bold, bold], 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature=0"):
        StrokeThicknessClassifier(temperature=0)
