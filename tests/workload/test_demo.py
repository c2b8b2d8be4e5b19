"""The README's first command: the demo backs up, breaks and restores sample data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_backs_up_and_restores() -> None:
    """`python -m demo` runs to the end and says the data was restored."""
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--media-files", "20"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(OpenPGP, not a tar)" in result.stdout
    assert "restored: every backed-up file identical" in result.stdout
    assert "and it restored the data." in result.stdout
