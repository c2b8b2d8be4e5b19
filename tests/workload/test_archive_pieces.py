"""Archives stored in several S3 objects, through the charm's actions, for real.

In production a piece is 64 GiB, so that the aws CLI keeps its 8 MiB parts
(and its memory) whatever the size of the data. Here the piece size is
lowered to 256 KiB so that a backup of about 1.3 MiB takes six pieces; the
code paths are the same. Everything else is real: the charm in Harness,
bash, tar, gpg and the aws CLI in the bubblewrap stand-in for the container,
and SeaweedFS.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops import testing

import backup
import backup_store
from charm import SynapseCharm
from tests.helpers.sandbox import Sandbox, default_path
from tests.helpers.seaweed import SeaweedServer, killed_when
from tests.helpers.synapse_data import SYNAPSE_GID, SYNAPSE_UID, tree_snapshot
from tests.workload.conftest import ServiceCalls
from tests.workload.test_charm_action import configure
from tests.workload.test_restore_action import EXCLUDED, backed_up_view
from tests.workload.test_restore_faults import S3_PATH, Scene, assert_nothing_changed, make_scene

PIECE_SIZE = 256 * 1024


@pytest.fixture
def pieces_scene(
    harness: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    service_calls: ServiceCalls,
    monkeypatch: pytest.MonkeyPatch,
) -> Scene:
    """A backup of about 1.3 MiB in pieces of 256 KiB, and live data changed since."""
    monkeypatch.setattr(backup, "ARCHIVE_PIECE_SIZE", PIECE_SIZE)
    _add_media(harness.get_filesystem_root("synapse") / "data", 1024 * 1024)
    return make_scene(harness, s3_server, bucket, service_calls)


def _add_media(data: Path, size: int) -> None:
    """Add an incompressible media file owned by the Synapse user."""
    path = data / "media_store/local_content/pieces/blob"
    path.parent.mkdir()
    path.write_bytes(os.urandom(size))
    for item in (path.parent, path):
        os.lchown(item, SYNAPSE_UID, SYNAPSE_GID)


def _manifest(scene: Scene) -> backup.BackupManifest:
    client = scene.server.client()
    key = f"{scene.key}{backup_store.MANIFEST_SUFFIX}"
    return backup.BackupManifest.from_json(
        client.get_object(Bucket=scene.bucket, Key=key)["Body"].read()
    )


def _piece_keys(scene: Scene) -> list[str]:
    """The keys of the scene's archive pieces in S3, in order."""
    return sorted(
        key
        for key in scene.objects()
        if key == scene.key or key.startswith(scene.key + backup_store.ARCHIVE_PIECE_INFIX)
    )


