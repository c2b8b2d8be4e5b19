"""The backup modules' functions that take an ops.Container, on Scenario's container.

The container is the charm's own, taken from a live Scenario event; /data is a
mounted local directory. Commands are canned (testing.Exec) and S3Client is
replaced by a mock: the real pipeline and S3 are tested in tests/workload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import subprocess
from collections.abc import Iterator
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
import backup_store
from tests.unit.builders import make_state

SECRET_KEY = "container-secret-key-77c1"
PASSPHRASE = "container-passphrase-e04d"
SHA256 = "ab" * 32
BACKUP_ID = "20250101T000000Z"
PARENT_ID = "20241231T000000Z"
WORK_TOKEN = "0123456789abcdef"
WORK_DIR = f"{backup_container.WORK_DIR_PREFIX}{WORK_TOKEN}"
# A backup's objects, its manifest (the commit) first: checked free, and discarded on failure.
BACKUP_NAMES = [f"{BACKUP_ID}.manifest.json", BACKUP_ID, f"{BACKUP_ID}.snar.gpg"]
EXPECTED_PATHS = [
    "/data/appservices/bridge.yaml",
    "/data/example.com.log.config",
    "/data/example.com.signing.key",
    "/data/homeserver.yaml",
    "/data/media_store/local_content",
    "/data/media_store/local_thumbnails",
]


def _params() -> backup.S3Parameters:
    return backup.S3Parameters.model_validate(
        {
            "access-key": "AKIACONTAINERTEST",
            "secret-key": SECRET_KEY,
            "bucket": "synapse-backups",
            "endpoint": "https://s3.example.com",
        }
    )


def _write_config(data_dir: pathlib.Path, **changes: Any) -> None:
    config: dict[str, Any] = {
        "server_name": "example.com",
        "database": {"name": "sqlite3", "args": {"database": "/data/homeserver.db"}},
        "media_store_path": "/data/media_store",
        "signing_key_path": "/data/example.com.signing.key",
        "log_config": "/data/example.com.log.config",
        "app_service_config_files": ["/data/appservices/bridge.yaml", "/data/missing.yaml"],
    }
    config.update(changes)
    (data_dir / "homeserver.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def synapse_data(data_dir: pathlib.Path) -> pathlib.Path:
    """A /data as Synapse leaves it: config, keys, database, media and caches."""
    _write_config(data_dir)
    (data_dir / "example.com.signing.key").write_text("ed25519 a_key xyz\n")
    (data_dir / "example.com.log.config").write_text("version: 1\n")
    (data_dir / "homeserver.db").write_bytes(b"SQLite format 3\x00")
    (data_dir / "appservices").mkdir()
    (data_dir / "appservices" / "bridge.yaml").write_text("id: bridge\n")
    (data_dir / "old.yaml").mkdir()  # a directory, not a configuration file
    media = data_dir / "media_store"
    for name in ("local_content", "local_thumbnails", "remote_content", "url_cache"):
        (media / name).mkdir(parents=True)
    (media / "local_file").write_text("not a directory")
    return data_dir


@contextlib.contextmanager
def live_container(
    ctx: testing.Context, data_dir: pathlib.Path, **container_options: Any
) -> Iterator[ops.Container]:
    """Yield the charm's synapse container during a start event (which the charm ignores).

    Scenario's container filesystem starts empty; /tmp is made as the image has it.
    """
    state = make_state(data_dir, {}, **container_options)
    with ctx(ctx.on.start(), state) as manager:
        container = manager.charm.unit.get_container("synapse")
        container.make_dir("/tmp", make_parents=True)
        yield container


# --- reading Synapse's configuration --------------------------------------------------------


def test_get_paths_to_backup(ctx: testing.Context, synapse_data: pathlib.Path):
    """The configuration, keys, log config, appservices and local media are backed up.

    The database (copied separately), remote media, URL caches, directories that
    look like config files and configured files that do not exist are not.
    """
    with live_container(ctx, synapse_data) as container:
        paths = list(backup.get_paths_to_backup(container))

    assert paths == EXPECTED_PATHS


def test_get_paths_to_backup_without_media(ctx: testing.Context, data_dir: pathlib.Path):
    """Before any upload there is no media directory, and only the config is backed up."""
    _write_config(data_dir, signing_key_path=None, log_config=None, app_service_config_files=[])

    with live_container(ctx, data_dir) as container:
        paths = list(backup.get_paths_to_backup(container))

    assert paths == ["/data/homeserver.yaml"]


@pytest.mark.parametrize(
    ("database", "create", "expected"),
    [
        pytest.param(
            {"name": "sqlite3", "args": {"database": "/data/homeserver.db"}},
            "homeserver.db",
            "/data/homeserver.db",
            id="sqlite3-absolute",
        ),
        pytest.param(
            {"name": "sqlite", "args": {"database": "db/synapse.db"}},
            "db/synapse.db",
            "/data/db/synapse.db",
            id="sqlite-relative",
        ),
        pytest.param(
            {"args": {"database": "homeserver.db"}},
            "homeserver.db",
            "/data/homeserver.db",
            id="default-engine-is-sqlite",
        ),
        pytest.param(
            {"name": "sqlite3", "args": {"database": "/data/homeserver.db"}},
            None,
            None,
            id="not-created-yet",
        ),
        pytest.param(
            {"name": "sqlite3", "args": {"database": ":memory:"}}, None, None, id="memory"
        ),
        pytest.param({"name": "sqlite3"}, None, None, id="no-args"),
        pytest.param(
            {"name": "psycopg2", "args": {"database": "synapse"}}, None, None, id="postgres"
        ),
        pytest.param(None, None, None, id="no-database-section"),
    ],
)
def test_get_database_path(
    ctx: testing.Context,
    data_dir: pathlib.Path,
    *,
    database: dict[str, Any] | None,
    create: str | None,
    expected: str | None,
):
    """The SQLite database file is found when Synapse uses SQLite and it exists."""
    _write_config(data_dir, database=database)
    if create:
        (data_dir / create).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / create).write_bytes(b"")

    with live_container(ctx, data_dir) as container:
        assert backup.get_database_path(container) == expected


@pytest.mark.parametrize(
    ("media_store_path", "expected"),
    [
        pytest.param(None, "/data/media_store", id="default"),
        pytest.param("media", "/data/media", id="relative"),
        pytest.param("/srv/media/", "/srv/media", id="absolute"),
    ],
)
def test_get_media_dir(
    ctx: testing.Context, data_dir: pathlib.Path, media_store_path: str | None, expected: str
):
    """The media directory is media_store_path, relative to /data, or the default."""
    _write_config(data_dir, media_store_path=media_store_path)

    with live_container(ctx, data_dir) as container:
        assert backup.get_media_dir(container) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "cannot read /data/homeserver.yaml", id="missing"),
        pytest.param("a: [b", "is not valid YAML", id="invalid-yaml"),
        pytest.param("- a\n- b\n", "is not a YAML mapping", id="list"),
        pytest.param("", "is not a YAML mapping", id="empty"),
        pytest.param(b"# caf\xe9\n", r"is not UTF-8 \(byte 5 is not\)", id="not-utf-8"),
        pytest.param(
            'macaroon_secret_key: "s3cr3t-value\n',
            r"is not valid YAML \(line 2, column 1\)$",
            id="never-quotes-the-text",
        ),
    ],
)
def test_read_synapse_config_errors(
    ctx: testing.Context, data_dir: pathlib.Path, content: str | bytes | None, message: str
):
    """An unusable homeserver.yaml raises BackupError."""
    if isinstance(content, bytes):
        (data_dir / "homeserver.yaml").write_bytes(content)
    elif content is not None:
        (data_dir / "homeserver.yaml").write_text(content)

    with (
        live_container(ctx, data_dir) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        backup.read_synapse_config(container)


def _paths(container: ops.Container) -> object:
    return list(backup.get_paths_to_backup(container))


@pytest.mark.parametrize(
    ("changes", "reader", "message"),
    [
        pytest.param(
            {"database": "sqlite3"},
            backup.get_database_path,
            "database must be a mapping, not str",
            id="database",
        ),
        pytest.param(
            {"database": {"name": "sqlite3", "args": ["homeserver.db", "db-password-5e1"]}},
            backup.get_database_path,
            "args must be a mapping, not list$",
            id="database-args",
        ),
        pytest.param(
            {"media_store_path": 5},
            backup.get_media_dir,
            "media_store_path must be a string, not int$",
            id="media",
        ),
        pytest.param(
            {"media_store_path": 5},
            _paths,
            "media_store_path must be a string, not int$",
            id="paths",
        ),
        pytest.param(
            {"database": {"name": "postgres", "args": {"database": "homeserver.db"}}},
            backup.get_database_path,
            "database name must be one of sqlite3, sqlite, psycopg2, psycopg$",
            id="database-engine",
        ),
        pytest.param(
            {"database": {"name": ["sqlite3"]}},
            backup.get_database_path,
            "name must be a string, not list$",
            id="database-engine-type",
        ),
        pytest.param(
            {"signing_key_path": ["k"]}, _paths, "signing_key_path must be a string", id="key"
        ),
        pytest.param(
            {"log_config": {"a": 1}}, _paths, "log_config must be a string", id="log-config"
        ),
        pytest.param(
            {"app_service_config_files": "bridge.yaml"},
            _paths,
            "app_service_config_files must be a list",
            id="appservices",
        ),
    ],
)
def test_misshapen_settings_are_refused_clearly(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    changes: dict[str, Any],
    reader: Any,
    message: str,
):
    """A setting of the wrong type is a SynapseConfigError naming it, never a crash."""
    _write_config(synapse_data, **changes)

    with (
        live_container(ctx, synapse_data) as container,
        pytest.raises(backup.SynapseConfigError, match=message),
    ):
        reader(container)


# --- commands in the container --------------------------------------------------------------


def test_calculate_size(ctx: testing.Context, data_dir: pathlib.Path):
    """The size is du's total, measured as the Synapse user with paths after "--"."""
    du = testing.Exec(["du"], stdout="10\t/data/a\n20\t/data/-b\n30\ttotal\n")

    with live_container(ctx, data_dir, execs=[du]) as container:
        size = backup.calculate_size(container, ["/data/a", "/data/-b"])

    assert size == 30
    (call,) = ctx.exec_history["synapse"]
    assert call.command == ["du", "--summarize", "--bytes", "--total", "--", "/data/a", "/data/-b"]
    assert (call.user_id, call.group_id) == (991, 991)


