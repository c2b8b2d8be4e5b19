"""The backup pipeline for real: bash, GNU tar, gpg, aws CLI and SeaweedFS.

Each test calls the backup API with the Harness container whose execs run in
a bubblewrap sandbox as the Synapse user (see conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import ops
import pytest

import backup
import backup_container
import backup_store
from tests.helpers.sandbox import Sandbox, default_path, mount_small_fs
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import SYNAPSE_GID, SYNAPSE_UID, make_synapse_data, tree_snapshot
from tests.workload.conftest import PASSPHRASE, SERVER_NAME, decrypt_and_extract, parameters_for

HOSTILE_NAMES = [
    "with space",
    "quote'single",
    'quote"double',
    "new\nline",
    "$(touch pwned)",
    "`touch pwned2`",
    "-leading-dash",
    "semi;colon&amp|pipe",
    "star*question?",
    "tab\there",
]
HOSTILE_BYTES_NAME = b"latin1-\xe9\xff"


def _objects(server: SeaweedServer, bucket: str) -> dict[str, int]:
    """List a bucket's objects with their sizes."""
    listing = server.client().list_objects_v2(Bucket=bucket)
    return {item["Key"]: item["Size"] for item in listing.get("Contents", [])}


def _own(path: Path) -> None:
    """Give a path to the Synapse user."""
    os.lchown(path, SYNAPSE_UID, SYNAPSE_GID)


def _add_hostile_files(root: Path) -> None:
    """Add files whose names break naive shell quoting, a symlink and odd modes."""
    content = root / "data/media_store/local_content"
    hostile = content / "hostile"
    hostile.mkdir()
    _own(hostile)
    for index, name in enumerate(HOSTILE_NAMES):
        path = hostile / name
        path.write_bytes(f"file {index}".encode())
        path.chmod(0o640 if index % 2 else 0o604)
        _own(path)
    raw = os.path.join(os.fsencode(hostile), HOSTILE_BYTES_NAME)
    with open(raw, "wb") as file:
        file.write(b"not utf-8 name")
    os.lchown(raw, SYNAPSE_UID, SYNAPSE_GID)
    link = hostile / "link to with space"
    link.symlink_to("with space")
    _own(link)
    empty = hostile / "empty dir"
    empty.mkdir(mode=0o750)
    _own(empty)


def _expected_members(root: Path) -> dict[str, object]:
    """What the archive must hold: the backed-up files and trees, not the caches."""
    data = root / "data"
    expected: dict[str, object] = {}
    for name in (
        "homeserver.yaml",
        "demo.example.signing.key",
        "demo.example.log.config",
        "appservices/bridge.yaml",
    ):
        expected[name] = tree_snapshot_of_file(data / name)
    for tree in ("media_store/local_content", "media_store/local_thumbnails"):
        expected[tree] = tree_snapshot(data / tree)
    return expected


def tree_snapshot_of_file(path: Path) -> tuple[int, int, int, bytes]:
    """Describe one file: mode, owner, group and content."""
    stat = path.lstat()
    return (stat.st_mode & 0o7777, stat.st_uid, stat.st_gid, path.read_bytes())


