"""A real Synapse (PyPI ``matrix-synapse``) as the Pebble service of a Harness container.

Harness records Pebble's service starts and stops without running anything.
`RealServices` makes them real: starting a service runs its command from the
plan in the `Sandbox` (as its user, in its working directory, with its
environment), stopping it sends SIGTERM as Pebble does. Pebble itself is still
Harness's stand-in; what runs is the real Synapse on the real files of the
container's ``/data``.

Synapse is not a test dependency of the charm: it lives in a virtualenv of
its own, named by ``SYNAPSE_PYTHON`` (tox makes it, see tox.ini), whose
``bin`` goes first on the sandbox's PATH so that the container's ``python3``
is the one with Synapse, as in the image.

`MatrixClient` talks to it over the client-server API on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from ops._private.harness import _TestingPebbleClient

from tests.helpers.sandbox import Sandbox, exec_args
from tests.helpers.seaweed import free_ports

STOP_TIMEOUT = 20.0


def synapse_python() -> Path:
    """Return the interpreter of the virtualenv holding Synapse.

    Returns:
        The path in ``SYNAPSE_PYTHON``, checked.

    Raises:
        RuntimeError: if it is not set or cannot import Synapse (a missing
            tool is a failure, never a skip).
    """
    given = os.environ.get("SYNAPSE_PYTHON")
    if not given:
        raise RuntimeError(
            "SYNAPSE_PYTHON is not set: run the tests through tox, which makes a "
            "virtualenv with matrix-synapse (see tox.ini), or point it at one"
        )
    python = Path(given)
    for directory in python.absolute().parents:
        if not directory.stat().st_mode & 0o001:  # Synapse runs as uid 991, not root
            raise RuntimeError(
                f"SYNAPSE_PYTHON={given} is not reachable by the Synapse user: {directory} "
                f"is mode {directory.stat().st_mode & 0o777:o}; make it searchable (o+x)"
            )
    try:
        synapse_version(python)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"SYNAPSE_PYTHON={given} cannot import synapse: {exc.stderr[-500:]}"
        ) from None
    return python


def synapse_version(python: Path) -> str:
    """Return the version of Synapse an interpreter imports.

    Args:
        python: the interpreter.

    Returns:
        ``synapse.__version__``.
    """
    # Without PYTHONPATH: tox's would import the charm's src/synapse.py instead.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    return subprocess.run(
        [str(python), "-c", "import synapse; print(synapse.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 now, never handed out before.

    From the same registry as the S3 servers' ports, so that a server started
    later in the test run is never given the port before Synapse binds it.

    Returns:
        The port.
    """
    return free_ports(1)[0]


