"""Constants and State builders shared by the Scenario (ops.testing) unit tests."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable
from typing import Any

import ops
import yaml
from ops import testing

import backup
import synapse

SERVER_NAME = "example.com"
# Distinctive values: a test fails if any of them shows up in a status or action message.
ACCESS_KEY = "AKIAUNITTESTACCESSKEY"
SECRET_KEY = "unit-test-s3-secret-key-9f3c"
PASSPHRASE = "unit-test-backup-passphrase-71ab"
SECRET_VALUES = (ACCESS_KEY, SECRET_KEY, PASSPHRASE)

CREDENTIALS = testing.Secret(tracked_content={"access-key": ACCESS_KEY, "secret-key": SECRET_KEY})
PASSPHRASE_SECRET = testing.Secret(tracked_content={"passphrase": PASSPHRASE})
CREDENTIALS_WITHOUT_SECRET_KEY = testing.Secret(tracked_content={"access-key": ACCESS_KEY})
CREDENTIALS_WITHOUT_ACCESS_KEY = testing.Secret(tracked_content={"secret-key": SECRET_KEY})
PASSPHRASE_SECRET_WRONG_KEY = testing.Secret(tracked_content={"password": PASSPHRASE})
# A well-formed secret id that no secret in any State has: "not granted / not found".
UNKNOWN_SECRET_ID = "secret:" + "0123456789abcdefghij"

ALL_SECRETS = (
    CREDENTIALS,
    PASSPHRASE_SECRET,
    CREDENTIALS_WITHOUT_SECRET_KEY,
    CREDENTIALS_WITHOUT_ACCESS_KEY,
    PASSPHRASE_SECRET_WRONG_KEY,
)

VALID_S3_CONFIG: dict[str, str] = {
    "s3-bucket": "synapse-backups",
    "s3-endpoint": "https://s3.example.com",
    "s3-credentials": CREDENTIALS.id,
    "backup-passphrase": PASSPHRASE_SECRET.id,
}


def homeserver_yaml(server_name: str = SERVER_NAME) -> str:
    """Return a homeserver.yaml like the one Synapse generates.

    Args:
        server_name: its server_name.

    Returns:
        The YAML document.
    """
    return yaml.safe_dump(
        {
            "server_name": server_name,
            "pid_file": "/data/homeserver.pid",
            "listeners": [
                {
                    "port": synapse.SYNAPSE_PORT,
                    "tls": False,
                    "type": "http",
                    "x_forwarded": True,
                    "bind_addresses": ["::1", "127.0.0.1"],
                    "resources": [{"names": ["client", "federation"], "compress": False}],
                },
                {"port": 9000, "type": "metrics", "bind_addresses": ["127.0.0.1"]},
            ],
            "database": {"name": "sqlite3", "args": {"database": "/data/homeserver.db"}},
            "media_store_path": "/data/media_store",
            "signing_key_path": f"/data/{server_name}.signing.key",
        },
        sort_keys=False,
    )


def synapse_container(
    data_dir: pathlib.Path,
    *,
    can_connect: bool = True,
    running: bool = True,
    check: ops.pebble.CheckStatus | None = ops.pebble.CheckStatus.UP,
    planned: bool = True,
    execs: Iterable[testing.Exec] = (),
    mount_data: bool = True,
) -> testing.Container:
    """Return the synapse container, with /data mounted from a local directory.

    Args:
        data_dir: the local directory behind /data.
        can_connect: whether Pebble answers.
        running: whether the synapse service is running.
        check: the status of the synapse-ready check, or None for no check.
        planned: whether the charm's layer is already in the plan.
        execs: the canned commands.
        mount_data: mount data_dir as /data. Scenario mounts it as a symlink,
            which Container.isdir reports as no directory (Pebble sees a
            volume as one); without the mount, the test makes /data itself
            inside the event (Scenario's container filesystem lives only there).

    Returns:
        The container.
    """
    layers = {synapse.SERVICE_NAME: ops.pebble.Layer(synapse.pebble_layer())} if planned else {}
    statuses = (
        {
            synapse.SERVICE_NAME: ops.pebble.ServiceStatus.ACTIVE
            if running
            else ops.pebble.ServiceStatus.INACTIVE
        }
        if planned
        else {}
    )
    check_infos = (
        [testing.CheckInfo(synapse.CHECK_NAME, level=ops.pebble.CheckLevel.READY, status=check)]
        if planned and check is not None
        else []
    )
    return testing.Container(
        synapse.CONTAINER_NAME,
        can_connect=can_connect,
        layers=layers,
        service_statuses=statuses,
        check_infos=check_infos,
        mounts={"data": testing.Mount(location=backup.DATA_DIR, source=data_dir)}
        if mount_data
        else {},
        execs=frozenset(execs),
    )


def make_state(
    data_dir: pathlib.Path,
    config: dict[str, Any],
    *,
    secrets: Iterable[testing.Secret] = ALL_SECRETS,
    leader: bool = True,
    **container_options: Any,
) -> testing.State:
    """Return a State with the synapse container and the given config and secrets.

    Args:
        data_dir: the local directory behind /data.
        config: the charm config.
        secrets: the secrets granted to the charm.
        leader: whether the unit is the leader (a single unit is).
        container_options: passed to synapse_container.

    Returns:
        The state.
    """
    return testing.State(
        config=config,
        leader=leader,
        secrets=list(secrets),
        containers=[synapse_container(data_dir, **container_options)],
    )
