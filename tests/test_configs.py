"""Every shipped config parses (no unknown keys, right types) without loading any model."""

from pathlib import Path

import pytest

from lightning_sdrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert {"ddpo.yaml", "tiny/ddpo.yaml"} <= {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.strip() for line in readme.splitlines() if line.strip().startswith("python -m pytest"))
    assert command in ci
