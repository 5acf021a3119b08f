"""The repository keeps its promises: CI runs README's test command, shipped configs load."""

import re
from pathlib import Path

import pytest

from polar_train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [line for block in blocks[:2] for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    install_and_demo, install_and_test = readme_commands()
    assert "pytest" in install_and_test and "configs/demo.yaml" in install_and_demo
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert install_and_test in ci_lines


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.data.train_files
