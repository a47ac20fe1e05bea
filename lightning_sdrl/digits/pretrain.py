"""The digits miniature's pretraining: validation by the digit classifier, and the model's report.

:class:`DigitsPretrainModule` is the generic denoising pretraining
(:class:`~lightning_sdrl.modules.pretrain.DiffusionPretrainModule`) of the digits text-to-image
model on the captions of :mod:`lightning_sdrl.digits.captions`, validated by the shipped
:class:`~lightning_sdrl.digits.models.DigitClassifier`: ``val/digit_agreement`` is the share of
samples of a per-digit prompt that it recognises as that digit.

Also a command that measures a trained digits model and writes its report (the numbers of
``docs/digits_model.md``)::

    python -m lightning_sdrl.digits.pretrain --model-dir DIR --report REPORT.json --figure GRID.png

(``--model flow`` measures the flow-matching model, ``docs/digits_flow_model.md``.)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_sdrl.data.sampling import PromptBatch
from lightning_sdrl.digits.captions import (
    BALANCE_PROMPT,
    DIGIT_TEMPLATES,
    GROUP_PROMPTS,
    MULTICLASS_PROMPT,
    PROMPT_CLASS_WEIGHTS,
    SHIFT_PROMPT,
    digit_captions,
)
from lightning_sdrl.digits.flow_policy import DigitsFlowPolicy
from lightning_sdrl.digits.models import DigitClassifier
from lightning_sdrl.digits.policy import DigitsPolicy
from lightning_sdrl.functional.classifier_rewards import classify_with_threshold
from lightning_sdrl.functional.rectified_flow import TimeSampling
from lightning_sdrl.functional.seeding import derive_seed
from lightning_sdrl.modules.flow_pretrain import FlowMatchingPretrainModule
from lightning_sdrl.modules.pretrain import DiffusionPretrainModule
from lightning_sdrl.policies.pixel import PixelTextToImageArchitecture
from lightning_sdrl.policies.pixel_flow import PixelFlowArchitecture
from lightning_sdrl.policies.text_to_image import TextToImagePolicy

CONFIDENCE_THRESHOLD = 0.7
"""Below this top probability the classifier's answer is "None" (section III-C of the paper)."""


# ---------------------------------------------------------------------- judging samples
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


# ---------------------------------------------------------------------- the LightningModules
class DigitAgreementValidation:
    """Validation of a digits model by the shipped classifier (mixed into a pretraining module).

    Validation batches are :class:`~lightning_sdrl.data.sampling.PromptBatch` es of per-digit
    prompts whose ``prompt_ids`` are the digits: the module samples them
    (``sample_validation_batch``) and the shipped
    :class:`~lightning_sdrl.digits.models.DigitClassifier` says how many show the named digit
    (``val/digit_agreement``, top probability at least 0.7) and how sure it is (``val/confidence``).
    """

    def load_classifier(self) -> None:
        """Attach the frozen classifier (in eval mode throughout: its dropout stays off)."""
        self.classifier = DigitClassifier.from_pretrained().requires_grad_(False)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Sample the batch's digit prompts and log how many the classifier recognises."""
        trajectory = self.sample_validation_batch(batch)
        probs = self.classifier.predict_proba(trajectory.images)
        labels = classify_with_threshold(probs, CONFIDENCE_THRESHOLD)
        agreement = (labels == batch.prompt_ids.to(labels.device)).float().mean()
        self.log("val/digit_agreement", agreement, prog_bar=True, batch_size=len(batch), sync_dist=True)
        self.log("val/confidence", probs.max(dim=1).values.mean(), batch_size=len(batch), sync_dist=True)


