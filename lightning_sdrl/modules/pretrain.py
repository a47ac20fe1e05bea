"""Denoising pretraining of a pixel-space text-to-image model (the digits miniature's "Stable Diffusion").

DDPM's simple objective (Ho et al. 2020, eq. 14): noise a training image to a random timestep with
the forward process (eq. 4) and regress the noise with the UNet, conditioned on the caption's CLIP
embedding. The UNet and the (randomly initialised) text encoder train together; a fraction of the
captions is replaced by the empty prompt so that the model also learns the unconditional score
that classifier-free guidance needs (Ho & Salimans 2022).

Exponential moving averages of the weights are Lightning's ``EMAWeightAveraging`` callback (see
``configs/digits/pretrain.yaml``): it swaps the averaged weights in for validation and copies them
into the model before :meth:`DiffusionPretrainModule.on_train_end` exports it.

Also a command that measures a trained digits model and writes its report (the numbers of
``docs/digits_model.md``)::

    python -m lightning_sdrl.modules.pretrain --model-dir DIR --report REPORT.json --figure GRID.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from lightning_sdrl.data.digits_captions import (
    BALANCE_PROMPT,
    DIGIT_TEMPLATES,
    GROUP_PROMPTS,
    MULTICLASS_PROMPT,
    PROMPT_CLASS_WEIGHTS,
    SHIFT_PROMPT,
    CaptionBatch,
    digit_captions,
)
from lightning_sdrl.data.sampling import PromptBatch, derive_seed
from lightning_sdrl.feedback.digits import DigitClassifier
from lightning_sdrl.functional.classifier_rewards import classify_with_threshold
from lightning_sdrl.policies.digits import PixelTextToImageArchitecture, pixel_text_to_image_components
from lightning_sdrl.policies.text_to_image import TextToImageComponents, TextToImagePolicy

CONFIDENCE_THRESHOLD = 0.7
"""Below this top probability the classifier's answer is "None" (section III-C of the paper)."""


