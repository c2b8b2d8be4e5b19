"""run_restore's pre-flight and steps, verify_backup and _swap_paths on Scenario's container.

The container is the charm's own, taken from a live Scenario event; /data is a
mounted local directory. S3Client is a mock, the tool check is skipped and
commands are canned (testing.Exec), so nothing is downloaded, decrypted or
moved for real: tests/workload runs the real pipeline against SeaweedFS. What
is tested here is the order of the steps and that nothing touches the live
data before the pre-flight has passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import shlex
from collections.abc import Collection, Iterator
from typing import Any
from unittest import mock

import ops
import pytest
import yaml
from ops import testing

import backup
import backup_chain
import backup_container
import backup_restore
import synapse
import synapse_layout
from tests.unit.builders import SERVER_NAME, homeserver_yaml, make_state

SECRET_KEY = "restore-container-secret-key-2f6a"
PASSPHRASE = "restore-container-passphrase-91dc"
BACKUP_ID = "20250102T030405Z"
TOKEN = "0a1b2c3d"
WORK_DIR = f"{backup_container.WORK_DIR_PREFIX}{TOKEN}"
STAGING_DIR = f"/data/{backup_restore.RESTORE_STAGING_PREFIX}{BACKUP_ID}-{TOKEN}"
PREVIOUS_DIR = f"/data/{backup_restore.PREVIOUS_DATA_PREFIX}{BACKUP_ID}-{TOKEN}"
SHA256 = "ab" * 32
MANIFEST_PATHS = (
    "/data/example.com.signing.key",
    "/data/homeserver.yaml",
    "/data/media_store/local_content",
    "/data/homeserver.db",
)


# What a restore of _manifest() replaces in synapse_data: the backed-up paths, what
# would be backed up now (extra.signing.key) and the database with its journals.
SWAP_PATHS = (
    "/data/example.com.signing.key",
    "/data/extra.signing.key",
    "/data/homeserver.db",
    "/data/homeserver.db-journal",
    "/data/homeserver.db-shm",
    "/data/homeserver.db-wal",
    "/data/homeserver.yaml",
    "/data/media_store/local_content",
)


def _params() -> backup.S3Parameters:
    return backup.S3Parameters.model_validate(
        {
            "access-key": "AKIARESTORECONTAINER",
            "secret-key": SECRET_KEY,
            "bucket": "synapse-backups",
            "endpoint": "https://s3.example.com",
        }
    )


def _manifest(**changes: Any) -> backup.BackupManifest:
    values: dict[str, Any] = {
        "backup_id": BACKUP_ID,
        "created_at": "2025-01-02T03:04:05+00:00",
        "paths": MANIFEST_PATHS,
        "file_count": 6,
        "size": 1234,
        "sha256": SHA256,
        "duration": 1.0,
        "metadata": {"server-name": SERVER_NAME},
    }
    values.update(changes)
    return backup.BackupManifest(**values)


@pytest.fixture
def synapse_data(data_dir: pathlib.Path) -> pathlib.Path:
    """A /data as Synapse leaves it, with a database WAL and a key the backup lacks."""
    (data_dir / "homeserver.yaml").write_text(homeserver_yaml())
    (data_dir / "example.com.signing.key").write_text("ed25519 a_key xyz\n")
    (data_dir / "homeserver.db").write_bytes(b"SQLite format 3\x00live")
    (data_dir / "homeserver.db-wal").write_bytes(b"wal")
    (data_dir / "extra.signing.key").write_text("ed25519 b_key xyz\n")
    for name in ("local_content", "remote_content"):
        (data_dir / "media_store" / name).mkdir(parents=True)
    (data_dir / "media_store" / "local_content" / "file").write_bytes(b"media")
    return data_dir


def _snapshot(directory: pathlib.Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


@contextlib.contextmanager
def live_container(
    ctx: testing.Context, data_dir: pathlib.Path, **container_options: Any
) -> Iterator[ops.Container]:
    """Yield the charm's synapse container during a start event, /tmp made.

    The charm does not handle start, so nothing but the test touches the
    container (update-status would reconcile: roll back a restore's journal, replan).
    """
    state = make_state(data_dir, {}, **container_options)
    with ctx(ctx.on.start(), state) as manager:
        container = manager.charm.unit.get_container(synapse.CONTAINER_NAME)
        container.make_dir("/tmp", make_parents=True)
        yield container


@pytest.fixture
def s3_client() -> Iterator[mock.MagicMock]:
    """Replace S3Client by a mock holding the backup (a full one); its first bytes read fine."""
    client = mock.create_autospec(backup.S3Client, instance=True)
    client.chain.return_value = [_manifest()]
    client.get_manifest.return_value = _manifest()
    client.read_object.return_value = b"\x8c\x0d encrypted head"
    with mock.patch.object(backup_restore, "S3Client", return_value=client):
        yield client


@pytest.fixture(autouse=True)
def tools_present() -> Iterator[mock.MagicMock]:
    """Skip the tool check (tested in test_backup_container.py)."""
    with mock.patch.object(backup_restore, "check_tools") as patched:
        yield patched


@pytest.fixture(autouse=True)
def fixed_token() -> Iterator[None]:
    """Make the random work, staging and previous-data names predictable."""
    with mock.patch.object(backup_container.secrets, "token_hex", return_value=TOKEN):
        yield


def _probe_command() -> list[str]:
    gpg = backup_container._gpg_command(f"{WORK_DIR}/{backup.PASSPHRASE_FILE}", "--decrypt")
    script = backup_container._script(
        [
            *backup_container._script_preamble(WORK_DIR),
            [*gpg, "--output", "/dev/null", f"{WORK_DIR}/probe.gpg"],
        ]
    )
    return ["bash", "-c", script]


def _pipeline_command(staging_dir: str | None, backup_id: str = BACKUP_ID) -> list[str]:
    return backup.build_restore_command(
        _params(),
        backup_id,
        f"{WORK_DIR}/{backup.PASSPHRASE_FILE}",
        staging_dir=staging_dir,
        work_dir=WORK_DIR,
    )


PROBE_OK = testing.Exec(_probe_command())
DF_ROOMY = testing.Exec(["df"], stdout="Avail\n1000000000000\n")
PIPELINE_OK = testing.Exec(_pipeline_command(STAGING_DIR), stdout=f"{SHA256} 1234 6\n")
POST_RESTORE = testing.Exec(["python3"])
MOVE = testing.Exec(["bash", "-c"])
RESTORE_EXECS = [PROBE_OK, DF_ROOMY, PIPELINE_OK, POST_RESTORE, MOVE]


def _commands(ctx: testing.Context) -> list[list[str]]:
    return [call.command for call in ctx.exec_history.get(synapse.CONTAINER_NAME, [])]


def _move_command(source: str, target: str) -> list[str]:
    """The command _move runs (canned here: nothing really moves)."""
    return [
        "bash",
        "-c",
        backup_container._script(
            [
                ["mkdir", "-p", "--", target.rsplit("/", 1)[0]],
                ["mv", "--no-target-directory", "--", source, target],
            ]
        ),
    ]


def _moves(ctx: testing.Context) -> list[tuple[str, str]]:
    """The (source, target) of every move the restore ran, in order."""
    moves = []
    for command in _commands(ctx):
        if command[:2] == ["bash", "-c"] and "\nmv --no-target-directory -- " in command[2]:
            source, target = shlex.split(command[2].splitlines()[-1])[-2:]
            moves.append((source, target))
    return moves


@contextlib.contextmanager
def staged_by_pipeline(
    container: ops.Container, data_dir: pathlib.Path, names: tuple[str, ...]
) -> Iterator[None]:
    """Make the canned extraction leave files in the staging dir, as tar would."""
    real_exec = container.exec

    def exec_and_stage(command: list[str], **kwargs: Any) -> Any:
        process = real_exec(command, **kwargs)
        if command == _pipeline_command(STAGING_DIR):
            staged = data_dir / STAGING_DIR.removeprefix("/data/") / "data"
            for name in names:
                (staged / name).parent.mkdir(parents=True, exist_ok=True)
                (staged / name).write_bytes(b"restored " + name.encode())
        return process

    with mock.patch.object(container, "exec", side_effect=exec_and_stage):
        yield


# --- _swap_paths ----------------------------------------------------------------------------


def test_swap_paths(ctx: testing.Context, synapse_data: pathlib.Path):
    """The backed-up paths, what would be backed up now, and the database's journals."""
    with live_container(ctx, synapse_data) as container:
        paths = backup_restore._swap_paths(container, _manifest())

    assert paths == list(SWAP_PATHS)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param("server_name: [example.com\n", id="not-yaml"),
        pytest.param("- a list\n", id="not-a-mapping"),
        pytest.param("database: sqlite3\n", id="database-not-a-mapping"),
        pytest.param("media_store_path: 5\n", id="media-path-not-a-string"),
        pytest.param("app_service_config_files: bridge.yaml\n", id="appservices-not-a-list"),
        pytest.param(b"# caf\xe9\nserver_name: example.com\n", id="not-utf-8"),
        pytest.param("database: {name: postgres}\n", id="unknown-database-engine"),
    ],
)
def test_swap_paths_without_a_usable_configuration(
    ctx: testing.Context, synapse_data: pathlib.Path, config: str | bytes
):
    """A restore repairs a broken homeserver.yaml: it replaces what the backup holds.

    What the live configuration might have named beyond that is left where it
    is (moved aside, it would be deleted after the restore), and the operator
    is told.
    """
    if isinstance(config, bytes):
        (synapse_data / "homeserver.yaml").write_bytes(config)
    else:
        (synapse_data / "homeserver.yaml").write_text(config)
    (synapse_data / "media_store" / "local_thumbnails").mkdir()  # live only
    logs: list[str] = []

    with live_container(ctx, synapse_data) as container:
        paths = backup_restore._swap_paths(container, _manifest(), logs.append)

    # What the backup holds, with its database's journals; extra.signing.key and
    # local_thumbnails (what a backup would take now) stay: nothing it cannot know goes.
    assert paths == sorted(
        [*MANIFEST_PATHS, *(f"/data/homeserver.db-{end}" for end in ("journal", "shm", "wal"))]
    )
    (note,) = logs
    assert note.startswith("/data/homeserver.yaml")
    assert "replaces only what the backup holds" in note