def test_calculate_size_no_paths(ctx: testing.Context, data_dir: pathlib.Path):
    """Nothing to measure is 0 bytes, without running du."""
    with live_container(ctx, data_dir) as container:
        assert backup.calculate_size(container, []) == 0

    assert ctx.exec_history == {}


@pytest.mark.parametrize(
    ("du", "message"),
    [
        pytest.param(
            testing.Exec(["du"], return_code=1, stderr="du: cannot access '/x'"),
            "cannot measure the backup size: du: cannot access",
            id="du-fails",
        ),
        pytest.param(testing.Exec(["du"], stdout=""), "unexpected du output", id="no-output"),
        pytest.param(
            testing.Exec(["du"], stdout="lots\ttotal\n"), "unexpected du output", id="garbage"
        ),
    ],
)
def test_calculate_size_errors(
    ctx: testing.Context, data_dir: pathlib.Path, du: testing.Exec, message: str
):
    """A failing du or output that is not a size raises BackupError."""
    with (
        live_container(ctx, data_dir, execs=[du]) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        backup.calculate_size(container, ["/data/a"])


def test_check_tools_present(ctx: testing.Context, data_dir: pathlib.Path):
    """No missing tool printed: the check passes; every tool is checked in one bash run."""
    with live_container(ctx, data_dir, execs=[testing.Exec(["bash", "-c"])]) as container:
        backup.check_tools(container)

    (call,) = ctx.exec_history["synapse"]
    for tool in backup_container.REQUIRED_TOOLS:
        assert tool in call.command[2]


@pytest.mark.parametrize(
    ("execs", "message"),
    [
        pytest.param(
            [testing.Exec(["bash", "-c"], stdout=" gpg aws\n")],
            "lacks gpg, aws; use the synapse rock",
            id="missing-tools",
        ),
        pytest.param(
            [testing.Exec(["bash", "-c"], return_code=2, stderr="boom")],
            "cannot check the workload's tools: boom",
            id="check-fails",
        ),
        pytest.param(
            [testing.Exec(["bash", "-c"], return_code=127, stderr="bash: not found")],
            "lacks bash; use the synapse rock",
            id="shell-not-found",
        ),
    ],
)
def test_check_tools_errors(
    ctx: testing.Context, data_dir: pathlib.Path, execs: list[testing.Exec], message: str
):
    """Missing tools are named; a failing check raises BackupError."""
    with (
        live_container(ctx, data_dir, execs=execs) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        backup.check_tools(container)


def test_check_tools_without_bash(ctx: testing.Context, data_dir: pathlib.Path):
    """A container without bash (Pebble cannot start it) is reported as lacking bash."""
    error = ops.pebble.APIError({}, 400, "Bad Request", 'cannot find executable "bash"')
    with (
        live_container(ctx, data_dir) as container,
        mock.patch.object(container, "exec", side_effect=error),
        pytest.raises(backup.BackupError, match="lacks bash"),
    ):
        backup.check_tools(container)


def test_run_in_container(ctx: testing.Context, data_dir: pathlib.Path):
    """The command runs as the Synapse user from /, with the given environment."""
    execs = [testing.Exec(["bash", "-c"], stdout="done\n")]
    with live_container(ctx, data_dir, execs=execs) as container:
        stdout = backup_container.run_in_container(
            container, ["bash", "-c", "true"], {"A": "1"}, what="the test"
        )

    assert stdout == "done\n"
    (call,) = ctx.exec_history["synapse"]
    assert call.environment == {"A": "1"}
    assert (call.user_id, call.group_id, call.working_dir) == (991, 991, "/")


def test_run_in_container_redacts_secrets(ctx: testing.Context, data_dir: pathlib.Path):
    """A failure's error output is in the message, with every secret replaced by ***."""
    stderr = f"line 1\nline 2\nsecret={SECRET_KEY}\npassphrase {PASSPHRASE}\nfinal\n"
    execs = [testing.Exec(["bash", "-c"], return_code=3, stderr=stderr)]
    with (
        live_container(ctx, data_dir, execs=execs) as container,
        pytest.raises(backup.BackupError) as exc_info,
    ):
        backup_container.run_in_container(
            container,
            ["bash", "-c", "false"],
            {},
            secrets_to_hide=(SECRET_KEY, PASSPHRASE, ""),
            what="the test",
        )

    message = str(exc_info.value)
    assert message.startswith("the test failed (exit code 3): ")
    assert "secret=***; passphrase ***; final" in message
    assert SECRET_KEY not in message
    assert PASSPHRASE not in message


def _change_error(message: str) -> ops.pebble.ChangeError:
    change = ops.pebble.Change.from_dict(
        {
            "id": "7",
            "kind": "exec",
            "summary": message,
            "status": "Error",
            "ready": True,
            "err": message,
            "spawn-time": "2025-01-01T00:00:00Z",
            "tasks": [],
        }
    )
    return ops.pebble.ChangeError(message, change)


PEBBLE_ERRORS = [
    pytest.param(ops.pebble.APIError({}, 500, "Internal Server Error", "boom"), id="api-error"),
    pytest.param(_change_error("boom"), id="change-error"),
    pytest.param(ops.pebble.TimeoutError("boom: timed out"), id="timeout"),
]


@pytest.mark.parametrize("error", PEBBLE_ERRORS)
@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(
            lambda container: backup.calculate_size(container, ["/data/a"]),
            "cannot measure the backup size: ",
            id="calculate-size",
        ),
        pytest.param(
            lambda container: backup_restore._move(container, "/data/a", "/data/b"),
            "cannot move /data/a to /data/b: ",
            id="move",
        ),
        pytest.param(
            lambda container: backup_container.run_in_container(
                container, ["bash", "-c", "true"], {}, what="the test"
            ),
            "the test ",
            id="run-in-container",
        ),
    ],
)
def test_pebble_errors_become_backup_errors(
    ctx: testing.Context, data_dir: pathlib.Path, error: Exception, call: Any, message: str
):
    """Pebble failing to run a command (API, change or timeout) is a BackupError, not a crash."""
    with (
        live_container(ctx, data_dir) as container,
        mock.patch.object(container, "exec", side_effect=error),
        pytest.raises(backup.BackupError) as exc_info,
    ):
        call(container)

    assert str(exc_info.value).startswith(message)
    assert exc_info.value.__cause__ is error


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(_change_error("boom"), id="change-error"),
        pytest.param(ops.pebble.TimeoutError("boom: timed out"), id="timeout"),
    ],
)
def test_check_tools_pebble_errors(ctx: testing.Context, data_dir: pathlib.Path, error: Exception):
    """A tool check that Pebble cannot finish is a BackupError."""
    with (
        live_container(ctx, data_dir) as container,
        mock.patch.object(container, "exec", side_effect=error),
        pytest.raises(backup.BackupError, match=r"^cannot check the workload's tools: boom"),
    ):
        backup.check_tools(container)