# ---------------------------------------------------------------------- the math, in small functions
def drop_captions(captions: list[str], probability: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty prompt with ``probability`` (classifier-free guidance).

    Example:
        >>> drop_captions(["a", "b", "c"], 1.0)
        ['', '', '']
    """
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist(), strict=True)]


def encode_captions(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str]) -> Tensor:
    """CLIP text embeddings ``[B, L, D]`` of captions padded to the tokenizer's length, with gradients.

    The same tokenisation as :meth:`TextToImagePolicy.encode_prompts`, so that sampling sees the
    conditioning the model was trained on.
    """
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


@dataclass
class NoisedImages:
    """Images noised by the forward process.

    Attributes:
        noisy: ``[B, C, H, W]`` the samples ``x_t``.
        noise: ``[B, C, H, W]`` the noise ``epsilon`` the UNet must predict.
        timesteps: ``[B]`` the timestep ``t`` of each sample.
    """

    noisy: Tensor
    noise: Tensor
    timesteps: Tensor


def forward_diffusion(
    scheduler: DDIMScheduler, images: Tensor, generator: torch.Generator | None = None
) -> NoisedImages:
    """Noise each image to a uniformly drawn timestep: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``.

    Eq. (4) of DDPM, with ``a_t`` the cumulative product of ``1 - beta`` (``alphas_cumprod``).
    """
    # 1. t ~ Uniform{0, ..., T - 1} and eps ~ N(0, I)
    timesteps = torch.randint(
        scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator, device=images.device
    )
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    # 2. q(x_t | x_0), eq. (4)
    return NoisedImages(scheduler.add_noise(images, noise, timesteps), noise, timesteps)


def epsilon_loss(predicted_noise: Tensor, noise: Tensor) -> Tensor:
    """DDPM's simple loss, eq. (14): mean squared error between predicted and true noise."""
    return F.mse_loss(predicted_noise.float(), noise.float())


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_fraction: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to ``final_fraction`` at ``total_steps``.

    Example:
        >>> [round(warmup_cosine(s, 10, 110), 2) for s in (0, 5, 10, 60, 110)]
        [0.1, 0.6, 1.0, 0.55, 0.1]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class PromptEvaluation:
    """What the digit classifier says about samples of one prompt.

    Attributes:
        prompt: the prompt.
        num_samples: number of samples.
        class_shares: share of the samples classified as each digit ``"0"``..``"9"``, and as
            ``"None"`` (top probability below the 0.7 threshold).
        mean_confidence: mean top probability of the classifier.
    """

    prompt: str
    num_samples: int
    class_shares: dict[str, float]
    mean_confidence: float


def evaluate_classes(probs: Tensor, prompt: str, threshold: float = CONFIDENCE_THRESHOLD) -> PromptEvaluation:
    """Class shares (with "None") and mean confidence of classifier probabilities ``[N, 10]``.

    Example:
        >>> probs = torch.eye(10)[[7, 7, 1]] * 0.9 + 0.01
        >>> evaluate_classes(probs, "the digit 7").class_shares["7"]
        0.6666666666666666
    """
    labels = classify_with_threshold(probs, threshold)
    counts = torch.bincount(labels + 1, minlength=11).tolist()  # "None" (-1) goes to column 0
    shares = {str(d): counts[d + 1] / len(labels) for d in range(10)} | {"None": counts[0] / len(labels)}
    return PromptEvaluation(prompt, len(labels), shares, probs.max(dim=1).values.mean().item())


@torch.no_grad()
def sample_and_classify(
    policy: TextToImagePolicy,
    classifier: DigitClassifier,
    prompt: str,
    num_samples: int,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
) -> tuple[PromptEvaluation, Tensor]:
    """Sample ``num_samples`` images of ``prompt`` with a fixed seed and classify them.

    Returns:
        The evaluation and the ``[num_samples, 3, H, W]`` images.
    """
    probs, images = [], []
    for index, start in enumerate(range(0, num_samples, batch_size)):
        count = min(batch_size, num_samples - start)
        generator = torch.Generator(policy.device).manual_seed(derive_seed(seed, index))
        trajectory = policy.sample([prompt] * count, num_steps, eta, guidance_scale, generator)
        images.append(trajectory.images)
        probs.append(classifier.predict_proba(trajectory.images.to(next(classifier.parameters()).device)))
    return evaluate_classes(torch.cat(probs), prompt), torch.cat(images)


# ---------------------------------------------------------------------- the LightningModule
class DiffusionPretrainModule(pl.LightningModule):
    """Denoising pretraining of a pixel-space text-to-image model, exported in the diffusers layout.

    Training batches are :class:`~lightning_sdrl.data.digits_captions.CaptionBatch` es (images in
    ``[-1, 1]``); validation batches are :class:`~lightning_sdrl.data.sampling.PromptBatch` es
    of per-digit prompts whose ``prompt_ids`` are the digits: the model samples them with DDIM and
    the shipped :class:`~lightning_sdrl.feedback.digits.DigitClassifier` says how many show the
    named digit (``val/digit_agreement``).

    Args:
        architecture: the model to build (default: the shipped digits model).
        seed: initialisation seed of the weights.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: optimiser steps of linear learning-rate warm-up, before a cosine decay to
            a tenth of ``lr`` at the end of training.
        caption_dropout: probability of training on the empty caption instead of the real one
            (the unconditional model for classifier-free guidance).
        val_num_steps: DDIM steps of validation samples.
        val_guidance_scale: classifier-free guidance of validation samples.
        val_eta: DDIM noise weight of validation samples.
        export_dir: where :meth:`on_train_end` writes the model (``save_pretrained`` layout);
            ``None`` writes ``<log_dir>/diffusion``.
    """

    def __init__(
        self,
        architecture: PixelTextToImageArchitecture = PixelTextToImageArchitecture(),  # noqa: B008 - frozen by use
        seed: int = 0,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        caption_dropout: float = 0.1,
        val_num_steps: int = 20,
        val_guidance_scale: float = 3.0,
        val_eta: float = 1.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={caption_dropout}; expected a probability in [0, 1)")
        if lr <= 0 or warmup_steps < 0:
            raise ValueError(f"lr={lr}, warmup_steps={warmup_steps}; expected lr > 0 and warmup_steps >= 0")
        self.save_hyperparameters()
        components = pixel_text_to_image_components(architecture, seed)
        self.unet: UNet2DConditionModel = components.unet
        self.text_encoder: CLIPTextModel = components.text_encoder.train()  # it trains too
        self.tokenizer, self.scheduler = components.tokenizer, components.scheduler
        # Frozen, in eval mode throughout (its dropout stays off); only validation uses it.
        self.classifier = DigitClassifier.from_pretrained().requires_grad_(False)

    def components(self) -> TextToImageComponents:
        """The model being trained (pixel space: no VAE)."""
        return TextToImageComponents(self.unet, self.text_encoder, self.tokenizer, self.scheduler, vae=None)

    def sampling_policy(self) -> TextToImagePolicy:
        """A frozen copy of the current model as a policy, to sample from."""
        return TextToImagePolicy(copy.deepcopy(self.components()), lora=None).eval()

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self) -> dict:
        """AdamW over UNet and text encoder, warm-up then cosine decay per optimiser step."""
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: CaptionBatch, batch_idx: int) -> Tensor:
        """Epsilon-prediction loss of one batch of captioned images."""
        captions = drop_captions(batch.captions, self.hparams.caption_dropout)
        conditions = encode_captions(self.text_encoder, self.tokenizer, captions)
        noised = forward_diffusion(self.scheduler, batch.images)
        predicted = self.unet(noised.noisy, noised.timesteps, encoder_hidden_states=conditions).sample
        loss = epsilon_loss(predicted, noised.noise)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Sample the batch's digit prompts and log how many the classifier recognises."""
        policy = self.sampling_policy()
        generator = torch.Generator(self.device).manual_seed(batch.seed)
        trajectory = policy.sample(
            batch.prompts, self.hparams.val_num_steps, self.hparams.val_eta, self.hparams.val_guidance_scale, generator
        )
        probs = self.classifier.predict_proba(trajectory.images)
        labels = classify_with_threshold(probs, CONFIDENCE_THRESHOLD)
        agreement = (labels == batch.prompt_ids.to(labels.device)).float().mean()
        self.log("val/digit_agreement", agreement, prog_bar=True, batch_size=len(batch), sync_dist=True)
        self.log("val/confidence", probs.max(dim=1).values.mean(), batch_size=len(batch), sync_dist=True)

    def on_train_end(self) -> None:
        """Write the (EMA, if the callback is used) model with ``save_pretrained``."""
        directory = self.hparams.export_dir
        if directory is None:  # trainer.log_dir is a collective call under DDP: every rank asks
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "diffusion"
        if self.trainer.is_global_zero:
            self.components().save_pretrained(directory)


