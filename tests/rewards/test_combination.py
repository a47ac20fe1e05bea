"""Several rewards at once: the combination against a hand computation, the logs, the YAML surface."""

import json
import math
import statistics

import pytest
import torch

from lightning_sdrl.cli import run_cli
from lightning_sdrl.functional.reward_combination import combine_rewards
from lightning_sdrl.rewards.combination import MultiReward
from lightning_sdrl.rewards.simple import Brightness, JpegCompressibility
from tests.helpers import BatchRankReward, WrongShapeReward

TINY = "configs/tiny/ddpo.yaml"


def hand_combination(components, weights, keys=None, eps=0.0):
    """The combination written out sample by sample with the statistics module (population std)."""
    rows = [list(map(float, row)) for row in components]
    finite = [all(math.isfinite(v) for v in row) for row in rows]
    out = []
    for i, row in enumerate(rows):
        if not finite[i]:
            out.append(math.nan)
            continue
        total = 0.0
        for k, w in enumerate(weights):
            value = row[k]
            if keys is not None:
                group = [rows[j][k] for j in range(len(rows)) if finite[j] and keys[j] == keys[i]]
                mean, std = statistics.fmean(group), statistics.pstdev(group)
                value = 0.0 if std + eps == 0 else (value - mean) / (std + eps)
            total += w * value
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("normalize", [False, True])
def test_combination_equals_the_hand_computation(normalize):
    generator = torch.Generator().manual_seed(3)
    components = torch.randn(12, 3, generator=generator, dtype=torch.float64) * torch.tensor([5.0, 0.1, 1.0])
    components[4, 1] = float("nan")  # one sample a component could not score
    components[7, 0] = float("inf")
    weights = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    keys = [i % 3 for i in range(12)]
    expected = hand_combination(components, weights.tolist(), keys if normalize else None, eps=1e-4)
    got = combine_rewards(components, weights, keys if normalize else None, eps=1e-4)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.isnan(got[[4, 7]]).all() and torch.isfinite(got[[0, 1, 2, 3, 5, 6]]).all()


def test_group_normalisation_keeps_a_small_scale_component_from_drowning():
    """GDPO's point: raw sums rank by the large-scale reward alone, normalised sums weigh both."""
    components = torch.tensor([[22.0, 0.20], [21.0, 0.40], [21.5, 0.30]])
    raw = combine_rewards(components, torch.ones(2))
    normalised = combine_rewards(components, torch.ones(2), ["p"] * 3, eps=0.0)
    assert raw.argmax() == 0  # PickScore-sized differences decide alone
    torch.testing.assert_close(normalised, torch.zeros(3), atol=1e-6, rtol=0)  # opposite, equal strength


def test_combination_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one weight per component"):
        combine_rewards(torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="one per sample"):
        combine_rewards(torch.zeros(4, 2), torch.ones(2), ["a"])


def test_multi_reward_calls_each_component_and_combines_within_the_batch():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "a", "a", "b", "b", "b"]
    reward = MultiReward(
        {"bright": Brightness(), "jpeg": JpegCompressibility()}, {"bright": 3.0, "jpeg": 0.5}, normalize="group"
    )
    components = reward.score_components(images, prompts)
    torch.testing.assert_close(components[:, 0], Brightness()(images, prompts))
    torch.testing.assert_close(components[:, 1], JpegCompressibility()(images, prompts))
    expected = hand_combination(components, [3.0, 0.5], prompts, eps=1e-4)
    torch.testing.assert_close(reward(images, prompts).double(), expected, rtol=1e-5, atol=1e-5)


def test_multi_reward_nan_image_gives_nan_and_flags_follow_the_components():
    images = torch.rand(3, 3, 8, 8)
    images[1] = float("nan")
    reward = MultiReward({"bright": Brightness(), "batch": BatchRankReward()})
    assert reward.batch_level and not reward.background
    assert torch.isnan(reward(images, ["a"] * 3)[1]) and torch.isfinite(reward(images, ["a"] * 3)[[0, 2]]).all()


def test_multi_reward_refuses_bad_settings_and_names_a_bad_component():
    with pytest.raises(ValueError, match="one weight per reward component"):
        MultiReward({"bright": Brightness()}, {"brightness": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        MultiReward({})
    with pytest.raises(ValueError, match="normalize='batch'"):
        MultiReward({"bright": Brightness()}, normalize="batch")
    reward = MultiReward({"bright": Brightness(), "bad": WrongShapeReward()})
    with pytest.raises(ValueError, match="component 'bad' returned shape \\[2, 1\\]; expected \\[2\\]"):
        reward(torch.rand(2, 3, 4, 4), ["a", "b"])


def test_a_multi_reward_run_logs_each_component_and_trains_on_the_epoch_combination(tmp_path):
    """Through the CLI: components from YAML, combined over the epoch's prompt groups, logged per name."""
    reward = {
        "class_path": "lightning_sdrl.rewards.combination.MultiReward",
        "init_args": {
            "rewards": {
                "bright": {"class_path": "lightning_sdrl.rewards.simple.Brightness"},
                "jpeg": {"class_path": "lightning_sdrl.rewards.simple.JpegCompressibility"},
            },
            "weights": {"bright": 2.0, "jpeg": 0.25},
            "normalize": "group",
        },
    }
    cli = run_cli(
        [
            "fit",
            "-c",
            TINY,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            f"--model.init_args.reward={json.dumps(reward)}",
        ]
    )
    module = cli.model
    update = module.last_update
    assert update.components.shape == (8, 2)
    # the components are the plain rewards of the epoch's images
    torch.testing.assert_close(update.components[:, 0], Brightness()(update.images, update.prompts))
    # the combination is over the epoch's prompt groups (ids), as written out by hand
    expected = hand_combination(update.components, [2.0, 0.25], update.prompt_ids.tolist(), eps=1e-4)
    torch.testing.assert_close(update.rewards.double(), expected, rtol=1e-5, atol=1e-5)
    logged = cli.trainer.logged_metrics
    for k, name in enumerate(["bright", "jpeg"]):
        torch.testing.assert_close(logged[f"train/reward/{name}"], update.components[:, k].mean())
    torch.testing.assert_close(logged["train/reward_mean"], update.rewards.mean())