def test_a_large_archive_is_stored_in_pieces_that_add_up(pieces_scene: Scene) -> None:
    """The pieces are the archive cut in order: sizes and SHA-256 match the manifest."""
    scene = pieces_scene
    manifest = _manifest(scene)
    keys = _piece_keys(scene)

    assert manifest.piece_size == PIECE_SIZE
    assert len(keys) == -(-manifest.size // PIECE_SIZE) >= 5
    assert keys == [f"{S3_PATH}/{name}" for name in manifest.pieces()]
    sizes = [scene.objects()[key][0] for key in keys]
    assert sizes[:-1] == [PIECE_SIZE] * (len(keys) - 1)
    assert 0 < sizes[-1] <= PIECE_SIZE
    client = scene.server.client()
    digest = hashlib.sha256()
    for key in keys:
        digest.update(client.get_object(Bucket=scene.bucket, Key=key)["Body"].read())
    assert digest.hexdigest() == manifest.sha256
    listed = scene.harness.run_action("list-backups").results["backups"]["1"]
    assert (listed["id"], int(listed["size"])) == (scene.backup_id, manifest.size)


def test_verify_and_restore_read_every_piece(pieces_scene: Scene) -> None:
    """verify-backup matches the manifest, and restore gives back the backed-up tree."""
    scene = pieces_scene

    verified = scene.harness.run_action("verify-backup", {"backup-id": scene.backup_id})
    assert verified.results["sha256"] == _manifest(scene).sha256
    assert verified.results["matches-manifest"] is True

    scene.restore()

    assert backed_up_view(scene.data) == {
        name: entry
        for name, entry in scene.backed_up.items()
        if not name.startswith(EXCLUDED) and not name.startswith("homeserver.db")
    }
    restored = sqlite3.connect(scene.data / "homeserver.db")
    assert restored.execute("SELECT count(*) FROM events").fetchone() == (200,)
    restored.close()
    assert scene.service_calls[-1] == ("start_services", ("synapse",))


def test_a_missing_piece_makes_the_backup_incomplete(pieces_scene: Scene) -> None:
    """A piece deleted behind the charm's back: not listed, not restored, nothing touched."""
    scene = pieces_scene
    scene.server.client().delete_object(Bucket=scene.bucket, Key=_piece_keys(scene)[2])
    before = tree_snapshot(scene.data)

    assert scene.harness.run_action("list-backups").results["count"] == 0
    failure = scene.fail_restore("is incomplete")

    assert_nothing_changed(scene, before, failure)


def test_a_corrupted_later_piece_fails_the_restore(pieces_scene: Scene) -> None:
    """One flipped bit in the fourth piece is caught; the live data stays."""
    scene = pieces_scene
    client = scene.server.client()
    key = _piece_keys(scene)[3]
    body = bytearray(client.get_object(Bucket=scene.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=scene.bucket, Key=key, Body=bytes(body))
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(f"restore of {scene.backup_id} failed")

    assert_nothing_changed(scene, before, failure)


def test_delete_backup_removes_every_piece_and_unfinished_upload(pieces_scene: Scene) -> None:
    """delete-backup leaves nothing of the backup, not even an upload left half done."""
    scene = pieces_scene
    client = scene.server.client()
    stray = f"{scene.key}{backup_store.ARCHIVE_PIECE_INFIX}0099"
    client.create_multipart_upload(Bucket=scene.bucket, Key=stray)

    scene.harness.run_action("delete-backup", {"backup-id": scene.backup_id})

    assert scene.objects() == {}
    assert client.list_multipart_uploads(Bucket=scene.bucket).get("Uploads", []) == []


@pytest.fixture
def failing_third_piece(harness: testing.Harness[SynapseCharm]) -> Iterator[None]:
    """Make the upload of the third piece (part-0002) fail, as an S3 refusal would.

    The real aws CLI is wrapped: the wrapper refuses that one piece and runs
    aws for everything else. It sits in a host directory under /var/tmp (which
    the sandbox shows read-only; its /tmp is the container's) ahead of the
    real one on PATH.
    """
    fake_bin = Path(tempfile.mkdtemp(prefix="synapse-fake-bin-", dir="/var/tmp"))
    wrapper = fake_bin / "aws"
    wrapper.write_text(
        "#!/bin/bash\n"
        'for word in "$@"; do\n'
        '  case "$word" in *.part-0002)\n'
        '    echo "injected: upload of $word refused" >&2; exit 1;;\n'
        "  esac\n"
        "done\n"
        'PATH="${PATH#*:}" exec aws "$@"  # the real one: PATH without this directory\n'
    )
    wrapper.chmod(0o755)
    root = harness.get_filesystem_root("synapse")
    fake_bin.chmod(0o755)
    sandbox = Sandbox(root, path_dirs=[str(fake_bin), *default_path()])
    harness.handle_exec("synapse", [], handler=sandbox.handle)
    yield
    shutil.rmtree(fake_bin)


@pytest.mark.usefixtures("failing_third_piece")
def test_a_failed_piece_fails_the_backup_and_leaves_nothing(
    harness: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    service_calls: ServiceCalls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pieces already uploaded are removed with the rest; no backup is listed."""
    monkeypatch.setattr(backup, "ARCHIVE_PIECE_SIZE", PIECE_SIZE)
    _add_media(harness.get_filesystem_root("synapse") / "data", 1024 * 1024)

    with pytest.raises(testing.ActionFailed, match="piece 2") as failure:
        make_scene(harness, s3_server, bucket, service_calls)

    assert "injected: upload of" in failure.value.message
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=bucket).get("Contents", []) == []
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert harness.run_action("list-backups").results["count"] == 0


def test_an_outage_leaves_an_incomplete_backup_that_delete_backup_removes(
    harness: testing.Harness[SynapseCharm],
    service_calls: ServiceCalls,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """S3 dies mid-backup, so the failed backup cannot remove its pieces.

    Once S3 is back, list-backups names the id as incomplete (not a backup),
    and delete-backup removes its pieces and unfinished uploads.
    """
    monkeypatch.setattr(backup, "ARCHIVE_PIECE_SIZE", 4 * 1024 * 1024)
    _add_media(harness.get_filesystem_root("synapse") / "data", 32 * 1024 * 1024)
    with SeaweedServer(tmp_path / "s3") as server:
        server.create_bucket("outage")
        client = server.client()

        def second_piece_started() -> bool:
            listing = client.list_objects_v2(Bucket="outage").get("Contents", [])
            return any(item["Key"].endswith(".part-0001") for item in listing)

        with (
            killed_when(server, second_piece_started, interval=0.02) as killed,
            pytest.raises(testing.ActionFailed),
        ):
            make_scene(harness, server, "outage", service_calls)
        assert killed.is_set(), "the backup ended before the server could be killed"
        server.restart()
        keys = _keys(client, "outage")
        backup_id = keys[0].rsplit("/", 1)[-1][:16]
        assert f"{S3_PATH}/{backup_id}.part-0001" in keys
        assert not [key for key in keys if key.endswith(backup_store.MANIFEST_SUFFIX)]

        listed = harness.run_action("list-backups").results
        assert (listed["count"], listed["incomplete"]) == (0, backup_id)

        # It started just now: it may be running on another unit, unless forced.
        with pytest.raises(testing.ActionFailed, match="may still be running on another unit"):
            harness.run_action("delete-backup", {"backup-id": backup_id})
        assert f"{S3_PATH}/{backup_id}.part-0001" in _keys(client, "outage")
        params = {"backup-id": backup_id, "force": True}
        deleted = harness.run_action("delete-backup", params).results
        assert deleted == {"deleted": backup_id}
        assert client.list_objects_v2(Bucket="outage").get("Contents", []) == []
        assert client.list_multipart_uploads(Bucket="outage").get("Uploads", []) == []
        assert harness.run_action("list-backups").results["incomplete"] == "none"


def _keys(client: Any, bucket: str) -> list[str]:
    """The keys in a bucket, sorted."""
    listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(item["Key"] for item in listing)


def test_an_unfinished_upload_alone_is_incomplete_and_deleted(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """An archive upload that was never completed, and nothing else, is still found."""
    configure(harness, s3_server, bucket)
    client = s3_server.client()
    backup_id = "20250101T000000Z"  # long ago: no unit can still be making it
    upload = client.create_multipart_upload(Bucket=bucket, Key=f"{S3_PATH}/{backup_id}")
    assert (
        client.list_multipart_uploads(Bucket=bucket)["Uploads"][0]["UploadId"]
        == (upload["UploadId"])
    )

    assert harness.run_action("list-backups").results["incomplete"] == backup_id
    harness.run_action("delete-backup", {"backup-id": backup_id})

    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert harness.run_action("list-backups").results["incomplete"] == "none"