# ---------------------------------------------------------------------- the report command
REPORT_PROMPTS = [caption for digit in range(10) for caption in digit_captions(digit)] + list(GROUP_PROMPTS)
"""Prompts measured by :func:`measure_model`: every per-digit caption and the group prompts."""

TEST_CHECK = {"prompts": [digit_captions(7)[0], BALANCE_PROMPT], "num_samples": 32, "num_steps": 10, "seed": 0}
"""The small fixed-seed sample whose result the report stores for the tests to reproduce."""


def measure_model(
    policy: TextToImagePolicy,
    num_samples: int = 256,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    seed: int = 0,
) -> tuple[dict, dict[str, Tensor]]:
    """Class distributions of ``num_samples`` samples of every report prompt, and the test check.

    Every prompt is sampled with ``guidance_scale``; the group prompts also without guidance.

    Returns:
        ``(report, images)``: the JSON-ready report and each prompt's ``[N, 3, H, W]`` images.
    """
    classifier = DigitClassifier.from_pretrained()
    settings = {
        "num_samples": num_samples,
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "eta": eta,
        "seed": seed,
        "threshold": CONFIDENCE_THRESHOLD,
    }
    prompts, images = {}, {}
    for index, prompt in enumerate(REPORT_PROMPTS):
        evaluation, images[prompt] = sample_and_classify(
            policy, classifier, prompt, num_samples, num_steps, guidance_scale, eta, derive_seed(seed, index)
        )
        prompts[prompt] = {**asdict(evaluation), "training_weights": PROMPT_CLASS_WEIGHTS[prompt]}
        del prompts[prompt]["prompt"]
    # Without guidance the samples should follow the training table; guidance sharpens it.
    unguided = {
        prompt: sample_and_classify(
            policy, classifier, prompt, num_samples, num_steps, 1.0, eta, derive_seed(seed, len(REPORT_PROMPTS) + index)
        )[0].class_shares
        for index, prompt in enumerate(GROUP_PROMPTS)
    }
    agreement = {
        template: [prompts[digit_captions(d)[index]]["class_shares"][str(d)] for d in range(10)]
        for index, template in enumerate(DIGIT_TEMPLATES)
    }
    every = sum(agreement.values(), [])
    check = dict(TEST_CHECK)
    check["class_shares"] = {
        prompt: asdict(
            sample_and_classify(
                policy, classifier, prompt, check["num_samples"], check["num_steps"], guidance_scale, eta, check["seed"]
            )[0]
        )["class_shares"]
        for prompt in check["prompts"]
    }
    multiclass = prompts[MULTICLASS_PROMPT]["class_shares"]
    summary = {
        "mean_digit_agreement": sum(every) / len(every),
        "min_digit_agreement": min(every),
        "mean_digit_agreement_by_template": {template: sum(a) / 10 for template, a in agreement.items()},
        "balance_zero_share": _share(prompts[BALANCE_PROMPT], [0], [0, 6, 8, 9]),
        "shift_six_share": _share(prompts[SHIFT_PROMPT], [6], [0, 6]),
        "multiclass_top3_digits": sorted(range(10), key=lambda d: -multiclass[str(d)])[:3],
    }
    report = {
        "settings": settings,
        "summary": summary,
        "prompts": prompts,
        "unguided_group_prompts": unguided,
        "test_check": check,
    }
    return report, images


