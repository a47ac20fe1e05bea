"""Train the digits feedback models and report how well they judge held-out digits.

Usage::

    python -m lightning_sdrl.digits.train_digits --out DIR [--seed 0] [--figure PNG]

writes

- ``DIR/classifier/`` and ``DIR/feature_net/``: :class:`DigitClassifier` and
  :class:`DigitFeatureNet` (``config.json`` + ``model.safetensors``, load with
  ``from_pretrained(DIR/classifier)``);
- ``DIR/report.json``: held-out accuracy, confusion matrices, robustness checks;
- the confusion-matrix figure (``DIR/confusion_matrix.png`` unless ``--figure`` says where).

Both models train on the ``"train"`` split of :func:`lightning_sdrl.digits.data.digits_split`
and are evaluated on its ``"test"`` split. Training is a plain PyTorch loop on one CPU thread with
fixed seeds and deterministic algorithms (about a minute): these are fixed tools that ship
with the package, not a recipe users tune, so they do not need a LightningModule.

The models will judge images made by a diffusion model, which are never quite like the
training digits, so every batch is augmented (:func:`augment_digits`: small rotations, scalings
and shifts, blur, contrast changes and noise). The classifier also sees non-digit images
(:func:`non_digit_images`) with a uniform target ("outlier exposure"), so that blobs and noise get
low confidence and fall into the paper's "None" class instead of earning a reward.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.digits.models import NUM_DIGIT_CLASSES, DigitClassifier, DigitFeatureNet

CONFIDENCE_THRESHOLD = 0.7
"""Section III-C: an image whose top class probability is below 0.7 is labelled "None"."""


def augment_digits(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Randomly perturb canonical digits the way a generated digit may differ from a real one.

    1. affine: rotation up to 10 degrees, scaling by 0.9..1.1, shift up to 1.5 pixels;
    2. blur: a random mix of the image and its 3x3 binomial blur;
    3. contrast: multiply by 0.8..1.2;
    4. noise: add Gaussian noise with a standard deviation up to 0.08 (not clamped).

    Args:
        images: ``[B, 1, 16, 16]`` canonical images in ``[0, 1]``.
        generator: Source of randomness (the global one if ``None``).

    Returns:
        Perturbed images of the same shape; values may leave ``[0, 1]`` slightly.

    Example:
        >>> images = torch.rand(4, 1, 16, 16)
        >>> augment_digits(images, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 1, 16, 16])
    """
    b = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    # 1. inverse affine map from output to input coordinates; 1 pixel = 2/16 normalised units
    angle, scale = uniform(-math.radians(10), math.radians(10)), uniform(0.9, 1.1)
    shift = uniform(-1.5, 1.5, 2) * (2 / images.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    # 2. blur
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel)
    images = torch.lerp(images, blurred, uniform(0, 1, 1, 1, 1))
    # 3. contrast, 4. noise
    images = images * uniform(0.8, 1.2, 1, 1, 1)
    return images + uniform(0, 0.08, 1, 1, 1) * torch.randn(images.shape, generator=generator)


