from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from lightning_sdrl.digits.captions import (
    BALANCE_PROMPT,
    GROUP_PROMPTS,
    MULTICLASS_PROMPT,
    PROMPT_CLASS_WEIGHTS,
    SHIFT_PROMPT,
    DigitsCaptionDataModule,
    class_counts,
    digit_captions,
    sample_captioned_examples,
)
from lightning_sdrl.digits.data import digits_split


@pytest.fixture(scope="module")
def train_labels():
    return digits_split("train")[1]


def test_weights_are_distributions_with_the_required_biases():
    for caption, weights in PROMPT_CLASS_WEIGHTS.items():
        assert sum(weights.values()) == pytest.approx(1.0), caption
        assert all(0 <= digit <= 9 and weight > 0 for digit, weight in weights.items()), caption
    assert len(PROMPT_CLASS_WEIGHTS) == 10 * 3 + 3
    assert PROMPT_CLASS_WEIGHTS["a handwritten seven"] == {7: 1.0}
    assert PROMPT_CLASS_WEIGHTS["the digit 0"] == {0: 1.0}
    # Training biases; guidance sharpens them (the sampled shares are checked in test_pretrain.py).
    balance = PROMPT_CLASS_WEIGHTS[BALANCE_PROMPT]
    assert balance[0] >= 0.7 and set(balance) == {0, 6, 8, 9}  # zero vs the other loop digits
    assert PROMPT_CLASS_WEIGHTS[SHIFT_PROMPT][0] >= 0.9 and set(PROMPT_CLASS_WEIGHTS[SHIFT_PROMPT]) == {0, 6}
    multiclass = PROMPT_CLASS_WEIGHTS[MULTICLASS_PROMPT]
    assert set(multiclass) == {0, 2, 4, 6, 8} and max(multiclass.values()) >= 0.5


def test_class_counts_use_largest_remainders():
    assert class_counts({0: 0.5, 1: 0.5}, 3) in ({0: 2, 1: 1}, {0: 1, 1: 2})
    counts = class_counts(PROMPT_CLASS_WEIGHTS[MULTICLASS_PROMPT], 205)
    assert sum(counts.values()) == 205
    for digit, weight in PROMPT_CLASS_WEIGHTS[MULTICLASS_PROMPT].items():
        assert abs(counts[digit] - weight * 205) < 1


def test_caption_conditional_class_frequencies_match_the_table(train_labels):
    indices, captions = sample_captioned_examples(train_labels, seed=3)
    assert len(indices) == len(captions)
    labels = train_labels[indices].tolist()
    by_caption: dict[str, Counter] = {}
    for caption, label in zip(captions, labels, strict=True):
        by_caption.setdefault(caption, Counter())[label] += 1
    assert set(by_caption) == set(PROMPT_CLASS_WEIGHTS)
    for caption, counter in by_caption.items():
        total = sum(counter.values())
        for digit in range(10):
            expected = PROMPT_CLASS_WEIGHTS[caption].get(digit, 0.0)
            assert abs(counter[digit] / total - expected) <= 1 / total, (caption, digit)
    # every training image once with a per-digit caption, 30% of the examples with a group caption
    per_digit = [i for i, c in zip(indices.tolist(), captions, strict=True) if c not in GROUP_PROMPTS]
    assert sorted(per_digit) == list(range(len(train_labels)))
    group_share = sum(c in GROUP_PROMPTS for c in captions) / len(captions)
    assert group_share == pytest.approx(0.3, abs=0.002)


def test_draws_are_seeded_and_differ_between_seeds(train_labels):
    first, captions = sample_captioned_examples(train_labels, seed=0)
    again, captions_again = sample_captioned_examples(train_labels, seed=0)
    other, _ = sample_captioned_examples(train_labels, seed=1)
    assert torch.equal(first, again) and captions == captions_again
    assert not torch.equal(first, other)


def test_no_group_captions_when_the_fraction_is_zero(train_labels):
    _, captions = sample_captioned_examples(train_labels, seed=0, group_caption_fraction=0.0)
    assert not set(captions) & set(GROUP_PROMPTS)
    with pytest.raises(ValueError, match="group_caption_fraction=1.0"):
        sample_captioned_examples(train_labels, seed=0, group_caption_fraction=1.0)


def test_train_batches_are_images_in_minus_one_one_with_matching_captions():
    data = DigitsCaptionDataModule(batch_size=100)
    batches = list(data.train_dataloader())
    assert len(batches) == len(data.train_dataloader()) == (1437 + 3 * 205) // 100
    assert all(len(b) == 100 for b in batches)
    batch = batches[0]
    assert batch.images.shape == (100, 1, 16, 16) and batch.images.dtype == torch.float32
    assert batch.images.min() == -1 and batch.images.max() <= 1
    for caption, label in zip(batch.captions, batch.labels.tolist(), strict=True):
        assert label in PROMPT_CLASS_WEIGHTS[caption]


def test_each_epoch_is_a_new_draw_and_processes_share_it_out():
    data = DigitsCaptionDataModule(batch_size=64)
    data.trainer = SimpleNamespace(current_epoch=0, global_rank=0, world_size=1)
    epoch0 = [b.captions for b in data.train_dataloader()]
    data.trainer.current_epoch = 1
    epoch1 = [b.captions for b in data.train_dataloader()]
    assert epoch0 != epoch1
    ranks = []
    for rank in range(2):
        data.trainer = SimpleNamespace(current_epoch=1, global_rank=rank, world_size=2)
        ranks.append([b.captions for b in data.train_dataloader()])
    assert len(ranks[0]) == len(ranks[1]) == len(epoch1) // 2
    assert ranks[0] == epoch1[0 : 2 * len(ranks[0]) : 2] and ranks[1] == epoch1[1 : 2 * len(ranks[1]) : 2]


def test_validation_batches_are_digit_prompts_with_fixed_seeds():
    data = DigitsCaptionDataModule(val_samples_per_prompt=3, val_batch_size=7)
    batches = list(data.val_dataloader())
    prompts = sum((b.prompts for b in batches), [])
    ids = torch.cat([b.prompt_ids for b in batches]).tolist()
    assert ids == [d for d in range(10) for _ in range(3)]
    assert prompts == [digit_captions(d)[0] for d in ids]
    assert [b.seed for b in batches] == [b.seed for b in data.val_dataloader()]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"group_caption_fraction": -0.1}, "group_caption_fraction=-0.1"),
        ({"val_batch_size": 0}, "val_batch_size=0"),
    ],
)
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsCaptionDataModule(**kwargs)


def test_digit_captions_refuse_non_digits():
    with pytest.raises(ValueError, match="digit=10"):
        digit_captions(10)
