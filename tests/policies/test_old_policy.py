"""ParameterCopy: the old / EMA policy of DiffusionNFT and AWM, as a copy of the trained parameters."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from lightning_sdrl.policies import LoRASettings, ParameterCopy, RandomStableDiffusion3Policy, RandomTextToImagePolicy
from tests.conftest import randomize_lora


def trainable(policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}


def set_trainable(policy, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(values[name])


def perturb(policy, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def tiny(rank: int | None = 4) -> RandomTextToImagePolicy:
    """The tiny latent model with its own networks (same seed, same initial weights)."""
    return RandomTextToImagePolicy("tiny", lora=None if rank is None else LoRASettings(rank=rank))


@pytest.fixture
def policy():
    policy = tiny()
    randomize_lora(policy.unet)
    return policy


def denoised(policy) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, *policy.sample_shape, generator=generator), torch.tensor([900, 300])
    with torch.no_grad():
        return policy.guided_prediction(x, t, policy.encode_prompts(["a cat", "b"]), guidance_scale=2.0)


def test_the_copy_holds_exactly_the_trainable_parameters(policy):
    copy = ParameterCopy(policy)
    state = copy.state_dict()
    expected = trainable(policy)
    assert list(state) == list(expected) and all("lora_" in name for name in state) and len(copy) == len(expected)
    assert all(torch.equal(state[name], expected[name]) for name in state)
    perturb(policy, 0)  # a clone: training moves the policy, not the copy
    assert all(torch.equal(state[name], expected[name]) for name in state)


def test_update_is_the_ema_formula_in_float64(policy):
    copy = ParameterCopy(policy)
    for step, decay in enumerate([0.3, 0.9, 0.5]):
        perturb(policy, step)
        old = {name: value.double() for name, value in copy.state_dict().items()}
        new = {name: value.double() for name, value in trainable(policy).items()}
        copy.update(policy, decay)
        for name, value in copy.state_dict().items():
            expected = decay * old[name] + (1 - decay) * new[name]  # theta_old <- eta theta_old + (1 - eta) theta
            # float32 storage: a few roundings of 2^-24 relative to the terms
            bound = 2**-22 * (old[name].abs() + new[name].abs())
            assert value.dtype == torch.float32 and bool(((value.double() - expected).abs() <= bound).all())
            assert (expected - old[name]).abs().max() > 1e-3  # the update moved it
    copy.update(policy, 0.0)  # decay 0 copies the policy
    assert all(torch.equal(copy.state_dict()[name], value) for name, value in trainable(policy).items())


def test_update_refuses_a_decay_outside_0_1(policy):
    with pytest.raises(ValueError, match=r"decay=1.0; expected 0 <= decay < 1"):
        ParameterCopy(policy).update(policy, 1.0)


@pytest.mark.parametrize("raises", [False, True])
def test_swapped_into_runs_the_copy_and_restores_the_weights_bit_exactly(policy, raises):
    copy = ParameterCopy(policy)
    copy_values = {name: value.clone() for name, value in copy.state_dict().items()}
    perturb(policy, 1)
    own = trainable(policy)
    # an independent policy whose weights are set to the copy
    other = tiny()
    set_trainable(other, copy_values)
    expected = denoised(other)
    assert not torch.allclose(denoised(policy), expected, atol=1e-4)  # the swap can fail

    inside = {}
    assert torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="in the block") if raises else contextlib.nullcontext():
        with copy.swapped_into(policy):
            inside["output"] = denoised(policy)
            inside["grad"] = torch.is_grad_enabled()
            inside["values"] = trainable(policy)
            if raises:
                raise RuntimeError("in the block")
    torch.testing.assert_close(inside["output"], expected, rtol=0, atol=0)
    assert all(torch.equal(inside["values"][name], copy_values[name]) for name in copy_values)
    assert inside["grad"] is False
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[name], own[name]) and after[name].requires_grad for name in own)
    assert all(torch.equal(copy.state_dict()[name], copy_values[name]) for name in copy_values)  # copy untouched


def test_swapping_keeps_the_parameter_tensors(policy):
    copy = ParameterCopy(policy)
    before = {name: p.data_ptr() for name, p in policy.named_parameters()}
    with copy.swapped_into(policy):
        assert {name: p.data_ptr() for name, p in policy.named_parameters()} == before  # optimisers keep them


def test_state_dict_round_trip(policy):
    copy = ParameterCopy(policy)
    perturb(policy, 2)
    copy.update(policy, 0.25)
    buffer = io.BytesIO()
    torch.save(copy.state_dict(), buffer)
    buffer.seek(0)
    fresh_policy = tiny()
    restored = ParameterCopy(fresh_policy)
    restored.load_state_dict(torch.load(buffer))
    assert all(torch.equal(restored.state_dict()[name], value) for name, value in copy.state_dict().items())
    with restored.swapped_into(fresh_policy), copy.swapped_into(policy):
        torch.testing.assert_close(denoised(fresh_policy), denoised(policy), rtol=0, atol=0)


def test_mismatched_names_and_shapes_are_errors(policy):
    copy = ParameterCopy(policy)
    state = copy.state_dict()
    name = next(iter(state))
    with pytest.raises(ValueError, match=rf"missing \['{name}'\] \(1\), unexpected \[\] \(0\)"):
        copy.load_state_dict({key: value for key, value in state.items() if key != name})
    with pytest.raises(ValueError, match=r"missing \[\] \(0\), unexpected \['extra.weight'\] \(1\)"):
        copy.load_state_dict({**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=rf"'{name}' has shape \[{state[name].shape[0] + 1}, .*the copy's is"):
        copy.load_state_dict({**state, name: torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:])})
    other_rank = tiny(rank=2)
    with pytest.raises(ValueError, match=r"the policy's trainable parameter .* has shape \[2, .*LoRA rank"):
        copy.update(other_rank, 0.5)
    full = tiny(rank=None)
    with pytest.raises(ValueError, match=r"do not match the copy: missing .* unexpected"):
        with copy.swapped_into(full):
            pass


def test_a_policy_without_trainable_parameters_is_refused(policy):
    policy.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter to copy"):
        ParameterCopy(policy)


def test_a_fully_fine_tuned_transformer_is_copied_whole():
    policy = RandomStableDiffusion3Policy("sd3-tiny", lora=None, max_sequence_length=12)
    copy = ParameterCopy(policy)
    assert len(copy) == len(list(policy.transformer.parameters()))
    samples_before = policy.generate(["a"], num_steps=2, generator=torch.Generator().manual_seed(0))
    perturb(policy, 3)
    with copy.swapped_into(policy):
        samples_old = policy.generate(["a"], num_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples_old.samples, samples_before.samples)
    assert not torch.equal(
        policy.generate(["a"], num_steps=2, generator=torch.Generator().manual_seed(0)).samples, samples_before.samples
    )
