"""Every shipped config parses (no unknown keys, right types) without loading any model."""

from pathlib import Path

import pytest

from lightning_sdrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
REWARD_SERVER_CONFIGS = sorted((ROOT / "configs" / "reward_server").glob("*.yaml"))
REWARD_FRAGMENTS = sorted((ROOT / "configs" / "rewards").glob("*.yaml"))  # set a training config's reward
CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p not in REWARD_SERVER_CONFIGS and p not in REWARD_FRAGMENTS
)


def test_there_are_configs():
    assert {"ddpo.yaml", "tiny/ddpo.yaml"} <= {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


@pytest.mark.parametrize("config", REWARD_SERVER_CONFIGS, ids=lambda p: p.name)
def test_reward_server_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-reward", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "port:" in printed


@pytest.mark.parametrize("fragment", REWARD_FRAGMENTS, ids=lambda p: p.name)
def test_reward_fragment_parses_on_top_of_a_training_config(fragment, capsys):
    """``fit -c configs/nft_sd3.yaml -c configs/rewards/X.yaml``: the fragment's reward replaces the config's."""
    import yaml

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs" / "nft_sd3.yaml"), "-c", str(fragment), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    wanted = yaml.safe_load(fragment.read_text())["model"]["init_args"]
    got = printed["model"]["init_args"]
    assert got["reward"]["class_path"] == wanted["reward"]["class_path"]
    for key, value in wanted["reward"]["init_args"].items():
        if key != "rewards":
            assert got["reward"]["init_args"][key] == value, key
    for key in set(wanted) - {"reward"}:
        assert got[key] == wanted[key], key


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.strip() for line in readme.splitlines() if line.strip().startswith("python -m pytest"))
    assert command in ci
