"""The diversity paper's evaluation of generated images, as one module to update in validation.

FID and precision/recall against a reference set, and the KL of the attribute distribution to
uniform (or a target).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_sdrl.functional.classifier_rewards import group_probabilities
from lightning_sdrl.metrics.attribute_kl import AttributeKL
from lightning_sdrl.metrics.fid import FID
from lightning_sdrl.metrics.precision_recall import PrecisionRecall
from lightning_sdrl.reference import ReferenceSet


class GenerationMetrics(nn.Module):
    """FID, precision/recall and attribute KL of generated images against a reference set.

    The reference images are added once, at the first update, and kept across validation epochs;
    under DDP each process adds its own shard of them, so the synchronised statistics are those of
    the reference set exactly once.

    Args:
        feature_extractor: images ``[B,3,H,W]`` in ``[0,1]`` -> features ``[B,D]`` (Inception,
            CLIP, or the digits feature network).
        reference: the reference images.
        attribute_classifier: images -> class probabilities ``[B,K]``; enables ``attribute_kl``.
        groups: classes summed into attribute columns (``None``: one column per class).
        target_distribution: target attribute shares (``None``: uniform).
        k: nearest neighbours of precision/recall (3, Kynkaanniemi et al. 2019).
        batch_size: images per feature-extractor call when adding the reference set.
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        reference: ReferenceSet,
        attribute_classifier: nn.Module | None = None,
        groups: list[list[int]] | None = None,
        target_distribution: list[float] | None = None,
        k: int = 3,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        with torch.no_grad():
            num_features = feature_extractor.eval()(reference.images[:2]).shape[1]
        self.reference, self.batch_size = reference, batch_size
        self.fid = FID(feature_extractor, num_features, reset_real_features=False)
        self.precision_recall = PrecisionRecall(feature_extractor, k=k, reset_real_features=False)
        self.attribute_classifier = attribute_classifier
        self.groups = groups
        self.attribute_kl: AttributeKL | None = None
        if attribute_classifier is not None:
            with torch.no_grad():
                probs = group_probabilities(attribute_classifier.eval()(reference.images[:1]), groups)
            self.attribute_kl = AttributeKL(probs.shape[1], target=target_distribution)
        self._reference_added = False

    def _add_reference(self, device: torch.device) -> None:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        for chunk in self.reference.images[rank::world].split(self.batch_size):
            chunk = chunk.to(device)
            self.fid.update(chunk, real=True)
            self.precision_recall.update(chunk, real=True)
        self._reference_added = True

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Add generated images ``[B, 3, H, W]`` in ``[0, 1]``."""
        if not self._reference_added:
            self._add_reference(images.device)
        self.fid.update(images, real=False)
        self.precision_recall.update(images, real=False)
        if self.attribute_kl is not None:
            self.attribute_kl.update(group_probabilities(self.attribute_classifier(images), self.groups))

    def compute(self) -> dict[str, Tensor]:
        """``fid``, ``precision``, ``recall`` and (with a classifier) ``attribute_kl``."""
        values = {"fid": self.fid.compute(), **self.precision_recall.compute()}
        if self.attribute_kl is not None:
            values["attribute_kl"] = self.attribute_kl.compute()
        return {name: torch.as_tensor(value, dtype=torch.float32) for name, value in values.items()}

    def reset(self) -> None:
        """Forget the generated images (the reference statistics stay)."""
        self.fid.reset()
        self.precision_recall.reset()
        if self.attribute_kl is not None:
            self.attribute_kl.reset()
