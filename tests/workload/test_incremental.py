"""Incremental backups, chains and retention through the charm's actions, for real.

Every command runs in the bubblewrap stand-in container against SeaweedFS;
only Juju and Pebble are Harness's (see conftest.py).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from ops import testing

from charm import SynapseCharm
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import SYNAPSE_GID, SYNAPSE_UID, tree_snapshot
from tests.workload.conftest import PASSPHRASE, decrypt_and_extract
from tests.workload.test_charm_action import configure
from tests.workload.test_restore_action import backed_up_view


def _backup(harness: testing.Harness[SynapseCharm], **params: str) -> dict[str, str]:
    """Run create-backup; ids are per second, so never two in one second."""
    time.sleep(1.05)
    return harness.run_action("create-backup", params).results


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file as the Synapse user would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.chown(path, SYNAPSE_UID, SYNAPSE_GID)


def _media(data: Path) -> list[Path]:
    """The local media files, in a stable order."""
    return sorted(p for p in (data / "media_store/local_content").rglob("*") if p.is_file())


@pytest.fixture
def configured(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> testing.Harness[SynapseCharm]:
    """The charm configured for backups, Synapse's layer planned."""
    configure(harness, s3_server, bucket)
    harness.container_pebble_ready("synapse")
    return harness


def test_incremental_chain_restores_every_point(
    configured: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """Full, then changes, incremental, changes, incremental; each point restores exactly."""
    harness = configured
    data = harness.get_filesystem_root("synapse") / "data"
    points: dict[str, dict[str, object]] = {}

    full = _backup(harness)
    assert full["type"] == "full"
    points[full["backup-id"]] = backed_up_view(data)

    media = _media(data)
    _write(data / "media_store/local_content/new/added", os.urandom(5000))  # add
    _write(media[0], b"modified content")  # modify
    media[1].unlink()  # delete
    media[2].rename(media[2].with_name("renamed"))  # rename
    media[3].chmod(0o640)  # change mode
    first = _backup(harness)
    assert (first["type"], first["parent"]) == ("incremental", full["backup-id"])
    assert int(first["size"]) < int(full["size"]) / 3
    points[first["backup-id"]] = backed_up_view(data)

    shutil.rmtree(data / "media_store/local_content/new")
    _write(data / "media_store/local_thumbnails/x/y/thumb", b"thumb")
    # Still naming the appservice: a file the configuration no longer names is
    # not backed up, and a restore of this point rightly leaves it out.
    _write(
        data / "homeserver.yaml",
        (data / "homeserver.yaml").read_bytes() + b"changed: true\n",
        0o640,
    )
    second = _backup(harness)
    assert (second["type"], second["parent"]) == ("incremental", first["backup-id"])
    points[second["backup-id"]] = backed_up_view(data)

    listed = harness.run_action("list-backups").results["backups"]
    assert [listed[str(n)]["type"] for n in (1, 2, 3)] == ["incremental", "incremental", "full"]
    assert listed["1"]["parent"] == first["backup-id"]

    for backup_id, expected in points.items():
        harness.run_action("restore-backup", {"backup-id": backup_id})
        assert backed_up_view(data) == expected, backup_id


def test_broken_chain_fails_clearly_and_touches_nothing(
    configured: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """An incremental whose parent was deleted behind the charm's back cannot be restored."""
    harness = configured
    data = harness.get_filesystem_root("synapse") / "data"
    full = _backup(harness, type="full")
    _write(data / "media_store/local_content/n/file", b"new")
    incremental = _backup(harness, type="incremental")
    s3_server.client().delete_object(
        Bucket=bucket, Key=f"homeserver/backups/{full['backup-id']}.manifest.json"
    )

    before = tree_snapshot(data)
    with pytest.raises(testing.ActionFailed, match=r"chain .* is broken"):
        harness.run_action("restore-backup", {"backup-id": incremental["backup-id"]})
    assert tree_snapshot(data) == before
    # With its parent gone, the next backup cannot build on it: auto makes a full one.
    assert _backup(harness)["type"] == "full"


def test_lost_snapshot_state_continues_the_chain_from_s3(
    configured: testing.Harness[SynapseCharm],
) -> None:
    """Without the local snapshot state, the encrypted copy in S3 continues the chain."""
    harness = configured
    data = harness.get_filesystem_root("synapse") / "data"
    full = _backup(harness)
    for state in (data / ".synapse-backup-state").glob(f"{full['backup-id']}.*"):
        state.unlink()  # the data (and its id) are the same
    _write(data / "media_store/local_content/n/file", b"new")
    incremental = _backup(harness)
    assert (incremental["type"], incremental["parent"]) == ("incremental", full["backup-id"])
    assert (data / f".synapse-backup-state/{incremental['backup-id']}.snar").exists()


def test_a_new_unit_continues_the_chain_of_the_backup_it_restored(
    configured: testing.Harness[SynapseCharm],
) -> None:
    """A unit that restored a backup builds on its chain (from the state in S3).

    Unless tar, meeting restored directories whose inodes the state knew for
    others, left a live directory out of the incremental archive: then the
    backup is a full one (the check after tar), which costs little here,
    since tar archives every file of a restored tree anyway.
    """
    harness = configured
    data = harness.get_filesystem_root("synapse") / "data"
    full = _backup(harness)
    shutil.rmtree(data / ".synapse-backup-state")  # a new unit: no state, no data id
    harness.run_action("restore-backup", {"backup-id": full["backup-id"]})
    data_id = (data / ".synapse-backup-state/data-id").read_text()
    _write(data / "media_store/local_content/n/file", b"new")

    incremental = _backup(harness)

    assert (incremental["type"], incremental["parent"]) in {
        ("incremental", full["backup-id"]),
        ("full", "none"),
    }, incremental
    assert (data / ".synapse-backup-state/data-id").read_text() == data_id
    (data / "media_store/local_content/n/file").unlink()
    harness.run_action("restore-backup", {"backup-id": incremental["backup-id"]})
    assert (data / "media_store/local_content/n/file").read_bytes() == b"new"


def test_other_data_starts_a_new_chain(
    configured: testing.Harness[SynapseCharm],
) -> None:
    """A unit whose data is not the chain's (another unit's volume) never extends it.

    tar's snapshot state knows files by device and inode: on another volume
    they may name other files, which an incremental backup would leave out.
    """
    harness = configured
    data = harness.get_filesystem_root("synapse") / "data"
    full = _backup(harness)
    shutil.rmtree(data / ".synapse-backup-state")  # other data: no state, no data id

    with pytest.raises(testing.ActionFailed, match=f"newest backup {full['backup-id']} was made"):
        _backup(harness, type="incremental")
    time.sleep(1.05)
    output = harness.run_action("create-backup")

    assert (output.results["type"], output.results["parent"]) == ("full", "none")
    assert any("was made of other data" in line for line in output.logs)
    assert _backup(harness)["parent"] == output.results["backup-id"]  # its own chain goes on


def test_delete_refuses_a_needed_backup_unless_chain(
    configured: testing.Harness[SynapseCharm],
) -> None:
    """Deleting a parent fails; chain=true deletes it with its dependants."""
    harness = configured
    full = _backup(harness)
    incremental = _backup(harness)
    with pytest.raises(testing.ActionFailed, match=incremental["backup-id"]):
        harness.run_action("delete-backup", {"backup-id": full["backup-id"]})
    assert harness.run_action("list-backups").results["count"] == 2
    deleted = harness.run_action("delete-backup", {"backup-id": full["backup-id"], "chain": True})
    assert deleted.results["deleted"] == f"{incremental['backup-id']} {full['backup-id']}"
    assert harness.run_action("list-backups").results["count"] == 0


def test_incremental_without_a_full_backup_fails(
    configured: testing.Harness[SynapseCharm],
) -> None:
    """type=incremental with nothing to build on fails saying so."""
    with pytest.raises(testing.ActionFailed, match="no full backup"):
        configured.run_action("create-backup", {"type": "incremental"})


def test_retention_keeps_the_newest_chains(
    configured: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """With backup-retention-count=2, a third full chain removes the oldest whole chain."""
    harness = configured
    harness.update_config({"backup-retention-count": 2})
    chain1 = [_backup(harness, type="full")["backup-id"], _backup(harness)["backup-id"]]
    chain2 = [_backup(harness, type="full")["backup-id"], _backup(harness)["backup-id"]]
    listed = harness.run_action("list-backups").results
    expiring = {
        entry["id"] for entry in listed["backups"].values() if entry["expires-after-next-full"]
    }
    assert expiring == set(chain1)
    assert "expires after the next full backup" in listed["formatted"]
    third = _backup(harness, type="full")
    assert set(third["retention-removed"].split()) == set(chain1)
    remaining = harness.run_action("list-backups").results["backups"]
    assert {entry["id"] for entry in remaining.values()} == {*chain2, third["backup-id"]}
    keys = {
        item["Key"]
        for item in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    }
    assert not [key for key in keys if any(old in key for old in chain1)]


def test_passphrase_change_starts_a_new_chain(
    configured: testing.Harness[SynapseCharm],
) -> None:
    """Backups after a passphrase change must restore with it: a new full chain starts."""
    harness = configured
    full = _backup(harness)
    new_secret = harness.add_user_secret({"passphrase": "a brand new passphrase"})
    harness.grant_secret(new_secret, "synapse")
    harness.update_config({"backup-passphrase": new_secret})
    with pytest.raises(testing.ActionFailed, match="does not decrypt"):
        harness.run_action("create-backup", {"type": "incremental"})
    after = _backup(harness)
    assert (after["type"], after["parent"]) == ("full", "none")
    # Both restore: the old one with the old passphrase would, the new one does with the new.
    harness.run_action("restore-backup", {"backup-id": after["backup-id"]})
    with pytest.raises(testing.ActionFailed, match="does not decrypt"):
        harness.run_action("restore-backup", {"backup-id": full["backup-id"]})


def _archive_tree(s3_server: SeaweedServer, bucket: str, backup_id: str, target: Path) -> Path:
    """Decrypt and extract one archive (not its chain) for a look at its members."""
    body = s3_server.client().get_object(Bucket=bucket, Key=f"homeserver/backups/{backup_id}")
    decrypt_and_extract(body["Body"].read(), PASSPHRASE, target)
    return target / "data"


def _events(database: Path) -> list[tuple[str, str]]:
    """The rows of the test database's events table."""
    connection = sqlite3.connect(database)
    try:
        return connection.execute("SELECT event_id, body FROM events ORDER BY 1").fetchall()
    finally:
        connection.close()


def test_unchanged_database_is_left_out_of_incremental_backups(
    configured: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    """A database unchanged since the parent is not copied again, and still restores.

    The archive of such an incremental backup has no database; restoring it,
    or the one after it that left it out as well, gives the full backup's,
    and once the database changes it is in the next one.
    """
    harness = configured
    data = harness.get_filesystem_root("synapse") / "data"
    database = data / "homeserver.db"
    time.sleep(2.1)  # older than the two seconds in which a write could hide
    original = _events(database)

    full = _backup(harness)
    state = data / f".synapse-backup-state/{full['backup-id']}.db-state"
    assert state.exists()
    _write(data / "media_store/local_content/n/file", b"new")
    time.sleep(1.05)
    quiet = harness.run_action("create-backup")
    assert (quiet.results["type"], quiet.results["parent"]) == ("incremental", full["backup-id"])
    assert f"the database has not changed since {full['backup-id']}: not copied again" in (
        quiet.logs
    )
    assert not (_archive_tree(s3_server, bucket, quiet.results["backup-id"], tmp_path / "a")
                / "homeserver.db").exists()  # fmt: skip
    assert (data / f".synapse-backup-state/{quiet.results['backup-id']}.db-state").exists()
    assert not state.exists()  # only the newest backup's is kept
    _write(data / "media_store/local_content/n/second", b"second")
    time.sleep(1.05)
    quieter = harness.run_action("create-backup")  # on a parent that left it out too
    assert quieter.results["parent"] == quiet.results["backup-id"]
    assert any("not copied again" in line for line in quieter.logs)

    connection = sqlite3.connect(database)
    with connection:
        connection.execute("INSERT INTO events (event_id, body) VALUES ('$late', 'late')")
    connection.close()
    changed = _backup(harness)
    assert (_archive_tree(s3_server, bucket, changed["backup-id"], tmp_path / "b")
            / "homeserver.db").exists()  # fmt: skip

    harness.run_action("restore-backup", {"backup-id": quiet.results["backup-id"]})
    assert _events(database) == original
    assert (data / "media_store/local_content/n/file").read_bytes() == b"new"
    harness.run_action("restore-backup", {"backup-id": quieter.results["backup-id"]})
    assert _events(database) == original  # from the full backup, two links up
    assert (data / "media_store/local_content/n/second").read_bytes() == b"second"
    harness.run_action("restore-backup", {"backup-id": changed["backup-id"]})
    assert _events(database) == [*original, ("$late", "late")]


def test_recently_written_database_is_copied_again(
    configured: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    """A database written less than two seconds before a backup gets no fingerprint.

    Its modification time cannot tell a later write in the same tick apart,
    so the next incremental backup copies it again although it is unchanged.
    """
    harness = configured
    data = harness.get_filesystem_root("synapse") / "data"
    later = time.time() + 60  # "written" within the last two seconds, however slow the backup
    os.utime(data / "homeserver.db", (later, later))
    full = harness.run_action("create-backup").results
    assert not (data / f".synapse-backup-state/{full['backup-id']}.db-state").exists()
    incremental = _backup(harness)
    assert incremental["parent"] == full["backup-id"]
    assert (_archive_tree(s3_server, bucket, incremental["backup-id"], tmp_path / "a")
            / "homeserver.db").exists()  # fmt: skip
