"""Fixtures for the workload tests: real S3, real bash, tar, gpg and aws CLI.

Pebble and Kubernetes cannot run here. The container is ops' Harness stand-in:
its filesystem is a real directory, and every exec runs for real in a
bubblewrap sandbox where that directory is the container's /data and /tmp,
as the Synapse user (uid 991). Nothing else is simulated.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ops
import pytest
from botocore.exceptions import BotoCoreError, ClientError
from ops import testing

from backup import S3Parameters
from charm import SynapseCharm
from tests.helpers.sandbox import Sandbox, SynapseHealth, honor_pebble_ownership
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import make_synapse_data

SERVER_NAME = "demo.example"
PASSPHRASE = "correct horse battery staple 'quoted' $(not run)"
# Pebble service starts and stops: ("start_services" or "stop_services", names).
ServiceCalls = list[tuple[str, tuple[str, ...]]]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS server shared by the session's tests."""
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def bucket(s3_server: SeaweedServer) -> Iterator[str]:
    """A new empty bucket, deleted with its objects after the test.

    SeaweedFS gives every bucket volumes of its own, and has a limited number:
    with a bucket per test left behind, it answered InternalError to uploads
    late in the session.
    """
    name = f"backups-{secrets.token_hex(6)}"
    s3_server.create_bucket(name)
    yield name
    if s3_server.running:
        _delete_bucket(s3_server.client(), name)


def _delete_bucket(client: Any, name: str) -> None:
    """Delete a bucket, its objects and its unfinished uploads; a broken server is let be.

    Args:
        client: a boto3 S3 client of the server.
        name: the bucket.
    """
    with contextlib.suppress(BotoCoreError, ClientError):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(
                Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        client.delete_bucket(Bucket=name)


def parameters_for(server: SeaweedServer, bucket: str, path: str = "synapse/prod") -> S3Parameters:
    """Return S3 parameters for a bucket of a server.

    Args:
        server: the S3 server.
        bucket: the bucket.
        path: the prefix of the backups.

    Returns:
        The parameters.
    """
    return S3Parameters.model_validate(
        {
            "access-key": server.access_key,
            "secret-key": server.secret_key,
            "endpoint": server.endpoint,
            "region": "us-east-1",
            "bucket": bucket,
            "path": path,
        }
    )


@pytest.fixture
def s3_parameters(s3_server: SeaweedServer, bucket: str) -> S3Parameters:
    """S3 parameters for the test's bucket."""
    return parameters_for(s3_server, bucket)


@pytest.fixture
def synapse_health() -> SynapseHealth:
    """Synapse's health endpoint as the charm's probe sees it."""
    return SynapseHealth()


@pytest.fixture
def harness(
    monkeypatch: pytest.MonkeyPatch, synapse_health: SynapseHealth
) -> Iterator[testing.Harness[SynapseCharm]]:
    """The charm in Harness, with sample Synapse data and real exec."""
    honor_pebble_ownership(monkeypatch)
    harness = testing.Harness(SynapseCharm)
    harness.set_can_connect("synapse", True)
    harness.set_leader(True)  # a single unit is the leader
    harness.begin()
    root = harness.get_filesystem_root("synapse")
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)
    make_synapse_data(root, SERVER_NAME)
    sandbox = Sandbox(root)
    harness.handle_exec("synapse", [], handler=sandbox.handle)
    synapse_health.answer_in(harness)
    yield harness
    harness.cleanup()


@pytest.fixture
def container(harness: testing.Harness[SynapseCharm]) -> ops.Container:
    """The Synapse container of the harness."""
    return harness.model.unit.get_container("synapse")


@pytest.fixture
def root(harness: testing.Harness[SynapseCharm]) -> Path:
    """The container's filesystem root."""
    return harness.get_filesystem_root("synapse")


def decrypt_and_extract(encrypted: bytes, passphrase: str, target: Path) -> None:
    """Decrypt a backup with the host's gpg and extract it as root, like a restore.

    Args:
        encrypted: the object's bytes.
        passphrase: the passphrase.
        target: the directory to extract into.

    Raises:
        CalledProcessError: if gpg or tar fail.
    """
    gnupg = target.parent / f"gnupg-{secrets.token_hex(4)}"
    gnupg.mkdir(mode=0o700)
    passphrase_file = gnupg / "passphrase"
    passphrase_file.write_text(passphrase)
    env = {**os.environ, "GNUPGHOME": str(gnupg)}
    try:
        tar = subprocess.run(
            [
                "gpg",
                "--batch",
                "--quiet",
                "--pinentry-mode",
                "loopback",
                "--passphrase-file",
                str(passphrase_file),
                "--decrypt",
            ],
            input=encrypted,
            capture_output=True,
            env=env,
            check=True,
        ).stdout
    finally:
        subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "gpg-agent"], check=False)
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "tar",
            "--extract",
            "--file=-",
            "--same-owner",
            "--same-permissions",
            "--numeric-owner",
            f"--directory={target}",
        ],
        input=tar,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def service_calls(monkeypatch: pytest.MonkeyPatch) -> ServiceCalls:
    """Record the Pebble service starts and stops (Harness only simulates them)."""
    from ops._private.harness import _TestingPebbleClient

    calls: ServiceCalls = []
    for name in ("start_services", "stop_services"):
        original = getattr(_TestingPebbleClient, name)

        def record(self, services, *args, _original=original, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls.append((_name, tuple(services)))
            return _original(self, services, *args, **kwargs)

        monkeypatch.setattr(_TestingPebbleClient, name, record)
    return calls