def _download(server: SeaweedServer, bucket: str, key: str) -> bytes:
    """Download an object."""
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_round_trip_is_byte_identical(
    container: ops.Container,
    root: Path,
    s3_server: SeaweedServer,
    bucket: str,
    s3_parameters: backup.S3Parameters,
    tmp_path: Path,
) -> None:
    """A backup decrypts and extracts to the same bytes, modes, owners and symlinks."""
    _add_hostile_files(root)
    expected = _expected_members(root)

    manifest = backup.run_backup(container, s3_parameters, "20261126T120000Z", PASSPHRASE)

    objects = _objects(s3_server, bucket)
    assert set(objects) == {
        "synapse/prod/20261126T120000Z",
        "synapse/prod/20261126T120000Z.manifest.json",
        "synapse/prod/20261126T120000Z.snar.gpg",
    }
    encrypted = _download(s3_server, bucket, "synapse/prod/20261126T120000Z")
    assert encrypted[257:262] != b"ustar"
    assert b"homeserver.yaml" not in encrypted
    assert hashlib.sha256(encrypted).hexdigest() == manifest.sha256
    assert len(encrypted) == manifest.size == objects["synapse/prod/20261126T120000Z"]
    stored = json.loads(
        _download(s3_server, bucket, "synapse/prod/20261126T120000Z.manifest.json")
    )
    assert stored["sha256"] == manifest.sha256
    assert stored["file-count"] == manifest.file_count
    assert "/data/homeserver.db" in stored["paths"]

    extracted = tmp_path / "extracted"
    decrypt_and_extract(encrypted, PASSPHRASE, extracted)
    data = extracted / "data"
    for name, snapshot in expected.items():
        if isinstance(snapshot, dict):
            assert tree_snapshot(data / name) == snapshot, name
        else:
            assert tree_snapshot_of_file(data / name) == snapshot, name
    # Caches and runtime files are left out.
    assert not (data / "media_store/remote_content").exists()
    assert not (data / "media_store/url_cache").exists()
    assert not (data / "homeserver.pid").exists()
    # The member count covers every file, directory and link in the archive.
    # (appservices/ and media_store/ are parents that tar creates, not members).
    assert manifest.file_count == sum(1 for _ in data.rglob("*")) - 2
    # The database copy is complete and consistent.
    restored = sqlite3.connect(data / "homeserver.db")
    assert restored.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert restored.execute("SELECT count(*) FROM events").fetchone() == (200,)
    restored.close()
    assert (data / "homeserver.db").stat().st_uid == SYNAPSE_UID
    # Nothing from the hostile names ran, and nothing secret was left behind.
    assert not [path for path in root.rglob("pwned*") if "hostile" not in str(path.parent)]
    assert not list((root / "tmp").iterdir())
    assert not list((root / "data").glob(".synapse-backup-snapshot-*"))


def test_empty_path_puts_the_backup_at_the_top(
    container: ops.Container, s3_server: SeaweedServer, bucket: str
) -> None:
    """With s3-path empty (or only slashes), the key is the backup id alone."""
    parameters = parameters_for(s3_server, bucket, path="//")
    backup.create_backup(container, parameters, "20261126T120001Z", PASSPHRASE)
    assert set(_objects(s3_server, bucket)) == {
        "20261126T120001Z",
        "20261126T120001Z.manifest.json",
        "20261126T120001Z.snar.gpg",
    }


def test_wrong_secret_key_fails_and_leaves_nothing(
    container: ops.Container, root: Path, s3_server: SeaweedServer, bucket: str
) -> None:
    """SeaweedFS checks the signature: a wrong secret key is refused."""
    parameters = parameters_for(s3_server, bucket).model_copy(update={"secret_key": "wrong-key"})
    with pytest.raises(backup.BackupError) as error:
        backup.create_backup(container, parameters, "20261126T120002Z", PASSPHRASE)
    assert "wrong-key" not in str(error.value)
    assert PASSPHRASE not in str(error.value)
    assert _objects(s3_server, bucket) == {}
    assert not list((root / "tmp").iterdir())


def test_missing_bucket_fails_clearly(container: ops.Container, s3_server: SeaweedServer) -> None:
    """A bucket that does not exist gives an error naming it."""
    parameters = parameters_for(s3_server, "no-such-bucket-here")
    with pytest.raises(backup.BackupError, match=r"no-such-bucket-here|NoSuchBucket"):
        backup.create_backup(container, parameters, "20261126T120003Z", PASSPHRASE)


def test_unreadable_file_fails_the_backup_and_removes_the_object(
    container: ops.Container,
    root: Path,
    s3_server: SeaweedServer,
    bucket: str,
    s3_parameters: backup.S3Parameters,
) -> None:
    """Tar failing on a file still uploads what it streamed; the backup discards it."""
    secret = root / "data/media_store/local_content/zz-unreadable"
    secret.write_bytes(b"x" * 10_000)
    secret.chmod(0o000)  # owned by root: the Synapse user cannot read it
    with pytest.raises(backup.BackupError, match="Permission denied"):
        backup.create_backup(container, s3_parameters, "20261126T120004Z", PASSPHRASE)
    assert _objects(s3_server, bucket) == {}
    assert not list((root / "tmp").iterdir())


