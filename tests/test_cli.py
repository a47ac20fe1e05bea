"""The command line: exit status, help by class name, quiet runs, config errors printed last, --cpu_threads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_sdrl import cli
from lightning_sdrl.cli import available_cpus, main, resolve_cpu_threads, run_cli
from lightning_sdrl.policies import LoRASettings

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "ddpo.yaml")


def console_script() -> list[str]:
    """The installed ``lightning-sdrl`` script, or a command doing exactly what its wrapper does."""
    script = Path(sys.executable).with_name("lightning-sdrl")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from lightning_sdrl.cli import main; sys.exit(main())"]


def run_console(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*console_script(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_console_script_exits_0_after_a_run_without_lightning_noise(tmp_path):
    result = run_console(
        [
            "fit",
            "-c",
            TINY,
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--cpu_threads=1",
        ],
        cwd=tmp_path,
    )
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    assert "`Trainer.fit` stopped: `max_epochs=1` reached" in printed  # the run did happen
    assert "LightningCLI object" not in printed
    assert "module(s) in eval mode at the start of training" not in printed
    assert "litlogger" not in printed
    assert "LeafSpec" not in printed


def test_console_script_prints_the_class_error_last_and_exits_2(tmp_path):
    with pytest.raises(ValueError) as expected:
        LoRASettings(rank=0)
    result = run_console(["fit", "-c", TINY, "--model.init_args.policy.init_args.lora.rank=0"], cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == cli.EXIT_CONFIG_ERROR, result.stderr
    assert lines[-1] == f"ValueError: {expected.value}"
    # the frame that raised it is shown; jsonargparse's dump of the Union members it tried is not
    assert any("lightning_sdrl/policies/lora.py" in line for line in lines)
    assert "Union" not in result.stderr and "Namespace(" not in result.stderr


def test_run_cli_reraises_the_error_of_the_class_as_itself(tmp_path):
    with pytest.raises(ValueError, match=r"^lora rank=0; expected >= 1") as raised:
        run_cli(
            [
                "fit",
                "-c",
                TINY,
                "--model.init_args.policy.init_args.lora.rank=0",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_run_cli_keeps_what_the_class_error_was_raised_from(tmp_path):
    model = tmp_path / "empty_model"
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (model / sub).mkdir(parents=True)
    with pytest.raises(OSError, match=r"could not load UNet2DConditionModel from .*empty_model/unet") as raised:
        run_cli(
            [
                "fit",
                "-c",
                str(ROOT / "configs" / "ddpo.yaml"),
                "--trainer.accelerator=cpu",
                "--trainer.precision=32",
                f"--trainer.default_root_dir={tmp_path}",
                f"--model.init_args.policy.init_args.pretrained_model_name_or_path={model}",
            ]
        )
    # our message, chained to the diffusers error it was raised from, not to jsonargparse's wrapper
    assert raised.value.__cause__ is not None and "could not load" not in str(raised.value.__cause__)
    assert "Union" not in str(raised.value) and "Union" not in str(raised.value.__cause__)


def test_model_help_by_class_name_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "DDPOModule"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "--model.clip_range" in printed and "--model.num_inner_epochs" in printed


def test_fit_help_lists_the_package_modules_by_path(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    printed = capsys.readouterr().out.replace("\n", "").replace(" ", "")
    for name in (
        "lightning_sdrl.modules.ddpo.DDPOModule",
        "lightning_sdrl.modules.refl.ReFLModule",
        "lightning_sdrl.data.sampling.SamplingDataModule",
    ):
        assert name in printed


def test_cpu_threads_is_applied_before_the_model_is_built(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run = run_cli(
            [
                "fit",
                "-c",
                TINY,
                "--cpu_threads=1",
                "--trainer.max_epochs=0",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
            ]
        )
        assert torch.get_num_threads() == 1
        assert run.config.fit.cpu_threads == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_rejects_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", TINY, "--cpu_threads=0"])
    assert exit_info.value.code == 2
    assert "cpu_threads" in capsys.readouterr().err


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        (None, 8),
        ("max 100000\n", 8),
        ("200000 100000\n", 2),
        ("250000 100000\n", 3),
        ("50000 100000\n", 1),
        ("1600000 100000\n", 8),
        ("garbage\n", 8),
    ],
)
def test_available_cpus_is_the_affinity_capped_by_the_cgroup_quota(eight_cpus, tmp_path, cpu_max, expected):
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert available_cpus(path) == expected
    assert resolve_cpu_threads("auto", path) == expected


def test_auto_threads_follow_omp_num_threads_when_set(eight_cpus, monkeypatch, tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("200000 100000\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert resolve_cpu_threads("auto", quota) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "3,2")  # nested OpenMP levels: the outer one
    assert resolve_cpu_threads("auto", quota) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert resolve_cpu_threads("auto", quota) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many'"):
        resolve_cpu_threads("auto", quota)


def test_explicit_cpu_threads_are_used_as_given(eight_cpus, tmp_path):
    assert resolve_cpu_threads(12, tmp_path / "cpu.max") == 12
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="cpu_threads="):
            resolve_cpu_threads(bad, tmp_path / "cpu.max")
