"""Smoke run of the benchmark on a tiny data set: it runs and reports, nothing timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VARIANTS = (
    "create-backup",
    "upload-limit",
    "baseline",
    "restore",
    "restore-limit",
    "incremental",
    "incremental, db written",
)
# The same again with the S3 server on a CPU of its own (the machine kind has 2).
SPLIT_VARIANTS = tuple(
    f"{name} [split]" for name in ("create-backup", "upload-limit", "restore", "restore-limit")
)


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a benchmark module as tox does, with the charm's sources importable."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_benchmark_produces_its_table_json_and_plot(tmp_path: Path) -> None:
    """`python -m bench` on 8 MiB prints the table and writes results.json and a PNG.

    Every variant runs, also with the S3 server on a CPU of its own, and each
    reports the CPU time of its processes and of the server.
    """
    out = tmp_path / "results"
    result = _run_module("bench", "--size-mib", "8", "--memory-size-mib", "0",
                         "--rounds", "1", "--out", str(out), "--workdir", "/var/tmp")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for variant in VARIANTS + SPLIT_VARIANTS:
        assert variant in result.stdout
    assert "create-backup / upload-limit >= 0.9" in result.stdout
    assert "create-backup / upload-limit [split] >= 0.9" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert {row["variant"] for row in results["summary"]} == set(VARIANTS + SPLIT_VARIANTS)
    assert all(row["mib-per-s"] > 0 for row in results["summary"])
    assert all(row["peak-rss-mib"] > 0 for row in results["summary"])
    # Every pipeline burns CPU, and every upload makes the S3 server work.
    assert all(row["cpu-s"] > 0 for row in results["summary"])
    uploads = [row for row in results["summary"] if row["variant"].startswith("create-backup")]
    assert all(row["server-cpu-s"] > 0 for row in uploads)
    programs = next(
        run["cpu_by_program"] for run in results["runs"] if run["variant"] == "create-backup"
    )
    assert programs["gpg"] > 0  # long-lived enough to be sampled: the S2K alone takes 0.2 s
    assert programs["aws"] > 0


def test_check_benchmark_runs_the_check_on_its_tree(tmp_path: Path) -> None:
    """`python -m bench.check_tar_read` on 3,000 directories: the check passes, and is measured."""
    out = tmp_path / "results"
    result = _run_module("bench.check_tar_read", "--directories", "3000", "--rounds", "1",
                         "--out", str(out), "--workdir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 1: check exited 0 in " in result.stdout
    results = json.loads((out / "check-tar-read.json").read_text())
    assert results["directories"] == 3000
    assert results["index-lines"] > 3000  # every leaf, and the levels above
    (run,) = results["runs"]
    assert run["status"] == 0
    assert run["stderr"] == ""
    assert run["peak-rss-mib"] > 0