def test_run_in_container_redacts_pebble_errors(ctx: testing.Context, data_dir: pathlib.Path):
    """A Pebble error naming a secret is shown with the secret replaced."""
    error = ops.pebble.APIError({}, 400, "Bad Request", f"bad environment {SECRET_KEY}")
    with (
        live_container(ctx, data_dir) as container,
        mock.patch.object(container, "exec", side_effect=error),
        pytest.raises(backup.BackupError) as exc_info,
    ):
        backup_container.run_in_container(
            container, ["true"], {}, secrets_to_hide=(SECRET_KEY,), what="the test"
        )

    assert str(exc_info.value) == "the test could not run: bad environment ***"


def test_prepare_container_pebble_error(ctx: testing.Context, data_dir: pathlib.Path):
    """A work dir Pebble cannot make is a BackupError."""
    error = ops.pebble.APIError({}, 500, "Internal Server Error", "disk full")
    with (
        live_container(ctx, data_dir) as container,
        mock.patch.object(container, "make_dir", side_effect=error),
        pytest.raises(
            backup.BackupError, match=r"^cannot prepare the backup work directory: disk full"
        ),
    ):
        backup.prepare_container(container, _params(), PASSPHRASE, work_dir="/tmp/w")


def test_remove_quietly_logs(
    ctx: testing.Context, data_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
):
    """A path that cannot be removed is logged, not raised: it is clean-up."""
    error = ops.pebble.PathError("generic-file-error", "permission denied")
    with (
        live_container(ctx, data_dir) as container,
        mock.patch.object(container, "remove_path", side_effect=error),
    ):
        backup_container._remove_quietly(container, "/tmp/w")

    assert "could not remove /tmp/w from the container: " in caplog.text


# --- the private work directory -------------------------------------------------------------


def test_prepare_container(ctx: testing.Context, data_dir: pathlib.Path):
    """The work dir is private; it holds the aws config and the passphrase file (0600)."""
    work_dir = "/tmp/synapse-backup-test"
    with live_container(ctx, data_dir) as container:
        backup.prepare_container(container, _params(), PASSPHRASE, work_dir=work_dir)

        (info,) = container.list_files(work_dir, itself=True)
        files = {file.name: file for file in container.list_files(work_dir)}
        passphrase = container.pull(f"{work_dir}/passphrase").read()
        aws_config = container.pull(f"{work_dir}/aws-config").read()

    assert info.permissions == 0o700
    assert files["gnupg"].permissions == 0o700
    assert files["passphrase"].permissions == 0o600
    assert files["aws-config"].permissions == 0o600
    assert passphrase == PASSPHRASE
    assert aws_config == backup_container.build_aws_config(_params())
    assert SECRET_KEY not in aws_config


def test_prepare_container_default_work_dir(ctx: testing.Context, data_dir: pathlib.Path):
    """Without work_dir (the seed API's call), the work dir is the fixed DEFAULT_WORK_DIR."""
    with live_container(ctx, data_dir) as container:
        backup.prepare_container(container, _params(), PASSPHRASE)

        (info,) = container.list_files(backup_container.DEFAULT_WORK_DIR, itself=True)
        passphrase = container.pull(f"{backup_container.DEFAULT_WORK_DIR}/passphrase").read()

    assert backup_container.DEFAULT_WORK_DIR == "/tmp/synapse-backup"
    assert info.permissions == 0o700
    assert passphrase == PASSPHRASE


def test_prepare_container_refuses_existing_dir(ctx: testing.Context, data_dir: pathlib.Path):
    """A work dir that exists already (maybe someone else's) is not reused."""
    with live_container(ctx, data_dir) as container:
        container.make_dir("/tmp/taken", make_parents=True)
        with pytest.raises(backup.BackupError, match="exists already"):
            backup.prepare_container(container, _params(), PASSPHRASE, work_dir="/tmp/taken")


def test_prepared_container_removed_on_error(ctx: testing.Context, data_dir: pathlib.Path):
    """The work dir, and the passphrase in it, is removed even when the backup fails."""
    seen: list[str] = []

    def failing_backup(container: ops.Container) -> None:
        with backup_container.prepared_container(container, _params(), PASSPHRASE) as work_dir:
            assert container.exists(f"{work_dir}/passphrase")
            seen.append(work_dir)
            raise RuntimeError("the backup failed")

    with live_container(ctx, data_dir) as container:
        with pytest.raises(RuntimeError, match="the backup failed"):
            failing_backup(container)
        (work_dir,) = seen
        assert work_dir.startswith(backup_container.WORK_DIR_PREFIX)
        assert not container.exists(work_dir)


# --- run_backup with S3 mocked ----------------------------------------------------------------


@pytest.fixture
def s3_client() -> Iterator[mock.MagicMock]:
    """Replace S3Client by a mock: no backup exists yet, and uploads are 1234 bytes.

    object_size answers, in order: the manifest, archive and snapshot-state names
    are free, then the uploaded archive has 1234 bytes.
    """
    client = mock.create_autospec(backup.S3Client, instance=True)
    client.list_backups.return_value = []
    client.backup_names.return_value = []
    client.has_manifest.return_value = False
    client.object_size.side_effect = [1234]
    with mock.patch.object(backup, "S3Client", return_value=client):
        yield client


@pytest.fixture
def fixed_work_dir() -> Iterator[str]:
    """Make the random work directory predictable, so commands can be canned exactly."""
    with mock.patch.object(backup_container.secrets, "token_hex", return_value=WORK_TOKEN):
        yield WORK_DIR


@pytest.fixture
def tools_present() -> Iterator[mock.MagicMock]:
    """Skip the tool check (tested above): its bash -c would match the pipeline's Exec."""
    with mock.patch.object(backup, "check_tools") as patched:
        yield patched