def non_digit_images(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``[n, 1, 16, 16]`` images that are no digit: smooth random blobs of random brightness.

    Random 4x4 or 8x8 noise upsampled to 16x16, scaled by a random brightness and sometimes
    sharpened into strokes-like blobs; the classifier learns to give them a uniform distribution.

    Example:
        >>> non_digit_images(3, torch.Generator().manual_seed(0)).shape
        torch.Size([3, 1, 16, 16])
    """
    coarse = F.interpolate(torch.rand(n, 1, 4, 4, generator=generator), size=16, mode="bilinear", align_corners=False)
    fine = F.interpolate(torch.rand(n, 1, 8, 8, generator=generator), size=16, mode="bilinear", align_corners=False)
    mix = torch.rand(n, 1, 1, 1, generator=generator)
    blobs = torch.lerp(coarse, fine, mix)
    # Half of them pass through a steep sigmoid: bright strokes on a dark background, like digits.
    sharp = torch.sigmoid((blobs - 0.5) * 12)
    blobs = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, sharp, blobs)
    return blobs * torch.rand(n, 1, 1, 1, generator=generator)


def _fit(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    outlier_fraction: float,
) -> None:
    """Minimise cross-entropy on augmented batches (AdamW, one-cycle learning rate).

    With ``outlier_fraction > 0``, each batch also holds that fraction of non-digit images whose
    target is the uniform distribution (cross-entropy to uniform = mean of ``-log_softmax``).
    Uses the global random generator, which the caller seeds.
    """
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    n_outliers = round(outlier_fraction * batch_size)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(batch_size):
            inputs = torch.cat([images[batch], non_digit_images(n_outliers)])
            logits = model(augment_digits(inputs))
            loss = F.cross_entropy(logits[: len(batch)], labels[batch])
            if n_outliers:
                loss = loss - logits[len(batch) :].log_softmax(dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    outlier_fraction: float = 0.125,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` from scratch, reproducibly.

    Args:
        images: ``[N, 1, 16, 16]`` canonical training images in ``[0, 1]``.
        labels: ``[N]`` int64 digit labels.
        seed: Seeds the initial weights, batch order and augmentations.
        epochs: Passes over the training images.
        batch_size: Digits per step (plus the outliers).
        lr: Peak learning rate of the one-cycle schedule.
        outlier_fraction: Non-digit images per batch, as a fraction of ``batch_size``.

    Returns:
        The trained classifier, in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
        _fit(
            model, images, labels, epochs=epochs, batch_size=batch_size, lr=lr,
            outlier_fraction=outlier_fraction,
        )  # fmt: skip
    return model


def train_feature_net(
    images: Tensor,
    labels: Tensor,
    *,
    seed: int = 1,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> DigitFeatureNet:
    """Train a :class:`DigitFeatureNet` through a linear softmax head that is then dropped.

    Args:
        images: ``[N, 1, 16, 16]`` canonical training images in ``[0, 1]``.
        labels: ``[N]`` int64 digit labels.
        seed: Seeds the initial weights, batch order and augmentations; the default differs
            from :func:`train_classifier`'s so the two networks are independent.
        epochs: Passes over the training images.
        batch_size: Images per step.
        lr: Peak learning rate of the one-cycle schedule.

    Returns:
        The trained feature network, in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitFeatureNet()
        head = nn.Linear(net.feature_dim, NUM_DIGIT_CLASSES)
        _fit(
            nn.Sequential(net, head), images, labels, epochs=epochs, batch_size=batch_size,
            lr=lr, outlier_fraction=0.0,
        )  # fmt: skip
    return net


def confusion_matrix(true: Tensor, predicted: Tensor, num_predicted: int = 10) -> Tensor:
    """``[10, num_predicted]`` counts: row = true digit, column = predicted class.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)[:2].tolist()
        [[1, 0], [1, 1]]
    """
    flat = true * num_predicted + predicted
    counts = torch.bincount(flat, minlength=NUM_DIGIT_CLASSES * num_predicted)
    return counts.view(NUM_DIGIT_CLASSES, num_predicted)


@torch.no_grad()
def evaluate_classifier(model: DigitClassifier, images: Tensor, labels: Tensor, seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy, confusion matrices and robustness checks of a classifier.

    Returns a JSON-ready dict:

    - ``test_accuracy`` and ``confusion_matrix`` (``[10][10]``) of the argmax prediction;
    - ``confusion_matrix_with_none`` (``[10][11]``, last column "None"), ``none_fraction`` and
      ``confident_accuracy`` (``None`` if no image is confident) under the section III-C rule
      (top probability < 0.7 is "None");
    - ``perturbed_test_accuracy``: accuracy on the test images passed through
      :func:`augment_digits` (seeded by ``seed``);
    - ``confident_fraction_on``: the fraction of non-digit inputs (uniform noise, blank,
      blobs) that would get a confident label instead of "None".
    """
    generator = torch.Generator().manual_seed(seed)
    probs = model.predict_proba(images)
    confidence, predicted = probs.max(dim=1)
    none = NUM_DIGIT_CLASSES
    thresholded = torch.where(confidence >= CONFIDENCE_THRESHOLD, predicted, none)
    confident = thresholded != none
    perturbed = model(augment_digits(images, generator)).argmax(dim=1)
    non_digits = {
        "uniform_noise": torch.rand(500, 1, 16, 16, generator=generator),
        "blank": torch.zeros(1, 1, 16, 16),
        "random_blobs": non_digit_images(500, generator),
    }
    return {
        "test_accuracy": (predicted == labels).double().mean().item(),
        "confusion_matrix": confusion_matrix(labels, predicted).tolist(),
        "confidence_threshold": CONFIDENCE_THRESHOLD,
        "confusion_matrix_with_none": confusion_matrix(labels, thresholded, 11).tolist(),
        "none_fraction": (~confident).double().mean().item(),
        "confident_accuracy": ((predicted == labels)[confident].double().mean().item() if confident.any() else None),
        "perturbed_test_accuracy": (perturbed == labels).double().mean().item(),
        "confident_fraction_on": {
            name: (model.predict_proba(x).max(dim=1).values >= CONFIDENCE_THRESHOLD).double().mean().item()
            for name, x in non_digits.items()
        },
    }


@torch.no_grad()
def evaluate_feature_net(
    net: DigitFeatureNet,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
) -> dict[str, Any]:
    """How well the features separate digits: 1-nearest-neighbour test accuracy (cosine).

    Returns ``{"knn1_test_accuracy": ..., "feature_dim": ...}``; a good embedding for FID and
    precision-recall puts same-digit images close together.
    """
    train = F.normalize(net(train_images), dim=1)
    test = F.normalize(net(test_images), dim=1)
    nearest = (test @ train.T).argmax(dim=1)
    accuracy = (train_labels[nearest] == test_labels).double().mean().item()
    return {"knn1_test_accuracy": accuracy, "feature_dim": net.feature_dim}


def plot_confusion(report: dict[str, Any], path: str | Path) -> None:
    """Save the argmax and the "None"-thresholded confusion matrices side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classifier = report["classifier"]
    panels = [
        ("argmax", classifier["confusion_matrix"], [str(d) for d in range(10)]),
        (
            f"top probability < {CONFIDENCE_THRESHOLD} -> None (§III-C)",
            classifier["confusion_matrix_with_none"],
            [str(d) for d in range(10)] + ["None"],
        ),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    for axis, (title, matrix, columns) in zip(axes, panels, strict=True):
        matrix = torch.tensor(matrix)
        axis.imshow(matrix, cmap="Blues")
        for (row, column), count in zip(matrix.nonzero().tolist(), matrix[matrix > 0].tolist(), strict=True):
            color = "white" if count > matrix.max() / 2 else "black"
            axis.text(column, row, count, ha="center", va="center", color=color, fontsize=8)
        axis.set(
            title=title, xlabel="predicted", ylabel="true digit",
            xticks=range(len(columns)), xticklabels=columns, yticks=range(10),
        )  # fmt: skip
    figure.suptitle(
        f"DigitClassifier on the held-out digits ({sum(map(sum, panels[0][1]))} images): "
        f"accuracy {classifier['test_accuracy']:.1%}"
    )
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train both models, save them under ``--out``, and write the report and figure."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_sdrl.digits.train_digits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="classifier seed; feature net: +1")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for each model")
    parser.add_argument("--figure", type=Path, help="PNG path (default OUT/confusion_matrix.png)")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    # One thread: the same numbers on any machine, and faster for such small networks on a
    # shared CPU than several threads waiting on each other.
    torch.set_num_threads(1)

    train_images, train_labels = digits_split("train")
    test_images, test_labels = digits_split("test")
    start = time.perf_counter()
    classifier = train_classifier(train_images, train_labels, seed=args.seed, epochs=args.epochs)
    feature_net = train_feature_net(train_images, train_labels, seed=args.seed + 1, epochs=args.epochs)
    seconds = time.perf_counter() - start
    classifier.save_pretrained(args.out / "classifier")
    feature_net.save_pretrained(args.out / "feature_net")

    command = "python -m lightning_sdrl.digits.train_digits " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "seed": args.seed,
        "epochs": args.epochs,
        "torch_version": torch.__version__,
        "train_seconds": round(seconds, 1),
        "train_images": len(train_labels),
        "test_images": len(test_labels),
        "classifier": evaluate_classifier(classifier, test_images, test_labels, seed=args.seed),
        "feature_net": evaluate_feature_net(feature_net, train_images, train_labels, test_images, test_labels),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_confusion(report, args.figure or args.out / "confusion_matrix.png")
    result = report["classifier"]
    print(
        f"trained in {seconds:.0f} s; held-out accuracy {result['test_accuracy']:.2%} "
        f"(perturbed {result['perturbed_test_accuracy']:.2%}, None {result['none_fraction']:.1%}); "
        f"feature 1-NN accuracy {report['feature_net']['knn1_test_accuracy']:.2%}; wrote {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