def _share(evaluation: dict, digits: list[int], among: list[int]) -> float:
    """Share of ``digits`` among the samples classified as one of ``among``."""
    shares = evaluation["class_shares"]
    total = sum(shares[str(d)] for d in among)
    return sum(shares[str(d)] for d in digits) / total if total else float("nan")


def save_sample_grid(images: dict[str, Tensor], path: str | Path, per_prompt: int = 16) -> None:
    """One row of ``per_prompt`` samples per prompt, the prompt written on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(images)
    figure, axes = plt.subplots(len(rows), 1, figsize=(per_prompt * 0.5 + 2.4, len(rows) * 0.55))
    for axis, prompt in zip(axes, rows, strict=True):
        strip = images[prompt][:per_prompt, 0].cpu()  # [N, H, W] grayscale
        axis.imshow(torch.cat(list(strip), dim=1), cmap="gray", vmin=0, vmax=1)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(prompt, rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


@torch.no_grad()
def measure_speed(policy: TextToImagePolicy, repeats: int = 20) -> dict[str, float]:
    """Wall times with the current thread settings.

    The median of ``repeats`` UNet forwards of 64 images, and one DDPO-sized sampling call
    (32 prompts, 20 DDIM steps, classifier-free guidance).
    """
    sample = torch.randn(64, *policy.sample_shape)
    timesteps = torch.full((64,), 500)
    conditions = policy.encode_prompts(["a handwritten seven"] * 64)
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        policy.denoise(sample, timesteps, conditions)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    policy.sample(
        ["a handwritten seven"] * 32, num_steps=20, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    )
    return {
        "unet_forward_batch64_ms": round(1000 * sorted(times[3:])[repeats // 2], 1),
        "sample_32x20_steps_cfg_s": round(time.perf_counter() - start, 2),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    """Measure a trained digits model: write its JSON report and a sample grid."""
    from lightning_sdrl.policies.digits import DigitsPolicy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--report", required=True, help="JSON file to write")
    parser.add_argument("--figure", default=None, help="PNG sample grid to write")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--train-seconds", type=float, default=None, help="training wall time to record")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    policy = DigitsPolicy(args.model_dir, lora=None).eval()
    start = time.perf_counter()
    report, images = measure_model(policy, num_samples=args.num_samples)
    report["measure_seconds"] = round(time.perf_counter() - start, 1)
    report["train_seconds"] = args.train_seconds
    report["weights_bytes"] = sum(
        p.stat().st_size for p in Path(policy.pretrained_model_name_or_path).rglob("*.safetensors")
    )
    report["parameters"] = {
        name: sum(p.numel() for p in getattr(policy, name).parameters()) for name in ("unet", "text_encoder")
    }
    report["speed"] = measure_speed(policy)
    Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    if args.figure:  # one caption per digit, and the group prompts
        rows = [digit_captions(digit)[0] for digit in range(10)] + list(GROUP_PROMPTS)
        save_sample_grid({prompt: images[prompt] for prompt in rows}, args.figure)
    return report


if __name__ == "__main__":
    main()
