import pytest
import torch

from lightning_sdrl.functional.ema import ema_decay, ema_update


def test_decay_grows_linearly_then_holds():
    assert [ema_decay(step) for step in (0, 1, 250, 500, 501, 10**6)] == [0.0, 0.001, 0.25, 0.5, 0.5, 0.5]
    assert ema_decay(200, rate=0.001, max_decay=0.3) == pytest.approx(0.2)  # AWM's EMA model
    assert ema_decay(10**6, rate=0.001, max_decay=0.3) == 0.3


def test_update_matches_the_formula_for_every_parameter():
    old, new = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().double().clone() for p in old.parameters()]
    ema_update(old.parameters(), new.parameters(), decay=0.3)
    for updated, start, source in zip(old.parameters(), before, new.parameters(), strict=True):
        expected = 0.3 * start + 0.7 * source.detach().double()
        torch.testing.assert_close(updated.detach().double(), expected, atol=1e-7, rtol=0)
        assert updated.grad_fn is None and updated.grad is None  # in place, outside autograd


def test_decay_zero_copies_and_other_dtypes_are_converted():
    old, new = torch.zeros(4), torch.arange(4, dtype=torch.float64)
    ema_update(old, new, decay=0.0)
    assert old.dtype == torch.float32 and torch.equal(old, torch.arange(4.0))


def test_a_parameter_that_requires_grad_is_updated_in_place():
    parameter = torch.nn.Parameter(torch.ones(2))
    storage = parameter.data_ptr()
    ema_update([parameter], [torch.zeros(2)], decay=0.5)
    assert parameter.data_ptr() == storage and torch.equal(parameter.detach(), torch.full((2,), 0.5))


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"decay=1.0; expected 0 <= decay < 1"):
        ema_update(torch.zeros(1), torch.zeros(1), 1.0)
    with pytest.raises(ValueError, match=r"decay=-0.1; expected 0 <= decay < 1"):
        ema_update(torch.zeros(1), torch.zeros(1), -0.1)
    with pytest.raises(ValueError, match="max_decay=1; expected 0 <= max_decay < 1"):
        ema_decay(5, max_decay=1)
    with pytest.raises(ValueError, match="rate=-0.001; expected rate >= 0"):
        ema_decay(5, rate=-0.001)
    with pytest.raises(ValueError, match="step=-1"):
        ema_decay(-1)
    with pytest.raises(ValueError, match="old has 2 tensors and new 1"):
        ema_update([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)], 0.5)
    with pytest.raises(ValueError, match=r"tensor 0: new has shape \[2\]; expected \[1\]"):
        ema_update([torch.zeros(1)], [torch.zeros(2)], 0.5)
