"""Post-sampling selection (lightning_sdrl.evaluation): a tiny random policy, errors, a short digits run.

The long digits run is benchmarks/digits_selection.py (docs/digits_selection.md).
"""

import functools
import itertools

import pytest
import torch
from torch import nn

from lightning_sdrl.evaluation import SELECTION_MODES, post_sampling_selection
from lightning_sdrl.functional.diversity import gp_mi_reward, mmd_reward
from lightning_sdrl.functional.metrics import fid_from_features, precision_recall

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def pixel_policy():
    from lightning_sdrl.policies import TextToImagePolicy
    from lightning_sdrl.policies.architectures import text_to_image_components

    return TextToImagePolicy(text_to_image_components("tiny-pixel", seed=0), lora=None)


def pooled_colours() -> nn.Module:
    """Features [B, 12]: the mean colour of each 8x8 quarter of a 16x16 image."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())


def real_images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def run_tiny(policy, reward_fn=mmd_reward, **overrides):
    arguments = dict(
        prompts=PROMPTS,
        reference=[real_images(6, 1), real_images(8, 2)],
        evaluation_images=real_images(20, 3),
        feature_extractor=pooled_colours(),
        num_sampled=6,
        subset_size=3,
        groups_per_prompt=2,
        reward_fn=reward_fn,
        random_draws=3,
        num_steps=2,
        guidance_scale=2.0,
    )
    return post_sampling_selection(policy, **{**arguments, **overrides})


@pytest.mark.parametrize("reward_fn", [mmd_reward, functools.partial(gp_mi_reward, lengthscale=0.5)])
def test_max_beats_every_random_draw_beats_min_in_every_group(pixel_policy, reward_fn):
    result = run_tiny(pixel_policy, reward_fn)
    assert list(result.modes) == list(SELECTION_MODES) == ["random", "max", "min"]
    assert result.group_prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert result.images.shape == (4, 6, 3, 16, 16) and result.features.shape == (4, 6, 12)
    cat, dog = pooled_colours()(real_images(6, 1)), pooled_colours()(real_images(8, 2))
    refs = [cat, cat, dog, dog]  # the reference of each group's prompt
    rewards = {}
    for mode, res in result.modes.items():
        draws = 3 if mode == "random" else 1
        assert res.kept.shape == (draws, 4, 3) and res.rewards.shape == (draws, 4)
        assert res.fids.shape == res.precisions.shape == res.recalls.shape == (draws,)
        for draw, group in itertools.product(range(draws), range(4)):
            kept = res.kept[draw, group]
            assert kept.unique().tolist() == kept.tolist() and 0 <= kept.min() and kept.max() < 6
            expected = reward_fn(result.features[group, kept], refs[group])
            torch.testing.assert_close(res.rewards[draw, group], expected)
        rewards[mode] = res.rewards
    # exhaustive selection: the brute-force optimum of each group, above any random subset
    for group in range(4):
        every = [reward_fn(result.features[group, list(s)], refs[group]) for s in itertools.combinations(range(6), 3)]
        torch.testing.assert_close(rewards["max"][0, group], max(every))
        torch.testing.assert_close(rewards["min"][0, group], min(every))
    assert (rewards["max"] >= rewards["random"]).all() and (rewards["random"] >= rewards["min"]).all()
    summary = result.to_dict()
    assert summary["max"]["mean_reward"] >= summary["random"]["mean_reward"] >= summary["min"]["mean_reward"]
    assert set(summary["random"]) >= {"fid", "precision", "recall", "mean_reward", "fids", "recalls"}


def test_metrics_match_an_independent_computation_on_the_kept_images(pixel_policy):
    result = run_tiny(pixel_policy)
    extractor, evaluation = pooled_colours(), real_images(20, 3)
    real = extractor(evaluation)
    for res in result.modes.values():
        for draw in range(len(res.fids)):
            kept = torch.cat([result.images[g, row] for g, row in enumerate(res.kept[draw])])
            assert kept.shape == (4 * 3, 3, 16, 16)
            fake = extractor(kept)
            torch.testing.assert_close(res.fids[draw], fid_from_features(real, fake))
            scores = precision_recall(real, fake, k=3)
            assert res.precisions[draw] == scores["precision"] and res.recalls[draw] == scores["recall"]


def test_the_same_seed_gives_the_same_samples_and_choices(pixel_policy):
    first, again = run_tiny(pixel_policy, random_draws=1), run_tiny(pixel_policy, random_draws=1)
    assert torch.equal(first.images, again.images)
    for mode in SELECTION_MODES:
        assert torch.equal(first.modes[mode].kept, again.modes[mode].kept)
    other = run_tiny(pixel_policy, random_draws=1, seed=1)
    assert not torch.equal(first.images, other.images)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompts": []}, r"prompts=\[\]; expected a non-empty list"),
        ({"subset_size": 7}, r"subset_size=7 > num_sampled=6; .* M <= O"),
        ({"num_sampled": 0}, r"num_sampled=0; expected a positive int"),
        ({"random_draws": 0}, r"random_draws=0; expected a positive int"),
        ({"groups_per_prompt": 1.5}, r"groups_per_prompt=1.5; expected a positive int"),
        ({"reference": [real_images(6, 1)]}, r"reference has 1 image sets for 2 prompts"),
        ({"reference": real_images(1, 1)}, r"reference has shape \[1, 3, 16, 16\]; .* N >= 2"),
        ({"reference": [real_images(6, 1), torch.rand(6, 16, 16)]}, r"reference\[1\] has shape \[6, 16, 16\]"),
        ({"evaluation_images": real_images(3, 3)}, r"evaluation_images has shape \[3, 3, 16, 16\]; .* N >= 4"),
        ({"prompts": ["a cat"], "subset_size": 1, "groups_per_prompt": 3}, r"keep 3 images per mode; .* k=3"),
    ],
)
def test_invalid_arguments_are_named(pixel_policy, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_tiny(pixel_policy, **overrides)


def test_digits_max_mmd_selection_has_higher_recall_than_min():
    """A short digits run (10 prompts x 1 group of O = 10, 10 DDIM steps); the full one is the benchmark."""
    from lightning_sdrl.digits.captions import digit_captions
    from lightning_sdrl.digits.features import DigitsFeatures
    from lightning_sdrl.digits.policy import DigitsPolicy
    from lightning_sdrl.digits.reference import DigitsReference

    references = [DigitsReference(split="train", classes=[d], per_class=50).images for d in range(10)]
    result = post_sampling_selection(
        DigitsPolicy(lora=None),
        [digit_captions(digit)[0] for digit in range(10)],
        references,
        DigitsReference(split="test").images,
        DigitsFeatures(),
        random_draws=2,
        num_steps=10,
    )
    best, random, worst = (result.modes[mode] for mode in ("max", "random", "min"))
    assert best.mean_reward > random.mean_reward > worst.mean_reward
    # 50 kept images per mode: recall 0.85 vs 0.38 (seeds 0-3: max - min = 0.34 to 0.54); the full run of
    # docs/digits_selection.md (1000 kept images, seeds 0-2): 0.27 to 0.33. Max over random is not asserted:
    # it does not hold for every seed of the full run.
    assert best.recall > worst.recall + 0.15, (best.recall, worst.recall)
    assert best.fid < random.fid < worst.fid, (best.fid, random.fid, worst.fid)
