import json

import pytest

from lightning_sdrl.callbacks import AttributeTracker, classified_ratio
from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.functional.advantages import PerPromptAdvantages
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.attribute import BalanceReward
from tests.modules.test_ddpo import tiny_trainer


def tracker_module(reward, **kwargs):
    """A 2-step DDPO module on the tiny pixel policy (LoRA rank 2) with ``reward``, as the tracker tests use."""
    return DDPOModule(
        RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=2)),
        reward,
        num_steps=2,
        guidance_scale=1.0,
        train_batch_size=4,
        advantages=PerPromptAdvantages(min_count=4),
        sample_grid_every_n_epochs=0,
        save_trained_on_end=False,
        **kwargs,
    )


def two_class_bias(shares):
    classified = shares["0"] + shares["6+8+9"]
    return pytest.approx(abs(shares["0"] - shares["6+8+9"]) / classified) if classified > 0 else None


def test_attribute_tracker_prints_records_and_plots(tmp_path, capsys):
    reward = BalanceReward(DigitsClassifier(), groups=[[0], [6, 8, 9]], threshold=0.3)
    module = tracker_module(reward)
    tracker = AttributeTracker(num_grid_images=4)
    trainer = tiny_trainer(tmp_path, epochs=2, callbacks=[tracker])
    trainer.fit(module, SamplingDataModule(prompts=["a digit with a loop"], batch_size=4, num_batches_per_epoch=1))
    summary = json.loads((tmp_path / "attributes.json").read_text())
    assert [r["epoch"] for r in summary["history"]] == [0, 1]
    for record in summary["history"]:
        assert set(record["shares"]) == {"0", "6+8+9", "None"}
        assert abs(sum(record["shares"].values()) - 1) < 1e-6
    assert set(summary["before"]) == set(summary["after"]) == {"0", "6+8+9", "None"}
    # the fairness bias of every shares entry: |f_0 - f_6+8+9| of the classified images (None left out)
    for record in summary["history"]:
        assert record["bias"] == two_class_bias(record["shares"])
    assert summary["bias"] == {"before": two_class_bias(summary["before"]), "after": two_class_bias(summary["after"])}
    for name in ("attributes.png", "samples_before.png", "samples_after.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert tracker.state_dict()["history"] == summary["history"]


def test_attribute_tracker_eval_samples_use_the_same_noise_every_epoch(tmp_path):
    import pytest
    import torch

    from lightning_sdrl.data.sampling import PromptBatch
    from lightning_sdrl.rewards.attribute import attribute_shares

    with pytest.raises(ValueError, match="eval_samples=-1"):
        AttributeTracker(eval_samples=-1)
    reward = BalanceReward(DigitsClassifier(), groups=[[0], [6, 8, 9]], threshold=0.3)
    module = tracker_module(reward, optimizer=lambda p: torch.optim.SGD(p, lr=10.0))
    tracker = AttributeTracker(num_grid_images=4, eval_samples=6, eval_seed=7, threshold=0.3)
    trainer = tiny_trainer(tmp_path, epochs=2, callbacks=[tracker])
    trainer.fit(module, SamplingDataModule(prompts=["a digit with a loop"], batch_size=4, num_batches_per_epoch=1))
    last = tracker.history[-1]["eval_shares"]
    assert abs(sum(last.values()) - 1) < 1e-6
    # the final policy on the eval noise gives exactly the last recorded eval shares
    images = module.sample(PromptBatch(["a digit with a loop"] * 6, torch.zeros(6, dtype=torch.long), seed=7)).images
    with torch.no_grad():
        expected = attribute_shares(reward.attribute_probs(images), 0.3).tolist()
    assert list(last.values()) == pytest.approx(expected)


def test_classified_ratio_is_the_share_among_classified_images():
    shares = {"0": 0.3, "6+8+9": 0.6, "None": 0.1}
    assert classified_ratio(shares, "6+8+9") == pytest.approx(0.6 / 0.9)
    assert classified_ratio(shares, "0") == pytest.approx(0.3 / 0.9)
    assert classified_ratio({"0": 0.0, "6+8+9": 0.0, "None": 1.0}, "6+8+9") == 0.0


def test_attribute_tracker_per_prompt_records_each_prompt_with_its_own_columns(tmp_path):
    import torch
    from scipy.stats import entropy

    from lightning_sdrl.callbacks import prompt_kl
    from lightning_sdrl.data.sampling import PromptBatch

    prompts = ["a digit with a loop", "an even digit"]
    groups = {prompts[0]: [[0], [6, 8, 9]], prompts[1]: [[2], [4]]}
    reward = BalanceReward(
        DigitsClassifier(), groups=groups[prompts[0]], threshold=0.3, per_prompt=True, prompt_groups=groups
    )
    module = tracker_module(reward, optimizer=lambda p: torch.optim.SGD(p, lr=10.0))
    tracker = AttributeTracker(num_grid_images=4, eval_samples=6, eval_seed=7, threshold=0.3, per_prompt=True)
    trainer = tiny_trainer(tmp_path, epochs=2, callbacks=[tracker])
    data = SamplingDataModule(prompts=prompts, batch_size=8, num_batches_per_epoch=1, group_size=4)
    trainer.fit(module, data)
    record = tracker.history[-1]
    assert list(record["prompt_shares"]) == list(record["prompt_eval_shares"]) == prompts
    assert set(record["prompt_eval_shares"][prompts[1]]) == {"2", "4", "None"}
    assert set(record["prompt_eval_shares"][prompts[0]]) == {"0", "6+8+9", "None"}

    def shares_by_hand(images, groups):
        probs = DigitsClassifier()(images)
        counts = [0] * (len(groups) + 1)
        for row in probs.tolist():
            columns = [sum(row[c] for c in group) for group in groups]
            best = max(range(len(columns)), key=columns.__getitem__)
            counts[best if columns[best] >= 0.3 else -1] += 1
        return [c / len(images) for c in counts]

    update = module.last_update
    for prompt in prompts:
        rows = [i for i, p in enumerate(update.prompts) if p == prompt]
        assert len(rows) == 4
        expected = shares_by_hand(update.images[rows], groups[prompt])
        assert list(record["prompt_shares"][prompt].values()) == pytest.approx(expected)
        # the final policy on the eval noise gives the last recorded per-prompt eval shares
        batch = PromptBatch([prompt] * 6, torch.zeros(6, dtype=torch.long), seed=7)
        expected = shares_by_hand(module.sample(batch).images, groups[prompt])
        assert list(record["prompt_eval_shares"][prompt].values()) == pytest.approx(expected)
    assert record["eval_shares"] == record["prompt_eval_shares"][prompts[0]]
    assert (tmp_path / "attributes_per_prompt.png").stat().st_size > 0
    summary = json.loads((tmp_path / "attributes.json").read_text())
    assert summary["history"][-1]["prompt_eval_shares"] == record["prompt_eval_shares"]
    # the per-prompt KL of the plot: over the classified images, "None" left out
    assert prompt_kl({"2": 0.5, "4": 0.1, "None": 0.4}) == pytest.approx(entropy([5, 1], [1, 1]))
    assert prompt_kl({"2": 0.5, "4": 0.1, "None": 0.4}, [0.3, 0.7]) == pytest.approx(entropy([5, 1], [3, 7]))


def test_attribute_tracker_per_prompt_names_each_prompt_s_joint_classes(tmp_path):
    import torch

    from lightning_sdrl.digits.thickness import StrokeThicknessClassifier
    from lightning_sdrl.rewards.attribute import JointBalanceReward

    prompts = ["a digit with a loop", "an even digit"]
    groups = {prompts[0]: [[0], [6, 8, 9]], prompts[1]: [[2], [4]]}
    reward = JointBalanceReward(
        [DigitsClassifier(), StrokeThicknessClassifier()],
        threshold=0.3,
        groups=[groups[prompts[0]], None],
        per_prompt=True,
        prompt_groups={prompts[1]: [groups[prompts[1]], None]},
    )
    module = tracker_module(reward)
    tracker = AttributeTracker(num_grid_images=4, summary_samples=4, threshold=0.3, per_prompt=True)
    trainer = tiny_trainer(tmp_path, epochs=1, callbacks=[tracker])
    trainer.fit(module, SamplingDataModule(prompts=prompts, batch_size=8, num_batches_per_epoch=1, group_size=4))
    record = tracker.history[-1]
    digits = {prompts[0]: ["0", "6+8+9"], prompts[1]: ["2", "4"]}

    def shares_by_hand(images, groups):
        digit, thickness = DigitsClassifier()(images), StrokeThicknessClassifier()(images)
        counts = [0] * 5
        for row, thick in zip(digit.tolist(), thickness.tolist(), strict=True):
            columns = [sum(row[c] for c in group) for group in groups]
            i, j = max(range(2), key=columns.__getitem__), max(range(2), key=thick.__getitem__)
            counts[2 * i + j if columns[i] >= 0.3 and thick[j] >= 0.3 else -1] += 1
        return [c / len(images) for c in counts]

    update = module.last_update
    for prompt in prompts:
        names = [f"{digit} & {thickness}" for digit in digits[prompt] for thickness in ("thin", "bold")]
        assert list(record["prompt_shares"][prompt]) == [*names, "None"]
        rows = [i for i, p in enumerate(update.prompts) if p == prompt]
        expected = shares_by_hand(update.images[rows], groups[prompt])
        assert list(record["prompt_shares"][prompt].values()) == pytest.approx(expected)
    assert torch.isfinite(update.rewards).all()
