"""The charm's create-backup action, from Juju config to an object in S3.

The action runs through the real ops.Container API; its execs run for real
(bash, tar, gpg, aws CLI) in the bubblewrap stand-in for the container, and
the S3 server is a real SeaweedFS. Only Juju and Pebble are Harness's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ops import testing

import backup
from charm import SynapseCharm
from tests.helpers.operator import configure_backups
from tests.helpers.sandbox import Sandbox
from tests.helpers.seaweed import SeaweedServer
from tests.workload.conftest import PASSPHRASE, SERVER_NAME, decrypt_and_extract


def configure(
    harness: testing.Harness[SynapseCharm],
    server: SeaweedServer,
    bucket: str,
    *,
    secret_key: str | None = None,
) -> None:
    """Set the charm's config as an operator would, with granted user secrets.

    Args:
        harness: the harness.
        server: the S3 server.
        bucket: the bucket.
        secret_key: the secret key to store (default: the right one).
    """
    configure_backups(
        harness,
        server,
        bucket,
        passphrase=PASSPHRASE,
        server_name=SERVER_NAME,
        path="/homeserver//backups/",
        secret_key=secret_key,
    )


def test_create_backup_action_uploads_an_encrypted_backup(
    harness: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    """Juju config -> action -> tar | gpg | aws in the container -> S3."""
    configure(harness, s3_server, bucket)

    output = harness.run_action("create-backup")

    backup_id = output.results["backup-id"]
    assert backup.BACKUP_ID_PATTERN.fullmatch(backup_id)
    assert int(output.results["size"]) > 0
    assert float(output.results["duration"]) >= 0
    assert output.logs, "the action reports progress"
    client = s3_server.client()
    key = f"homeserver/backups/{backup_id}"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert len(body) == int(output.results["size"])
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key=key + ".manifest.json")["Body"].read()
    )
    assert manifest["backup-id"] == backup_id
    assert manifest["server-name"] == SERVER_NAME
    decrypt_and_extract(body, PASSPHRASE, tmp_path / "restored")
    assert (tmp_path / "restored/data/homeserver.yaml").read_bytes() == (
        harness.get_filesystem_root("synapse") / "data/homeserver.yaml"
    ).read_bytes()
    # No secret in the results or the progress messages.
    shown = json.dumps(output.results) + "\n".join(output.logs)
    assert s3_server.secret_key not in shown
    assert PASSPHRASE not in shown


def test_action_fails_with_wrong_credentials_and_status_names_them(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """A wrong secret key blocks the unit (naming s3-credentials) and fails the action."""
    configure(harness, s3_server, bucket, secret_key="not-the-secret")
    harness.evaluate_status()
    status = harness.model.unit.status
    assert isinstance(status, testing.BlockedStatus) or status.name == "blocked"
    assert "s3-credentials" in status.message
    with pytest.raises(testing.ActionFailed) as failure:
        harness.run_action("create-backup")
    assert "not-the-secret" not in failure.value.message
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_action_fails_naming_a_missing_tool(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """An image without the aws CLI fails the action with a message naming it."""
    root = harness.get_filesystem_root("synapse")
    bin_dir = root / "test-bin"  # the sandbox binds it at /test-bin
    bin_dir.mkdir()
    for directory in Sandbox(root).path_dirs:
        for entry in sorted(Path(directory).glob("*")):
            target = bin_dir / entry.name
            if entry.name != "aws" and not target.exists():
                target.symlink_to(entry)
    harness.handle_exec("synapse", [], handler=Sandbox(root, path_dirs=["/test-bin"]).handle)
    configure(harness, s3_server, bucket)
    with pytest.raises(testing.ActionFailed, match=r"lacks aws\b"):
        harness.run_action("create-backup")


def test_action_without_backup_config_says_what_to_set(
    harness: testing.Harness[SynapseCharm],
) -> None:
    """With no S3 options the unit is not blocked and the action lists what to set."""
    harness.update_config({"server-name": SERVER_NAME})
    with pytest.raises(testing.ActionFailed) as failure:
        harness.run_action("create-backup")
    for option in ("s3-bucket", "s3-credentials", "backup-passphrase"):
        assert option in failure.value.message
