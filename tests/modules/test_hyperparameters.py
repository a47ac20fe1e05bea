"""A module's saved hyper-parameters are exactly its own constructor's arguments, so a checkpoint re-builds it."""

import inspect

import pytest

from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.modules.flow_pretrain import FlowMatchingPretrainModule
from lightning_sdrl.modules.grpo import GRPOModule
from lightning_sdrl.modules.pretrain import DiffusionPretrainModule
from lightning_sdrl.policies.pixel_flow import PixelFlowArchitecture
from lightning_sdrl.rewards.simple import Brightness
from tests.modules.test_grpo import tiny_policy

OBJECTS = {"policy": tiny_policy, "reward": Brightness}


def own_arguments(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


@pytest.mark.parametrize("cls", [DDPOModule, GRPOModule])
def test_fine_tuning_modules_record_their_own_arguments_and_rebuild_from_them(cls):
    module = cls(tiny_policy(), Brightness(), num_steps=3, guidance_scale=1.0)
    recorded = set(module.hparams)
    assert recorded <= own_arguments(cls)
    assert recorded == own_arguments(cls) - {
        "policy",
        "reward",
        "optimizer",
        "lr_scheduler",
        "evaluation",
        "advantages",
    }
    rebuilt = cls(tiny_policy(), Brightness(), **module.hparams)  # what validate / fit --ckpt_path do
    assert rebuilt.settings == module.settings


def test_grpo_records_its_names_and_runs_ddpo_with_the_renamed_settings():
    module = GRPOModule(tiny_policy(), Brightness(), num_steps=3, noise_level=0.5, beta=0.2)
    assert module.hparams.noise_level == 0.5 and module.hparams.beta == 0.2
    assert not {"eta", "kl_reference_coef", "trust_region", "advantages"} & set(module.hparams)
    assert module.settings.eta == 0.5 and module.settings.kl_reference_coef == 0.2
    assert module.settings.trust_region == "clip"


def test_a_subclass_with_other_arguments_does_not_record_its_parents():
    module = FlowMatchingPretrainModule(
        PixelFlowArchitecture(sample_size=8, num_layers=1, attention_heads=2, attention_head_dim=8), val_noise_level=0.3
    )
    assert set(module.hparams) == own_arguments(FlowMatchingPretrainModule)
    assert "val_eta" in own_arguments(DiffusionPretrainModule) and "val_eta" not in module.hparams
