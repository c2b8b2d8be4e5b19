"""Fixtures for the Scenario (ops.testing) unit tests."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from unittest import mock

import pytest
from ops import testing

import backup
from charm import SynapseCharm
from tests.unit.builders import homeserver_yaml


@pytest.fixture(scope="session", autouse=True)
def host_data_dir_left_as_found() -> Iterator[None]:
    """Remove the empty /data that tests running the backup script on this host leave.

    The script copies the database into a directory on the data volume,
    /data (see backup_container.SNAPSHOT_DIR_PREFIX), and removes that
    directory, but ``mkdir -p`` made /data itself when the host had none.
    Only an empty /data this session made is removed.
    """
    data = pathlib.Path("/data")
    existed = data.exists()
    yield
    if not existed and data.is_dir() and not any(data.iterdir()):
        data.rmdir()


@pytest.fixture
def ctx() -> testing.Context[SynapseCharm]:
    """A Scenario context for the charm (metadata, config and actions from the repo)."""
    return testing.Context(SynapseCharm)


@pytest.fixture
def extra_ctx() -> testing.Context[SynapseCharm]:
    """A Scenario context for unit 1: a unit added by scaling out, which runs no Synapse."""
    return testing.Context(SynapseCharm, unit_id=1)


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """An empty local directory mounted as the container's /data."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def configured_data_dir(data_dir: pathlib.Path) -> pathlib.Path:
    """A /data holding the homeserver.yaml Synapse generated for SERVER_NAME."""
    (data_dir / "homeserver.yaml").write_text(homeserver_yaml())
    return data_dir


@pytest.fixture(autouse=True)
def check_bucket() -> Iterator[mock.MagicMock]:
    """Patch S3Client.check_bucket, which talks to a real S3 server.

    This stands for S3 in unit tests (the real client is exercised against
    SeaweedFS in tests/workload). By default the bucket is usable; tests set
    ``side_effect`` to an S3Error to stand for a bucket S3 refuses.
    """
    with mock.patch.object(backup.S3Client, "check_bucket", autospec=True) as patched:
        patched.return_value = None
        yield patched