DU = testing.Exec(["du"], stdout="4096\ttotal\n")
PIPELINE_OK = testing.Exec(["bash", "-c"], stdout=f"{SHA256} 1234 6\n")


def _parent(backup_id: str = PARENT_ID, **changes: Any) -> backup.BackupManifest:
    """A committed full backup that an incremental one can build on."""
    values: dict[str, Any] = {
        "backup_id": backup_id,
        "created_at": "2024-12-31T00:00:00+00:00",
        "paths": (*EXPECTED_PATHS, "/data/homeserver.db"),
        "file_count": 9,
        "size": 999,
        "sha256": "cd" * 32,
        "duration": 1.0,
        # Made of the data in /data: the id the first backup there makes (see fixed_work_dir).
        "metadata": {"data-id": WORK_TOKEN},
    }
    values.update(changes)
    return backup.BackupManifest(**values)


def _keep_state_command(backup_id: str = BACKUP_ID) -> list[str]:
    """The command _keep_snapshot_state runs, captured from a stand-in container."""
    container = mock.MagicMock(spec=ops.Container)
    container.exec.return_value.wait_output.return_value = ("", "")
    backup_chain._keep_snapshot_state(container, backup_id, WORK_DIR)
    (command,), _ = container.exec.call_args
    return command


def _put_manifest(s3_client: mock.MagicMock) -> dict[str, Any]:
    """The manifest run_backup wrote, as a JSON document."""
    (name, text), _ = s3_client.put_text.call_args
    assert name == f"{BACKUP_ID}.manifest.json"
    return json.loads(text)


@pytest.mark.usefixtures("tools_present")
def test_run_backup(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
):
    """A full backup streams the pipeline, checks the upload, commits, then keeps its state.

    Arrange: Synapse's /data; S3 (mocked) has no backup yet, then 1234 bytes.
    Act: run_backup (type auto: with nothing to build on, a full backup).
    Assert: the manifest (type full, no parent, the database recorded); the
        pipeline ran as the Synapse user with the credentials in its environment
        only, starting a listed-incremental state and uploading it encrypted; the
        state was kept in the container by a separate command without
        credentials; the manifest was written; nothing was deleted; the work dir
        is gone; progress was logged.
    """
    logs: list[str] = []
    with live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container:
        manifest = backup.run_backup(
            container,
            _params(),
            BACKUP_ID,
            PASSPHRASE,
            metadata={"server-name": "example.com"},
            log=logs.append,
        )
        du, pipeline, keep_state = ctx.exec_history["synapse"]
        assert not container.exists(WORK_DIR)

    assert manifest.backup_id == BACKUP_ID
    assert (manifest.backup_type, manifest.parent) == ("full", "")
    assert (manifest.size, manifest.sha256, manifest.file_count) == (1234, SHA256, 6)
    assert manifest.paths == (*EXPECTED_PATHS, "/data/homeserver.db")
    assert manifest.metadata == {
        "server-name": "example.com",
        "database-path": "/data/homeserver.db",
        "data-id": WORK_TOKEN,  # made at the first backup (token_hex is fixed here)
    }
    state_dir = synapse_data / backup_chain.STATE_DIR.removeprefix("/data/")
    assert (state_dir / "data-id").read_text() == f"{WORK_TOKEN}\n"
    assert du.command[-len(manifest.paths) :] == list(manifest.paths)
    assert pipeline.command[:2] == ["bash", "-c"]
    assert (pipeline.user_id, pipeline.group_id) == (991, 991)
    assert pipeline.environment["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    assert pipeline.environment["HOME"] == WORK_DIR
    script = pipeline.command[2]
    for value in (SECRET_KEY, PASSPHRASE):
        assert value not in script
    assert "--add-file=data/homeserver.yaml" in script
    assert f"--listed-incremental={WORK_DIR}/{backup_chain.SNAPSHOT_STATE_FILE}" in script
    assert f" - s3://synapse-backups/{BACKUP_ID}.snar.gpg\n" in script
    assert keep_state.command == _keep_state_command()
    assert keep_state.environment == {}
    assert (keep_state.user_id, keep_state.group_id) == (991, 991)
    # Strictly: a manifest that cannot be read is not taken for a missing backup.
    s3_client.list_backups.assert_called_once_with(strict=True)
    s3_client.chain.assert_not_called()
    s3_client.backup_names.assert_called_once_with(BACKUP_ID)  # the id is free
    assert s3_client.object_size.call_args_list == [mock.call(BACKUP_ID)]
    s3_client.has_manifest.assert_called_once_with(BACKUP_ID)  # none committed meanwhile
    document = _put_manifest(s3_client)
    assert document["sha256"] == SHA256
    assert (document["type"], document["parent"]) == ("full", "")
    assert document["database-path"] == "/data/homeserver.db"
    s3_client.delete_backup_objects.assert_not_called()
    assert logs[:2] == [
        "making a full backup: there is no full backup to build on",
        "full backup of 7 paths, about 4096 bytes",
    ]
    assert logs[-1] == "writing the manifest"


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(
    ("uploaded", "message"),
    [
        pytest.param([500, 500, 234], None, id="complete"),
        pytest.param(
            [500, 500, 233],
            f"the uploaded object {BACKUP_ID}.part-0002 has 233 bytes, the pipeline wrote 234",
            id="last-piece-short",
        ),
        pytest.param(
            [500, None],
            f"the uploaded object {BACKUP_ID}.part-0001 has None bytes",
            id="piece-missing",
        ),
    ],
)
def test_run_backup_checks_every_piece(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    monkeypatch: pytest.MonkeyPatch,
    *,
    uploaded: list[int | None],
    message: str | None,
):
    """An archive larger than a piece is checked piece by piece before the commit.

    Arrange: pieces of 500 bytes (instead of 64 GiB); the pipeline wrote 1234.
    Act: run_backup.
    Assert: each piece's size is checked; a complete upload is committed with
        its piece size in the manifest; a short or missing piece fails the
        backup, which is discarded.
    """
    monkeypatch.setattr(backup, "ARCHIVE_PIECE_SIZE", 500)
    s3_client.object_size.side_effect = [*uploaded]

    with live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container:
        if message is None:
            manifest = backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)
        else:
            with pytest.raises(backup.BackupError) as exc_info:
                backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)
        script = ctx.exec_history["synapse"][1].command[2]

    pieces = [BACKUP_ID, f"{BACKUP_ID}.part-0001", f"{BACKUP_ID}.part-0002"]
    assert s3_client.object_size.call_args_list == [
        mock.call(name) for name in pieces[: len(uploaded)]
    ]
    assert " 500 .part- aws s3 cp " in script
    if message is None:
        assert manifest.piece_size == 500
        assert manifest.pieces() == dict(zip(pieces, [500, 500, 234], strict=True))
        assert _put_manifest(s3_client)["piece-size"] == 500
        s3_client.delete_backup_objects.assert_not_called()
    else:
        assert message in str(exc_info.value)
        s3_client.put_text.assert_not_called()
        s3_client.delete_backup_objects.assert_called_once_with(BACKUP_ID)