@pytest.mark.parametrize(
    "failing",
    [
        pytest.param(
            ops.pebble.APIError({}, 500, "Internal Server Error", "pebble is restarting"),
            id="api-error",
        ),
        pytest.param(
            ops.pebble.PathError("permission-denied", "pebble is restarting"), id="path-error"
        ),
    ],
)
def test_swap_paths_does_not_guess_when_pebble_cannot_say(
    ctx: testing.Context, synapse_data: pathlib.Path, failing: ops.pebble.Error
):
    """Pebble failing to serve homeserver.yaml is not a broken file: the restore fails."""
    logs: list[str] = []
    with (
        live_container(ctx, synapse_data) as container,
        mock.patch.object(container, "pull", side_effect=failing),
        pytest.raises(backup.BackupError, match="pebble is restarting") as raised,
    ):
        backup_restore._swap_paths(container, _manifest(), logs.append)

    assert not isinstance(raised.value, backup.SynapseConfigError)
    assert logs == []


def test_swap_paths_with_a_database_elsewhere(ctx: testing.Context, synapse_data: pathlib.Path):
    """A configured database outside the standard place is replaced with its journals."""
    config = yaml.safe_load((synapse_data / "homeserver.yaml").read_text())
    config["database"] = {"name": "sqlite3", "args": {"database": "db/synapse.db"}}
    (synapse_data / "homeserver.yaml").write_text(yaml.safe_dump(config))

    with live_container(ctx, synapse_data) as container:
        paths = backup_restore._swap_paths(container, _manifest())

    assert "/data/db/synapse.db" in paths
    assert "/data/db/synapse.db-wal" in paths


@pytest.mark.parametrize(
    "bad_path",
    [
        pytest.param("/etc/passwd", id="etc"),
        pytest.param("/data/../etc/shadow", id="dot-dot"),
        pytest.param("/data", id="data-itself"),
        pytest.param("data/homeserver.yaml", id="relative"),
    ],
)
def test_swap_paths_refuses_paths_outside_data(
    ctx: testing.Context, synapse_data: pathlib.Path, bad_path: str
):
    """A manifest (not encrypted) cannot make a restore replace a path outside /data."""
    manifest = _manifest(paths=(*MANIFEST_PATHS, bad_path))

    with (
        live_container(ctx, synapse_data) as container,
        pytest.raises(backup.BackupError, match="names paths outside /data"),
    ):
        backup_restore._swap_paths(container, manifest)


# --- run_restore: the pre-flight ------------------------------------------------------------


