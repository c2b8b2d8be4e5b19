"""Smoke run of the benchmark on a tiny data set: it runs and reports, nothing timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("create-backup", "upload-limit", "baseline", "restore", "restore-limit", "incremental")


def test_benchmark_produces_its_table_json_and_plot(tmp_path: Path) -> None:
    """`python -m bench` on 8 MiB prints the table and writes results.json and a PNG."""
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--size-mib", "8", "--memory-size-mib", "0",
         "--rounds", "1", "--out", str(out), "--workdir", "/var/tmp"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for variant in VARIANTS:
        assert variant in result.stdout
    assert "create-backup / upload-limit >= 0.9" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert {row["variant"] for row in results["summary"]} == set(VARIANTS)
    assert all(row["mib-per-s"] > 0 for row in results["summary"])
    assert all(row["peak-rss-mib"] > 0 for row in results["summary"])
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
