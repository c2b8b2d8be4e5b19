"""The benchmark's target checks compare the measured ratios, not rounded ones."""

from __future__ import annotations

from bench.__main__ import MIB, Results, Run, summarise


def _run(variant: str, seconds: float) -> Run:
    return Run(variant=variant, data_bytes=1024 * MIB, seconds=seconds, peak_rss=MIB,
               transferred=1024 * MIB, cpu_seconds=1.0, server_cpu_seconds=1.0,
               cpu_by_program={})  # fmt: skip


def test_a_ratio_just_under_its_target_is_not_met() -> None:
    """Restore at 0.798x its limit (rounded, 0.80) does not meet 0.8; at 0.8x it does."""
    results = Results(machine={}, runs=[_run("restore", 5.883), _run("restore-limit", 4.696)])
    summarise(results)
    (target,) = [t for t in results.targets if t["target"] == "restore / restore-limit >= 0.8"]
    assert target == {"target": "restore / restore-limit >= 0.8", "value": 0.798, "met": False}

    results = Results(machine={}, runs=[_run("restore", 5.0), _run("restore-limit", 4.0)])
    summarise(results)
    (target,) = [t for t in results.targets if t["target"] == "restore / restore-limit >= 0.8"]
    assert target["met"] is True