def _restore(container: ops.Container, logs: list[str] | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("server_name", SERVER_NAME)
    return backup.run_restore(
        container,
        _params(),
        BACKUP_ID,
        PASSPHRASE,
        log=(logs if logs is not None else []).append,
        **kwargs,
    )


def test_restore_missing_backup(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    tools_present: mock.MagicMock,
):
    """A backup that does not exist fails before anything runs in the container."""
    s3_client.chain.side_effect = backup.S3Error(
        f"there is no backup {BACKUP_ID}", option="backup-id"
    )
    before = _snapshot(synapse_data)

    with (
        live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container,
        pytest.raises(backup.BackupError, match=f"^there is no backup {BACKUP_ID}$"),
    ):
        _restore(container)

    assert _commands(ctx) == []
    tools_present.assert_not_called()
    assert _snapshot(synapse_data) == before


def test_restore_invalid_manifest(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A manifest that does not parse fails the restore with a BackupError."""
    s3_client.chain.side_effect = backup.BackupError("invalid backup manifest: bad sha256")

    with (
        live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container,
        pytest.raises(backup.BackupError, match="invalid backup manifest"),
    ):
        _restore(container)

    assert _commands(ctx) == []


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param(
            {"server-name": "other.org"},
            "is of server 'other.org', not 'example.com'; use force=true",
            id="other-server",
        ),
        pytest.param({}, "is of server '', not 'example.com'", id="no-server-name"),
        pytest.param(
            {"server-name": "other.org"},
            "is of server 'other.org', not 'this unknown server'; use force=true",
            id="this-server-unknown",
        ),
    ],
)
def test_restore_refuses_another_server(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    tools_present: mock.MagicMock,
    metadata: dict[str, str],
    message: str,
):
    """A backup of another server name is refused without force, before anything runs.

    With no server name to compare with (None), the check is not skipped: the
    backup's name cannot be shown to be this server's.
    """
    s3_client.chain.return_value = [_manifest(metadata=metadata)]
    before = _snapshot(synapse_data)
    server_name = None if "unknown server" in message else SERVER_NAME

    with (
        live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        _restore(container, server_name=server_name)

    assert _commands(ctx) == []
    tools_present.assert_not_called()
    assert _snapshot(synapse_data) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"force": True}, id="force"),
        pytest.param({"force": True, "server_name": None}, id="force-no-server-name-given"),
    ],
)
def test_restore_server_check_skipped(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock, kwargs: dict
):
    """With force, another server's backup goes through, whatever this server's name."""
    s3_client.chain.return_value = [_manifest(metadata={"server-name": "other.org"})]

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        result = _restore(container, **kwargs)

    assert result.backup_id == BACKUP_ID


def _versions(*versions: str) -> list[backup.BackupManifest]:
    """A chain whose backups were made by these Synapse versions ("" records none)."""
    chain = []
    for index, version in enumerate(versions):
        metadata = {"server-name": SERVER_NAME}
        if version:
            metadata["synapse-version"] = version
        last = index == len(versions) - 1
        chain.append(
            _manifest(
                backup_id=BACKUP_ID if last else f"2025010{index}T000000Z",
                metadata=metadata,
                backup_type="incremental" if index else "full",
                parent=f"2025010{index - 1}T000000Z" if index else "",
            )
        )
    return chain


@pytest.mark.parametrize(
    ("versions", "running", "newer"),
    [
        pytest.param(("1.120.0",), "1.98.0", "1.120.0", id="newer-minor"),
        pytest.param(("1.98.1",), "1.98.0", "1.98.1", id="newer-patch"),
        pytest.param(("2.0.0",), "1.150.3", "2.0.0", id="newer-major"),
        pytest.param(("1.99.0rc1",), "1.98.0", "1.99.0rc1", id="newer-rc"),
        pytest.param(("1.10.0",), "1.9.0", "1.10.0", id="numeric-not-text-order"),
        pytest.param(("1.120.0", "1.98.0"), "1.98.0", "1.120.0", id="newer-full-backup"),
        pytest.param(("", "1.120.0"), "1.98.0", "1.120.0", id="one-unknown-one-newer"),
    ],
)
def test_restore_refuses_a_backup_of_a_newer_synapse(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    tools_present: mock.MagicMock,
    versions: tuple[str, ...],
    running: str,
    newer: str,
):
    """A database from a newer Synapse would keep this one from starting: refused first.

    Synapse runs schema migrations forward only. The check looks at every
    backup of the chain (the database may come from any of them) and runs
    before anything in the container.
    """
    s3_client.chain.return_value = _versions(*versions)
    before = _snapshot(synapse_data)
    logs: list[str] = []

    with (
        live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container,
        pytest.raises(backup.BackupError) as exc_info,
    ):
        _restore(container, logs, synapse_version=running)

    assert logs == []  # no "not comparing" note for a refusal

    assert str(exc_info.value) == (
        f"backup {BACKUP_ID} was made by Synapse {newer}, newer than this unit's Synapse "
        f"{running}, which may not start on its database; upgrade Synapse first, "
        "or use force=true to restore it anyway"
    )
    assert _commands(ctx) == []
    tools_present.assert_not_called()
    assert _snapshot(synapse_data) == before


OURS_UNKNOWN = "the backup's is 1.98.0, this unit's unknown"


@pytest.mark.parametrize(
    ("versions", "running", "note"),
    [
        pytest.param(("1.98.0",), "1.98.0", None, id="same"),
        pytest.param(("1.98.0",), "1.120.0", None, id="older-backup"),
        pytest.param(("1.9.0",), "1.10.0", None, id="numeric-not-text-order"),
        pytest.param(("1.98.0",), "unknown", OURS_UNKNOWN, id="unknown-running"),
        pytest.param(("1.98.0",), "", OURS_UNKNOWN.replace(" unknown", " "), id="empty"),
        pytest.param(("1.98.0",), None, None, id="not-given"),
        pytest.param(("",), "1.98.0", "the backup's is unknown, this unit's 1.98.0", id="old"),
        pytest.param(("1.120.0",), "1.98.0", None, id="forced"),
    ],
)
def test_restore_synapse_version_check_passes(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    request: pytest.FixtureRequest,
    versions: tuple[str, ...],
    running: str | None,
    note: str | None,
):
    """Same or older backups restore; versions that cannot be compared are said, not fatal.

    A caller that gives no version (None) asks for no check.
    """
    s3_client.chain.return_value = _versions(*versions)
    force = request.node.callspec.id == "forced"
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        result = _restore(container, logs, synapse_version=running, force=force)

    assert result.backup_id == BACKUP_ID
    notes = [line for line in logs if line.startswith("not comparing Synapse versions")]
    assert notes == ([f"not comparing Synapse versions: {note}"] if note else [])


def test_restore_refuses_paths_outside_data(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A manifest naming /etc/passwd fails the restore before any work dir is made."""
    s3_client.chain.return_value = [_manifest(paths=(*MANIFEST_PATHS, "/etc/passwd"))]

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with pytest.raises(backup.BackupError, match="names paths outside /data: '/etc/passwd'"):
            _restore(container)
        assert not container.exists(WORK_DIR)

    assert _commands(ctx) == []
    s3_client.read_object.assert_not_called()


def _assert_untouched(
    ctx: testing.Context,
    container: ops.Container,
    data_dir: pathlib.Path,
    before: dict[str, bytes | None],
) -> None:
    """Nothing moved, no staging or previous-data dir left, Synapse never stopped."""
    assert _snapshot(data_dir) == before
    assert not container.exists(WORK_DIR)
    assert not list(data_dir.glob(".synapse-*"))
    assert not any(command[0] == "python3" for command in _commands(ctx))
    assert container.get_service(synapse.SERVICE_NAME).is_running()


def test_restore_wrong_passphrase(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A passphrase that does not decrypt the backup's first bytes fails the pre-flight."""
    probe = testing.Exec(
        _probe_command(),
        return_code=2,
        stderr="gpg: decryption failed: Bad session key\n",
    )
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=[probe, DF_ROOMY, PIPELINE_OK]) as container:
        with pytest.raises(backup.BackupError, match="passphrase does not decrypt backup"):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    assert _commands(ctx) == [_probe_command()]
    s3_client.read_object.assert_called_once_with(
        BACKUP_ID, first_bytes=backup_container.PASSPHRASE_PROBE_BYTES
    )


def test_restore_probe_cut_off_is_not_a_wrong_passphrase(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A gpg failure on the cut-off probe for another reason does not stop the restore."""
    probe = testing.Exec(
        _probe_command(), return_code=2, stderr="gpg: block_filter: 1st length byte missing\n"
    )
    execs = [probe, DF_ROOMY, PIPELINE_OK, POST_RESTORE, MOVE]

    with live_container(ctx, synapse_data, execs=execs) as container:
        result = _restore(container)

    assert result.file_count == 6


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ops.pebble.APIError({}, 500, "Internal Server Error", "boom"), id="api"),
        pytest.param(ops.pebble.TimeoutError("timed out waiting for change 3"), id="timeout"),
    ],
)
def test_restore_probe_that_cannot_run(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    error: ops.pebble.Error,
):
    """A passphrase probe Pebble cannot run fails the pre-flight; the live data is untouched."""
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with (
            mock.patch.object(container, "exec", side_effect=error),
            pytest.raises(backup.BackupError) as exc_info,
        ):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    assert str(exc_info.value) == f"cannot check the passphrase: {error}"


def test_restore_s3_error_reading_the_probe(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """An S3 error while reading the backup's first bytes is a BackupError, data untouched."""
    s3_client.read_object.side_effect = backup.S3Error("cannot read object x: AccessDenied")
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with pytest.raises(backup.BackupError, match="cannot read object x: AccessDenied"):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    assert _commands(ctx) == []


@pytest.mark.parametrize(
    ("df", "message"),
    [
        pytest.param(
            testing.Exec(["df"], stdout="Avail\n1000\n"),
            "not enough room in /data to stage the restore: "
            f"{1234 + 6 * backup_restore.DISK_BLOCK + backup_restore.STAGING_HEADROOM}"
            " bytes needed, "
            "1000 available",
            id="no-room",
        ),
        pytest.param(
            testing.Exec(["df"], stdout="Avail\nlots\n"),
            "cannot measure the free space of /data",
            id="unparsable",
        ),
        pytest.param(
            testing.Exec(["df"], stdout=""),
            "cannot measure the free space of /data",
            id="no-output",
        ),
        pytest.param(
            testing.Exec(["df"], return_code=1, stderr="df: /data: I/O error"),
            "cannot measure the free space of /data",
            id="df-fails",
        ),
    ],
)
def test_restore_room_check(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    df: testing.Exec,
    message: str,
):
    """Without room to stage the backup, or free space unknown, nothing is downloaded."""
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=[PROBE_OK, df, PIPELINE_OK]) as container:
        with pytest.raises(backup.BackupError, match=message):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    commands = _commands(ctx)
    assert commands[0] == _probe_command()
    assert commands[1] == ["df", "--output=avail", "--block-size=1", "--", "/data"]
    assert len(commands) == 2


def test_restore_df_timeout_is_a_backup_error(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A df that does not finish (a stuck filesystem) fails the restore with a BackupError."""
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        real_exec = container.exec

        def exec_with_hanging_df(command: list[str], **kwargs: Any) -> Any:
            if command[0] == "df":
                raise ops.pebble.TimeoutError("timed out waiting for change 7 (61 seconds)")
            return real_exec(command, **kwargs)

        with (
            mock.patch.object(container, "exec", side_effect=exec_with_hanging_df),
            pytest.raises(
                backup.BackupError,
                match=r"^cannot measure the free space of /data: timed out waiting for change 7",
            ),
        ):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    assert _commands(ctx) == [_probe_command()]


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        pytest.param(
            f"{'cd' * 32} 1234 6\n", "does not match its manifest: checksum differs", id="checksum"
        ),
        pytest.param(f"{SHA256} 1234 5\n", "5 files instead of 6", id="file-count"),
        pytest.param("garbage\n", "did not report the archive's digest", id="no-digest"),
    ],
)
def test_restore_staged_archive_must_match(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    stdout: str,
    message: str,
):
    """A download that does not match the manifest is never swapped in; staging is removed."""
    pipeline = testing.Exec(_pipeline_command(STAGING_DIR), stdout=stdout)
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=[PROBE_OK, DF_ROOMY, pipeline]) as container:
        with pytest.raises(backup.BackupError, match=message):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)


def test_restore_pipeline_fails(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A failing download is a BackupError without secrets; the live data is untouched."""
    pipeline = testing.Exec(
        _pipeline_command(STAGING_DIR),
        return_code=1,
        stderr=f"download failed: key {SECRET_KEY} passphrase {PASSPHRASE}\n",
    )
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=[PROBE_OK, DF_ROOMY, pipeline]) as container:
        with pytest.raises(backup.BackupError) as exc_info:
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    message = str(exc_info.value)
    assert message.startswith("downloading and decrypting the backup failed (exit code 1)")
    assert SECRET_KEY not in message
    assert PASSPHRASE not in message


# --- run_restore: the steps after the pre-flight --------------------------------------------


@pytest.mark.parametrize("keep_previous", [False, True])
def test_restore_steps(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    keep_previous: bool,
):
    """Probe, room check, staged download as root, database fix-up, stop, swap, start.

    Arrange: every command canned to succeed (the moves are canned too: nothing
        really moves here; tests/workload checks the data).
    Act: run_restore.
    Assert: the commands in order; the pipeline extracts into the staging dir as
        root with the credentials in its environment only; Synapse is running
        again; work and staging dirs are gone; the result.
    """
    logs: list[str] = []
    service_calls: list[tuple[str, int]] = []  # (stop or start, commands run before it)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        real_stop, real_start = container.stop, container.start

        def stop(*names: str) -> None:
            service_calls.append(("stop", len(_commands(ctx))))
            real_stop(*names)

        def start(*names: str) -> None:
            service_calls.append(("start", len(_commands(ctx))))
            real_start(*names)

        with (
            mock.patch.object(container, "stop", side_effect=stop),
            mock.patch.object(container, "start", side_effect=start),
        ):
            result = _restore(container, logs, keep_previous=keep_previous)
        assert container.get_service(synapse.SERVICE_NAME).is_running()
        assert not container.exists(WORK_DIR)
        assert not container.exists(STAGING_DIR)

    calls = ctx.exec_history[synapse.CONTAINER_NAME]
    probe, df, pipeline, post_restore, *moves = calls
    assert probe.command == _probe_command()
    assert probe.environment["LC_ALL"] == "C"  # gpg's "Bad session key" is matched in English
    assert df.command[0] == "df"
    assert pipeline.command == _pipeline_command(STAGING_DIR)
    assert (pipeline.user_id, pipeline.group_id) == (
        backup_restore.ROOT_USER_ID,
        backup_restore.ROOT_USER_ID,
    )
    assert pipeline.environment["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    for value in (SECRET_KEY, PASSPHRASE):
        assert value not in pipeline.command[2]
    assert post_restore.command[:2] == ["python3", "-c"]
    assert post_restore.command[-1] == f"{STAGING_DIR}/data/homeserver.db"
    assert len(moves) == len(_moves(ctx))
    # Synapse is stopped only after the download, and started after the last move.
    assert service_calls == [("stop", 4), ("start", 4 + len(moves))]
    assert _moves(ctx) == [
        (path, f"{PREVIOUS_DIR}{path}")
        for path in SWAP_PATHS
        if (synapse_data / path.removeprefix("/data/")).exists()
    ]
    assert result == backup.RestoreResult(
        backup_id=BACKUP_ID,
        file_count=6,
        size=1234,
        restored_paths=SWAP_PATHS,
        previous_dir=PREVIOUS_DIR if keep_previous else None,
    )
    assert logs[0] == "checking the passphrase"
    swap = logs.index("stopping Synapse and swapping the restored data in")
    assert logs[swap + 1 :] == ([] if keep_previous else ["removing the previous data"])


def test_restore_of_a_backup_without_database(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A manifest recording database-path "" has no database, whatever its paths end with.

    Arrange: a backup of a server without SQLite (database-path ""), holding an
        appservice's /data/bridge.db.
    Act: run_restore.
    Assert: no one-time-key clean-up runs (on bridge.db or anything); bridge.db is
        swapped like any file, without SQLite journal names.
    """
    manifest = _manifest(
        paths=("/data/homeserver.yaml", "/data/bridge.db"),
        metadata={"server-name": SERVER_NAME, "database-path": ""},
    )
    s3_client.chain.return_value = [manifest]

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        result = _restore(container)

    assert not [command for command in _commands(ctx) if command[0] == "python3"]
    assert "/data/bridge.db" in result.restored_paths
    assert not [path for path in result.restored_paths if path.startswith("/data/bridge.db-")]


def test_restore_swaps_staged_paths_in(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """Each live path goes aside, then its staged copy (if the backup has it) comes in."""
    staged = ("homeserver.yaml", "homeserver.db")

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with staged_by_pipeline(container, synapse_data, staged):
            _restore(container)
        assert not container.exists(STAGING_DIR)

    expected = []
    for path in SWAP_PATHS:
        if (synapse_data / path.removeprefix("/data/")).exists():
            expected.append((path, f"{PREVIOUS_DIR}{path}"))
        if path.removeprefix("/data/") in staged:
            expected.append((f"{STAGING_DIR}{path}", path))
    assert _moves(ctx) == expected


def _as_move(command: list[str]) -> tuple[str, str] | None:
    """The (source, target) of a _move command, or None for another command."""
    if command[:2] == ["bash", "-c"] and "\nmv --no-target-directory -- " in command[2]:
        source, target = shlex.split(command[2].splitlines()[-1])[-2:]
        return source, target
    return None


@contextlib.contextmanager
def moves_for_real(
    container: ops.Container,
    data_dir: pathlib.Path,
    *,
    failing: Collection[tuple[str, str]] = (),
) -> Iterator[None]:
    """Make the canned moves rename for real in the mounted /data, as mv would.

    The moves in ``failing`` (canned to fail) leave everything where it is. So
    the roll-back, which decides from where each path is, sees a real /data.
    """
    real_exec = container.exec

    def exec_and_move(command: list[str], **kwargs: Any) -> Any:
        process = real_exec(command, **kwargs)
        move = _as_move(command)
        if move is not None and move not in failing:
            source, target = (data_dir / path.removeprefix("/data/") for path in move)
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        return process

    with mock.patch.object(container, "exec", side_effect=exec_and_move):
        yield


def _failing_move(source: str, target: str, stderr: str) -> testing.Exec:
    return testing.Exec(_move_command(source, target), return_code=1, stderr=stderr)


def test_restore_swap_for_real_with_journal(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A journal is written before the first move and removed after the swap.

    Arrange: the backup's homeserver.yaml and homeserver.db are staged; moves happen
        for real in /data.
    Act: run_restore.
    Assert: at the first move, the journal (0600) names the staging and previous
        dirs, the paths and the staged ones; afterwards the restored files are
        live, what the backup lacks is gone, and no journal, staging or previous
        data is left.
    """
    staged = ("homeserver.yaml", "homeserver.db")
    journals: list[tuple[dict[str, Any], int]] = []
    journal_file = synapse_data / backup.RESTORE_JOURNAL.removeprefix("/data/")

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        real_exec = container.exec

        def exec_(command: list[str], **kwargs: Any) -> Any:
            if _as_move(command) and not journals:
                journals.append(
                    (json.loads(journal_file.read_text()), journal_file.stat().st_mode & 0o777)
                )
            return real_exec(command, **kwargs)

        with (
            mock.patch.object(container, "exec", side_effect=exec_),
            staged_by_pipeline(container, synapse_data, staged),
            moves_for_real(container, synapse_data),
        ):
            result = _restore(container)
        assert container.get_service(synapse.SERVICE_NAME).is_running()

    assert journals == [
        (
            {
                "staging": STAGING_DIR,
                "previous": PREVIOUS_DIR,
                "paths": list(SWAP_PATHS),
                "staged": ["/data/homeserver.db", "/data/homeserver.yaml"],
            },
            0o600,
        )
    ]
    assert result.restored_paths == SWAP_PATHS
    assert _snapshot(synapse_data) == {
        "homeserver.db": b"restored homeserver.db",
        "homeserver.yaml": b"restored homeserver.yaml",
        "media_store": None,
        "media_store/remote_content": None,
        # The data is the backup's now: a new id, and the backup the next one may build on.
        ".synapse-backup-state": None,
        ".synapse-backup-state/data-id": f"{TOKEN}\n".encode(),
        ".synapse-backup-state/restored-from": f"{BACKUP_ID}\n".encode(),
    }


def test_restore_swap_failure_is_undone(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A move that fails is undone, newest first, from where each path is; Synapse starts again.

    Nothing is left behind: no journal, no staging dir, no (empty) previous-data dir.
    """
    failing = ("/data/homeserver.db", f"{PREVIOUS_DIR}/data/homeserver.db")
    busy = _failing_move(*failing, "mv: cannot move: Device or resource busy\n")
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=[*RESTORE_EXECS, busy]) as container:
        with (
            moves_for_real(container, synapse_data, failing={failing}),
            pytest.raises(backup.BackupError) as exc_info,
        ):
            _restore(container)
        assert container.get_service(synapse.SERVICE_NAME).is_running()

    assert not isinstance(exc_info.value, backup_restore.IncompleteRollbackError)
    assert str(exc_info.value) == (
        "the swap failed and was undone, nothing changed: cannot move /data/homeserver.db to "
        f"{PREVIOUS_DIR}/data/homeserver.db: mv: cannot move: Device or resource busy"
    )
    assert _moves(ctx) == [
        ("/data/example.com.signing.key", f"{PREVIOUS_DIR}/data/example.com.signing.key"),
        ("/data/extra.signing.key", f"{PREVIOUS_DIR}/data/extra.signing.key"),
        failing,
        # The undo, newest first.
        (f"{PREVIOUS_DIR}/data/extra.signing.key", "/data/extra.signing.key"),
        (f"{PREVIOUS_DIR}/data/example.com.signing.key", "/data/example.com.signing.key"),
    ]
    assert _snapshot(synapse_data) == before


def test_restore_swap_failure_takes_back_a_path_only_the_backup_had(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A restored path with no live version is moved back to staging by the undo.

    Arrange: the backup holds a.signing.key, which /data lacks; it is moved in
        first, then moving homeserver.db aside fails.
    Act: run_restore.
    Assert: the undo moves a.signing.key back to staging; /data is as before.
    """
    s3_client.chain.return_value = [_manifest(paths=(*MANIFEST_PATHS, "/data/a.signing.key"))]
    failing = ("/data/homeserver.db", f"{PREVIOUS_DIR}/data/homeserver.db")
    busy = _failing_move(*failing, "mv: cannot move: Device or resource busy\n")
    before = _snapshot(synapse_data)

    with (
        live_container(ctx, synapse_data, execs=[*RESTORE_EXECS, busy]) as container,
        staged_by_pipeline(container, synapse_data, ("a.signing.key",)),
        moves_for_real(container, synapse_data, failing={failing}),
        pytest.raises(backup.BackupError, match=r"^the swap failed and was undone"),
    ):
        _restore(container)

    moves = _moves(ctx)
    assert moves[0] == (f"{STAGING_DIR}/data/a.signing.key", "/data/a.signing.key")
    assert moves[-1] == ("/data/a.signing.key", f"{STAGING_DIR}/data/a.signing.key")
    assert _snapshot(synapse_data) == before


STAGED = ("homeserver.yaml", "homeserver.db")
# Moving the staged homeserver.yaml in fails, and so does moving the restored
# homeserver.db back to staging during the undo.
UNDO_FAILS = {
    (
        f"{STAGING_DIR}/data/homeserver.yaml",
        "/data/homeserver.yaml",
    ): "mv: No space left on device",
    ("/data/homeserver.db", f"{STAGING_DIR}/data/homeserver.db"): "mv: Input/output error",
}


def _restore_whose_undo_fails(
    ctx: testing.Context, data_dir: pathlib.Path
) -> tuple[backup.BackupError, bool]:
    """Run a restore whose swap and undo both fail; return its error and Synapse's state."""
    failing = [_failing_move(*move, stderr + "\n") for move, stderr in UNDO_FAILS.items()]
    with live_container(ctx, data_dir, execs=[*RESTORE_EXECS, *failing]) as container:
        with (
            staged_by_pipeline(container, data_dir, STAGED),
            moves_for_real(container, data_dir, failing=set(UNDO_FAILS)),
            pytest.raises(backup_restore.IncompleteRollbackError) as exc_info,
        ):
            _restore(container)
        running = container.get_service(synapse.SERVICE_NAME).is_running()
    return exc_info.value, running


def test_restore_failed_undo_keeps_everything_for_the_operator(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    caplog: pytest.LogCaptureFixture,
):
    """If the undo fails too, Synapse is not started and nothing the operator needs is removed.

    Arrange: homeserver.yaml and homeserver.db staged; moving the staged
        homeserver.yaml in fails, and so does moving the restored homeserver.db
        back to staging.
    Act: run_restore.
    Assert: IncompleteRollbackError naming both failures and where the data is;
        the other paths are back; the path that could not be undone is not
        overwritten (its previous version stays aside); the journal, staging and
        previous data are kept; Synapse is left stopped; the failed undo is
        logged as critical.
    """
    caplog.set_level(logging.CRITICAL, logger="backup_restore")
    before = _snapshot(synapse_data)

    error, running = _restore_whose_undo_fails(ctx, synapse_data)

    assert str(error) == (
        f"the swap failed (cannot move {STAGING_DIR}/data/homeserver.yaml to "
        "/data/homeserver.yaml: mv: No space left on device) and could not be undone: "
        f"cannot move /data/homeserver.db to {STAGING_DIR}/data/homeserver.db: "
        f"mv: Input/output error; the previous data is in {PREVIOUS_DIR}, "
        f"the restored data in {STAGING_DIR}"
    )
    assert running is False
    moves = _moves(ctx)
    failed_swap = moves.index((f"{STAGING_DIR}/data/homeserver.yaml", "/data/homeserver.yaml"))
    assert moves[failed_swap + 1 :] == [
        (f"{PREVIOUS_DIR}/data/homeserver.yaml", "/data/homeserver.yaml"),
        (f"{PREVIOUS_DIR}/data/homeserver.db-wal", "/data/homeserver.db-wal"),
        ("/data/homeserver.db", f"{STAGING_DIR}/data/homeserver.db"),  # fails
        (f"{PREVIOUS_DIR}/data/extra.signing.key", "/data/extra.signing.key"),
        (f"{PREVIOUS_DIR}/data/example.com.signing.key", "/data/example.com.signing.key"),
    ]
    after = _snapshot(synapse_data)
    assert after["homeserver.db"] == b"restored homeserver.db"
    previous = PREVIOUS_DIR.removeprefix("/data/")
    assert after[f"{previous}/data/homeserver.db"] == before["homeserver.db"]
    for name in ("homeserver.yaml", "homeserver.db-wal", "extra.signing.key"):
        assert after[name] == before[name]
    assert f"{STAGING_DIR.removeprefix('/data/')}/data/homeserver.yaml" in after
    journal = json.loads(after[backup.RESTORE_JOURNAL.removeprefix("/data/")] or b"")
    assert (journal["staging"], journal["previous"]) == (STAGING_DIR, PREVIOUS_DIR)
    (record,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.getMessage().startswith("could not undo the restore of /data/homeserver.db: ")


def test_recover_interrupted_restore_rolls_back(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A later hook rolls back from the journal what a failed undo (or a dead charm) left.

    Arrange: a restore whose undo failed (as above).
    Act: recover_interrupted_restore in a later event, moves now working.
    Assert: nothing to report; the live data is as before the restore; the journal
        and the staging dir are removed.
    """
    before = _snapshot(synapse_data)
    _restore_whose_undo_fails(ctx, synapse_data)

    with (
        live_container(ctx, synapse_data, execs=[MOVE]) as container,
        moves_for_real(container, synapse_data),
    ):
        assert backup.recover_interrupted_restore(container) is None

    after = _snapshot(synapse_data)
    previous = PREVIOUS_DIR.removeprefix("/data/")
    assert {name: value for name, value in after.items() if not name.startswith(previous)} == (
        before
    )


def test_recover_interrupted_restore_leaves_no_empty_previous_dir(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """After a roll-back from the journal, /data is exactly as before the restore.

    The previous-data dir, which holds only empty directories once all is back,
    is removed with the staging dir.
    """
    before = _snapshot(synapse_data)
    _restore_whose_undo_fails(ctx, synapse_data)

    with (
        live_container(ctx, synapse_data, execs=[MOVE]) as container,
        moves_for_real(container, synapse_data),
    ):
        backup.recover_interrupted_restore(container)

    assert _snapshot(synapse_data) == before


def test_recover_interrupted_restore_without_journal(
    ctx: testing.Context, synapse_data: pathlib.Path
):
    """No journal: nothing to do, nothing run."""
    with live_container(ctx, synapse_data) as container:
        assert backup.recover_interrupted_restore(container) is None

    assert _commands(ctx) == []


def test_recover_interrupted_restore_unreadable_journal(
    ctx: testing.Context, synapse_data: pathlib.Path
):
    """A journal that does not parse is reported, and nothing is moved."""
    (synapse_data / backup.RESTORE_JOURNAL.removeprefix("/data/")).write_text("{not json")

    with live_container(ctx, synapse_data) as container:
        problem = backup.recover_interrupted_restore(container)

    assert problem is not None
    assert problem.startswith("cannot read the journal of an interrupted restore: ")
    assert _commands(ctx) == []


def test_recover_interrupted_restore_that_fails_again(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A roll-back that still fails says where the previous data is; the journal stays."""
    _restore_whose_undo_fails(ctx, synapse_data)
    move = ("/data/homeserver.db", f"{STAGING_DIR}/data/homeserver.db")
    failing = _failing_move(*move, "mv: Input/output error\n")

    with live_container(ctx, synapse_data, execs=[MOVE, failing]) as container:
        with moves_for_real(container, synapse_data, failing={move}):
            problem = backup.recover_interrupted_restore(container)
        assert container.exists(backup.RESTORE_JOURNAL)

    assert problem == (
        f"an interrupted restore could not be rolled back; the previous data is in "
        f"{PREVIOUS_DIR}: cannot move /data/homeserver.db to {STAGING_DIR}/data/homeserver.db: "
        "mv: Input/output error"
    )


def _change_error(message: str) -> ops.pebble.ChangeError:
    change = ops.pebble.Change.from_dict(
        {
            "id": "7",
            "kind": "service",
            "summary": message,
            "status": "Error",
            "ready": True,
            "err": message,
            "spawn-time": "2025-01-01T00:00:00Z",
            "tasks": [],
        }
    )
    return ops.pebble.ChangeError(message, change)


def test_restore_start_failure_is_reported(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """If Synapse does not start again after the swap, the restore says so."""
    error = _change_error("cannot start service: exited quickly")

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with (
            mock.patch.object(container, "start", side_effect=error) as start,
            pytest.raises(backup.BackupError, match="Synapse did not start again: cannot start"),
        ):
            _restore(container)
        start.assert_called_once_with(synapse.SERVICE_NAME)
        assert not container.exists(STAGING_DIR)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(_change_error("cannot stop service: timed out"), id="change-error"),
        pytest.param(
            ops.pebble.TimeoutError("timed out waiting for change 9 (30 seconds)"), id="timeout"
        ),
    ],
)
def test_restore_stop_failure_is_a_backup_error_and_restarts(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    error: Exception,
):
    """A Synapse that fails to stop fails the restore cleanly, and is started again.

    Nothing is moved: the live data is as it was, and the staging dir is removed.
    """
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with (
            mock.patch.object(container, "stop", side_effect=error),
            mock.patch.object(container, "start", wraps=container.start) as start,
            pytest.raises(
                backup.BackupError, match=r"^Synapse could not be stopped: "
            ) as exc_info,
        ):
            _restore(container)
        start.assert_called_once_with(synapse.SERVICE_NAME)
        assert not container.exists(STAGING_DIR)

    assert str(error) in str(exc_info.value)
    assert _moves(ctx) == []
    assert _snapshot(synapse_data) == before


def test_restore_stop_and_start_failures_report_the_start(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """If Synapse can be neither stopped nor started, the restore says it is not running."""
    with (
        live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container,
        mock.patch.object(container, "stop", side_effect=_change_error("cannot stop")),
        mock.patch.object(container, "start", side_effect=_change_error("cannot start")),
        pytest.raises(backup.BackupError, match=r"^Synapse did not start again: cannot start"),
    ):
        _restore(container)

    assert _moves(ctx) == []


def test_restore_without_the_service_planned_swaps_without_stopping(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """Before the charm planned Synapse's service, there is nothing to stop or start."""
    with (
        live_container(ctx, synapse_data, execs=RESTORE_EXECS, planned=False) as container,
        mock.patch.object(container, "stop") as stop,
        mock.patch.object(container, "start") as start,
    ):
        result = _restore(container)

    stop.assert_not_called()
    start.assert_not_called()
    assert result.restored_paths == SWAP_PATHS
    assert _moves(ctx)


# --- run_restore: what an error leaves, by where it happens ----------------------------------


class CharmDied(BaseException):
    """Stands for the charm process being killed mid-restore: nothing catches it."""


@contextlib.contextmanager
def failing_at_move(container: ops.Container, number: int, error: BaseException) -> Iterator[None]:
    """Make the ``number``-th move (1-based) raise ``error`` instead of running."""
    real_exec = container.exec
    moves = 0

    def exec_(command: list[str], **kwargs: Any) -> Any:
        nonlocal moves
        if _as_move(command):
            moves += 1
            if moves == number:
                raise error
        return real_exec(command, **kwargs)

    with mock.patch.object(container, "exec", side_effect=exec_):
        yield


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(CharmDied(), id="charm-killed"),
        pytest.param(RuntimeError("a bug"), id="unexpected-exception"),
    ],
)
def test_restore_unexpected_error_mid_swap_leaves_all_for_the_journal(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    error: BaseException,
):
    """An unexpected error mid-swap changes nothing more: the journal rolls the swap back.

    Arrange: homeserver.yaml and homeserver.db staged; moves happen for real;
        the fourth move raises an exception that is neither a BackupError nor a
        Pebble error.
    Act: run_restore, then recover_interrupted_restore in a later event.
    Assert: the exception propagates as it is; Synapse is left stopped (not
        started on half-swapped data); the journal, staging and previous data
        are all in place; the roll-back then puts /data back exactly as it was.
    """
    before = _snapshot(synapse_data)
    previous = PREVIOUS_DIR.removeprefix("/data/")

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with (
            staged_by_pipeline(container, synapse_data, STAGED),
            moves_for_real(container, synapse_data),
            failing_at_move(container, 4, error),
            mock.patch.object(container, "start", wraps=container.start) as start,
            pytest.raises(type(error)) as exc_info,
        ):
            _restore(container)
        running = container.get_service(synapse.SERVICE_NAME).is_running()

    assert exc_info.value is error
    assert running is False
    start.assert_not_called()
    half_swapped = _snapshot(synapse_data)
    assert backup.RESTORE_JOURNAL.removeprefix("/data/") in half_swapped
    assert f"{STAGING_DIR.removeprefix('/data/')}/data/homeserver.yaml" in half_swapped
    assert (
        half_swapped[f"{previous}/data/example.com.signing.key"]
        == (before["example.com.signing.key"])
    )

    with (
        live_container(ctx, synapse_data, execs=[MOVE]) as container,
        moves_for_real(container, synapse_data),
    ):
        assert backup.recover_interrupted_restore(container) is None

    assert _snapshot(synapse_data) == before


@pytest.mark.parametrize(
    ("error", "raised", "message"),
    [
        pytest.param(CharmDied(), CharmDied, None, id="charm-killed"),
        pytest.param(RuntimeError("a bug"), RuntimeError, "a bug", id="unexpected-exception"),
        pytest.param(
            ops.pebble.ConnectionError("cannot connect to Pebble"),
            backup.BackupError,
            "restore failed: cannot connect to Pebble",
            id="pebble-error",
        ),
    ],
)
def test_restore_error_while_staging_removes_staging(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    error: BaseException,
    raised: type[BaseException],
    message: str | None,
):
    """Whatever fails while staging, nothing live was touched: the staging dir goes.

    A Pebble error becomes a BackupError; anything else propagates as it is.
    """
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        real_exec = container.exec

        def exec_(command: list[str], **kwargs: Any) -> Any:
            if command == _pipeline_command(STAGING_DIR):
                assert container.exists(STAGING_DIR)
                raise error
            return real_exec(command, **kwargs)

        with (
            mock.patch.object(container, "exec", side_effect=exec_),
            pytest.raises(raised) as exc_info,
        ):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    if message is not None:
        assert str(exc_info.value) == message
    assert not any(_as_move(command) for command in _commands(ctx))


def _journal_push_fails(container: ops.Container) -> Any:
    """Patch container.push so that writing the restore journal fails (say, /data is full)."""
    real_push = container.push

    def push(path: str, *args: Any, **kwargs: Any) -> None:
        if path == backup.RESTORE_JOURNAL:
            raise ops.pebble.PathError("generic-file-error", "write: no space left on device")
        real_push(path, *args, **kwargs)

    return mock.patch.object(container, "push", side_effect=push)


def test_restore_pebble_error_before_the_first_move_cleans_up(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A Pebble error after the stop but before any move: a BackupError, nothing changed.

    Arrange: writing the restore journal (the swap's first step) fails.
    Act: run_restore.
    Assert: BackupError "restore failed: ..."; nothing was moved; no journal,
        staging or previous-data dir is left; the live data is as it was.
    """
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with _journal_push_fails(container), pytest.raises(backup.BackupError) as exc_info:
            _restore(container)
        assert not container.exists(WORK_DIR)

    assert str(exc_info.value) == (
        "restore failed: generic-file-error - write: no space left on device"
    )
    assert _moves(ctx) == []
    assert _snapshot(synapse_data) == before


def test_restore_pebble_error_before_the_first_move_starts_synapse_again(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A restore that failed before touching the live data leaves Synapse running."""
    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with _journal_push_fails(container), pytest.raises(backup.BackupError):
            _restore(container)

        assert container.get_service(synapse.SERVICE_NAME).is_running()


def test_restore_start_failure_after_the_swap_keeps_the_previous_data(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """Synapse not starting on the restored data: the previous data kept as asked."""
    before = _snapshot(synapse_data)
    previous = PREVIOUS_DIR.removeprefix("/data/")
    error = _change_error("cannot start service: exited quickly")

    with (
        live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container,
        staged_by_pipeline(container, synapse_data, STAGED),
        moves_for_real(container, synapse_data),
        mock.patch.object(container, "start", side_effect=error),
        pytest.raises(backup.BackupError, match=r"^Synapse did not start again: "),
    ):
        _restore(container, keep_previous=True)

    after = _snapshot(synapse_data)
    assert after["homeserver.db"] == b"restored homeserver.db"
    assert after.get(f"{previous}/data/homeserver.db") == before["homeserver.db"]


# --- run_restore: a chain of backups ---------------------------------------------------------

FULL_ID = "20250101T000000Z"
MIDDLE_ID = "20250101T120000Z"


def _chain() -> list[backup.BackupManifest]:
    """A full backup, an incremental on it, and BACKUP_ID, an incremental on that."""
    return [
        _manifest(backup_id=FULL_ID, size=1000, file_count=10, sha256="01" * 32),
        _manifest(
            backup_id=MIDDLE_ID,
            size=200,
            file_count=3,
            sha256="02" * 32,
            backup_type="incremental",
            parent=FULL_ID,
        ),
        _manifest(
            backup_type="incremental",
            parent=MIDDLE_ID,
            metadata={"server-name": SERVER_NAME, "database-path": "/data/homeserver.db"},
        ),
    ]


def _chain_execs(**stdouts: str) -> list[testing.Exec]:
    """Canned commands for a chain restore; each archive's pipeline reports its manifest's."""
    pipelines = [
        testing.Exec(
            _pipeline_command(STAGING_DIR, link.backup_id),
            stdout=stdouts.get(link.backup_id, f"{link.sha256} {link.size} {link.file_count}\n"),
        )
        for link in _chain()
    ]
    return [PROBE_OK, DF_ROOMY, *pipelines, POST_RESTORE, MOVE]


def test_restore_chain(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """An incremental backup is restored with its chain: the full one, then each in order.

    Arrange: S3 (mocked) gives the chain of BACKUP_ID: full, middle, BACKUP_ID.
    Act: run_restore of BACKUP_ID.
    Assert: the passphrase is probed on the full backup; every archive is
        extracted, oldest first, into the one staging dir (as an incremental
        archive: deletions replay); the database recorded in the newest manifest
        is fixed up; then the swap; the result adds up the archives.
    """
    s3_client.chain.return_value = _chain()
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=_chain_execs()) as container:
        result = _restore(container, logs)
        assert container.get_service(synapse.SERVICE_NAME).is_running()
        assert not container.exists(STAGING_DIR)

    s3_client.chain.assert_called_once_with(BACKUP_ID)
    s3_client.get_manifest.assert_not_called()
    s3_client.read_object.assert_called_once_with(
        FULL_ID, first_bytes=backup_container.PASSPHRASE_PROBE_BYTES
    )
    commands = _commands(ctx)
    assert commands[:6] == [
        _probe_command(),
        ["df", "--output=avail", "--block-size=1", "--", "/data"],
        _pipeline_command(STAGING_DIR, FULL_ID),
        _pipeline_command(STAGING_DIR, MIDDLE_ID),
        _pipeline_command(STAGING_DIR, BACKUP_ID),
        commands[5],
    ]
    for pipeline in commands[2:5]:
        assert "--listed-incremental=/dev/null" in shlex.split(pipeline[2])
    assert commands[5][:2] == ["python3", "-c"]
    assert commands[5][-1] == f"{STAGING_DIR}/data/homeserver.db"
    assert _moves(ctx)
    assert (result.backup_id, result.file_count, result.size) == (BACKUP_ID, 19, 2434)
    assert result.restored_paths == SWAP_PATHS
    assert [line for line in logs if line.startswith("downloading")] == [
        f"downloading, decrypting and extracting full backup {FULL_ID} (1000 bytes) into staging",
        f"downloading, decrypting and extracting incremental backup {MIDDLE_ID} (200 bytes) "
        "into staging",
        f"downloading, decrypting and extracting incremental backup {BACKUP_ID} (1234 bytes) "
        "into staging",
    ]


def test_restore_chain_needs_room_for_every_archive(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """The staging area must hold the whole chain: nothing is downloaded otherwise.

    Each member may waste most of a disk block (3,000 small thumbnails took
    2.2 times their archive's bytes): a block per member is counted too.
    """
    s3_client.chain.return_value = _chain()
    members = sum(link.file_count for link in _chain())
    assert members > 0
    needed = (
        1000 + 200 + 1234 + members * backup_restore.DISK_BLOCK + backup_restore.STAGING_HEADROOM
    )
    df = testing.Exec(["df"], stdout=f"Avail\n{needed - 1}\n")
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=[PROBE_OK, df]) as container:
        with pytest.raises(
            backup.BackupError, match=f"{needed} bytes needed, {needed - 1} available"
        ):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    assert len(_commands(ctx)) == 2


def test_restore_chain_stops_at_an_archive_that_does_not_match(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A link that does not match its manifest fails the restore, naming it; nothing is swapped.

    The archives after it are not downloaded, Synapse is never stopped and the
    staging dir (holding the archives before it) is removed.
    """
    s3_client.chain.return_value = _chain()
    execs = _chain_execs(**{MIDDLE_ID: f"{'02' * 32} 200 4\n"})
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=execs) as container:
        with pytest.raises(
            backup.BackupError,
            match=f"^backup {MIDDLE_ID} does not match its manifest: 4 files instead of 3$",
        ):
            _restore(container)
        _assert_untouched(ctx, container, synapse_data, before)

    assert _commands(ctx)[2:] == [
        _pipeline_command(STAGING_DIR, FULL_ID),
        _pipeline_command(STAGING_DIR, MIDDLE_ID),
    ]


def test_restore_broken_chain_touches_nothing(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    tools_present: mock.MagicMock,
):
    """A chain with a missing link fails before anything runs, saying which link is missing."""
    message = (
        f"backup {MIDDLE_ID} depends on {FULL_ID}, which is missing or incomplete: "
        f"the chain of {BACKUP_ID} is broken"
    )
    s3_client.chain.side_effect = backup.S3Error(message, option="backup-id")
    before = _snapshot(synapse_data)

    with (
        live_container(ctx, synapse_data, execs=_chain_execs()) as container,
        pytest.raises(backup.BackupError) as exc_info,
    ):
        _restore(container)

    assert str(exc_info.value) == message
    assert _commands(ctx) == []
    tools_present.assert_not_called()
    assert _snapshot(synapse_data) == before


def test_restore_chain_checks_the_newest_server_name(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """The server-name check reads the backup asked for, the newest link of its chain."""
    chain = _chain()
    chain[-1] = dataclasses.replace(chain[-1], metadata={"server-name": "other.org"})
    s3_client.chain.return_value = chain

    with (
        live_container(ctx, synapse_data, execs=_chain_execs()) as container,
        pytest.raises(backup.BackupError, match=r"is of server 'other\.org'"),
    ):
        _restore(container)

    assert _commands(ctx) == []


# --- verify_backup --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdout", "matches"),
    [
        pytest.param(f"{SHA256} 1234 6\n", True, id="matches"),
        pytest.param(f"{SHA256} 1234 9\n", False, id="mismatch"),
    ],
)
def test_verify_backup(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    stdout: str,
    matches: bool,
):
    """Verify lists the archive as the Synapse user and touches no live data."""
    pipeline = testing.Exec(_pipeline_command(None), stdout=stdout)
    before = _snapshot(synapse_data)
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=[pipeline]) as container:
        check = backup.verify_backup(container, _params(), BACKUP_ID, PASSPHRASE, log=logs.append)
        assert not container.exists(WORK_DIR)

    assert check.matches is matches
    assert check.manifest == _manifest()
    (call,) = ctx.exec_history[synapse.CONTAINER_NAME]
    assert call.command == _pipeline_command(None)
    assert (call.user_id, call.group_id) == (
        synapse_layout.SYNAPSE_USER_ID,
        synapse_layout.SYNAPSE_GROUP_ID,
    )
    assert _snapshot(synapse_data) == before
    assert logs == ["downloading and listing 1234 bytes"]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        pytest.param(
            backup.S3Error(f"there is no backup {BACKUP_ID}", option="backup-id"),
            f"there is no backup {BACKUP_ID}",
            id="missing",
        ),
        pytest.param(
            backup.BackupError("invalid backup manifest: bad sha256"),
            "invalid backup manifest",
            id="bad-manifest",
        ),
    ],
)
def test_verify_backup_missing(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    error: Exception,
    message: str,
):
    """A missing backup or bad manifest is a BackupError; nothing runs in the container."""
    s3_client.get_manifest.side_effect = error

    with (
        live_container(ctx, synapse_data) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        backup.verify_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    assert _commands(ctx) == []


def test_verify_backup_pipeline_fails(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A failing download or decryption is a BackupError without secrets."""
    pipeline = testing.Exec(
        _pipeline_command(None), return_code=2, stderr=f"gpg: bad key {PASSPHRASE}\n"
    )

    with live_container(ctx, synapse_data, execs=[pipeline]) as container:
        with pytest.raises(backup.BackupError) as exc_info:
            backup.verify_backup(container, _params(), BACKUP_ID, PASSPHRASE)
        assert not container.exists(WORK_DIR)

    assert "gpg: bad key ***" in str(exc_info.value)
    assert PASSPHRASE not in str(exc_info.value)


def test_restore_backup_is_a_forced_run_restore(ctx: testing.Context, synapse_data: pathlib.Path):
    """The seed API's restore_backup is run_restore with force (no server name to check)."""
    with (
        live_container(ctx, synapse_data) as container,
        mock.patch.object(backup_restore, "run_restore", autospec=True) as run_restore,
    ):
        backup.restore_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    run_restore.assert_called_once_with(container, _params(), BACKUP_ID, PASSPHRASE, force=True)


def _journal_removal_fails(container: ops.Container, times: int) -> Any:
    """Patch container.remove_path so that removing the restore journal fails some times."""
    real_remove = container.remove_path
    failures = [times]

    def remove_path(path: str, *args: Any, **kwargs: Any) -> None:
        if path == backup.RESTORE_JOURNAL and failures[0]:
            failures[0] -= 1
            raise ops.pebble.APIError({}, 500, "Internal Server Error", "unlink: I/O error")
        real_remove(path, *args, **kwargs)

    return mock.patch.object(container, "remove_path", side_effect=remove_path)


@pytest.mark.parametrize("times", [1, 2, 3], ids=["once", "twice", "until-the-next-hook"])
def test_restore_whose_journal_cannot_be_removed_never_loses_data(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock, times: int
):
    """A journal that outlives a swap must never meet a removed staging or previous dir.

    Its roll-back would take every restored path for one moved in, and move
    the live data into the staging dir about to be deleted: a wiped
    homeserver. So a swap whose journal cannot be removed is undone at once,
    while staging and previous are whole; while the journal stays, neither
    is removed, and the next hook finishes the roll-back.

    Arrange: removing the journal fails once (the swap's), twice (the
        roll-back's too), or three times (and the next hook's first try too).
    Act: run_restore, then recover_interrupted_restore in later events.
    Assert: the restore fails saying nothing changed, or that the journal
        stays; Synapse is started only when the journal is gone; in the end
        /data is exactly as before the restore.
    """
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with (
            staged_by_pipeline(container, synapse_data, STAGED),
            moves_for_real(container, synapse_data),
            _journal_removal_fails(container, times),
            pytest.raises(backup.BackupError) as exc_info,
        ):
            _restore(container)
        running = container.get_service(synapse.SERVICE_NAME).is_running()
        journal_stays = container.exists(backup.RESTORE_JOURNAL)

        if times == 1:
            assert str(exc_info.value).startswith(
                "the swap failed and was undone, nothing changed"
            )
            assert running
            assert not journal_stays
        else:
            assert isinstance(exc_info.value, backup_restore.IncompleteRollbackError)
            assert f"cannot remove {backup.RESTORE_JOURNAL}" in str(exc_info.value)
            assert not running
            assert journal_stays
            assert container.exists(STAGING_DIR)
            assert container.exists(PREVIOUS_DIR)
            with _journal_removal_fails(container, times - 2):
                problem = backup.recover_interrupted_restore(container)
            if times == 3:
                assert problem is not None
                assert "could not be rolled back" in problem
                assert container.exists(STAGING_DIR)
                assert backup.recover_interrupted_restore(container) is None

    assert _snapshot(synapse_data) == before


def test_recover_interrupted_restore_damaged_journal(
    ctx: testing.Context, synapse_data: pathlib.Path
):
    """A journal that parses but lacks what a roll-back needs is reported, not half used."""
    journal = synapse_data / backup.RESTORE_JOURNAL.removeprefix("/data/")
    for text in ("{}", "null", '{"staging": "/data/x", "previous": "/data/y", "paths": [1]}'):
        journal.write_text(text)

        with live_container(ctx, synapse_data) as container:
            problem = backup.recover_interrupted_restore(container)

        assert problem == (
            "cannot read the journal of an interrupted restore: "
            f"{backup.RESTORE_JOURNAL} is damaged"
        )
    assert _commands(ctx) == []


def test_restore_removes_the_previous_data_once_synapse_answers(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    monkeypatch: pytest.MonkeyPatch,
):
    """Pebble counts Synapse started after a second: the previous data waits for /health.

    Arrange: Synapse answers its health check at the third question.
    Act: run_restore with that check.
    Assert: it was asked three times, with the interval between; then the
        previous data was removed.
    """
    answers = iter([False, False, True])
    sleeps: list[float] = []
    monkeypatch.setattr(backup_restore.time, "sleep", sleeps.append)
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with staged_by_pipeline(container, synapse_data, STAGED):
            result = _restore(container, logs, healthy=lambda: next(answers))
        assert not container.exists(PREVIOUS_DIR)

    assert sleeps == [backup_restore.RESTORE_HEALTH_INTERVAL] * 2
    assert next(answers, "all asked") == "all asked"
    assert logs[-2:] == [
        "waiting for Synapse to answer its health check",
        "removing the previous data",
    ]
    assert result.previous_dir is None


@pytest.mark.parametrize(
    ("kwargs", "answers", "marker"),
    [
        pytest.param({}, True, BACKUP_ID, id="previous-data-removed"),
        pytest.param({"keep_previous": True}, True, None, id="previous-data-kept"),
        pytest.param({}, False, None, id="synapse-does-not-answer"),
    ],
)
def test_restore_says_what_the_next_backup_may_build_on(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any],
    answers: bool,
    marker: str | None,
):
    """Only when the replaced data is gone may the next backup build on the restored one.

    Where it is kept, the operator may move it back by hand, and the restored
    backup's snapshot state would not describe it: the next backup is full.
    """
    monkeypatch.setattr(backup_restore.time, "sleep", lambda _: None)
    monkeypatch.setattr(backup_restore, "RESTORE_HEALTH_TIMEOUT", 0.0)
    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        with (
            staged_by_pipeline(container, synapse_data, STAGED),
            contextlib.suppress(backup_restore.SynapseNotStartedError),
        ):
            _restore(container, healthy=lambda: answers, **kwargs)
        assert backup_chain.read_data_id(container) is not None
        assert backup_chain._read_state_value(container, backup_chain.RESTORED_FROM_FILE) == marker


@pytest.mark.parametrize("removal_fails", [False, True], ids=["journal-removed", "journal-stays"])
def test_restore_whose_journal_write_fails_after_writing_never_loses_data(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    removal_fails: bool,
):
    """Pebble may fail a push after the file is written (its client gives up after 5 s).

    A journal left that way beside a removed staging dir would make the next
    roll-back move the live data into it. So a failed write is followed by a
    strict removal; if that fails too, staging is kept and Synapse stays
    stopped until the next hook, whose roll-back moves nothing and cleans up.
    """
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        real_push = container.push

        def push(path: str, *args: Any, **kwargs: Any) -> None:
            real_push(path, *args, **kwargs)
            if path == backup.RESTORE_JOURNAL:
                raise ops.pebble.ConnectionError("timed out waiting for Pebble")

        with (
            staged_by_pipeline(container, synapse_data, STAGED),
            mock.patch.object(container, "push", side_effect=push),
            _journal_removal_fails(container, 1 if removal_fails else 0),
            pytest.raises(backup.BackupError) as exc_info,
        ):
            _restore(container)
        running = container.get_service(synapse.SERVICE_NAME).is_running()

        assert _moves(ctx) == []
        if removal_fails:
            assert isinstance(exc_info.value, backup_restore.IncompleteRollbackError)
            assert "nothing was moved, and the next hook removes it" in str(exc_info.value)
            assert not running
            assert container.exists(STAGING_DIR)
        else:
            assert str(exc_info.value) == "restore failed: timed out waiting for Pebble"
            assert running
        assert backup.recover_interrupted_restore(container) is None
        assert not container.exists(backup.RESTORE_JOURNAL)

    assert _snapshot(synapse_data) == before


def test_restore_without_the_service_planned_does_not_wait_for_an_answer(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """With no Synapse service in the plan nothing was started: nobody is asked."""
    asked: list[bool] = []

    with (
        live_container(ctx, synapse_data, execs=RESTORE_EXECS, planned=False) as container,
        staged_by_pipeline(container, synapse_data, STAGED),
    ):
        result = _restore(container, healthy=lambda: asked.append(True) or False)

    assert asked == []
    assert result.previous_dir is None


def test_a_journal_removed_although_pebble_said_it_failed_counts_as_removed(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """Pebble may fail a removal it did: the roll-back then finds no journal, which is fine.

    Arrange: removing the journal at the end of the swap removes it, then fails.
    Act: run_restore.
    Assert: the swap is undone, the second removal's "not found" is no
        problem: a plain "undone" error, Synapse running, /data as before.
    """
    before = _snapshot(synapse_data)

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        real_remove = container.remove_path
        failed: list[str] = []

        def remove_path(path: str, *args: Any, **kwargs: Any) -> None:
            real_remove(path, *args, **kwargs)
            if path == backup.RESTORE_JOURNAL and not failed:
                failed.append(path)
                raise ops.pebble.APIError({}, 500, "Internal Server Error", "timed out")

        with (
            staged_by_pipeline(container, synapse_data, STAGED),
            moves_for_real(container, synapse_data),
            mock.patch.object(container, "remove_path", side_effect=remove_path),
            pytest.raises(backup.BackupError) as exc_info,
        ):
            _restore(container)
        running = container.get_service(synapse.SERVICE_NAME).is_running()

    assert not isinstance(exc_info.value, backup_restore.IncompleteRollbackError)
    assert str(exc_info.value).startswith("the swap failed and was undone, nothing changed")
    assert running
    assert _snapshot(synapse_data) == before


def test_restore_waits_for_an_answer_when_pebble_cannot_say_what_is_planned(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """Reading the plan after the swap fails: the restore asks Synapse all the same."""
    asked: list[bool] = []

    with live_container(ctx, synapse_data, execs=RESTORE_EXECS) as container:
        real_get_plan = container.get_plan
        calls: list[bool] = []

        def get_plan() -> Any:
            calls.append(True)
            if len(calls) > 1:  # the stop-and-swap reads it first
                raise ops.pebble.ConnectionError("Pebble is restarting")
            return real_get_plan()

        with (
            staged_by_pipeline(container, synapse_data, STAGED),
            mock.patch.object(container, "get_plan", side_effect=get_plan),
        ):
            result = _restore(container, healthy=lambda: asked.append(True) or True)

    assert asked == [True]
    assert result.previous_dir is None


# --- the data id after a restore ------------------------------------------------------------


def _data_id_file(data_dir: pathlib.Path) -> pathlib.Path:
    return data_dir / backup_chain.DATA_ID_FILE.removeprefix("/data/")


@pytest.mark.parametrize("before", [None, "b" * 32])
@pytest.mark.parametrize("restored_from", [BACKUP_ID, None])
def test_restore_renews_the_data_id(
    ctx: testing.Context, synapse_data: pathlib.Path, before: str | None, restored_from: str | None
):
    """/data holds other data now: a new id, and the one backup it may build on (or none)."""
    if before is not None:
        _data_id_file(synapse_data).parent.mkdir(parents=True)
        _data_id_file(synapse_data).write_text(before + "\n")
    logs: list[str] = []

    with live_container(ctx, synapse_data) as container:
        backup_chain._renew_data_id(container, restored_from, logs.append)
        after = backup_chain.read_data_id(container)
        marker = backup_chain._read_state_value(container, backup_chain.RESTORED_FROM_FILE)

    assert logs == []
    assert after is not None
    assert after != before
    assert marker == restored_from
    assert _data_id_file(synapse_data).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("method", "error"),
    [
        pytest.param("push", ops.pebble.APIError({}, 500, "error", "disk full"), id="write"),
        pytest.param(
            "remove_path", ops.pebble.PathError("generic-file-error", "disk full"), id="remove"
        ),
    ],
)
def test_restore_that_cannot_renew_the_data_id_says_so(
    ctx: testing.Context, synapse_data: pathlib.Path, method: str, error: ops.pebble.Error
):
    """Not fatal (the restore is done; the next chain is only larger), but logged."""
    logs: list[str] = []

    with (
        live_container(ctx, synapse_data) as container,
        mock.patch.object(container, method, side_effect=error),
    ):
        backup_chain._renew_data_id(container, BACKUP_ID, logs.append)

    (line,) = logs
    assert "disk full" in line
    assert "the next backup may be larger than needed" in line


def _newest(data_id: str | None, backup_id: str = BACKUP_ID) -> backup.BackupManifest:
    return _manifest(backup_id=backup_id, metadata={"data-id": data_id} if data_id else {})


OURS = "a" * 32
OTHER = "b" * 32


@pytest.mark.parametrize(
    ("newest", "local", "restored_from", "expected"),
    [
        pytest.param(_newest(OURS), False, None, True, id="made-by-this-data"),
        pytest.param(_newest(OTHER), True, None, False, id="made-by-other-data"),
        pytest.param(_newest(OTHER), False, BACKUP_ID, True, id="the-restored-backup"),
        pytest.param(
            _newest(OTHER, "20250102T030406Z"),
            False,
            BACKUP_ID,
            False,
            id="made-after-the-restore-by-another-volume",
        ),
        pytest.param(_newest(None), True, None, True, id="older-than-ids-state-here"),
        pytest.param(_newest(None), False, None, False, id="older-than-ids-state-elsewhere"),
    ],
)
def test_made_of_this_data(
    newest: backup.BackupManifest, local: bool, restored_from: str | None, expected: bool
):
    """Only a snapshot state that describes /data may be built on."""
    assert (
        backup_chain._made_of_this_data(
            newest, local=local, data_id=OURS, restored_from=restored_from
        )
        is expected
    )


def test_read_data_id_failures(ctx: testing.Context, synapse_data: pathlib.Path):
    """Pebble failing is an error; a damaged file is no id (a new one replaces it)."""
    _data_id_file(synapse_data).parent.mkdir(parents=True)
    _data_id_file(synapse_data).write_text("damaged\n")
    with live_container(ctx, synapse_data) as container:
        assert backup_chain.read_data_id(container) is None
        for error in (
            ops.pebble.PathError("permission-denied", "no"),
            ops.pebble.APIError({}, 500, "error", "pebble down"),
        ):
            with (
                mock.patch.object(container, "pull", side_effect=error),
                pytest.raises(
                    backup.BackupError, match=r"cannot read /data/\.synapse-backup-state"
                ),
            ):
                backup_chain.read_data_id(container)