class RealServices:
    """Runs the Pebble services of a Harness container for real, in a Sandbox."""

    def __init__(self, sandbox: Sandbox, log_dir: Path) -> None:
        """Prepare; nothing runs until `install` and a start.

        Args:
            sandbox: runs the service commands.
            log_dir: where each service's output goes (``<name>.log``).
        """
        self.sandbox = sandbox
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: list[str] = []
        self.enabled = True

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make Harness's service starts, stops and replans run the services.

        Args:
            monkeypatch: undoes it after the test.
        """
        services = self
        original_start = _TestingPebbleClient.start_services
        original_stop = _TestingPebbleClient.stop_services
        original_autostart = _TestingPebbleClient.autostart_services

        def start(
            client: _TestingPebbleClient, names: list[str], *args: Any, **kwargs: Any
        ) -> Any:
            change = original_start(client, names, *args, **kwargs)
            for name in names:
                services.start(client, name)
            return change

        def stop(client: _TestingPebbleClient, names: list[str], *args: Any, **kwargs: Any) -> Any:
            for name in names:
                services.stop(name)
            return original_stop(client, names, *args, **kwargs)

        def autostart(client: _TestingPebbleClient, *args: Any, **kwargs: Any) -> Any:
            result = original_autostart(client, *args, **kwargs)
            for name, service in client.get_plan().services.items():
                if service.startup == "enabled":
                    services.start(client, name)
            return result

        monkeypatch.setattr(_TestingPebbleClient, "start_services", start)
        monkeypatch.setattr(_TestingPebbleClient, "stop_services", stop)
        monkeypatch.setattr(_TestingPebbleClient, "autostart_services", autostart)

    def start(self, client: _TestingPebbleClient, name: str) -> None:
        """Start a service from the plan, unless it runs or running is disabled.

        Args:
            client: Harness's Pebble client, for the plan.
            name: the service.
        """
        if not self.enabled or self.is_running(name):
            return
        service = client.get_plan().services[name]
        args = exec_args(
            shlex.split(service.command),
            user_id=service.user_id,
            group_id=service.group_id,
            working_dir=service.working_dir,
            environment=dict(service.environment),
        )
        log = (self.log_dir / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            self.sandbox.argv(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.sandbox.environment(args),
            cwd="/",
            start_new_session=True,
        )
        log.close()
        self.starts.append(name)

    def is_running(self, name: str) -> bool:
        """Tell whether a service's process runs.

        Args:
            name: the service.

        Returns:
            True while it runs.
        """
        process = self.running.get(name)
        return process is not None and process.poll() is None

    def stop(self, name: str) -> None:
        """Stop a service as Pebble does: SIGTERM, then SIGKILL after STOP_TIMEOUT.

        Args:
            name: the service.
        """
        process = self.running.pop(name, None)
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        """Stop every service still running."""
        for name in list(self.running):
            self.stop(name)

    def log(self, name: str) -> str:
        """Return the tail of a service's output, for failure messages.

        Args:
            name: the service.

        Returns:
            Its last 3,000 characters.
        """
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class MatrixClient:
    """A minimal Matrix client-server API client for one user."""

    def __init__(self, base_url: str) -> None:
        """Talk to a homeserver.

        Args:
            base_url: e.g. ``http://127.0.0.1:8008``.
        """
        self.base_url = base_url
        self.token = ""

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        """Send one request.

        Args:
            method: the HTTP method.
            path: the path, with its query.
            body: a JSON body.
            raw: a raw body instead.
            content_type: the raw body's type.

        Returns:
            The status and the body.
        """
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base_url + path, data=data, method=method)  # noqa: S310 - http://127.0.0.1 only
        request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, method: str, path: str, body: object = None) -> Any:
        """Send a JSON request that must succeed.

        Args:
            method: the HTTP method.
            path: the path.
            body: the JSON body.

        Returns:
            The decoded answer.

        Raises:
            AssertionError: if the status is not 200.
        """
        status, answer = self.request(method, path, body)
        if status != 200:
            raise AssertionError(f"{method} {path}: {status} {answer[:500]!r}")
        return json.loads(answer)

    def wait_until_up(self, timeout: float, alive: Any) -> None:
        """Wait for /health to answer.

        Args:
            timeout: seconds to wait.
            alive: returns False once the server died (no point waiting).

        Raises:
            AssertionError: if it did not answer in time.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.request("GET", "/health")[0] == 200:
                    return
            if not alive():
                raise AssertionError("Synapse exited")
            time.sleep(0.5)
        raise AssertionError(f"Synapse did not answer /health within {timeout} s")

    def register_admin(self, user: str, password: str, shared_secret: str) -> None:
        """Register a user with the shared secret (Synapse's admin API) and keep its token.

        Args:
            user: the localpart.
            password: its password.
            shared_secret: homeserver.yaml's registration_shared_secret.
        """
        nonce = self.json("GET", "/_synapse/admin/v1/register")["nonce"]
        mac = hmac.new(shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), user.encode(), password.encode(), b"admin"]))
        answer = self.json(
            "POST",
            "/_synapse/admin/v1/register",
            {
                "nonce": nonce,
                "username": user,
                "password": password,
                "admin": True,
                "mac": mac.hexdigest(),
            },
        )
        self.token = answer["access_token"]

    def create_room(self, name: str) -> str:
        """Create a private room.

        Args:
            name: its name.

        Returns:
            Its id.
        """
        return str(self.json("POST", "/_matrix/client/v3/createRoom", {"name": name})["room_id"])

    def send(self, room_id: str, text: str) -> str:
        """Send a text message.

        Args:
            room_id: the room.
            text: the message.

        Returns:
            The event id.
        """
        txn = hashlib.sha256(f"{room_id}{text}{time.time_ns()}".encode()).hexdigest()[:16]
        room = urllib.parse.quote(room_id)
        path = f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"
        return str(self.json("PUT", path, {"msgtype": "m.text", "body": text})["event_id"])

    def messages(self, room_id: str) -> list[str]:
        """Return the text messages of a room, oldest first.

        Args:
            room_id: the room.

        Returns:
            Their bodies.
        """
        room = urllib.parse.quote(room_id)
        answer = self.json("GET", f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1000")
        return [
            event["content"]["body"]
            for event in reversed(answer["chunk"])
            if event["type"] == "m.room.message"
        ]

    def upload(self, content: bytes) -> str:
        """Upload media.

        Args:
            content: the bytes.

        Returns:
            Its mxc:// URI.
        """
        status, answer = self.request(
            "POST",
            "/_matrix/media/v3/upload?filename=photo.bin",
            raw=content,
            content_type="application/octet-stream",
        )
        assert status == 200, answer[:500]
        return str(json.loads(answer)["content_uri"])

    def download(self, uri: str) -> tuple[int, bytes]:
        """Download media.

        Args:
            uri: its mxc:// URI.

        Returns:
            The status and the bytes.
        """
        server_and_id = uri.removeprefix("mxc://")
        return self.request("GET", f"/_matrix/client/v1/media/download/{server_and_id}")


__all__ = ["MatrixClient", "RealServices", "free_port", "synapse_python", "synapse_version"]