@pytest.mark.usefixtures("tools_present")
def test_run_backup_refuses_more_pieces_than_a_manifest_may_name(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    monkeypatch: pytest.MonkeyPatch,
):
    """An archive needing more pieces than a manifest may name is not committed.

    (With 64 GiB pieces that is 640 TiB; here 2 pieces of 500 bytes for 1234.)
    """
    monkeypatch.setattr(backup, "ARCHIVE_PIECE_SIZE", 500)
    monkeypatch.setattr(backup, "MAX_ARCHIVE_PIECES", 2)

    with (
        live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container,
        pytest.raises(backup.BackupError, match="the archive has 3 pieces of 500 bytes"),
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    s3_client.put_text.assert_not_called()
    s3_client.delete_backup_objects.assert_called_once_with(BACKUP_ID)


def test_keep_state_command():
    """The new state replaces the kept one atomically, in a private directory.

    It and the database's fingerprint (when the pipeline recorded one) are
    copied beside their final names and renamed, and every other kept state
    is removed; the script is valid bash and names no S3 or gpg secret.
    """
    command = _keep_state_command()

    assert command[:2] == ["bash", "-c"]
    lines = command[2].splitlines()
    state_dir = backup_chain.STATE_DIR
    target = f"{state_dir}/{BACKUP_ID}.snar"
    assert lines[0] == "set -o errexit -o nounset"
    assert lines[1] == f"mkdir -p -m 700 -- {state_dir}"
    assert lines[2] == f"cp -- {WORK_DIR}/{backup_chain.SNAPSHOT_STATE_FILE} {target}.tmp"
    assert lines[3] == f"mv -- {target}.tmp {target}"
    database_state = f"{WORK_DIR}/{backup_chain.DATABASE_STATE_FILE}"
    database_target = f"{state_dir}/{BACKUP_ID}{backup_store.DATABASE_STATE_SUFFIX}"
    assert lines[4:] == [
        f"if [ -e {database_state} ]; then",
        f"cp -- {database_state} {database_target}.tmp",
        f"mv -- {database_target}.tmp {database_target}",
        "fi",
        f"for old in {state_dir}/*.snar {state_dir}/*{backup_store.DATABASE_STATE_SUFFIX}; do",
        f'  case "$old" in {target}|{database_target}) ;; *) rm -f -- "$old" ;; esac',
        "done",
    ]
    assert subprocess.run(["bash", "-n", "-c", command[2]], check=False).returncode == 0


@pytest.mark.usefixtures("tools_present")
def test_run_backup_state_not_kept_is_only_logged(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
    caplog: pytest.LogCaptureFixture,
):
    """A committed backup stays committed when its state cannot be kept in the container.

    S3 has the encrypted state, from which the next backup continues the chain.
    """
    failing = testing.Exec(
        _keep_state_command(), return_code=1, stderr="cp: No space left on device\n"
    )

    with live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK, failing]) as container:
        manifest = backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)
        assert not container.exists(WORK_DIR)

    assert manifest.backup_id == BACKUP_ID
    assert ctx.exec_history["synapse"][-1].command == _keep_state_command()
    s3_client.put_text.assert_called_once()
    s3_client.delete_backup_objects.assert_not_called()
    assert (
        "keeping the snapshot state failed (exit code 1): cp: No space left on device"
        in caplog.text
    )


ROOT_ID = "20241230T000000Z"


def _chain() -> list[backup.BackupManifest]:
    """The newest backup's chain, oldest first: a full backup and PARENT_ID on it."""
    return [_parent(ROOT_ID), _parent(backup_type="incremental", parent=ROOT_ID)]


def _probe_command() -> list[str]:
    """The passphrase probe on the chain's full backup (its first bytes, in the work dir)."""
    gpg = backup_container._gpg_command(f"{WORK_DIR}/{backup.PASSPHRASE_FILE}", "--decrypt")
    script = backup_container._script(
        [
            *backup_container._script_preamble(WORK_DIR),
            [*gpg, "--output", "/dev/null", f"{WORK_DIR}/probe.gpg"],
        ]
    )
    return ["bash", "-c", script]


def _incremental_s3(s3_client: mock.MagicMock, *, remote_state: bool = True) -> None:
    """S3 (mocked) with an intact newest chain whose full backup's first bytes read fine."""
    chain = _chain()
    s3_client.list_backups.return_value = list(reversed(chain))
    s3_client.chain.return_value = chain
    s3_client.read_object.return_value = b"\x8c\x0d encrypted head"
    # The names are free, the parent's state is in S3 (or not), the upload has 1234 bytes.
    s3_client.object_size.side_effect = [321 if remote_state else None, 1234]


def _keep_local_state(data_dir: pathlib.Path) -> None:
    state_dir = data_dir / backup_chain.STATE_DIR.removeprefix("/data/")
    state_dir.mkdir()
    (state_dir / f"{PARENT_ID}.snar").write_bytes(b"GNU tar-1.34-2\n")


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize("backup_type", ["auto", "incremental"])
@pytest.mark.parametrize("local", [True, False], ids=["local-state", "state-from-s3"])
def test_run_backup_incremental(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
    *,
    backup_type: str,
    local: bool,
):
    """An incremental backup builds on the newest backup and its tar snapshot state.

    Arrange: S3 (mocked) lists the newest backup (an incremental one) and its
        full backup, an intact chain; the newest one's state is in the container,
        or only in S3.
    Act: run_backup.
    Assert: the passphrase is probed on the chain's full backup, as the Synapse
        user; the parent's state is put in the work dir (copied, or downloaded and
        decrypted with the credentials in the environment only); the pipeline
        continues it; the new state is kept; the manifest is an incremental one
        on the newest backup.
    """
    _incremental_s3(s3_client)
    if local:
        _keep_local_state(synapse_data)
    parent = _chain()[-1]
    state_command = backup_chain._snapshot_state_commands(_params(), parent, local, WORK_DIR)
    execs = [DU, testing.Exec(_probe_command()), testing.Exec(state_command), PIPELINE_OK]
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=execs) as container:
        manifest = backup.run_backup(
            container, _params(), BACKUP_ID, PASSPHRASE, backup_type=backup_type, log=logs.append
        )

    _, probe, state, pipeline, keep_state = ctx.exec_history["synapse"]
    assert probe.command == _probe_command()
    assert (probe.user_id, probe.group_id) == (991, 991)
    s3_client.read_object.assert_called_once_with(
        ROOT_ID, first_bytes=backup_container.PASSPHRASE_PROBE_BYTES
    )
    assert state.command == state_command
    script = state.command[2]
    target = f"{WORK_DIR}/{backup_chain.SNAPSHOT_STATE_FILE}"
    if local:
        assert f"cp -- {backup_chain.STATE_DIR}/{PARENT_ID}.snar {target}" in script.splitlines()
        assert "aws" not in script.split()
    else:
        assert (
            f"env AWS_CONFIG_FILE={WORK_DIR}/aws-config-download aws s3api get-object "
            f"--bucket synapse-backups --key={PARENT_ID}.snar.gpg /dev/fd/3 3>&1 >/dev/null"
            " | gpg "
        ) in script
        assert script.endswith(f" --decrypt --output {target}")
    for value in (SECRET_KEY, PASSPHRASE):
        assert value not in script
    assert state.environment == pipeline.environment
    assert (state.user_id, state.group_id) == (991, 991)
    assert f"--listed-incremental={target}" in pipeline.command[2]
    assert keep_state.command == _keep_state_command()
    assert (manifest.backup_type, manifest.parent) == ("incremental", PARENT_ID)
    document = _put_manifest(s3_client)
    assert (document["type"], document["parent"]) == ("incremental", PARENT_ID)
    s3_client.chain.assert_called_once_with(PARENT_ID)
    assert s3_client.object_size.call_args_list == [
        mock.call(f"{PARENT_ID}.snar.gpg"),
        mock.call(BACKUP_ID),
    ]
    assert logs[0] == f"incremental on {PARENT_ID} backup of 7 paths, about 4096 bytes"
    s3_client.delete_backup_objects.assert_not_called()


WRONG_PASSPHRASE = testing.Exec(
    _probe_command(), return_code=2, stderr="gpg: decryption failed: Bad session key\n"
)


