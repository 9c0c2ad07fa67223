"""ruff over the package and the tests, with pyproject.toml's settings: a finding fails the suite
(and so CI). Skipped only where ruff is not installed (it comes with the `test` extras)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUFF = [sys.executable, "-m", "ruff"]
RUFF_MISSING = subprocess.run([*RUFF, "--version"], capture_output=True).returncode != 0


@pytest.mark.skipif(RUFF_MISSING, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_finds_nothing():
    result = subprocess.run([*RUFF, "check", "ffcv_imagenet", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
