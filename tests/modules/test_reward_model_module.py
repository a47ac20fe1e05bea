import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lightning_sdrl.data.imagereward_db import ImageRewardDataModule
from lightning_sdrl.modules.reward_model import RewardModelModule
from lightning_sdrl.rewards.reward_model import LearnedPreferenceReward
from tests.helpers import make_tiny_clip, tiny_clip_config

TINY_CLIP = tiny_clip_config(16, 2)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), "tiny-clip-test", TINY_CLIP)[:2]


def write_brightness_preferences(root, prompts=4, images_per_prompt=4):
    """ImageRewardDB (Hugging Face layout) where annotators always prefer the brighter image.

    Train and validation hold the same comparisons, so validation accuracy measures the fit.
    """
    rng = np.random.default_rng(0)
    rows = {"image_path": [], "prompt_id": [], "prompt": [], "rank": []}
    for p in range(prompts):
        brightness = rng.permutation(images_per_prompt) / images_per_prompt + 0.1
        for k, level in enumerate(brightness):
            path = f"images/train/train_1/{p}-{k}.webp"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            noise = rng.normal(0, 0.05, size=(32, 32, 3))
            pixels = (np.clip(level + noise, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / path, lossless=True)
            rows["image_path"].append(path)
            rows["prompt_id"].append(f"{p:06d}")
            rows["prompt"].append(f"prompt number {p}")
            rows["rank"].append(int(images_per_prompt - np.argsort(np.argsort(brightness))[k]))
    for split in ("train", "validation"):
        pq.write_table(pa.table(rows), root / f"metadata-{split}.parquet")


def test_defaults_are_the_seed_optimizer(tiny_clip):
    module = RewardModelModule(*tiny_clip)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    (group,) = optimizer.param_groups
    assert group["lr"] == 1e-5 and group["betas"] == (0.9, 0.99) and group["eps"] == 1e-8
    assert group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in module.head.parameters()}
    assert module.head.hidden_sizes == (1024, 256, 128, 32) and module.head.embed_dim == 16


def test_fit_learns_preferences_and_exports_the_best_head(tiny_clip, tmp_path):
    name, weights = tiny_clip
    write_brightness_preferences(tmp_path / "db")
    pl.seed_everything(0)
    datamodule = ImageRewardDataModule(str(tmp_path / "db"), batch_size=8)
    module = RewardModelModule(
        name, weights, hidden_sizes=(32, 16), dropout=(), lr=1e-2, export_dir=str(tmp_path / "head")
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/accuracy", mode="max")
    trainer = pl.Trainer(
        max_epochs=25,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (before,) = trainer.validate(module, datamodule, verbose=False)
    trainer.fit(module, datamodule)
    last_epoch = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert last_epoch["val/loss"] < 0.1 * before["val/loss"]
    assert last_epoch["train/accuracy"] >= 0.9 and last_epoch["val/accuracy"] >= 0.9

    # fitting ended by restoring the head that was best on validation (the reward-model report's selection)
    (after,) = trainer.validate(module, datamodule, verbose=False)
    assert after["val/accuracy"] == pytest.approx(checkpoint.best_model_score.item())
    assert after["val/accuracy"] >= 0.9

    # checkpoints leave the frozen CLIP out and still load
    state = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    assert state and not any(k.startswith("embedder.") for k in state)
    restored = RewardModelModule.load_from_checkpoint(checkpoint.best_model_path)
    torch.testing.assert_close(restored.head.state_dict(), module.head.state_dict())

    # the exported reward is the best head, standardised over the training images
    reward = LearnedPreferenceReward.from_pretrained(tmp_path / "head", clip_pretrained=weights)
    image_embeds, text_embeds = datamodule.image_text_embeddings("train")
    module.head.eval()
    with torch.no_grad():
        raw = module.head(image_embeds, text_embeds)
    torch.testing.assert_close(reward.head(image_embeds, text_embeds), raw)
    assert reward.score_mean == pytest.approx(raw.mean().item(), abs=1e-6)
    assert reward.score_std == pytest.approx(raw.std().item(), rel=1e-5)


def test_fit_prints_validation_accuracy_every_epoch(tiny_clip, tmp_path, caplog):
    name, weights = tiny_clip
    write_brightness_preferences(tmp_path / "db")
    module = RewardModelModule(name, weights, hidden_sizes=(8,), dropout=(), lr=1e-2)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,
    )
    with caplog.at_level("INFO"):
        trainer.fit(module, ImageRewardDataModule(str(tmp_path / "db"), batch_size=8))
    lines = [r.getMessage() for r in caplog.records if "val/accuracy" in r.getMessage()]
    assert [line.split("|")[0].strip() for line in lines] == ["epoch   0", "epoch   1", "epoch   2"]
    assert f"val/accuracy {trainer.callback_metrics['val/accuracy'].item():.4f}" in lines[-1]