def _state_unreadable() -> testing.Exec:
    """The download of the parent's state failing (the state is in S3 only)."""
    command = backup_chain._snapshot_state_commands(_params(), _chain()[-1], False, WORK_DIR)
    return testing.Exec(
        command, return_code=2, stderr=f"An error occurred (AccessDenied) for {SECRET_KEY}\n"
    )


PARENT_UNUSABLE = [
    pytest.param(
        [WRONG_PASSPHRASE],
        f"the backup passphrase does not decrypt backup {ROOT_ID}",
        id="passphrase-changed",
    ),
    pytest.param(
        [testing.Exec(_probe_command()), _state_unreadable()],
        f"reading the snapshot state of {PARENT_ID} failed (exit code 2): "
        "An error occurred (AccessDenied) for ***",
        id="state-unreadable",
    ),
]


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(("execs", "problem"), PARENT_UNUSABLE)
def test_run_backup_auto_full_when_the_parent_cannot_be_used(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
    *,
    execs: list[testing.Exec],
    problem: str,
):
    """Type auto makes a full backup when the chain cannot go on, saying why.

    After a passphrase change, a chain restored with the new passphrase could not
    be read: a new chain starts. A parent state that cannot be read does the same.
    """
    _incremental_s3(s3_client)
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=[DU, *execs, PIPELINE_OK]) as container:
        manifest = backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE, log=logs.append)

    assert (manifest.backup_type, manifest.parent) == ("full", "")
    assert logs[:2] == [
        f"making a full backup: {problem}",
        "full backup of 7 paths, about 4096 bytes",
    ]
    commands = [call.command for call in ctx.exec_history["synapse"]]
    assert commands[1 : 1 + len(execs)] == [list(exec_.command_prefix) for exec_ in execs]
    assert commands[-1] == _keep_state_command()
    for line in logs:
        assert SECRET_KEY not in line
    s3_client.delete_backup_objects.assert_not_called()


@pytest.mark.usefixtures("tools_present")
def test_run_backup_full_fallback_starts_from_no_state(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
):
    """A state download that failed half way is removed: the full backup starts from nothing.

    Otherwise tar would read the partial state and make an incremental archive
    recorded as a full backup.
    """
    _incremental_s3(s3_client)
    failing = _state_unreadable()
    target = f"{WORK_DIR}/{backup_chain.SNAPSHOT_STATE_FILE}"
    state_at_pipeline: list[bool] = []

    with live_container(
        ctx, synapse_data, execs=[DU, testing.Exec(_probe_command()), failing, PIPELINE_OK]
    ) as container:
        real_exec = container.exec

        def exec_(command: list[str], **kwargs: Any) -> Any:
            if command == list(failing.command_prefix):
                container.push(target, "GNU tar-1.34-2\npartial", make_dirs=True)
            elif "tar --create" in command[-1]:
                state_at_pipeline.append(container.exists(target))
            return real_exec(command, **kwargs)

        with mock.patch.object(container, "exec", side_effect=exec_):
            manifest = backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    assert manifest.backup_type == "full"
    assert state_at_pipeline == [False]


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(("execs", "problem"), PARENT_UNUSABLE)
def test_run_backup_incremental_fails_when_the_parent_cannot_be_used(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
    *,
    execs: list[testing.Exec],
    problem: str,
):
    """type=incremental fails saying why the chain cannot go on; nothing is uploaded.

    The pipeline never runs, the names the backup would have written are
    cleared, and the work dir is removed.
    """
    _incremental_s3(s3_client)

    with live_container(ctx, synapse_data, execs=[DU, *execs, PIPELINE_OK]) as container:
        with pytest.raises(backup.BackupError) as exc_info:
            backup.run_backup(
                container, _params(), BACKUP_ID, PASSPHRASE, backup_type="incremental"
            )
        assert not container.exists(WORK_DIR)

    assert str(exc_info.value) == f"cannot make an incremental backup: {problem}"
    commands = [call.command for call in ctx.exec_history["synapse"]]
    assert commands[1:] == [list(exec_.command_prefix) for exec_ in execs]
    s3_client.put_text.assert_not_called()
    s3_client.delete_backup_objects.assert_called_once_with(BACKUP_ID)


@pytest.mark.usefixtures("tools_present")
def test_run_backup_parent_state_error_hides_the_passphrase(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
):
    """type=incremental fails with the state download's error output, every secret hidden."""
    _incremental_s3(s3_client)
    command = backup_chain._snapshot_state_commands(_params(), _chain()[-1], False, WORK_DIR)
    failing = testing.Exec(
        command, return_code=2, stderr=f"gpg: bad passphrase file: {PASSPHRASE} {SECRET_KEY}\n"
    )

    with (
        live_container(
            ctx, synapse_data, execs=[DU, testing.Exec(_probe_command()), failing]
        ) as container,
        pytest.raises(backup.BackupError) as exc_info,
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE, backup_type="incremental")

    assert str(exc_info.value).endswith("gpg: bad passphrase file: *** ***")
    assert PASSPHRASE not in str(exc_info.value)


@pytest.mark.usefixtures("tools_present")
def test_run_backup_auto_logs_the_parent_state_error_without_secrets(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
):
    """Type auto logs why it makes a full backup, with the passphrase hidden there too."""
    _incremental_s3(s3_client)
    command = backup_chain._snapshot_state_commands(_params(), _chain()[-1], False, WORK_DIR)
    failing = testing.Exec(
        command, return_code=2, stderr=f"gpg: bad passphrase file: {PASSPHRASE}\n"
    )
    logs: list[str] = []

    with live_container(
        ctx, synapse_data, execs=[DU, testing.Exec(_probe_command()), failing, PIPELINE_OK]
    ) as container:
        manifest = backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE, log=logs.append)

    assert manifest.backup_type == "full"
    assert logs[0].startswith("making a full backup: ")
    assert logs[0].endswith("gpg: bad passphrase file: ***")
    for line in logs:
        assert PASSPHRASE not in line


BROKEN_CHAIN = (
    f"backup {PARENT_ID} depends on 20241201T000000Z, which is missing or incomplete: "
    f"the chain of {PARENT_ID} is broken"
)
NO_PARENT = [
    pytest.param({}, None, "there is no full backup to build on", id="no-backup"),
    pytest.param(
        {"list_backups": [_parent()]},
        backup.S3Error(BROKEN_CHAIN, option="backup-id"),
        BROKEN_CHAIN,
        id="broken-chain",
    ),
    pytest.param(
        {"list_backups": [_parent()]},
        [_parent()],
        f"the newest backup {PARENT_ID} has no snapshot state",
        id="no-snapshot-state",
    ),
    pytest.param(
        {"list_backups": backup.S3Error("cannot list the backups: AccessDenied")},
        None,
        "cannot list the backups: AccessDenied",
        id="cannot-list",
    ),
    pytest.param(
        {"list_backups": [_parent(metadata={"data-id": "f" * 32})]},
        None,
        f"the newest backup {PARENT_ID} was made of other data (by another unit, or before "
        "this unit's data was replaced other than by restore-backup)",
        id="other-data",
    ),
]


def _no_parent_s3(s3_client: mock.MagicMock, listing: dict[str, Any], chain: Any) -> None:
    """Set up S3 (mocked) for a backup that has nothing to build on."""
    backups = listing.get("list_backups", [])
    if isinstance(backups, Exception):
        s3_client.list_backups.side_effect = backups
    else:
        s3_client.list_backups.return_value = backups
    if isinstance(chain, Exception):
        s3_client.chain.side_effect = chain
    else:
        s3_client.chain.return_value = chain
    # The names are free; no snapshot state in S3 (if asked); the upload has 1234 bytes.
    sizes: list[int | None] = []
    if chain and not isinstance(chain, Exception):
        sizes.append(None)
    s3_client.object_size.side_effect = [*sizes, 1234]


