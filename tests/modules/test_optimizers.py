"""Per-layer learning-rate scales (``LoRASettings.lr_scales``) through ``build_optimizer`` and DDPO."""

import pytest
import torch
from torch import nn

from lightning_sdrl.modules.optimizers import build_optimizer
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from tests.modules.test_ddpo import tiny_data, tiny_module, tiny_trainer

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def two_groups(seed=0):
    torch.manual_seed(seed)
    a, b, c = (nn.Parameter(torch.randn(3)) for _ in range(3))
    return [{"params": [a, c], "lr_scale": 0.1}, {"params": [b], "lr_scale": 1.0}]


def test_each_group_steps_at_its_scaled_rate():
    groups = two_groups()
    start = [p.detach().clone() for g in groups for p in g["params"]]
    optimizer = build_optimizer(sgd(2.0), groups)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 2.0])
    params = [p for g in groups for p in g["params"]]
    sum((p**2).sum() for p in params).backward()
    optimizer.step()
    # d/dp sum p^2 = 2p: p - lr * scale * 2p, computed by hand
    for p, p0, rate in zip(params, start, [0.2, 0.2, 2.0], strict=True):
        torch.testing.assert_close(p.detach(), p0 - rate * 2 * p0)


def test_one_unscaled_group_is_the_factory_on_the_plain_parameter_list():
    params = [nn.Parameter(torch.ones(2))]
    optimizer = build_optimizer(sgd(0.5), [{"params": params, "lr_scale": 1.0}])
    assert optimizer.state_dict()["param_groups"] == torch.optim.SGD(params, lr=0.5).state_dict()["param_groups"]
    with pytest.raises(ValueError, match="no trainable parameters; check its lora settings"):
        build_optimizer(sgd(0.5), [{"params": [], "lr_scale": 1.0}])


def test_a_schedule_decays_every_scaled_rate_and_a_resumed_optimizer_keeps_them():
    groups = two_groups()
    optimizer = build_optimizer(sgd(1.0), groups)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        sum((p**2).sum() for g in groups for p in g["params"]).backward()
        optimizer.step()
        schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.025, 0.25])
    # a resume builds the optimiser again (at the scaled starting rates), then loads the saved state
    fresh = build_optimizer(sgd(1.0), groups)
    fresh_schedule = torch.optim.lr_scheduler.ExponentialLR(fresh, gamma=0.5)
    fresh.load_state_dict(optimizer.state_dict())
    fresh_schedule.load_state_dict(schedule.state_dict())
    fresh_schedule.step()
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([0.0125, 0.125])


def test_lora_lr_scale_matches_layers_as_peft_targets_do():
    settings = LoRASettings(
        target_modules=[*ATTENTION, "conv1", "resnets.0.conv1"],
        lr_scales={"conv1": 0.1, "resnets.0.conv1": 0.01, "to_q": 2.0},
    )
    assert settings.lr_scale("unet.up_blocks.1.resnets.1.conv1.lora_A.default.weight") == 0.1
    assert settings.lr_scale("unet.up_blocks.1.resnets.0.conv1.lora_B.default.weight") == 0.01  # longest key wins
    assert settings.lr_scale("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight") == 2.0
    assert settings.lr_scale("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.default.weight") == 1.0
    assert settings.lr_scale("unet.down_blocks.0.resnets.0.xconv1.lora_A.default.weight") == 1.0  # not a dotted part


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ({"conv1": 0.1}, r"lr_scales names \['conv1'\], which are not in target_modules"),
        ({"to_q": 0.0}, "each scale must be a finite number > 0"),
        ({"to_q": float("nan")}, "each scale must be a finite number > 0"),
    ],
)
def test_lora_lr_scales_refuse_what_cannot_apply(scales, message):
    with pytest.raises(ValueError, match=message):
        LoRASettings(target_modules=ATTENTION, lr_scales=scales)


def test_policy_groups_cover_every_trainable_parameter_once_in_order():
    settings = LoRASettings(
        rank=2, target_modules=[*ATTENTION, "conv1", "conv2"], lr_scales={"conv1": 0.1, "conv2": 0.1}
    )
    policy = RandomTextToImagePolicy("tiny-pixel", lora=settings)
    groups = policy.parameter_groups()
    assert sorted(g["lr_scale"] for g in groups) == [0.1, 1.0]
    names = {id(p): n for n, p in policy.named_parameters()}
    for group in groups:
        assert all(
            (".conv1." in names[id(p)] or ".conv2." in names[id(p)]) == (group["lr_scale"] == 0.1)
            for p in group["params"]
        )
    flat = [id(p) for g in groups for p in g["params"]]
    assert sorted(flat) == sorted(id(p) for p in policy.trainable_parameters()) and len(set(flat)) == len(flat)
    assert [
        g["lr_scale"] for g in RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=2)).parameter_groups()
    ] == [1.0]


def lora_deltas(scales, tmp_path):
    """One DDPO update with SGD lr 1 (one optimiser step): each adapter weight's change."""
    module = tiny_module(optimizer=sgd(1.0), max_grad_norm=None, train_batch_size=8, num_inner_epochs=1)
    settings = LoRASettings(rank=4, target_modules=[*ATTENTION, "conv1", "conv2"], lr_scales=scales)
    module.policy = RandomTextToImagePolicy("tiny-pixel", lora=settings)
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero, which leaves lora_A without a gradient
        for name, parameter in module.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    tiny_trainer(tmp_path, epochs=1).fit(module, tiny_data(seed=0))
    return {n: p.detach() - before[n] for n, p in module.policy.named_parameters() if p.requires_grad}


def test_ddpo_applies_each_layers_scale_to_its_update(tmp_path):
    plain = lora_deltas({}, tmp_path / "plain")
    scaled = lora_deltas({"conv1": 0.25, "conv2": 0.25}, tmp_path / "scaled")
    convs = [n for n in plain if ".conv1." in n or ".conv2." in n]
    assert convs and len(convs) < len(plain)
    assert all(plain[n].abs().max() > 0 for n in plain)
    for name in plain:
        expected = plain[name] * (0.25 if name in convs else 1.0)
        # atol: float32 rounding of weights ~0.05 (the deltas themselves are >= 1e-5, asserted)
        assert plain[name].abs().max() > 1e-5
        torch.testing.assert_close(scaled[name], expected, rtol=1e-4, atol=2e-8)
