"""backup.py functions that take an ops.Container, on Scenario's container.

The container is the charm's own, taken from a live Scenario event; /data is a
mounted local directory. Commands are canned (testing.Exec) and S3Client is
replaced by a mock: the real pipeline and S3 are tested in tests/workload.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import ops
import pytest
import yaml
from ops import testing

import backup
from tests.unit.builders import make_state

SECRET_KEY = "container-secret-key-77c1"
PASSPHRASE = "container-passphrase-e04d"
SHA256 = "ab" * 32
BACKUP_ID = "20250101T000000Z"
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
    """Yield the charm's synapse container during an update-status event.

    Scenario's container filesystem starts empty; /tmp is made as the image has it.
    """
    state = make_state(data_dir, {}, **container_options)
    with ctx(ctx.on.update_status(), state) as manager:
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
    ],
)
def test_read_synapse_config_errors(
    ctx: testing.Context, data_dir: pathlib.Path, content: str | None, message: str
):
    """An unusable homeserver.yaml raises BackupError."""
    if content is not None:
        (data_dir / "homeserver.yaml").write_text(content)

    with (
        live_container(ctx, data_dir) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        backup.read_synapse_config(container)


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
    for tool in backup.REQUIRED_TOOLS:
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
        stdout = backup.run_in_container(
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
        backup.run_in_container(
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
    assert aws_config == backup.build_aws_config(_params())
    assert SECRET_KEY not in aws_config


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
        with backup.prepared_container(container, _params(), PASSPHRASE) as work_dir:
            assert container.exists(f"{work_dir}/passphrase")
            seen.append(work_dir)
            raise RuntimeError("the backup failed")

    with live_container(ctx, data_dir) as container:
        with pytest.raises(RuntimeError, match="the backup failed"):
            failing_backup(container)
        (work_dir,) = seen
        assert work_dir.startswith(backup.WORK_DIR_PREFIX)
        assert not container.exists(work_dir)


# --- run_backup with S3 mocked ----------------------------------------------------------------


@pytest.fixture
def s3_client() -> Iterator[mock.MagicMock]:
    """Replace S3Client by a mock; by default no backup exists and uploads are 1234 bytes."""
    client = mock.create_autospec(backup.S3Client, instance=True)
    client.object_size.side_effect = [None, None, 1234]
    with mock.patch.object(backup, "S3Client", return_value=client):
        yield client


@pytest.fixture
def tools_present() -> Iterator[mock.MagicMock]:
    """Skip the tool check (tested above): its bash -c would match the pipeline's Exec."""
    with mock.patch.object(backup, "check_tools") as patched:
        yield patched


DU = testing.Exec(["du"], stdout="4096\ttotal\n")
PIPELINE_OK = testing.Exec(["bash", "-c"], stdout=f"{SHA256} 1234 6\n")