class DigitsPretrainModule(DigitAgreementValidation, DiffusionPretrainModule):
    """Denoising pretraining of the DDIM digits model, validated by the shipped digit classifier.

    Training is :class:`~lightning_sdrl.modules.pretrain.DiffusionPretrainModule`'s, on the
    :class:`~lightning_sdrl.digits.captions.CaptionBatch` es of
    :class:`~lightning_sdrl.digits.captions.DigitsCaptionDataModule`; validation samples with DDIM
    (:class:`DigitAgreementValidation`).

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
        super().__init__(
            architecture,
            seed,
            lr,
            weight_decay,
            warmup_steps,
            caption_dropout,
            val_num_steps,
            val_guidance_scale,
            val_eta,
            export_dir,
        )
        self.load_classifier()


class DigitsFlowPretrainModule(DigitAgreementValidation, FlowMatchingPretrainModule):
    """Rectified-flow pretraining of the flow-matching digits model, validated by the shipped classifier.

    Training is :class:`~lightning_sdrl.modules.flow_pretrain.FlowMatchingPretrainModule`'s on the
    same captions as the DDIM digits model; validation samples with Flow-GRPO's SDE
    (:class:`DigitAgreementValidation`). See ``configs/digits/pretrain_flow.yaml``.

    Args:
        architecture: the model to build (default: the shipped flow-matching digits model).
        seed: initialisation seed of the weights.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: optimiser steps of linear warm-up, before a cosine decay to a tenth of ``lr``.
        caption_dropout: probability of training on the empty caption (for classifier-free guidance).
        time_sampling: distribution of the training ``sigma``: ``"logit_normal"`` or ``"uniform"``.
        logit_mean: mean of the logit-normal's Gaussian.
        logit_std: standard deviation of the logit-normal's Gaussian.
        max_sequence_length: zero "T5" embeddings after the CLIP tokens (the shipped model: 1).
        val_num_steps: sampling steps of validation samples.
        val_guidance_scale: classifier-free guidance of validation samples.
        val_noise_level: the SDE's noise level for validation samples.
        export_dir: where ``on_train_end`` writes the model; ``None`` writes ``<log_dir>/diffusion``.
    """

    def __init__(
        self,
        architecture: PixelFlowArchitecture = PixelFlowArchitecture(),  # noqa: B008 - frozen by use
        seed: int = 0,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        caption_dropout: float = 0.1,
        time_sampling: TimeSampling = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        max_sequence_length: int = 1,
        val_num_steps: int = 10,
        val_guidance_scale: float = 3.0,
        val_noise_level: float = 0.7,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(
            architecture,
            seed,
            lr,
            weight_decay,
            warmup_steps,
            caption_dropout,
            time_sampling,
            logit_mean,
            logit_std,
            max_sequence_length,
            val_num_steps,
            val_guidance_scale,
            val_noise_level,
            export_dir,
        )
        self.load_classifier()


# ---------------------------------------------------------------------- the report command
REPORT_PROMPTS = [caption for digit in range(10) for caption in digit_captions(digit)] + list(GROUP_PROMPTS)
"""Prompts measured by :func:`measure_model`: every per-digit caption and the group prompts."""

TEST_CHECK = {"prompts": [digit_captions(7)[0], BALANCE_PROMPT], "num_samples": 32, "num_steps": 10, "seed": 0}
"""The small fixed-seed sample whose result the report stores for the tests to reproduce."""


FLOW_NETWORKS = ("transformer", "text_encoder", "text_encoder_2")
"""The networks of the flow digits model whose parameters the report counts."""


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

    The median of ``repeats`` denoiser (UNet or transformer) forwards of 64 images, and one DDPO-sized sampling call
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--report", required=True, help="JSON file to write")
    parser.add_argument("--figure", default=None, help="PNG sample grid to write")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--train-seconds", type=float, default=None, help="training wall time to record")
    parser.add_argument(
        "--model",
        choices=("ddim", "flow"),
        default="ddim",
        help="ddim: the DDIM digits model (DigitsPolicy); flow: the flow-matching one (DigitsFlowPolicy)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=None,
        help="DDIM eta / the flow SDE's noise level (default: 1.0 for ddim, 0.7 for flow)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.model == "flow":
        policy, networks, eta = DigitsFlowPolicy(args.model_dir, lora=None), FLOW_NETWORKS, 0.7
    else:
        policy, networks, eta = DigitsPolicy(args.model_dir, lora=None), ("unet", "text_encoder"), 1.0
    policy.eval()
    eta = eta if args.eta is None else args.eta
    start = time.perf_counter()
    report, images = measure_model(policy, num_samples=args.num_samples, eta=eta)
    report["measure_seconds"] = round(time.perf_counter() - start, 1)
    report["train_seconds"] = args.train_seconds
    report["weights_bytes"] = sum(
        p.stat().st_size for p in Path(policy.pretrained_model_name_or_path).rglob("*.safetensors")
    )
    report["parameters"] = {name: sum(p.numel() for p in getattr(policy, name).parameters()) for name in networks}
    report["speed"] = measure_speed(policy)
    Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    if args.figure:  # one caption per digit, and the group prompts
        rows = [digit_captions(digit)[0] for digit in range(10)] + list(GROUP_PROMPTS)
        save_sample_grid({prompt: images[prompt] for prompt in rows}, args.figure)
    return report


if __name__ == "__main__":
    main()
