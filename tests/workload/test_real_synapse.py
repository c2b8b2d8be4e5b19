"""Back up and restore a real Synapse, through the charm's actions.

Synapse is PyPI's matrix-synapse, run from its own virtualenv (see
tests/helpers/real_synapse.py): the charm generates its configuration with
Synapse's own --generate-config, Synapse runs as the Pebble service would (as
the Synapse user, in the sandbox) and writes its SQLite database and media
store while the backup runs; the restore stops it, swaps the data in, starts
it again and waits for its real /health. Pebble is still Harness's stand-in
(its service calls start and stop the real process); S3 is SeaweedFS on
127.0.0.1.

Adjustments for a shared machine, in the test only: Synapse listens on a
free port of 127.0.0.1 (the charm binds 0.0.0.0:8008 inside its pod), the
charm's health URL points at that port, Synapse has no trusted key server
(the network stays on loopback), and its message rate limit lets a test
thread write while the backup runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ops import testing

import backup
import synapse
from charm import SynapseCharm
from tests.helpers.real_synapse import (
    MatrixClient,
    RealServices,
    free_port,
    synapse_python,
    synapse_version,
)
from tests.helpers.sandbox import Sandbox, default_path, honor_pebble_ownership
from tests.helpers.seaweed import SeaweedServer
from tests.workload.conftest import parameters_for
from tests.workload.test_charm_action import configure

FIRST_START_TIMEOUT = 180.0  # the first start creates the whole schema on 2 vCPUs


@pytest.fixture
def real_synapse(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[testing.Harness[SynapseCharm], RealServices]]:
    """The charm in Harness over an empty /data, with a real Synapse as its service."""
    python = synapse_python()
    honor_pebble_ownership(monkeypatch)
    harness = testing.Harness(SynapseCharm)
    harness.set_can_connect("synapse", True)
    harness.set_leader(True)
    harness.begin()
    root = harness.get_filesystem_root("synapse")
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "data").mkdir(exist_ok=True)
    sandbox = Sandbox(root, path_dirs=[str(python.parent), *default_path()])
    harness.handle_exec("synapse", [], handler=sandbox.handle)
    services = RealServices(sandbox, tmp_path)
    services.install(monkeypatch)
    try:
        yield harness, services
    finally:
        services.stop_all()
        harness.cleanup()


def _listen_on_loopback(config_path: Path, port: int) -> str:
    """Move Synapse's client listener to 127.0.0.1:port; return its shared secret."""
    config = yaml.safe_load(config_path.read_text())
    (listener,) = [item for item in config["listeners"] if item["port"] == synapse.SYNAPSE_PORT]
    listener["port"] = port
    listener["bind_addresses"] = ["127.0.0.1"]
    config["trusted_key_servers"] = []  # never asks matrix.org for keys: loopback only
    config["suppress_key_server_warning"] = True
    config["rc_message"] = {"per_second": 100, "burst_count": 100}  # the writer thread
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(config["registration_shared_secret"])