@pytest.mark.usefixtures("tools_present", "fixed_work_dir")
def test_run_backup_without_the_database_file_says_so(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """Synapse's configured SQLite file is missing: the backup holds no database, and says so.

    Synapse creates the file when it first starts, so a backup before that is
    legitimate; a lost database must not go unnoticed either.
    """
    (synapse_data / "homeserver.db").unlink()
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container:
        manifest = backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE, log=logs.append)
        pipeline = ctx.exec_history["synapse"][1]

    assert (
        "Synapse's database /data/homeserver.db does not exist (has Synapse ever started?): "
        "this backup holds no database"
    ) in logs
    assert manifest.metadata["database-path"] == ""
    assert manifest.metadata["database-missing"] == "/data/homeserver.db"
    assert "/data/homeserver.db" not in manifest.paths
    assert "VACUUM INTO" not in pipeline.command[2]


@pytest.mark.usefixtures("tools_present", "fixed_work_dir")
@pytest.mark.parametrize(("listing", "chain", "problem"), NO_PARENT)
def test_run_backup_auto_falls_back_to_full(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    *,
    listing: dict[str, Any],
    chain: Any,
    problem: str,
):
    """Without an intact newest chain and its state, type auto makes a full backup, saying why."""
    _no_parent_s3(s3_client, listing, chain)
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container:
        manifest = backup.run_backup(
            container, _params(), BACKUP_ID, PASSPHRASE, backup_type="auto", log=logs.append
        )

    assert (manifest.backup_type, manifest.parent) == ("full", "")
    assert logs[:2] == [
        f"making a full backup: {problem}",
        "full backup of 7 paths, about 4096 bytes",
    ]
    # du, the pipeline and keeping the state: no parent state was fetched.
    assert len(ctx.exec_history["synapse"]) == 3
    document = _put_manifest(s3_client)
    assert (document["type"], document["parent"]) == ("full", "")


@pytest.mark.usefixtures("tools_present", "fixed_work_dir")
@pytest.mark.parametrize(("listing", "chain", "problem"), NO_PARENT)
def test_run_backup_incremental_impossible(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    *,
    listing: dict[str, Any],
    chain: Any,
    problem: str,
):
    """An incremental backup asked for without anything to build on fails before anything runs."""
    _no_parent_s3(s3_client, listing, chain)

    with (
        live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container,
        pytest.raises(backup.BackupError) as exc_info,
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE, backup_type="incremental")

    assert str(exc_info.value) == f"cannot make an incremental backup: {problem}"
    assert ctx.exec_history == {}
    s3_client.put_text.assert_not_called()
    s3_client.delete_backup_objects.assert_not_called()


