"""torchmetrics metrics over :mod:`lightning_sdrl.functional`: FID, precision/recall, attribute KL and bias."""

from lightning_sdrl.metrics.attribute_bias import AttributeBias
from lightning_sdrl.metrics.attribute_counts import AttributeCounts
from lightning_sdrl.metrics.attribute_kl import AttributeKL
from lightning_sdrl.metrics.fid import FID
from lightning_sdrl.metrics.precision_recall import PrecisionRecall

__all__ = ["FID", "AttributeBias", "AttributeCounts", "AttributeKL", "PrecisionRecall"]
