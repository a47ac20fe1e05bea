"""A ``background`` reward is computed in a worker thread while the next batch samples: same numbers."""

import json
import threading

import lightning.pytorch as pl
import pytest

from lightning_sdrl.cli import run_cli
from lightning_sdrl.rewards.base import RewardModule

TINY = "configs/tiny/ddpo.yaml"
SECOND_BATCH_STARTED = threading.Event()


class WaitsForTheNextBatch(RewardModule):
    """Brightness that, on its first call, waits until the training loop has started the next batch."""

    background = True

    def __init__(self) -> None:
        super().__init__()
        self.overlapped: list[bool] = []

    def forward(self, images, prompts, **metadata):
        if not self.overlapped:
            self.overlapped.append(SECOND_BATCH_STARTED.wait(timeout=60))
        return images.mean(dim=(1, 2, 3))


class MarkSecondBatch(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == 1:
            SECOND_BATCH_STARTED.set()


def fit(tmp_path, reward: str, *extra: str, epochs: int = 2):
    return run_cli(
        [
            "fit",
            "-c",
            TINY,
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.max_epochs={epochs}",
            "--trainer.enable_progress_bar=false",
            f"--model.init_args.reward={reward}",
            "--trainer.callbacks+=tests.helpers.RecordUpdates",
            f"--trainer.callbacks.out_dir={tmp_path / 'records'}",
            *extra,
        ]
    )


def records(tmp_path, epochs=2):
    return [json.loads((tmp_path / "records" / f"rank0_epoch{e}.json").read_text()) for e in range(epochs)]


def test_background_scoring_gives_the_same_rewards_advantages_and_weights(tmp_path):
    reward = "tests.helpers.ThreadRecordingBrightness"
    inline = fit(tmp_path / "inline", reward, "--model.init_args.reward.background=false")
    worker = fit(tmp_path / "worker", reward, "--model.init_args.reward.background=true")
    assert set(inline.model.reward.threads) == {"MainThread"}
    assert len(worker.model.reward.threads) == 4 and all(t.startswith("reward") for t in worker.model.reward.threads)
    for a, b in zip(records(tmp_path / "inline"), records(tmp_path / "worker"), strict=True):
        for key in ("sample_sums", "rewards", "advantages", "trainable_sum"):
            assert a[key] == b[key], key
    assert worker.model._reward_worker is None  # shut down at the end of training


def test_background_scoring_overlaps_the_next_batch(tmp_path):
    """The first batch's reward finishes only once the second batch has started: it cannot be in line."""
    SECOND_BATCH_STARTED.clear()
    cli = fit(
        tmp_path,
        "tests.modules.test_background_reward.WaitsForTheNextBatch",
        "--trainer.callbacks+=tests.modules.test_background_reward.MarkSecondBatch",
        epochs=1,
    )
    assert cli.model.reward.overlapped == [True]


def test_an_error_in_the_background_reward_stops_the_run_with_that_error(tmp_path):
    with pytest.raises(RuntimeError, match="the reward failed at call 3"):
        fit(
            tmp_path,
            "tests.helpers.ThreadRecordingBrightness",
            "--model.init_args.reward.background=true",
            "--model.init_args.reward.fail_at_call=3",
        )
