"""Conditioning: named per-sample tensors (SD3-style pairs, SDXL time ids, class labels)."""

import pytest
import torch

from lightning_sdrl.policies import Conditioning, Trajectory


def sd3_like(batch, value=1.0):
    return Conditioning(
        prompt_embeds=torch.full((batch, 5, 4), value), pooled_prompt_embeds=torch.full((batch, 4), value)
    )


def test_select_cat_and_guidance_stacking_keep_every_tensor_row_aligned():
    cond = Conditioning(prompt_embeds=torch.arange(12.0).view(3, 2, 2), time_ids=torch.arange(3).view(3, 1))
    picked = cond.select(torch.tensor([2, 0]))
    assert torch.equal(picked["prompt_embeds"], cond["prompt_embeds"][[2, 0]])
    assert torch.equal(picked["time_ids"], torch.tensor([[2], [0]]))
    both = Conditioning.cat([cond, picked])
    assert both.batch_size == 5 and both.names == ["prompt_embeds", "time_ids"]
    guided = sd3_like(2).with_null(sd3_like(2, 0.0).to(torch.float64))
    assert guided.batch_size == 4 and guided["prompt_embeds"].dtype == torch.float32  # null cast to ours
    assert torch.equal(guided["pooled_prompt_embeds"][:2], torch.zeros(2, 4))  # unconditional rows first
    assert dict(**sd3_like(1).expand(3))["prompt_embeds"].shape == (3, 5, 4)


def test_to_keeps_integer_labels_integer():
    cond = Conditioning(class_labels=torch.tensor([1, 2]), embeds=torch.zeros(2, 3))
    moved = cond.to(torch.float64)
    assert moved["class_labels"].dtype == torch.long and moved["embeds"].dtype == torch.float64


def test_bad_conditioning_is_a_clear_error():
    with pytest.raises(ValueError, match="share their first"):
        Conditioning(a=torch.zeros(2, 3), b=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="different names"):
        Conditioning.cat([Conditioning(a=torch.zeros(1)), Conditioning(b=torch.zeros(1))])


def test_trajectories_select_and_cat_their_conditioning():
    def trajectory(batch, value):
        return Trajectory(
            latents=torch.zeros(batch, 3, 1, 2, 2),
            timesteps=torch.zeros(batch, 2, dtype=torch.long),
            log_probs=torch.zeros(batch, 2),
            conditions=sd3_like(batch, value),
            prompt_ids=torch.arange(batch),
            prompts=[str(i) for i in range(batch)],
            images=torch.zeros(batch, 3, 2, 2),
        )

    joined = Trajectory.cat([trajectory(2, 1.0), trajectory(1, 2.0)])
    assert joined.conditions.batch_size == 3
    last = joined.select(torch.tensor([2]))
    assert torch.equal(last.conditions["pooled_prompt_embeds"], torch.full((1, 4), 2.0)) and last.prompts == ["0"]
