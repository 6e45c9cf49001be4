"""The code's style is checked, not argued: ruff's lint and its formatter (settings in pyproject.toml) pass on
every tracked Python file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_passes(command: list[str]) -> None:
    result = subprocess.run([str(RUFF), *command, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff {' '.join(command)} (run it to fix):\n{result.stdout}{result.stderr}"
