"""Benchmark of the backup and restore pipelines against SeaweedFS on loopback.

Generates a synthetic Synapse data set (incompressible media in files of
log-normal sizes, plus a SQLite database), starts SeaweedFS on 127.0.0.1 and
runs, interleaved over several rounds, each variant as the charm runs it
(the same command builders, as the Synapse user, in the bubblewrap stand-in
for the workload container):

- upload-limit: ``aws s3 cp`` of a ready file as large as our archive;
- create-backup: our pipeline;
- baseline: tar | gpg (defaults) | aws with max_concurrent_requests=1;
- restore: our restore pipeline into a staging directory;
- restore-limit: ``aws s3 cp s3://... - | tar -x`` of an unencrypted tar.

Each run's peak RSS is the largest sum of the RSS of all its processes,
sampled every 20 ms. Prints a table, writes JSON and a PNG plot.

Run with ``tox -e bench`` (as root); ``-- --size-mib 64 --rounds 1`` for a
quick run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import backup
import backup_chain
import backup_container
from tests.helpers.sandbox import Sandbox, exec_args
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import SYNAPSE_GID, SYNAPSE_UID, create_database, homeserver_config

MIB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")
STALL_FLOOR = 10 * MIB  # bytes per second: a run slower than this (or 2 min) is stuck
RETRIES = 2  # a stalled run is run again, at most this often
SPLIT = " [split]"  # the variant run with the S3 server on a CPU of its own
SPLIT_VARIANTS = ("create-backup", "upload-limit", "restore", "restore-limit")
BUCKET = "bench"
PASSPHRASE = "benchmark passphrase"
SERVER_NAME = "bench.example"


@dataclass
class Run:
    """One measured run.

    Attributes:
        variant: what ran.
        data_bytes: the size of the data set.
        seconds: wall time.
        peak_rss: peak RSS of all its processes together, in bytes.
        transferred: bytes sent to or read from S3.
        cpu_seconds: CPU time (user and system) of all its processes, sampled
            every 20 ms (what a process used after its last sample is missed).
        server_cpu_seconds: CPU time of the S3 server meanwhile.
        cpu_by_program: the same per program name.
    """

    variant: str
    data_bytes: int
    seconds: float
    peak_rss: int
    transferred: int
    cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0
    cpu_by_program: dict[str, float] = field(default_factory=dict)


@dataclass
class Results:
    """Everything a benchmark run measured.

    Attributes:
        machine: where it ran.
        runs: every run.
        summary: medians per variant and data size.
        targets: each target, its value and whether it is met.
        stalls: the runs that made no progress and were killed (and run again).
    """

    machine: dict[str, str]
    runs: list[Run] = field(default_factory=list)
    summary: list[dict[str, float | str | int]] = field(default_factory=list)
    targets: list[dict[str, object]] = field(default_factory=list)
    stalls: list[str] = field(default_factory=list)


def tree_sample(pid: int) -> tuple[int, dict[int, tuple[str, float]]]:
    """Return the summed RSS of a process and its descendants, and their CPU times.

    Args:
        pid: the top process.

    Returns:
        Bytes, and each process's name and CPU seconds so far.
    """
    total, stack, cpu = 0, [pid], {}
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
            cpu[current] = _process_cpu(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    stack += [int(child) for child in (task / "children").read_text().split()]
    return total, cpu


@dataclass
class Measured:
    """What one command cost.

    Attributes:
        seconds: wall time.
        peak_rss: peak RSS of its process tree, in bytes.
        cpu_seconds: CPU time of its process tree, sampled.
        server_cpu_seconds: CPU time of the S3 server meanwhile.
        cpu_by_program: the same per program name.
    """

    seconds: float
    peak_rss: int
    cpu_seconds: float
    server_cpu_seconds: float
    cpu_by_program: dict[str, float]


def _process_cpu(pid: int) -> tuple[str, float]:
    """Return a process's name and CPU seconds (all its threads).

    Args:
        pid: the process.

    Returns:
        Its name and utime + stime.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return text[text.index("(") + 1 : text.rindex(")")], (
        int(fields[11]) + int(fields[12])
    ) / TICKS