@pytest.mark.usefixtures("tools_present")
def test_run_backup(ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock):
    """A backup streams the pipeline, checks the upload and then commits the manifest.

    Arrange: Synapse's /data; S3 (mocked) has no such backup and then 1234 bytes.
    Act: run_backup.
    Assert: the manifest; the pipeline ran as the Synapse user with the credentials
        in its environment only; the manifest was written; nothing was deleted; the
        work dir is gone; progress was logged.
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
        du, pipeline = ctx.exec_history["synapse"]
        work_dir = pipeline.environment["HOME"]
        assert not container.exists(work_dir)

    assert manifest.backup_id == BACKUP_ID
    assert (manifest.size, manifest.sha256, manifest.file_count) == (1234, SHA256, 6)
    assert manifest.paths == (*EXPECTED_PATHS, "/data/homeserver.db")
    assert manifest.metadata == {"server-name": "example.com"}
    assert du.command[-len(manifest.paths) :] == list(manifest.paths)
    assert pipeline.command[:2] == ["bash", "-c"]
    assert (pipeline.user_id, pipeline.group_id) == (991, 991)
    assert pipeline.environment["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    assert work_dir.startswith(backup.WORK_DIR_PREFIX)
    for value in (SECRET_KEY, PASSPHRASE):
        assert value not in pipeline.command[2]
    assert "--add-file=data/homeserver.yaml" in pipeline.command[2]
    s3_client.object_size.assert_has_calls(
        [mock.call(BACKUP_ID), mock.call(f"{BACKUP_ID}.manifest.json"), mock.call(BACKUP_ID)]
    )
    (name, text), _ = s3_client.put_text.call_args
    assert name == f"{BACKUP_ID}.manifest.json"
    assert json.loads(text)["sha256"] == SHA256
    s3_client.delete_objects.assert_not_called()
    assert logs[0] == "backing up 7 paths, about 4096 bytes"
    assert logs[-1] == "writing the manifest"


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(
    ("pipeline", "sizes", "put_error", "message"),
    [
        pytest.param(
            testing.Exec(["bash", "-c"], return_code=1, stderr=f"aws: denied for {SECRET_KEY}\n"),
            [None, None],
            None,
            "the backup pipeline failed (exit code 1): aws: denied for ***",
            id="pipeline-fails",
        ),
        pytest.param(
            testing.Exec(["bash", "-c"], stdout="no digest\n"),
            [None, None],
            None,
            "did not report the archive's digest",
            id="no-digest",
        ),
        pytest.param(
            PIPELINE_OK,
            [None, None, 999],
            None,
            "the uploaded object has 999 bytes, the pipeline wrote 1234",
            id="size-mismatch",
        ),
        pytest.param(
            PIPELINE_OK,
            [None, None, None],
            None,
            "the uploaded object has None bytes",
            id="nothing-uploaded",
        ),
        pytest.param(
            PIPELINE_OK,
            [None, None, 1234],
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
    Assert: BackupError with the reason and no secret; the archive and manifest
        names are deleted; the work dir is gone.
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
    s3_client.delete_objects.assert_called_once_with((BACKUP_ID, f"{BACKUP_ID}.manifest.json"))


@pytest.mark.usefixtures("tools_present")
def test_run_backup_discard_failure_keeps_the_error(
    ctx: testing.Context, synapse_data: pathlib.Path, s3_client: mock.MagicMock
):
    """A cleanup that fails too is logged; the backup's own error is raised."""
    s3_client.delete_objects.side_effect = backup.S3Error("cannot delete")
    failing = testing.Exec(["bash", "-c"], return_code=1, stderr="gpg: failed")

    with (
        live_container(ctx, synapse_data, execs=[DU, failing]) as container,
        pytest.raises(backup.BackupError, match="gpg: failed"),
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)


@pytest.mark.usefixtures("tools_present")
@pytest.mark.parametrize(
    ("check_error", "sizes", "message"),
    [
        pytest.param(
            None, [10], f"a backup named {BACKUP_ID} exists already", id="archive-exists"
        ),
        pytest.param(None, [None, 2], "exists already", id="manifest-exists"),
        pytest.param(
            None, [backup.S3Error("cannot read object")], "cannot read object", id="s3-error"
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
    sizes: list[Any],
    message: str,
):
    """A backup id in use (or S3 refusing) stops before anything runs or is deleted."""
    s3_client.check_bucket.side_effect = check_error
    s3_client.object_size.side_effect = sizes

    with (
        live_container(ctx, synapse_data, execs=[DU, PIPELINE_OK]) as container,
        pytest.raises(backup.BackupError, match=message),
    ):
        backup.run_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    assert ctx.exec_history == {}
    s3_client.delete_objects.assert_not_called()
    s3_client.put_text.assert_not_called()


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


def test_create_backup_runs_backup(ctx: testing.Context, synapse_data: pathlib.Path):
    """create_backup (the seed API) delegates to run_backup."""
    with (
        live_container(ctx, synapse_data) as container,
        mock.patch.object(backup, "run_backup") as run_backup,
    ):
        backup.create_backup(container, _params(), BACKUP_ID, PASSPHRASE)

    run_backup.assert_called_once_with(container, _params(), BACKUP_ID, PASSPHRASE)