def _start(
    harness: testing.Harness[SynapseCharm],
    services: RealServices,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[MatrixClient, str]:
    """Let the charm generate the configuration, adjust it, and start Synapse.

    Returns:
        A client of the running Synapse, and its registration shared secret.
    """
    services.enabled = False  # generate the configuration first; start once it is adjusted
    harness.container_pebble_ready("synapse")
    data = harness.get_filesystem_root("synapse") / "data"
    assert (data / "homeserver.yaml").exists(), "the charm did not generate the configuration"
    port = free_port()
    shared_secret = _listen_on_loopback(data / "homeserver.yaml", port)
    monkeypatch.setattr(synapse, "HEALTH_URL", f"http://localhost:{port}/health")
    services.enabled = True
    harness.model.unit.get_container("synapse").replan()
    client = MatrixClient(f"http://127.0.0.1:{port}")
    try:
        client.wait_until_up(FIRST_START_TIMEOUT, lambda: services.is_running("synapse"))
    except AssertionError as error:
        raise AssertionError(f"{error}\n{services.log('synapse')}") from None
    return client, shared_secret


@contextlib.contextmanager
def _writing(client: MatrixClient, room: str) -> Iterator[list[str]]:
    """Send messages to a room from another thread until the block ends.

    Yields:
        The messages sent, in order (complete once the block ended).
    """
    writer = MatrixClient(client.base_url)
    writer.token = client.token
    sent: list[str] = []
    stop = threading.Event()
    started = threading.Event()

    def write() -> None:
        while not stop.is_set() and len(sent) < 500:  # messages() reads the last 1,000
            text = f"during the backup {len(sent)}"
            writer.send(room, text)
            sent.append(text)
            started.set()

    thread = threading.Thread(target=write)
    thread.start()
    assert started.wait(30), "the writer could not send"
    try:
        yield sent
    finally:
        stop.set()
        thread.join(60)
    assert len(sent) >= 2


def _restore(
    harness: testing.Harness[SynapseCharm], services: RealServices, backup_id: str
) -> None:
    """Restore a backup and check Synapse was stopped, started again and answers."""
    starts = services.starts.count("synapse")
    restored = harness.run_action("restore-backup", {"backup-id": backup_id})
    assert restored.results["previous-data"] == "removed"  # only once /health answered
    assert services.starts.count("synapse") == starts + 1, "not stopped and started again"
    assert services.is_running("synapse"), services.log("synapse")


def test_a_real_synapse_comes_back_from_each_backup_of_its_chain(
    real_synapse: tuple[testing.Harness[SynapseCharm], RealServices],
    s3_server: SeaweedServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each restore brings back what Synapse had at that backup, and only that.

    A full backup is taken while another client sends messages, an
    incremental one after more messages and media, and more come after it. Restoring
    the incremental backup (its chain: the full one, then it) and then the
    full one gives each time a Synapse that answers /health and serves
    exactly the messages and media of that moment (for the full backup, a
    consistent cut of the messages sent while it ran).
    """
    harness, services = real_synapse
    configure(harness, s3_server, bucket)
    client, shared_secret = _start(harness, services, monkeypatch)
    client.register_admin("alice", "correct horse battery staple", shared_secret)
    room = client.create_room("backups")
    client.send(room, "before the full backup")
    first = os.urandom(300_000)
    first_uri = client.upload(first)

    with _writing(client, room) as during:
        full = harness.run_action("create-backup").results
    assert full["type"] == "full"
    assert services.is_running("synapse")  # a backup never stops Synapse
    client.send(room, "between the backups")
    second = os.urandom(50_000)
    second_uri = client.upload(second)
    time.sleep(1.05)  # backup ids are to the second
    incremental = harness.run_action("create-backup").results
    assert (incremental["type"], incremental["parent"]) == ("incremental", full["backup-id"])
    client.send(room, "after the backups")
    lost_uri = client.upload(os.urandom(1000))

    _restore(harness, services, incremental["backup-id"])

    client.wait_until_up(30, lambda: services.is_running("synapse"))
    messages = client.messages(room)  # alice's token was issued before the first backup
    assert messages == ["before the full backup", *during, "between the backups"]
    assert client.download(first_uri) == (200, first)
    assert client.download(second_uri) == (200, second)
    assert client.download(lost_uri)[0] == 404

    _restore(harness, services, full["backup-id"])

    client.wait_until_up(30, lambda: services.is_running("synapse"))
    messages = client.messages(room)  # a consistent copy: what was sent up to some point
    assert messages == ["before the full backup", *during[: len(messages) - 1]]
    assert client.download(first_uri) == (200, first)
    assert client.download(second_uri)[0] == 404
    parameters = parameters_for(s3_server, bucket, path="homeserver/backups")  # configure()'s
    manifest = backup.S3Client(parameters).get_manifest(full["backup-id"])
    assert manifest.metadata["synapse-version"] == synapse_version(synapse_python())
