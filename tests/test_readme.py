"""The README's set-up commands stay true: they are the ones run here, on a tiny preset."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands():
    assert readme_commands() == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_make_run_prepares_trains_and_samples(tmp_path):
    """`make run` exactly as the README says, with the tiny preset and paths in a temporary folder."""
    command = readme_commands()[0].split() + [
        f"VENV={sys.prefix}",
        "CONFIG=configs/tiny.yaml",
        f"OVERRIDES=data.dir={tmp_path / 'data'} train.out_dir={tmp_path / 'run'}",
        f"RUN_DIR={tmp_path / 'run'}",
    ]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prepared: " in r.stdout and "vocab " in r.stdout
    assert f"trained 20 steps into {tmp_path / 'run'}" in r.stdout
    assert "\nROMEO:" in r.stdout  # the preset's sample prompt, followed by generated text
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
