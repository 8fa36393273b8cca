"""The tree stays lint-clean (ruff) and type-clean (mypy), both configured in pyproject.toml:
unused imports, undefined names, syntax errors, a None where a value is needed and calls with
the wrong types fail the README's test command, not a later reader."""
import importlib.util
import shutil
import subprocess
import sys

import pytest

from cli_runner import REPO


def test_ruff_finds_nothing():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_mypy_finds_nothing():
    """tests/typecheck.py: mypy over the asyncps namespace as setup.py maps it, plus bench/ and
    examples/ (5-7 s cold on 2 busy cores, under 1 s with its cache in build/)."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "typecheck.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