def test_gpg_failure_fails_the_backup(
    harness_root_sandbox: tuple[ops.Container, Path],
    s3_server: SeaweedServer,
    bucket: str,
    s3_parameters: backup.S3Parameters,
) -> None:
    """A gpg that dies mid-stream fails the backup; nothing counts as a backup."""
    container, root = harness_root_sandbox
    with pytest.raises(backup.BackupError, match="exit code"):
        backup.create_backup(container, s3_parameters, "20261126T120005Z", PASSPHRASE)
    assert _objects(s3_server, bucket) == {}
    assert not list((root / "tmp").iterdir())


@pytest.fixture
def harness_root_sandbox(
    container: ops.Container, root: Path, harness, tmp_path: Path
) -> tuple[ops.Container, Path]:
    """The harness with a PATH whose gpg encrypts part of the stream, then fails."""
    bin_dir = root / "test-bin"  # the sandbox binds it at /test-bin
    bin_dir.mkdir()
    fake = bin_dir / "gpg"
    fake.write_text('#!/bin/bash\nhead -c 1000 >/dev/null\necho "gpg: fake failure" >&2\nexit 2\n')
    fake.chmod(0o755)
    sandbox = Sandbox(root, path_dirs=["/test-bin", *default_path()])
    harness.handle_exec("synapse", [], handler=sandbox.handle)
    return container, root


def test_missing_tool_is_named(
    container: ops.Container,
    root: Path,
    harness,
    tmp_path: Path,
    s3_parameters: backup.S3Parameters,
) -> None:
    """A workload without gpg fails the backup with a message naming gpg."""
    bin_dir = root / "test-bin"  # the sandbox binds it at /test-bin
    bin_dir.mkdir()
    for directory in default_path():
        for entry in Path(directory).iterdir() if Path(directory).is_dir() else []:
            target = bin_dir / entry.name
            if entry.name != "gpg" and not target.exists():
                target.symlink_to(entry)
    sandbox = Sandbox(root, path_dirs=["/test-bin"])
    harness.handle_exec("synapse", [], handler=sandbox.handle)
    with pytest.raises(backup.BackupError, match=r"lacks gpg\b"):
        backup.create_backup(container, s3_parameters, "20261126T120006Z", PASSPHRASE)


def test_database_written_during_backup_is_consistent(
    container: ops.Container,
    root: Path,
    s3_server: SeaweedServer,
    bucket: str,
    s3_parameters: backup.S3Parameters,
    tmp_path: Path,
) -> None:
    """A writer keeps inserting while the backup runs; the copy passes integrity_check."""
    database = root / "data/homeserver.db"
    stop = threading.Event()
    written = [0]

    def write() -> None:
        connection = sqlite3.connect(database, timeout=30)
        while not stop.is_set():
            with connection:
                connection.executemany(
                    "INSERT INTO events (event_id, body) VALUES (?, ?)",
                    [(f"$live{written[0]}-{n}", "x" * 500) for n in range(50)],
                )
            written[0] += 1
        connection.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while written[0] < 5:
            time.sleep(0.01)
        manifest = backup.run_backup(container, s3_parameters, "20261126T120007Z", PASSPHRASE)
    finally:
        stop.set()
        writer.join()
    assert written[0] > 5
    encrypted = _download(s3_server, bucket, f"synapse/prod/{manifest.backup_id}")
    decrypt_and_extract(encrypted, PASSPHRASE, tmp_path / "out")
    restored = sqlite3.connect(tmp_path / "out/data/homeserver.db")
    assert restored.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = restored.execute("SELECT count(*) FROM events").fetchone()[0]
    restored.close()
    assert rows >= 200 + 5 * 50
    assert (rows - 200) % 50 == 0


