"""The bias metric of Shen et al. (2024) against an independent computation (pairs enumerated)."""

import itertools

import numpy as np
import pytest
import torch

from lightning_sdrl.functional.metrics import pairwise_bias
from lightning_sdrl.metrics import AttributeBias, AttributeKL


def independent_bias(counts: np.ndarray) -> float:
    """``mean over class pairs |freq_i - freq_j|``, the pairs enumerated one by one."""
    freq = counts / counts.sum()
    pairs = list(itertools.combinations(range(len(counts)), 2))
    return sum(abs(freq[i] - freq[j]) for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("num_classes", [2, 3, 8])
def test_pairwise_bias_equals_the_pairs_enumerated(num_classes):
    rng = np.random.default_rng(num_classes)
    counts = rng.integers(0, 50, size=(6, num_classes)) + np.eye(6, num_classes, dtype=np.int64)
    expected = [independent_bias(row) for row in counts]
    torch.testing.assert_close(pairwise_bias(torch.tensor(counts)), torch.tensor(expected, dtype=torch.float64))
    one_class = torch.zeros(num_classes).index_fill(0, torch.tensor([0]), 5)
    assert float(pairwise_bias(one_class)) == pytest.approx(2 / num_classes)  # the most biased
    assert float(pairwise_bias(torch.ones(num_classes))) == 0.0


def test_the_metric_per_prompt_mean_and_worst_match_the_counts():
    rng = np.random.default_rng(0)
    prompts = ["an engineer", "a nurse", "a doctor"]
    probs = torch.tensor(rng.random((60, 4)))
    rows = [prompts[i % 2] for i in range(60)]  # the third prompt never appears
    metric = AttributeBias(num_classes=4, prompts=prompts)
    for start in range(0, 60, 7):
        metric.update(probs[start : start + 7], rows[start : start + 7])
    classes = probs.argmax(1).numpy()
    expected = [independent_bias(np.bincount(classes[i::2], minlength=4)) for i in range(2)]
    values = metric.compute()
    torch.testing.assert_close(values[:2], torch.tensor(expected, dtype=torch.float64))
    assert values[2].isnan()
    assert float(metric.compute_mean()) == pytest.approx(np.mean(expected))
    assert float(metric.compute_worst()) == pytest.approx(max(expected))
    pooled = AttributeBias(num_classes=4)
    pooled.update(probs)
    assert float(pooled.compute()) == pytest.approx(independent_bias(np.bincount(classes, minlength=4)))


def test_bias_and_kl_count_alike_and_bad_input_is_refused():
    probs = torch.softmax(torch.randn(40, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    bias, kl = AttributeBias(num_classes=3), AttributeKL(num_classes=3)
    bias.update(probs)
    kl.update(probs)
    assert torch.equal(bias.counts, kl.counts)
    with pytest.raises(ValueError, match=r"expected \[B, 3\]"):
        bias.update(torch.rand(4, 2))
    with pytest.raises(RuntimeError, match="AttributeBias.compute\\(\\) called before any update"):
        AttributeBias(num_classes=3).compute()
    with pytest.raises(ValueError, match="needs the prompt of each"):
        AttributeBias(num_classes=3, prompts=["a"]).update(probs)
    with pytest.raises(ValueError, match="K >= 2 classes"):
        pairwise_bias(torch.ones(1))