def group_pids(group: int) -> list[int]:
    """Return the processes of a process group.

    Args:
        group: the group's id.

    Returns:
        Their pids.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == group:
                    pids.append(int(entry.name))
    return pids


def group_cpu(group: int) -> float:
    """Return the CPU seconds used so far by a process group (the S3 server).

    Args:
        group: the group's id.

    Returns:
        Seconds.
    """
    total = 0.0
    for pid in group_pids(group):
        with contextlib.suppress(OSError):
            total += _process_cpu(pid)[1]
    return total


class StalledError(RuntimeError):
    """A run made no progress: it was killed."""


def measure(
    argv: list[str],
    env: dict[str, str],
    *,
    server_group: int,
    cpus: str | None = None,
    timeout: float = 3600.0,
) -> Measured:
    """Run a command, sampling the RSS and CPU time of its process tree.

    Args:
        argv: the command.
        env: its environment.
        server_group: the S3 server's process group, whose CPU time is counted too.
        cpus: the CPUs to run it on (a taskset list), or None for any.
        timeout: seconds after which it is killed as stalled.

    Returns:
        What it cost.

    Raises:
        RuntimeError: if the command fails.
        StalledError: if it did not finish in time.
    """
    if cpus is not None:
        argv = ["taskset", "--cpu-list", cpus, *argv]
    server_before = group_cpu(server_group)
    started = time.monotonic()
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    peak = 0
    last_cpu: dict[int, tuple[str, float]] = {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            rss, cpu = tree_sample(process.pid)
            peak = max(peak, rss)
            last_cpu.update(cpu)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, stderr = process.communicate(timeout=timeout)
        seconds = time.monotonic() - started
    except subprocess.TimeoutExpired:
        raise StalledError(f"{argv[-1][:200]!r} did not finish in {timeout:.0f} s") from None
    finally:  # also on Ctrl-C: the pipeline has its own session and would go on
        done.set()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        sampler.join()
    if process.returncode:
        raise RuntimeError(f"{argv[-1][:200]!r} failed: {stderr.decode(errors='replace')[-2000:]}")
    by_program: dict[str, float] = {}
    for name, cpu in last_cpu.values():
        by_program[name] = round(by_program.get(name, 0.0) + cpu, 2)
    return Measured(
        seconds=seconds,
        peak_rss=peak,
        cpu_seconds=sum(cpu for _, cpu in last_cpu.values()),
        server_cpu_seconds=group_cpu(server_group) - server_before,
        cpu_by_program=by_program,
    )


def make_data(root: Path, size: int, seed: int = 1) -> int:
    """Lay out a Synapse data directory with ``size`` bytes of incompressible media.

    Args:
        root: the container root.
        size: bytes of media.
        seed: random seed of the file sizes.

    Returns:
        The bytes written, database included.
    """
    import yaml

    rng = random.Random(seed)  # noqa: S311 - sizes, not secrets
    data = root / "data"
    media = data / "media_store" / "local_content"
    media.mkdir(parents=True)
    (data / "homeserver.yaml").write_text(yaml.safe_dump(homeserver_config(SERVER_NAME)))
    (data / f"{SERVER_NAME}.signing.key").write_text("ed25519 a_bench key\n")
    create_database(data / "homeserver.db", rows=600_000)  # about 25 MB
    written, index = 0, 0
    chunk = os.urandom(8 * MIB)
    while written < size:
        length = min(size - written, max(4096, int(rng.lognormvariate(12.3, 1.2))))
        name = f"{index:08x}"
        path = media / name[:2] / name[2:4] / name[4:]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            remaining = length
            while remaining:
                offset = rng.randrange(0, len(chunk) - 1)
                piece = chunk[offset : offset + remaining]
                file.write(piece)
                remaining -= len(piece)
        written += length
        index += 1
    for path in [data, *data.rglob("*")]:
        os.lchown(path, SYNAPSE_UID, SYNAPSE_GID)
    return written + (data / "homeserver.db").stat().st_size


class Bench:
    """The benchmark's fixtures: a server, a container root and a sandbox."""

    def __init__(self, workdir: Path, server: SeaweedServer):
        """Prepare the container root and the S3 parameters.

        Args:
            workdir: scratch space (not under /tmp: the sandbox owns /tmp).
            server: the S3 server.
        """
        self.root = workdir / "container"
        (self.root / "tmp").mkdir(parents=True)
        (self.root / "tmp").chmod(0o1777)
        self.sandbox = Sandbox(self.root)
        self.server = server
        self.client_cpus: str | None = None  # where the pipelines run: None for any CPU
        self.timeout = 120.0  # seconds before a run counts as stalled
        self.s3 = backup.S3Parameters.model_validate(
            {
                "access-key": server.access_key,
                "secret-key": server.secret_key,
                "endpoint": server.endpoint,
                "region": "us-east-1",
                "bucket": BUCKET,
                "path": "bench",
            }
        )
        self.work_dir = "/tmp/bench-work"
        host_work = self.root / "tmp/bench-work"
        (host_work / backup_container.GNUPG_DIR).mkdir(parents=True, mode=0o700)
        (host_work / backup.PASSPHRASE_FILE).write_text(PASSPHRASE)
        (host_work / backup_container.AWS_CONFIG_FILE).write_text(
            backup_container.build_aws_config(self.s3)
        )
        (host_work / backup_container.AWS_DOWNLOAD_CONFIG_FILE).write_text(
            backup_container.build_aws_config(self.s3, download=True)
        )
        baseline = backup_container.build_aws_config(self.s3).replace(
            f"max_concurrent_requests = {backup.S3_MAX_CONCURRENT_REQUESTS}",
            "max_concurrent_requests = 1",
        )
        (host_work / "aws-config-baseline").write_text(baseline)
        for path in [host_work, *host_work.rglob("*")]:
            os.lchown(path, SYNAPSE_UID, SYNAPSE_GID)
            path.chmod(0o700 if path.is_dir() else 0o600)
        self.env = backup.get_environment(self.s3, work_dir=self.work_dir)

    def run(self, command: list[str], *, env: dict[str, str] | None = None, root: bool = False):
        """Run a command in the sandbox as the charm would.

        Args:
            command: the command.
            env: extra environment.
            root: run as root (restore) instead of the Synapse user.

        Returns:
            What it cost.
        """
        ids = {} if root else {"user_id": SYNAPSE_UID, "group_id": SYNAPSE_GID}
        args = exec_args(command, environment={**self.env, **(env or {})}, **ids)
        return measure(
            self.sandbox.argv(args), self.sandbox.environment(args),
            server_group=self.server.pid, cpus=self.client_cpus, timeout=self.timeout,
        )  # fmt: skip

    def shell(self, script: str, **kwargs: object):
        """Run a bash script in the sandbox.

        Args:
            script: the script.
            **kwargs: as for run.

        Returns:
            What it cost.
        """
        return self.run(["bash", "-c", script], **kwargs)  # type: ignore[arg-type]