@pytest.mark.usefixtures("tools_present")
def test_run_backup_full_on_request(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """type=full ignores the existing backups: no parent is looked for."""
    s3_client.list_backups.return_value = [_parent()]

    with live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container:
        manifest = backup.run_backup(
            container, _params(), BACKUP_ID, PASSPHRASE, backup_type="full"
        )

    assert (manifest.backup_type, manifest.parent) == ("full", "")
    s3_client.list_backups.assert_not_called()
    s3_client.chain.assert_not_called()
    assert len(ctx.exec_history["synapse"]) == 3


@pytest.mark.usefixtures("tools_present")
def test_run_backup_unknown_type(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """An unknown backup type is refused before anything runs or is written."""
    with (
        live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container,
        pytest.raises(
            backup.BackupError,
            match="unknown backup type 'differential': use full or incremental",
        ),
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE, backup_type="differential")

    assert ctx.exec_history == {}
    s3_client.put_text.assert_not_called()


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(
    ("pipeline", "sizes", "put_error", "message"),
    [
        pytest.param(
            testing.Exec(["bash", "-c"], return_code=1, stderr=f"aws: denied for {SECRET_KEY}\n"),
            [],
            None,
            "the backup pipeline failed (exit code 1): aws: denied for ***",
            id="pipeline-fails",
        ),
        pytest.param(
            testing.Exec(["bash", "-c"], stdout="no digest\n"),
            [],
            None,
            "did not report the archive's digest",
            id="no-digest",
        ),
        pytest.param(
            PIPELINE_OK,
            [999],
            None,
            f"the uploaded object {BACKUP_ID} has 999 bytes, the pipeline wrote 1234",
            id="size-mismatch",
        ),
        pytest.param(
            PIPELINE_OK,
            [None],
            None,
            f"the uploaded object {BACKUP_ID} has None bytes",
            id="nothing-uploaded",
        ),
        pytest.param(
            PIPELINE_OK,
            [1234],
            backup.S3Error("cannot write object x: AccessDenied"),
            "cannot write object x: AccessDenied",
            id="manifest-not-written",
        ),
    ],
)
def test_run_backup_failure_discards(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    *,
    pipeline: testing.Exec,
    sizes: list[int | None],
    put_error: backup.S3Error | None,
    message: str,
):
    """A backup that fails after the upload started removes what it left in S3.

    Arrange: S3 (mocked) and a pipeline that fail in one way.
    Act: run_backup.
    Assert: BackupError with the reason and no secret; the archive, manifest and
        snapshot-state names are deleted; the state is not kept in the container;
        the work dir is gone.
    """
    s3_client.object_size.side_effect = sizes
    s3_client.put_text.side_effect = put_error

    with live_container(ctx, synapse_data, execs=[DU, pipeline]) as container:
        with pytest.raises(backup.BackupError) as exc_info:
            backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)
        work_dir = ctx.exec_history["synapse"][-1].environment["HOME"]
        assert not container.exists(work_dir)

    assert message in str(exc_info.value)
    assert SECRET_KEY not in str(exc_info.value)
    s3_client.delete_backup_objects.assert_called_once_with(BACKUP_ID)
    # du and the pipeline; the state of a failed backup is not kept.
    assert len(ctx.exec_history["synapse"]) == 2


@pytest.mark.usefixtures("tools_present")
def test_run_backup_discard_failure_keeps_the_error(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A cleanup that fails too is logged; the backup's own error is raised."""
    s3_client.delete_backup_objects.side_effect = backup.S3Error("cannot delete")
    failing = testing.Exec(["bash", "-c"], return_code=1, stderr="gpg: failed")

    with (
        live_container(ctx, synapse_data, execs=[DU, failing]) as container,
        pytest.raises(backup.BackupError, match="gpg: failed"),
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    s3_client.delete_backup_objects.assert_called_once_with(BACKUP_ID)


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(
    ("check_error", "names", "message"),
    [
        pytest.param(
            None,
            [f"{BACKUP_ID}.manifest.json"],
            f"a backup named {BACKUP_ID} exists already",
            id="manifest-exists",
        ),
        pytest.param(None, [BACKUP_ID], "exists already", id="archive-exists"),
        pytest.param(
            None, [f"{BACKUP_ID}.snar.gpg"], "exists already", id="snapshot-state-exists"
        ),
        pytest.param(
            None, [f"{BACKUP_ID}.part-0001"], "or is being made", id="upload-under-way-elsewhere"
        ),
        pytest.param(
            None, backup.S3Error("cannot list the backups"), "cannot list", id="s3-error"
        ),
        pytest.param(
            backup.S3Error("access to bucket synapse-backups denied", option="s3-credentials"),
            [],
            "access to bucket synapse-backups denied",
            id="bucket-refused",
        ),
    ],
)
def test_run_backup_never_touches_an_existing_backup(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    *,
    check_error: backup.S3Error | None,
    names: list[str] | backup.S3Error,
    message: str,
):
    """A backup id in use, even by a backup being made on another unit, stops everything.

    The id's objects and unfinished uploads are looked for (or S3 refuses):
    nothing runs and nothing is deleted.
    """
    s3_client.check_bucket.side_effect = check_error
    if isinstance(names, Exception):
        s3_client.backup_names.side_effect = names
    else:
        s3_client.backup_names.return_value = names

    with (
        live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    assert ctx.exec_history == {}
    s3_client.list_backups.assert_not_called()
    s3_client.delete_backup_objects.assert_not_called()
    s3_client.put_text.assert_not_called()


@pytest.mark.usefixtures("tools_present")
def test_run_backup_never_overwrites_nor_discards_a_backup_committed_meanwhile(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """Two units that start a backup in the same second get the same id.

    When the other one commits first, this one fails without writing its
    manifest over the other's, and without deleting the other's objects.
    """
    s3_client.has_manifest.return_value = True

    with (
        live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container,
        pytest.raises(backup.BackupError, match=r"another backup named .* was committed"),
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    s3_client.put_text.assert_not_called()
    s3_client.delete_backup_objects.assert_not_called()


@pytest.mark.parametrize(
    ("key", "passphrase", "message"),
    [
        pytest.param("../x", PASSPHRASE, "invalid backup id", id="bad-key"),
        pytest.param(BACKUP_ID, "", "passphrase is empty", id="empty-passphrase"),
    ],
)
def test_run_backup_refuses_bad_arguments(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    *,
    key: str,
    passphrase: str,
    message: str,
):
    """A bad key or an empty passphrase is refused before S3 is contacted."""
    with (
        live_container(ctx, synapse_data) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        backup.run_backup(container, _params(), key, passphrase)

    s3_client.object_size.assert_not_called()


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(
    ("changes", "make", "outside"),
    [
        pytest.param(
            {"media_store_path": "/srv/media_store"},
            "/srv/media_store/local_content",
            "/srv/media_store/local_content",
            id="media",
        ),
        pytest.param(
            {"database": {"name": "sqlite3", "args": {"database": "/var/lib/synapse/h.db"}}},
            "/var/lib/synapse/h.db",
            "/var/lib/synapse/h.db",
            id="database",
        ),
        pytest.param(
            {"signing_key_path": "/etc/synapse/example.com.signing.key"},
            "/etc/synapse/example.com.signing.key",
            "/etc/synapse/example.com.signing.key",
            id="signing-key",
        ),
    ],
)
def test_run_backup_refuses_paths_outside_data(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    *,
    changes: dict[str, Any],
    make: str,
    outside: str,
):
    """A backup no restore could put back is not made: nothing runs, nothing reaches S3.

    Arrange: homeserver.yaml names a file Synapse keeps outside /data, which exists.
    Act: run_backup.
    Assert: BackupError naming the path; no command ran; nothing written or deleted.
    """
    _write_config(synapse_data, **changes)

    with live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container:
        if make.endswith((".db", ".key")):
            container.push(make, "content", make_dirs=True)
        else:
            container.make_dir(make, make_parents=True)
        with pytest.raises(backup.BackupError) as exc_info:
            backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    assert str(exc_info.value) == (
        f"{outside} is outside /data, where a restore can put it back: "
        "keep Synapse's files under /data"
    )
    assert ctx.exec_history == {}
    s3_client.put_text.assert_not_called()
    s3_client.delete_backup_objects.assert_not_called()


DEPLOYMENT = "3f9c0d1e-0000-4000-8000-000000000001/synapse"
OTHER_DEPLOYMENT = "7a2b4c6d-0000-4000-8000-000000000002/synapse"
# Another deployment's backup, newer than this deployment's chain, at the same S3 path.
OTHERS_NEWEST = _parent(
    "20241231T120000Z", metadata={"deployment": OTHER_DEPLOYMENT, "database-path": ""}
)


def _own_chain(*, recorded: bool) -> list[backup.BackupManifest]:
    """_chain(), its manifests recording this deployment (or, older ones, no deployment)."""
    metadata = {"deployment": DEPLOYMENT} if recorded else {}
    return [
        dataclasses.replace(manifest, metadata={**manifest.metadata, **metadata})
        for manifest in _chain()
    ]


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(
    "recorded", [True, False], ids=["deployment-recorded", "older-manifests-without-deployment"]
)
def test_run_backup_builds_only_on_this_deployments_chain(
    ctx: testing.Context,
    synapse_data: pathlib.Path,
    s3_client: mock.MagicMock,
    fixed_work_dir: str,
    *,
    recorded: bool,
):
    """Another deployment's newer backup at the same path is not built on: ours is.

    Arrange: S3 (mocked) lists another deployment's backup, then this deployment's
        chain (whose manifests record it, or predate the deployment field).
    Act: run_backup with this deployment in the metadata.
    Assert: an incremental backup on this deployment's newest backup; the
        manifest records the deployment.
    """
    _incremental_s3(s3_client)
    chain = _own_chain(recorded=recorded)
    s3_client.list_backups.return_value = [OTHERS_NEWEST, *reversed(chain)]
    s3_client.chain.return_value = chain
    state_command = backup_chain._snapshot_state_commands(_params(), chain[-1], False, WORK_DIR)
    execs = [DU, testing.Exec(_probe_command()), testing.Exec(state_command), PIPELINE_OK]

    with live_container(ctx, synapse_data, execs=execs) as container:
        manifest = backup.run_backup(
            container, _params(), BACKUP_ID, PASSPHRASE, metadata={"deployment": DEPLOYMENT}
        )

    s3_client.list_backups.assert_called_once_with(strict=True)
    s3_client.chain.assert_called_once_with(PARENT_ID)
    assert (manifest.backup_type, manifest.parent) == ("incremental", PARENT_ID)
    assert manifest.metadata["deployment"] == DEPLOYMENT
    assert _put_manifest(s3_client)["deployment"] == DEPLOYMENT


@pytest.mark.usefixtures("tools_present")
def test_run_backup_other_deployments_backups_are_nothing_to_build_on(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """With only another deployment's backups at the path, type auto makes a full backup."""
    _no_parent_s3(s3_client, {"list_backups": [OTHERS_NEWEST]}, None)
    logs: list[str] = []

    with live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container:
        manifest = backup.run_backup(
            container,
            _params(),
            BACKUP_ID,
            PASSPHRASE,
            metadata={"deployment": DEPLOYMENT},
            log=logs.append,
        )

    assert (manifest.backup_type, manifest.parent) == ("full", "")
    assert logs[0] == "making a full backup: there is no full backup to build on"
    s3_client.chain.assert_not_called()


@pytest.mark.usefixtures("tools_present")
def test_run_backup_incremental_refuses_another_deployments_chain(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """type=incremental fails rather than build on another deployment's backup."""
    _no_parent_s3(s3_client, {"list_backups": [OTHERS_NEWEST]}, None)

    with (
        live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container,
        pytest.raises(backup.BackupError) as exc_info,
    ):
        backup.run_backup(
            container,
            _params(),
            BACKUP_ID,
            PASSPHRASE,
            backup_type="incremental",
            metadata={"deployment": DEPLOYMENT},
        )

    assert str(exc_info.value) == (
        "cannot make an incremental backup: there is no full backup to build on"
    )
    assert ctx.exec_history == {}
    s3_client.chain.assert_not_called()


def test_create_backup_runs_backup(ctx: testing.Context, synapse_data: pathlib.Path):
    """create_backup (the seed API) delegates to run_backup."""
    with (
        live_container(ctx, synapse_data) as container,
        mock.patch.object(backup, "run_backup") as run_backup,
    ):
        backup.create_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    run_backup.assert_called_once_with(container, _params(), BACKUP_ID, PASSPHRASE)