def test_s3_outage_mid_upload_leaves_no_backup(
    container: ops.Container, root: Path, tmp_path: Path
) -> None:
    """The S3 server is killed while the multipart upload runs."""
    big = root / "data/media_store/local_content/big"
    big.mkdir()
    _own(big)
    for index in range(6):
        path = big / f"blob{index}"
        path.write_bytes(os.urandom(32 * 1024 * 1024))
        _own(path)
    with SeaweedServer(tmp_path / "outage") as server:
        server.create_bucket("outage")
        parameters = parameters_for(server, "outage")
        client = server.client()

        def kill_when_uploading() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                uploads = client.list_multipart_uploads(Bucket="outage").get("Uploads", [])
                if uploads:
                    server.kill()
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_when_uploading)
        killer.start()
        with pytest.raises(backup.BackupError):
            backup.create_backup(container, parameters, "20261126T120008Z", PASSPHRASE)
        killer.join()
        server.restart()
        keys = _objects(server, "outage")
        assert not [key for key in keys if key.endswith(backup_store.MANIFEST_SUFFIX)]
        assert "synapse/prod/20261126T120008Z" not in keys
    assert not list((root / "tmp").iterdir())


def test_killed_exec_leaves_no_backup(
    container: ops.Container,
    root: Path,
    s3_server: SeaweedServer,
    bucket: str,
    s3_parameters: backup.S3Parameters,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pipeline is killed by its timeout: no manifest, no object, no work dir."""
    big = root / "data/media_store/local_content/big"
    big.mkdir()
    _own(big)
    path = big / "blob"
    path.write_bytes(os.urandom(256 * 1024 * 1024))
    _own(path)
    monkeypatch.setattr(backup_container, "EXEC_TIMEOUT", 1.0)
    with pytest.raises(backup.BackupError, match="timed out"):
        backup.create_backup(container, s3_parameters, "20261126T120009Z", PASSPHRASE)
    time.sleep(1)
    assert _objects(s3_server, bucket) == {}
    assert not list((root / "tmp").iterdir())
    assert not list((root / "data").glob(".synapse-backup-snapshot-*"))


def test_existing_backup_id_is_refused(
    container: ops.Container,
    s3_server: SeaweedServer,
    bucket: str,
    s3_parameters: backup.S3Parameters,
) -> None:
    """A second backup with the same id does not overwrite the first."""
    backup.create_backup(container, s3_parameters, "20261126T120010Z", PASSPHRASE)
    before = _objects(s3_server, bucket)
    with pytest.raises(backup.BackupError, match="exists already"):
        backup.create_backup(container, s3_parameters, "20261126T120010Z", PASSPHRASE)
    assert _objects(s3_server, bucket) == before


def test_full_disk_fails_clearly_and_loses_nothing(
    container: ops.Container,
    root: Path,
    s3_server: SeaweedServer,
    bucket: str,
    s3_parameters: backup.S3Parameters,
) -> None:
    """No room for the database copy: a clear error, live data untouched, nothing in S3."""
    with mount_small_fs(root / "data", 16 * 1024 * 1024):
        make_synapse_data(root, SERVER_NAME, media_files=5)
        connection = sqlite3.connect(root / "data/homeserver.db")
        with connection:
            connection.executemany(
                "INSERT INTO events (event_id, body) VALUES (?, ?)",
                [(f"$big{n}", "y" * 1000) for n in range(3000)],
            )
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        filler = root / "data/filler"
        free = os.statvfs(root / "data").f_bavail * os.statvfs(root / "data").f_frsize
        filler.write_bytes(b"\0" * (free - 256 * 1024))
        before = tree_snapshot(root / "data")

        with pytest.raises(backup.BackupError, match="full"):
            backup.create_backup(container, s3_parameters, "20261126T120011Z", PASSPHRASE)

        assert tree_snapshot(root / "data") == before
        assert _objects(s3_server, bucket) == {}
    assert not list((root / "tmp").iterdir())
