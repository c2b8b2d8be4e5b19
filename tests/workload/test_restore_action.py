"""Backup, break, restore: the charm's actions with real exec against SeaweedFS.

Pebble is Harness's stand-in (its service start/stop are recorded, not run);
every command runs for real in the bubblewrap container (see conftest.py).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from ops import testing

import backup_restore
from charm import SynapseCharm
from tests.helpers.sandbox import SynapseHealth
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import tree_snapshot
from tests.workload.test_charm_action import configure

# Caches, runtime files and the charm's own snapshot state are not backed up.
EXCLUDED = (
    "media_store/remote_content",
    "media_store/url_cache",
    "homeserver.pid",
    ".synapse-backup-state",
)


def backed_up_view(data: Path) -> dict[str, object]:
    """The part of the data directory a backup covers, without the database file."""
    return {
        name: entry
        for name, entry in tree_snapshot(data).items()
        if not name.startswith(EXCLUDED) and not name.startswith("homeserver.db")
    }


def test_backup_break_restore_round_trip(
    harness: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    service_calls: list[tuple[str, tuple[str, ...]]],
    synapse_health: SynapseHealth,
) -> None:
    """After a restore, /data is the backed-up tree byte for byte, and Synapse restarted."""
    configure(harness, s3_server, bucket)
    harness.container_pebble_ready("synapse")
    root = harness.get_filesystem_root("synapse")
    data = root / "data"
    before = backed_up_view(data)
    backup_id = harness.run_action("create-backup").results["backup-id"]

    # Break things: change a file, delete media, add a new media directory and rows.
    (data / "homeserver.yaml").write_text("broken: true\n")
    shutil.rmtree(data / "media_store/local_thumbnails")
    media = data / "media_store/local_content"
    victim = next(path for path in media.rglob("*") if path.is_file())
    victim.unlink()
    (data / "media_store/local_new_dir").mkdir()
    (data / "media_store/local_new_dir/file").write_bytes(b"new")
    connection = sqlite3.connect(data / "homeserver.db")
    with connection:
        connection.execute("DELETE FROM events")
    connection.close()
    service_calls.clear()

    output = harness.run_action("restore-backup", {"backup-id": backup_id})

    assert output.results["backup-id"] == backup_id
    assert backed_up_view(data) == before
    assert not (data / "media_store/local_new_dir").exists()
    assert (data / "media_store/remote_content").exists()  # caches are left alone
    restored = sqlite3.connect(data / "homeserver.db")
    assert restored.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert restored.execute("SELECT count(*) FROM events").fetchone() == (200,)
    assert restored.execute("SELECT count(*) FROM e2e_one_time_keys_json").fetchone() == (0,)
    restored.close()
    assert ("stop_services", ("synapse",)) in service_calls
    assert service_calls[-1] == ("start_services", ("synapse",))
    assert synapse_health.asked  # the previous data went only once Synapse answered
    assert not list(data.glob(".synapse-restore-*")) + list(data.glob(".synapse-previous-*"))
    assert not list((root / "tmp").iterdir())

    listed = harness.run_action("list-backups").results
    assert listed["backups"]["1"]["id"] == backup_id
    verified = harness.run_action("verify-backup", {"backup-id": backup_id}).results
    assert verified["matches-manifest"] is True
    harness.run_action("delete-backup", {"backup-id": backup_id})
    assert harness.run_action("list-backups").results["count"] == 0
    with pytest.raises(testing.ActionFailed, match="no backup"):
        harness.run_action("delete-backup", {"backup-id": backup_id})


def test_restore_keeps_the_previous_data_when_synapse_does_not_answer(
    harness: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    synapse_health: SynapseHealth,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pebble counts Synapse started after one second; Synapse may fail after that.

    It checks its database schema and configuration later (a newer backup
    forced on, a configuration this image rejects): the data from before the
    restore is kept until Synapse answers its health check, and the action
    says where it is.
    """
    monkeypatch.setattr(backup_restore, "RESTORE_HEALTH_TIMEOUT", 0.3)
    monkeypatch.setattr(backup_restore, "RESTORE_HEALTH_INTERVAL", 0.1)
    configure(harness, s3_server, bucket)
    harness.container_pebble_ready("synapse")
    data = harness.get_filesystem_root("synapse") / "data"
    backup_id = harness.run_action("create-backup").results["backup-id"]
    (data / "homeserver.yaml").write_text((data / "homeserver.yaml").read_text() + "# edited\n")
    edited = (data / "homeserver.yaml").read_bytes()
    synapse_health.answers = False

    with pytest.raises(testing.ActionFailed) as failure:
        harness.run_action("restore-backup", {"backup-id": backup_id})

    assert "did not answer its health check within 0.3 s" in failure.value.message
    (previous,) = data.glob(".synapse-previous-*")
    assert f"the previous data is kept in /data/{previous.name}" in failure.value.message
    assert (previous / "data/homeserver.yaml").read_bytes() == edited
    assert b"# edited" not in (data / "homeserver.yaml").read_bytes()
    assert synapse_health.asked >= 2
    assert not list(data.glob(".synapse-restore-*"))


def test_restore_repairs_a_homeserver_yaml_that_does_not_parse(
    harness: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    synapse_health: SynapseHealth,
) -> None:
    """A restore is how an operator repairs a broken configuration: it must not need one.

    Only what the backup holds is replaced, the action says so, and the
    homeserver comes back as it was backed up.
    """
    configure(harness, s3_server, bucket)
    harness.container_pebble_ready("synapse")
    data = harness.get_filesystem_root("synapse") / "data"
    before = backed_up_view(data)
    backup_id = harness.run_action("create-backup").results["backup-id"]
    (data / "homeserver.yaml").write_text("server_name: [example.com\n  listeners: {{\n")
    (data / "media_store/local_new_dir").mkdir()
    (data / "media_store/local_new_dir/file").write_bytes(b"new")
    harness.evaluate_status()
    assert "configuration unreadable" in harness.model.unit.status.message
    with pytest.raises(testing.ActionFailed, match=r"homeserver\.yaml is not valid YAML"):
        harness.run_action("create-backup")  # never a backup of a broken configuration

    output = harness.run_action("restore-backup", {"backup-id": backup_id})

    assert any("replaces only what the backup holds" in line for line in output.logs)
    # What the backup holds is back; what only the live data had is left alone
    # (the broken file could not say what it was; replaced, it would be deleted).
    assert (data / "media_store/local_new_dir/file").read_bytes() == b"new"
    shutil.rmtree(data / "media_store/local_new_dir")
    assert backed_up_view(data) == before
    assert synapse_health.asked
    harness.evaluate_status()
    assert "configuration unreadable" not in harness.model.unit.status.message
