import pytest
import torch

from lightning_sdrl.functional.stat_tracking import PerPromptStatTracker, batch_advantages


def test_falls_back_to_batch_statistics_below_min_count():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0])
    advantages = tracker.update([0, 0, 1, 1], rewards)
    torch.testing.assert_close(advantages, batch_advantages(rewards))


def test_uses_each_prompts_own_buffer_once_full_enough():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a", "a"], torch.tensor([0.0, 0.0]))
    advantages = tracker.update(["a", "a", "b"], torch.tensor([3.0, 6.0, 5.0]))
    buffer_a = torch.tensor([0.0, 3.0, 6.0])  # maxlen 3 keeps the last three
    expected_a = (torch.tensor([3.0, 6.0]) - buffer_a.mean()) / (buffer_a.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(advantages[:2], expected_a)
    batch = torch.tensor([3.0, 6.0, 5.0])  # "b" has one reward < min_count: batch statistics
    assert advantages[2].item() == pytest.approx(((5.0 - batch.mean()) / batch.std(unbiased=False)).item(), rel=1e-5)


def test_state_dict_round_trip():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
    tracker.update([0, 1], torch.tensor([1.0, 2.0]))
    restored = PerPromptStatTracker(buffer_size=4, min_count=1)
    restored.load_state_dict(tracker.state_dict())
    rewards = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(restored.update([0, 1], rewards), tracker.update([0, 1], rewards))


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=2, min_count=3)
    with pytest.raises(ValueError, match="one key per reward"):
        PerPromptStatTracker().update([0], torch.ones(2))