class Variants:
    """The variants to measure; each method runs one once.

    Each returns what it cost and the bytes sent to or read from S3.
    """

    def __init__(self, bench: Bench, data_bytes: int):
        """Prepare the variants.

        Args:
            bench: the fixtures.
            data_bytes: the size of the data set.
        """
        self.bench = bench
        self.paths = ["/data/homeserver.yaml", f"/data/{SERVER_NAME}.signing.key",
                      "/data/media_store/local_content"]  # fmt: skip
        self.passphrase_file = f"{bench.work_dir}/{backup.PASSPHRASE_FILE}"
        self.expected = backup._expected_size(data_bytes)
        self.client = bench.server.client()
        self.host_work = bench.root / bench.work_dir.lstrip("/")
        self.archive_size = 0
        self.plain_size = 0
        self.rounds = 0

    def all(self) -> dict[str, Callable[[], tuple[Measured, int]]]:
        """Return the variants by name, in the order they run in a round.

        Returns:
            The variants.
        """
        return {
            "create-backup": self.ours,
            "upload-limit": self.limit,
            "baseline": self.baseline,
            "restore": self.restore,
            "restore-limit": self.restore_limit,
            "incremental": self.incremental,
            "incremental, db written": self.incremental_database,
        }

    def _size(self, key: str) -> int:
        return int(self.client.head_object(Bucket=BUCKET, Key=f"bench/{key}")["ContentLength"])

    def _backup_command(self, key: str, snar: str, database_state: str | None) -> list[str]:
        return backup.build_backup_command(
            self.bench.s3, key, self.paths, self.passphrase_file, expected_size=self.expected,
            database_path="/data/homeserver.db", work_dir=self.bench.work_dir,
            snapshot_file=f"{self.bench.work_dir}/{snar}", database_state=database_state,
        )  # fmt: skip

    def ours(self) -> tuple[Measured, int]:
        """Our create-backup pipeline, a full backup."""
        self.rounds += 1
        (self.host_work / "full.snar").unlink(missing_ok=True)
        (self.host_work / backup_chain.DATABASE_STATE_FILE).unlink(missing_ok=True)
        self._at_rest()
        cost = self.bench.run(self._backup_command("ours", "full.snar", None))
        shutil.copy2(self.host_work / "full.snar", self.host_work / "base.snar")
        # As the charm keeps them for the next backup: tar's state and the database's fingerprint.
        recorded = self.host_work / backup_chain.DATABASE_STATE_FILE
        (self.host_work / "base.db-state").unlink(missing_ok=True)
        if recorded.exists():  # not when the database was written in the last two seconds
            shutil.copy2(recorded, self.host_work / "base.db-state")
            os.chown(self.host_work / "base.db-state", SYNAPSE_UID, SYNAPSE_GID)
        self.archive_size = self._size("ours")
        return cost, self.archive_size

    def _at_rest(self) -> None:
        """Wait until the database was last written two seconds ago, and clear leftovers.

        A backup records no fingerprint of a database written in the last two
        seconds; a run killed as stalled leaves its copy (its trap did not run).
        """
        stat = (self.bench.root / "data/homeserver.db").stat()
        age = time.time() - max(stat.st_mtime, stat.st_ctime)
        time.sleep(max(0.0, 2.1 - age))
        for leftover in (self.bench.root / "data").glob(
            backup_container.SNAPSHOT_DIR_PREFIX + "*"
        ):
            shutil.rmtree(leftover)

    def _incremental_on_full(self, key: str) -> tuple[Measured, int]:
        """Run an incremental backup on this round's full one (its state and fingerprint)."""
        self._at_rest()
        shutil.copy2(self.host_work / "base.snar", self.host_work / f"{key}.snar")
        os.chown(self.host_work / f"{key}.snar", SYNAPSE_UID, SYNAPSE_GID)
        command = self._backup_command(key, f"{key}.snar", f"{self.bench.work_dir}/base.db-state")
        cost = self.bench.run(command)
        return cost, self._size(key)

    def incremental(self) -> tuple[Measured, int]:
        """An incremental backup after 1% of the media changed since this round's full one."""
        media = sorted((self.bench.root / "data/media_store/local_content").rglob("*"))
        files = [path for path in media if path.is_file()]
        rng = random.Random(self.rounds)  # noqa: S311 - picks files, not secrets
        for path in rng.sample(files, max(1, len(files) // 100)):
            path.write_bytes(os.urandom(path.stat().st_size))
        return self._incremental_on_full("incremental")

    def incremental_database(self) -> tuple[Measured, int]:
        """The same, after Synapse also wrote to its database: it is copied again."""
        connection = sqlite3.connect(self.bench.root / "data/homeserver.db")
        try:
            with connection:
                connection.execute(
                    "INSERT INTO events (event_id, body) VALUES (?, 'written')",
                    (f"$bench{self.rounds}",),
                )
        finally:
            connection.close()  # the last connection: SQLite removes its -wal and -shm
        return self._incremental_on_full("incremental-db")

    def limit(self) -> tuple[Measured, int]:
        """The upload limit: aws s3 cp of a ready file as large as our archive."""
        ready = self.bench.root / "tmp/ready.bin"
        if not ready.exists() or ready.stat().st_size != self.archive_size:
            with ready.open("wb") as file:
                for offset in range(0, self.archive_size, 8 * MIB):
                    file.write(os.urandom(min(8 * MIB, self.archive_size - offset)))
            os.chown(ready, SYNAPSE_UID, SYNAPSE_GID)
        url = self.bench.s3.object_url("limit")
        command = f"aws s3 cp --only-show-errors --no-progress /tmp/ready.bin {url}"
        cost = self.bench.shell(command)
        return cost, self.archive_size

    def baseline(self) -> tuple[Measured, int]:
        """The baseline: tar | gpg (defaults) | aws with one request at a time."""
        members = " ".join(path.lstrip("/") for path in self.paths)
        script = (
            f"set -o pipefail; tar -c -C / {members} data/homeserver.db"
            f" | gpg --batch --no-symkey-cache --pinentry-mode loopback"
            f" --passphrase-file {self.passphrase_file} --symmetric"
            f" | aws s3 cp --only-show-errors - {self.bench.s3.object_url('baseline')}"
        )
        env = {"AWS_CONFIG_FILE": f"{self.bench.work_dir}/aws-config-baseline"}
        cost = self.bench.shell(script, env=env)
        return cost, self._size("baseline")

    def restore(self) -> tuple[Measured, int]:
        """Our restore pipeline into a staging directory."""
        staging = self.bench.root / "data/.bench-staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        command = backup.build_restore_command(
            self.bench.s3, "ours", self.passphrase_file,
            staging_dir="/data/.bench-staging", work_dir=self.bench.work_dir,
        )  # fmt: skip
        cost = self.bench.run(command, root=True)
        shutil.rmtree(staging)
        return cost, self.archive_size

    def restore_limit(self) -> tuple[Measured, int]:
        """The restore limit: the same streaming GET as restore, into ``tar -x``, of a plain tar.

        That is our restore without gpg and the digest. (``aws s3 cp s3://...
        -`` stalled for good in the sandbox at 1 GiB, into a pipe or
        /dev/null, with 1 or 4 requests, in every try on 2026-11-26.)
        """
        url = self.bench.s3.object_url("plain")
        if not self.plain_size:
            members = " ".join(path.lstrip("/") for path in self.paths)
            self.bench.shell(
                f"set -o pipefail; tar -c -C / {members}"
                f" | aws s3 cp --only-show-errors --expected-size {self.expected} - {url}"
            )
            self.plain_size = self._size("plain")
        staging = self.bench.root / "data/.bench-plain"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        config = f"{self.bench.work_dir}/{backup_container.AWS_DOWNLOAD_CONFIG_FILE}"
        get = (
            f"aws s3api get-object --bucket {BUCKET} --key={self.bench.s3.object_key('plain')}"
            " /dev/fd/3 3>&1 >/dev/null"
        )
        script = f"set -o pipefail; {get} | tar -x -C /data/.bench-plain"
        cost = self.bench.shell(script, root=True, env={"AWS_CONFIG_FILE": config})
        shutil.rmtree(staging)
        return cost, self.plain_size


def _run_variant(
    variant: Callable[[], tuple[Measured, int]], name: str, results: Results
) -> tuple[Measured, int]:
    """Run a variant once, again if it stalled (each stall is recorded).

    Args:
        variant: the variant.
        name: its name, layout included.
        results: where stalls are recorded.

    Returns:
        What the run that finished cost, and the bytes it moved.

    Raises:
        StalledError: if it stalled every time.
    """
    for attempt in range(RETRIES + 1):
        try:
            return variant()
        except StalledError as exc:
            results.stalls.append(f"{name}: {exc}")
            print(f"{name} stalled and was killed ({exc})", flush=True)
            if attempt == RETRIES:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def pin(group: int, cpus: set[int]) -> None:
    """Move every thread of a process group (the S3 server) to some CPUs.

    Args:
        group: the process group.
        cpus: the CPUs.
    """
    for pid in group_pids(group):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(int(task.name), cpus)
        if os.sched_getaffinity(pid) != cpus:
            raise RuntimeError(f"could not move the S3 server (pid {pid}) to CPUs {cpus}")


def run_size(
    workdir: Path, size: int, rounds: int, results: Results, only: set[str], *, split: bool
) -> None:
    """Measure every variant on one data size, interleaved over rounds.

    Args:
        workdir: scratch space.
        size: bytes of media.
        rounds: how many rounds.
        results: where runs go.
        only: the variants to run (empty: all).
        split: also run the transfer variants with the S3 server on a CPU of
            its own and the pipelines on the others.
    """
    cpus = os.sched_getaffinity(0)
    with SeaweedServer(workdir / "s3") as server:
        server.create_bucket(BUCKET)
        bench = Bench(workdir, server)
        print(f"generating {size // MIB} MiB of media ...", flush=True)
        data_bytes = make_data(bench.root, size)
        time.sleep(2.1)  # at rest: a database written in the last two seconds is always copied
        bench.timeout = max(120.0, data_bytes / STALL_FLOOR)
        todo = Variants(bench, data_bytes).all()
        names = [name for name in todo if not only or name in only or name == "create-backup"]
        layouts = [("", names)]
        if split:
            layouts.append((SPLIT, [name for name in names if name in SPLIT_VARIANTS]))
        for round_number in range(rounds):
            for layout, layout_names in layouts:
                clients = cpus - {max(cpus)} if layout else cpus
                pin(server.pid, {max(cpus)} if layout else cpus)
                os.sched_setaffinity(0, clients)  # the sampler too stays off the server's CPU
                bench.client_cpus = ",".join(map(str, sorted(clients))) if layout else None
                for name in layout_names:
                    cost, transferred = _run_variant(todo[name], name + layout, results)
                    results.runs.append(Run(
                        name + layout, data_bytes, cost.seconds, cost.peak_rss, transferred,
                        round(cost.cpu_seconds, 2), round(cost.server_cpu_seconds, 2),
                        cost.cpu_by_program,
                    ))  # fmt: skip
                    print(f"round {round_number + 1}: {name + layout:<24} {cost.seconds:7.2f} s "
                          f"{data_bytes / MIB / cost.seconds:8.1f} MiB/s  "
                          f"peak {cost.peak_rss / MIB:7.1f} MiB  CPU {cost.cpu_seconds:6.2f} s"
                          f"  S3 server CPU {cost.server_cpu_seconds:6.2f} s",
                          flush=True)  # fmt: skip
            pin(server.pid, cpus)
            os.sched_setaffinity(0, cpus)
            bench.client_cpus = None


def summarise(results: Results) -> None:
    """Compute medians and check the targets.

    Args:
        results: the runs; summary and targets are filled in.
    """
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in results.runs:
        groups.setdefault((run.variant, run.data_bytes), []).append(run)
    median_seconds: dict[tuple[str, int], float] = {}  # unrounded: targets compare these
    for (variant, data_bytes), runs in sorted(groups.items(), key=lambda item: item[0][1]):
        seconds = statistics.median(run.seconds for run in runs)
        median_seconds[(variant, round(data_bytes / MIB))] = seconds
        results.summary.append(
            {
                "variant": variant,
                "data-mib": round(data_bytes / MIB),
                "seconds": round(seconds, 2),
                "mib-per-s": round(data_bytes / MIB / seconds, 1),
                "peak-rss-mib": round(max(run.peak_rss for run in runs) / MIB, 1),
                "transferred-mib": round(
                    statistics.median(run.transferred for run in runs) / MIB, 1
                ),
                "cpu-s": round(statistics.median(run.cpu_seconds for run in runs), 2),
                "server-cpu-s": round(
                    statistics.median(run.server_cpu_seconds for run in runs), 2
                ),
                "rounds": len(runs),
            }
        )
    by = {(row["variant"], row["data-mib"]): row for row in results.summary}
    smallest = min(row["data-mib"] for row in results.summary)

    def ratio(a: str, b: str) -> float | None:
        """Return a's throughput over b's (the same data): b's median time over a's."""
        if (a, smallest) not in median_seconds or (b, smallest) not in median_seconds:
            return None
        return median_seconds[(b, smallest)] / median_seconds[(a, smallest)]

    checks = [
        ("create-backup / upload-limit", ratio("create-backup", "upload-limit"), 0.9),
        ("create-backup / baseline", ratio("create-backup", "baseline"), 2.0),
        ("restore / restore-limit", ratio("restore", "restore-limit"), 0.8),
    ]
    if ("create-backup" + SPLIT, smallest) in by:
        checks += [
            (f"create-backup / upload-limit{SPLIT}",
             ratio("create-backup" + SPLIT, "upload-limit" + SPLIT), 0.9),
            (f"restore / restore-limit{SPLIT}",
             ratio("restore" + SPLIT, "restore-limit" + SPLIT), 0.8),
        ]  # fmt: skip
    for name, value, target in checks:
        results.targets.append(
            {
                "target": f"{name} >= {target}",
                "value": None if value is None else round(value, 3),
                "met": value is not None and value >= target,  # unrounded: 0.798 is not 0.8
            }
        )
    full = by.get(("create-backup", smallest))
    incremental = by.get(("incremental", smallest))
    if full and incremental:
        bytes_ratio = float(incremental["transferred-mib"]) / float(full["transferred-mib"])
        time_ratio = float(incremental["seconds"]) / float(full["seconds"])
        results.targets += [
            {"target": "incremental (1% changed) bytes / full bytes < 0.03",
             "value": round(bytes_ratio, 3), "met": bytes_ratio < 0.03},
            {"target": "incremental (1% changed) time / full time < 0.15",
             "value": round(time_ratio, 3), "met": time_ratio < 0.15},
        ]  # fmt: skip
    for variant in ("create-backup", "restore"):
        peaks = [
            float(row["peak-rss-mib"]) for row in results.summary if row["variant"] == variant
        ]
        if peaks:
            results.targets.append(
                {
                    "target": f"{variant} peak RSS <= 200 MiB at every size",
                    "value": max(peaks),
                    "met": max(peaks) <= 200,
                }
            )


def print_table(results: Results) -> None:
    """Print the summary and the targets.

    Args:
        results: the summarised results.
    """
    print(f"\n{'variant':<24} {'data MiB':>9} {'seconds':>8} {'MiB/s':>8} {'peak MiB':>9}"
          f" {'S3 MiB':>8} {'CPU s':>7} {'S3 server CPU s':>16} rounds")  # fmt: skip
    for row in results.summary:
        print(f"{row['variant']:<24} {row['data-mib']:>9} {row['seconds']:>8} "
              f"{row['mib-per-s']:>8} {row['peak-rss-mib']:>9} {row['transferred-mib']:>8}"
              f" {row['cpu-s']:>7} {row['server-cpu-s']:>16} {row['rounds']:>6}")  # fmt: skip
    print()
    for target in results.targets:
        print(
            f"{'met    ' if target['met'] else 'NOT met'}  {target['target']}: {target['value']}"
        )
    for stall in results.stalls:
        print(f"stalled and run again: {stall}")


def plot(results: Results, path: Path) -> None:
    """Render throughput and peak memory per variant as a PNG.

    Args:
        results: the summarised results.
        path: the PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["data-mib"] for row in results.summary})
    variant_names = list(dict.fromkeys(str(row["variant"]) for row in results.summary))
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    width = 0.8 / max(1, len(sizes))
    for offset, size in enumerate(sizes):
        rows = {row["variant"]: row for row in results.summary if row["data-mib"] == size}
        xs = [index + offset * width for index in range(len(variant_names))]
        left.bar(xs, [float(rows[v]["mib-per-s"]) if v in rows else 0 for v in variant_names],
                 width, label=f"{size} MiB")  # fmt: skip
        right.bar(xs, [float(rows[v]["peak-rss-mib"]) if v in rows else 0 for v in variant_names],
                  width, label=f"{size} MiB")  # fmt: skip
    for axis, title in ((left, "throughput (MiB/s, median)"), (right, "peak RSS (MiB)")):
        axis.set_xticks(
            [index + width * (len(sizes) - 1) / 2 for index in range(len(variant_names))]
        )
        axis.set_xticklabels(variant_names, rotation=35, ha="right")
        axis.set_title(title)
        axis.legend()
    right.axhline(200, color="red", linestyle="--", linewidth=1)
    figure.suptitle(
        f"Synapse backup pipelines, SeaweedFS on loopback ({results.machine['cpus']} CPUs)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    """Run the benchmark.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="media for the speed runs")
    parser.add_argument("--memory-size-mib", type=int, default=4096,
                        help="a second, larger size for the memory runs (0: skip)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated variants")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--no-split", action="store_true",
                        help="skip the runs with the S3 server on a CPU of its own")  # fmt: skip
    options = parser.parse_args()
    if os.geteuid() != 0:
        print("the benchmark runs the pipelines as uid 991 in a sandbox: run as root")
        return 2
    if not options.no_split and len(os.sched_getaffinity(0)) < 2:
        print("the [split] runs give the S3 server a CPU of its own: they need 2 CPUs"
              " (or run with --no-split)")  # fmt: skip
        return 2
    if not options.no_split and not shutil.which("taskset"):
        print("the [split] runs need taskset (util-linux), or run with --no-split")
        return 2
    options.out.mkdir(parents=True, exist_ok=True)
    results = Results(
        machine={
            "cpus": str(os.cpu_count()),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // MIB} MiB",
        }
    )
    only = {name for name in options.only.split(",") if name}
    sizes = [(options.size_mib, options.rounds)]
    if options.memory_size_mib:
        sizes.append((options.memory_size_mib, 1))
    for size_mib, rounds in sizes:
        workdir = Path(tempfile.mkdtemp(prefix="synapse-bench-", dir=options.workdir))
        try:
            variants_here = only if size_mib == options.size_mib else {"create-backup", "restore"}
            speed = size_mib == options.size_mib
            run_size(workdir, size_mib * MIB, rounds, results, variants_here,
                     split=speed and not options.no_split)  # fmt: skip
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    summarise(results)
    print_table(results)
    (options.out / "results.json").write_text(json.dumps(asdict(results), indent=2))
    plot(results, options.out / "results.png")
    print(f"\nwrote {options.out / 'results.json'} and {options.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
