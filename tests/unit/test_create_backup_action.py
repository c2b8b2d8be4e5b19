"""The create-backup action: precondition failures, backup errors and results.

backup.run_backup is patched here: it runs a tar | gpg | aws pipeline in the
workload against S3, which tests/workload exercises for real (bash, tar, gpg,
the aws CLI and a SeaweedFS server). These tests cover what the observer does
around it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import ops
import pytest
import yaml
from ops import testing

import backup
import backup_container
import backup_restore
import synapse
from backup_observer import NOT_CONFIGURED, CreateParams
from tests.unit.builders import (
    ALL_SECRETS,
    CREDENTIALS_WITHOUT_SECRET_KEY,
    PASSPHRASE,
    SECRET_KEY,
    SECRET_VALUES,
    SERVER_NAME,
    UNKNOWN_SECRET_ID,
    VALID_S3_CONFIG,
    homeserver_yaml,
    make_state,
)

SYNAPSE_VERSION = "1.120.2"
VERSION_EXEC = testing.Exec(
    ["python3", "-c", "import synapse; print(synapse.__version__)"], stdout=f"{SYNAPSE_VERSION}\n"
)
CONFIG = {"server-name": SERVER_NAME, **VALID_S3_CONFIG}
ACTIONS_YAML = pathlib.Path(__file__).parents[2] / "actions.yaml"


@pytest.fixture
def run_backup() -> Iterator[mock.MagicMock]:
    """Patch backup.run_backup (the real pipeline is tested in tests/workload)."""
    with mock.patch.object(backup, "run_backup", autospec=True) as patched:
        yield patched


def _manifest(
    backup_id: str = "20250101T000000Z", parent: str = "", deployment: str | None = None
) -> backup.BackupManifest:
    return backup.BackupManifest(
        backup_id=backup_id,
        created_at="2025-01-01T00:00:00+00:00",
        paths=("/data/homeserver.yaml", "/data/homeserver.db"),
        file_count=7,
        size=123456,
        sha256="0" * 64,
        duration=1.5,
        backup_type="incremental" if parent else "full",
        parent=parent,
        metadata={"deployment": deployment} if deployment else {},
    )


def _assert_no_secret(message: str) -> None:
    for value in SECRET_VALUES:
        assert value not in message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param({"server-name": SERVER_NAME}, NOT_CONFIGURED, id="no-s3-option"),
        pytest.param({}, NOT_CONFIGURED, id="nothing-set"),
    ],
)
def test_not_configured(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    config: dict[str, str],
    expected: str,
):
    """Without backup options the action fails and says what to set.

    Arrange: no S3 option.
    Act: run create-backup.
    Assert: the failure lists every option to set; no backup ran.
    """
    state = make_state(configured_data_dir, config)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("create-backup"), state)

    assert exc_info.value.message == expected
    for option in ("s3-bucket", "s3-endpoint", "s3-region", "s3-credentials", "backup-passphrase"):
        assert option in exc_info.value.message
    run_backup.assert_not_called()


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        pytest.param({"s3-bucket": None}, "s3-bucket", id="missing-bucket"),
        pytest.param({"s3-bucket": "Not_A_Bucket"}, "s3-bucket", id="bad-bucket"),
        pytest.param({"s3-credentials": None}, "s3-credentials", id="missing-credentials"),
        pytest.param(
            {"s3-credentials": UNKNOWN_SECRET_ID}, "s3-credentials", id="credentials-not-granted"
        ),
        pytest.param(
            {"s3-credentials": CREDENTIALS_WITHOUT_SECRET_KEY.id},
            "s3-credentials",
            id="credentials-lack-secret-key",
        ),
        pytest.param({"backup-passphrase": None}, "backup-passphrase", id="missing-passphrase"),
        pytest.param(
            {"backup-passphrase": UNKNOWN_SECRET_ID},
            "backup-passphrase",
            id="passphrase-not-granted",
        ),
        pytest.param({"s3-endpoint": None}, "s3-endpoint", id="no-endpoint-or-region"),
        pytest.param({"s3-endpoint": "s3.example.com"}, "s3-endpoint", id="bad-endpoint"),
        pytest.param({"s3-uri-style": "dns"}, "s3-uri-style", id="bad-uri-style"),
        pytest.param({"s3-path": "../escape"}, "s3-path", id="bad-path"),
    ],
)
def test_invalid_config(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    changes: dict[str, str | None],
    option: str,
):
    """Invalid backup options fail the action, naming the option.

    Arrange: valid backup options but one.
    Act: run create-backup.
    Assert: the failure names the option and shows no secret; no backup ran.
    """
    config = {**CONFIG, **changes}
    config = {key: value for key, value in config.items() if value is not None}
    state = make_state(configured_data_dir, config)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("create-backup"), state)

    assert exc_info.value.message.startswith(f"cannot back up: {option}: ")
    _assert_no_secret(exc_info.value.message)
    run_backup.assert_not_called()


def test_negative_retention_count_fails_the_action(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """A backup-retention-count pydantic refuses fails the action naming the option."""
    state = make_state(configured_data_dir, {**CONFIG, "backup-retention-count": -1})

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("create-backup"), state)

    assert exc_info.value.message == (
        "cannot back up: backup-retention-count: Input should be greater than or equal to 0"
    )
    run_backup.assert_not_called()


@pytest.mark.parametrize(
    ("passphrase", "given", "failure"),
    [
        pytest.param(PASSPHRASE + "\n", PASSPHRASE, None, id="final-newline-dropped"),
        pytest.param(
            PASSPHRASE + "\nsecond line",
            None,
            "cannot back up: backup-passphrase: the passphrase must be a single line",
            id="two-lines-refused",
        ),
    ],
)
def test_passphrase_lines(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    *,
    passphrase: str,
    given: str | None,
    failure: str | None,
):
    """The passphrase gpg reads is the one line of the secret, without its final newline.

    gpg reads the first line of a passphrase file: a second line would be ignored,
    so it is refused rather than silently dropped.
    """
    run_backup.return_value = _manifest()
    secret = testing.Secret(tracked_content={"passphrase": passphrase})
    state = make_state(
        configured_data_dir,
        {**CONFIG, "backup-passphrase": secret.id},
        secrets=[*ALL_SECRETS, secret],
        execs=[VERSION_EXEC],
    )

    if failure is None:
        ctx.run(ctx.on.action("create-backup"), state)
        assert run_backup.call_args.args[3] == given
    else:
        with pytest.raises(testing.ActionFailed) as exc_info:
            ctx.run(ctx.on.action("create-backup"), state)
        assert exc_info.value.message == failure
        run_backup.assert_not_called()


def test_container_not_connectable(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """The action fails while the workload container does not answer.

    Arrange: valid backup options; Pebble does not answer.
    Act: run create-backup.
    Assert: the failure says the container is not reachable; no backup ran.
    """
    state = make_state(configured_data_dir, CONFIG, can_connect=False)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("create-backup"), state)

    assert exc_info.value.message == "cannot back up: the synapse container is not reachable yet"
    run_backup.assert_not_called()


NOT_SYNAPSE_UNIT = "cannot {}: Synapse runs on synapse/0 only; run the action there"


@pytest.mark.parametrize(
    ("action", "params", "what"),
    [
        pytest.param("create-backup", {}, "back up", id="create"),
        pytest.param("restore-backup", {"backup-id": "20250101T000000Z"}, "restore", id="restore"),
        pytest.param(
            "verify-backup", {"backup-id": "20250101T000000Z"}, "verify the backup", id="verify"
        ),
    ],
)
def test_container_actions_run_only_where_synapse_runs(
    extra_ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    action: str,
    params: dict[str, str],
    what: str,
):
    """Unit 1 refuses, even as the leader: Synapse and its data are on unit 0.

    Arrange: valid backup options on unit 1 (added by scaling out), the leader.
    Act: run an action that uses the workload container.
    Assert: the failure names unit 0 as the one to use; no backup or restore
        ran, and nothing was executed in the container.
    """
    state = make_state(configured_data_dir, CONFIG, leader=True)

    with (
        pytest.raises(testing.ActionFailed) as exc_info,
        mock.patch.object(backup, "run_restore", autospec=True) as run_restore,
        mock.patch.object(backup, "verify_backup", autospec=True) as verify_backup,
    ):
        extra_ctx.run(extra_ctx.on.action(action, params=params), state)

    assert exc_info.value.message == NOT_SYNAPSE_UNIT.format(what)
    run_backup.assert_not_called()
    run_restore.assert_not_called()
    verify_backup.assert_not_called()
    assert extra_ctx.exec_history == {}


def test_unit_zero_backs_up_without_leadership(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """Unit 0 makes the backups whether or not it is the leader just now.

    Arrange: valid backup options on unit 0, not the leader (leadership
        moved, or is being re-elected).
    Act: run create-backup.
    Assert: the backup ran.
    """
    run_backup.return_value = _manifest()
    state = make_state(configured_data_dir, CONFIG, leader=False)

    ctx.run(ctx.on.action("create-backup"), state)

    run_backup.assert_called_once()
    assert ctx.action_results is not None
    assert ctx.action_results["backup-id"] == "20250101T000000Z"


@pytest.mark.parametrize("action", ["list-backups", "delete-backup"])
def test_s3_only_actions_run_on_any_unit(
    extra_ctx: testing.Context, configured_data_dir: pathlib.Path, action: str
):
    """Listing and deleting backups use S3 only: any unit runs them."""
    state = make_state(configured_data_dir, CONFIG, leader=False)
    params = {} if action == "list-backups" else {"backup-id": "20250101T000000Z"}

    no_s3 = backup.S3Error("no S3 in unit tests")
    with (
        pytest.raises(testing.ActionFailed) as exc_info,
        mock.patch.object(backup.S3Client, "__init__", side_effect=no_s3),
    ):
        extra_ctx.run(extra_ctx.on.action(action, params=params), state)

    assert "no S3 in unit tests" in exc_info.value.message


def test_not_configured_yet(
    ctx: testing.Context, data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """The action fails before Synapse generated homeserver.yaml.

    Arrange: valid backup options; /data is empty.
    Act: run create-backup.
    Assert: the failure says Synapse is not configured yet; no backup ran.
    """
    state = make_state(data_dir, CONFIG, planned=False)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("create-backup"), state)

    assert exc_info.value.message == (
        "cannot back up: Synapse has not been configured yet (set server-name)"
    )
    run_backup.assert_not_called()


@pytest.mark.parametrize(
    "error",
    [
        pytest.param("the backup pipeline failed (exit code 2): gpg: error", id="pipeline"),
        pytest.param("a backup named X exists already", id="exists"),
        pytest.param("the workload container lacks gpg", id="missing-tool"),
    ],
)
def test_backup_error(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    error: str,
):
    """A BackupError from the backup fails the action with its message.

    Arrange: valid options; run_backup raises a BackupError.
    Act: run create-backup.
    Assert: the failure names the backup id and carries the error.
    """
    run_backup.side_effect = backup.BackupError(error)
    state = make_state(configured_data_dir, CONFIG, execs=[VERSION_EXEC])

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("create-backup"), state)

    backup_id = run_backup.call_args.args[2]
    assert backup.BACKUP_ID_PATTERN.fullmatch(backup_id)
    assert exc_info.value.message == f"backup {backup_id} failed: {error}"
    assert ctx.action_logs == [f"creating backup {backup_id}"]


def test_success(ctx: testing.Context, configured_data_dir: pathlib.Path):
    """A backup returns its id, type, parent, size, duration and file count, and logs progress.

    Arrange: valid options (no retention); run_backup (patched) logs progress and
        returns a full backup's manifest for the backup id it was given.
    Act: run create-backup without a type.
    Assert: the results (no retention result); run_backup got the container, the S3
        parameters, a UTC backup id, the passphrase, type auto and the metadata; the
        progress is in the action logs.
    """
    calls: list[dict[str, Any]] = []

    def fake_run_backup(
        container: ops.Container,
        s3_parameters: backup.S3Parameters,
        backup_key: str,
        passphrase: str,
        **kwargs: Any,
    ) -> backup.BackupManifest:
        calls.append(
            {
                "container": container,
                "s3": s3_parameters,
                "backup_key": backup_key,
                "passphrase": passphrase,
                **kwargs,
            }
        )
        kwargs["log"]("streaming tar | gpg | aws")
        return _manifest(backup_key)

    state = make_state(configured_data_dir, CONFIG, execs=[VERSION_EXEC])

    with mock.patch.object(backup, "run_backup", side_effect=fake_run_backup):
        out = ctx.run(ctx.on.action("create-backup"), state)

    (call,) = calls
    backup_id = call["backup_key"]
    assert backup.BACKUP_ID_PATTERN.fullmatch(backup_id)
    assert ctx.action_results == {
        "backup-id": backup_id,
        "type": "full",
        "parent": "none",
        "size": 123456,
        "duration": 1.5,
        "file-count": 7,
    }
    assert isinstance(call["container"], ops.Container)
    assert call["container"].name == synapse.CONTAINER_NAME
    s3 = call["s3"]
    assert (s3.bucket, s3.endpoint, s3.secret_key) == (
        "synapse-backups",
        "https://s3.example.com",
        SECRET_KEY,
    )
    assert call["passphrase"] == PASSPHRASE
    assert call["backup_type"] == "auto"
    # The deployment (model UUID and application) keeps chains of deployments sharing a path apart.
    assert call["metadata"] == {
        "server-name": SERVER_NAME,
        "synapse-version": SYNAPSE_VERSION,
        "charm-version": "unknown",
        "deployment": f"{state.model.uuid}/synapse",
    }
    assert ctx.action_logs == [
        f"creating backup {backup_id}",
        "streaming tar | gpg | aws",
        f"backup {backup_id} committed",
    ]
    for line in ctx.action_logs:
        _assert_no_secret(line)
    assert out.unit_status == ops.ActiveStatus()


def test_success_with_unknown_synapse_version(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """A Synapse version that cannot be read does not stop the backup.

    Arrange: valid options; the version command fails; run_backup returns a manifest.
    Act: run create-backup.
    Assert: the backup succeeds with synapse-version "unknown" in its metadata.
    """
    run_backup.return_value = _manifest()
    failing_version = testing.Exec(VERSION_EXEC.command_prefix, return_code=1, stderr="no")
    state = make_state(configured_data_dir, CONFIG, execs=[failing_version])

    ctx.run(ctx.on.action("create-backup"), state)

    assert run_backup.call_args.kwargs["metadata"]["synapse-version"] == "unknown"
    assert ctx.action_results is not None
    assert ctx.action_results["backup-id"] == "20250101T000000Z"


def test_endpoint_boto_rejects_fails_cleanly(
    ctx: testing.Context, configured_data_dir: pathlib.Path
):
    """An endpoint boto3 refuses fails the action with a message, not a traceback.

    Arrange: an endpoint that passes S3Parameters but that boto3 refuses; the real
        run_backup (it fails before running anything in the workload).
    Act: run create-backup.
    Assert: ActionFailed naming the backup and the refused endpoint.
    """
    config = {**CONFIG, "s3-endpoint": "https://bad_host.example.com"}
    state = make_state(configured_data_dir, config, execs=[VERSION_EXEC])

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("create-backup"), state)

    message = exc_info.value.message
    assert message.startswith("backup ")
    assert "Invalid endpoint: https://bad_host.example.com" in message
    _assert_no_secret(message)


# --- the type parameter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "backup_type"),
    [
        pytest.param({}, "auto", id="not-given"),
        pytest.param({"type": "full"}, "full", id="full"),
        pytest.param({"type": "incremental"}, "incremental", id="incremental"),
    ],
)
def test_type_param(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    params: dict[str, str],
    backup_type: str,
):
    """The type param reaches run_backup; without it, run_backup chooses (auto)."""
    run_backup.return_value = _manifest()
    state = make_state(configured_data_dir, CONFIG, execs=[VERSION_EXEC])

    ctx.run(ctx.on.action("create-backup", params=params), state)

    assert run_backup.call_args.kwargs["backup_type"] == backup_type


@pytest.mark.parametrize("config", [CONFIG, {"server-name": SERVER_NAME}])
@pytest.mark.parametrize("backup_type", ["differential", "auto ", "FULL", ""])
def test_bad_type_param(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    config: dict[str, str],
    backup_type: str,
):
    """A type that is not full or incremental fails first, even without backup options."""
    state = make_state(configured_data_dir, config, execs=[VERSION_EXEC])

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("create-backup", params={"type": backup_type}), state)

    assert exc_info.value.message == (
        "Error in action parameters: type must be full or incremental"
    )
    run_backup.assert_not_called()


def test_incremental_results(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """An incremental backup's results give its type and the backup it builds on."""
    run_backup.return_value = _manifest("20250102T000000Z", parent="20250101T000000Z")
    state = make_state(configured_data_dir, CONFIG, execs=[VERSION_EXEC])

    ctx.run(ctx.on.action("create-backup", params={"type": "incremental"}), state)

    assert ctx.action_results is not None
    assert (ctx.action_results["type"], ctx.action_results["parent"]) == (
        "incremental",
        "20250101T000000Z",
    )


@pytest.mark.parametrize(
    ("backup_type", "valid"),
    [
        pytest.param("auto", True, id="auto"),
        pytest.param("full", True, id="full"),
        pytest.param("incremental", True, id="incremental"),
        pytest.param("differential", False, id="unknown"),
        pytest.param("Full", False, id="case"),
    ],
)
def test_create_params(backup_type: str, valid: bool):
    """CreateParams takes full, incremental, or auto (its default: the param not given)."""
    assert CreateParams().type == "auto"
    if valid:
        assert CreateParams(type=backup_type).type == backup_type
    else:
        with pytest.raises(ValueError, match=r"^type must be full or incremental$"):
            CreateParams(type=backup_type)


def test_type_param_schema():
    """actions.yaml offers full and incremental, with no default (the charm then chooses)."""
    spec = yaml.safe_load(ACTIONS_YAML.read_text())["create-backup"]
    param = spec["params"]["type"]

    assert param["type"] == "string"
    assert param["enum"] == ["full", "incremental"]
    assert "default" not in param
    assert spec.get("required", []) == []
    assert {field.name for field in dataclasses.fields(CreateParams)} == set(spec["params"])
    for value in param["enum"]:
        assert CreateParams(type=value).type == value


# --- retention after a backup ----------------------------------------------------------------

# Two older chains, oldest first: A <- A+1 and B <- B+1 <- B+2.
OLDER = [
    _manifest("20250101T000000Z"),
    _manifest("20250102T000000Z", parent="20250101T000000Z"),
    _manifest("20250201T000000Z"),
    _manifest("20250202T000000Z", parent="20250201T000000Z"),
    _manifest("20250203T000000Z", parent="20250202T000000Z"),
]


@pytest.fixture
def s3_retention() -> Iterator[tuple[mock.MagicMock, mock.MagicMock]]:
    """Patch S3Client.list_backups and delete_objects, which retention calls.

    Each backup has a second archive piece, <id>.part-0001, that only a
    listing finds (_piece_names, tested against SeaweedFS in tests/workload):
    retention must delete it too.
    """

    def piece_names(client: backup.S3Client, backup_id: str) -> list[str]:
        return [f"{backup_id}.part-0001"]

    with (
        mock.patch.object(backup.S3Client, "list_backups", autospec=True) as list_backups,
        mock.patch.object(backup.S3Client, "delete_objects", autospec=True) as delete_objects,
        mock.patch.object(backup.S3Client, "_piece_names", autospec=True, side_effect=piece_names),
        mock.patch.object(
            backup.S3Client, "_unlisted_links", autospec=True, return_value=({}, {})
        ),
    ):
        yield list_backups, delete_objects


def _newest_full_first(run_backup: mock.MagicMock) -> Any:
    """list_backups as S3 would answer after the backup: the new full one, then the older.

    It answers only a strict listing: retention must not take a manifest that could
    not be read for a missing backup.
    """

    def list_backups(client: backup.S3Client, *, strict: bool = False) -> list[Any]:
        assert strict, "retention lists strictly"
        return [_manifest(run_backup.call_args.args[2]), *reversed(OLDER)]

    return list_backups


def _deleted_names(delete_objects: mock.MagicMock) -> list[list[str]]:
    return [list(call.args[1]) for call in delete_objects.call_args_list]


@pytest.mark.parametrize(
    ("keep", "removed"),
    [
        pytest.param(
            1,
            [
                "20250203T000000Z",
                "20250202T000000Z",
                "20250201T000000Z",
                "20250102T000000Z",
                "20250101T000000Z",
            ],
            id="keep-1",
        ),
        pytest.param(2, ["20250102T000000Z", "20250101T000000Z"], id="keep-2"),
        pytest.param(3, [], id="keep-3"),
    ],
)
def test_retention_after_backup(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    s3_retention: tuple[mock.MagicMock, mock.MagicMock],
    keep: int,
    removed: list[str],
):
    """After a backup, the chains beyond backup-retention-count are deleted, newest first.

    Arrange: backup-retention-count; run_backup (patched) makes a new full backup;
        S3 (patched) lists it and two older chains.
    Act: run create-backup.
    Assert: each expired backup's manifest, archive and snapshot state are deleted,
        in that order, newest backup first; the results name them (or "none"); the
        deletions are logged after the commit.
    """
    list_backups, delete_objects = s3_retention
    run_backup.side_effect = lambda container, s3, backup_id, passphrase, **_: _manifest(backup_id)
    list_backups.side_effect = _newest_full_first(run_backup)
    state = make_state(
        configured_data_dir, {**CONFIG, "backup-retention-count": keep}, execs=[VERSION_EXEC]
    )

    ctx.run(ctx.on.action("create-backup"), state)

    backup_id = run_backup.call_args.args[2]
    assert ctx.action_results is not None
    assert ctx.action_results["backup-id"] == backup_id
    assert ctx.action_results["retention-removed"] == (" ".join(removed) or "none")
    assert "retention-error" not in ctx.action_results
    assert _deleted_names(delete_objects) == [
        [f"{name}.manifest.json", name, f"{name}.part-0001", f"{name}.snar.gpg"]
        for name in removed
    ]
    (client,) = list_backups.call_args.args
    assert list_backups.call_args.kwargs == {"strict": True}
    assert client._parameters.bucket == "synapse-backups"
    committed = ctx.action_logs.index(f"backup {backup_id} committed")
    assert ctx.action_logs[committed + 1 :] == [f"retention: deleting {name}" for name in removed]


def _deployment(state: testing.State) -> str:
    """The deployment the charm records in manifests: the model's UUID and the application."""
    return f"{state.model.uuid}/synapse"


def _retention_run(
    ctx: testing.Context,
    data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    list_backups: mock.MagicMock,
    *,
    keep: int,
    new_parent: str,
    listing: Any,
) -> dict[str, Any]:
    """Run create-backup making a backup on ``new_parent``; S3 lists it, then ``listing``.

    ``listing`` takes this deployment's id and returns the older manifests, newest first.
    """
    state = make_state(data_dir, {**CONFIG, "backup-retention-count": keep}, execs=[VERSION_EXEC])
    deployment = _deployment(state)

    def new_backup(backup_id: str) -> backup.BackupManifest:
        return _manifest(backup_id, parent=new_parent, deployment=deployment)

    run_backup.side_effect = lambda container, s3, backup_id, passphrase, **_: new_backup(
        backup_id
    )
    list_backups.side_effect = lambda client, *, strict=False: [
        new_backup(run_backup.call_args.args[2]),
        *listing(deployment),
    ]

    ctx.run(ctx.on.action("create-backup"), state)

    assert ctx.action_results is not None
    return ctx.action_results


def test_retention_never_deletes_the_new_backups_chain(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    s3_retention: tuple[mock.MagicMock, mock.MagicMock],
):
    """The chain the new backup builds on stays, even where a newer full backup exists.

    Arrange: backup-retention-count 1; the new backup is incremental on full
        backup A; S3 lists a newer full backup B, then A and an older full C.
    Act: run create-backup.
    Assert: only C is deleted: A's chain is the newest backup's, so it stays.
    """
    list_backups, delete_objects = s3_retention

    results = _retention_run(
        ctx,
        configured_data_dir,
        run_backup,
        list_backups,
        keep=1,
        new_parent="20250101T000000Z",
        listing=lambda deployment: [
            _manifest("20250201T000000Z", deployment=deployment),
            _manifest("20250101T000000Z", deployment=deployment),
            _manifest("20241201T000000Z", deployment=deployment),
        ],
    )

    assert results["retention-removed"] == "20241201T000000Z"
    name = "20241201T000000Z"
    assert _deleted_names(delete_objects) == [
        [f"{name}.manifest.json", name, f"{name}.part-0001", f"{name}.snar.gpg"]
    ]


OTHER_DEPLOYMENT = "7a2b4c6d-0000-4000-8000-000000000002/synapse"


def test_retention_only_deletes_this_deployments_chains(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    s3_retention: tuple[mock.MagicMock, mock.MagicMock],
):
    """Another deployment's backups at the same path are never deleted, old as they are.

    Arrange: backup-retention-count 1; a new full backup; S3 lists this
        deployment's older chain, a backup older than the deployment field (no
        deployment: counted as this deployment's) and another deployment's chains,
        older and newer than ours.
    Act: run create-backup.
    Assert: this deployment's older chains are deleted; the other deployment's stay.
    """
    list_backups, delete_objects = s3_retention

    results = _retention_run(
        ctx,
        configured_data_dir,
        run_backup,
        list_backups,
        keep=1,
        new_parent="",
        listing=lambda deployment: [
            _manifest("20250301T000000Z", deployment=OTHER_DEPLOYMENT),
            _manifest("20250202T000000Z", parent="20250201T000000Z", deployment=deployment),
            _manifest("20250201T000000Z", deployment=deployment),
            _manifest("20250101T000000Z", deployment=OTHER_DEPLOYMENT),
            _manifest("20241201T000000Z"),
        ],
    )

    removed = ["20250202T000000Z", "20250201T000000Z", "20241201T000000Z"]
    assert results["retention-removed"] == " ".join(removed)
    assert _deleted_names(delete_objects) == [
        [f"{name}.manifest.json", name, f"{name}.part-0001", f"{name}.snar.gpg"]
        for name in removed
    ]


def test_no_retention_by_default(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    s3_retention: tuple[mock.MagicMock, mock.MagicMock],
):
    """backup-retention-count 0 (the default) keeps every backup: S3 is not even listed."""
    list_backups, delete_objects = s3_retention
    run_backup.return_value = _manifest()
    state = make_state(
        configured_data_dir, {**CONFIG, "backup-retention-count": 0}, execs=[VERSION_EXEC]
    )

    ctx.run(ctx.on.action("create-backup"), state)

    assert ctx.action_results is not None
    assert not [key for key in ctx.action_results if key.startswith("retention")]
    list_backups.assert_not_called()
    delete_objects.assert_not_called()


@pytest.mark.parametrize(
    ("list_error", "delete_errors", "deleted"),
    [
        pytest.param(
            backup.S3Error("cannot list the backups: AccessDenied: no"),
            None,
            0,
            id="cannot-list",
        ),
        pytest.param(
            None,
            [None, backup.S3Error("cannot delete object 20250101T000000Z: AccessDenied: no")],
            2,
            id="cannot-delete",
        ),
    ],
)
def test_retention_error_keeps_the_backup(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    s3_retention: tuple[mock.MagicMock, mock.MagicMock],
    *,
    list_error: backup.S3Error | None,
    delete_errors: list[Any] | None,
    deleted: int,
):
    """A retention failure does not fail the committed backup: it is in the results.

    Arrange: backup-retention-count 2; the backup succeeds; listing or the second
        deletion fails.
    Act: run create-backup.
    Assert: the action succeeds with the backup's results and retention-error;
        retention stopped at the error.
    """
    list_backups, delete_objects = s3_retention
    run_backup.side_effect = lambda container, s3, backup_id, passphrase, **_: _manifest(backup_id)
    list_backups.side_effect = list_error or _newest_full_first(run_backup)
    delete_objects.side_effect = delete_errors
    state = make_state(
        configured_data_dir, {**CONFIG, "backup-retention-count": 2}, execs=[VERSION_EXEC]
    )

    ctx.run(ctx.on.action("create-backup"), state)

    error = list_error or delete_errors[-1]  # type: ignore[index]
    results = ctx.action_results
    assert results is not None
    assert results["backup-id"] == run_backup.call_args.args[2]
    assert results["type"] == "full"
    assert results["retention-error"] == str(error)
    assert "retention-removed" not in results
    assert delete_objects.call_count == deleted
    _assert_no_secret(results["retention-error"])


def test_failed_backup_applies_no_retention(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    s3_retention: tuple[mock.MagicMock, mock.MagicMock],
):
    """When the backup fails, nothing is deleted: the older chains are all there is."""
    list_backups, delete_objects = s3_retention
    run_backup.side_effect = backup.BackupError("the backup pipeline failed")
    state = make_state(
        configured_data_dir, {**CONFIG, "backup-retention-count": 1}, execs=[VERSION_EXEC]
    )

    with pytest.raises(testing.ActionFailed):
        ctx.run(ctx.on.action("create-backup"), state)

    list_backups.assert_not_called()
    delete_objects.assert_not_called()


def test_interrupted_restore_not_rolled_back_stops_the_backup(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """No backup of half-restored data: the action fails while the roll-back fails."""
    problem = "an interrupted restore could not be rolled back; the previous data is in /x"
    state = make_state(configured_data_dir, CONFIG, execs=[VERSION_EXEC])

    with (
        mock.patch.object(backup, "recover_interrupted_restore", return_value=problem),
        pytest.raises(testing.ActionFailed) as exc_info,
    ):
        ctx.run(ctx.on.action("create-backup"), state)

    assert exc_info.value.message == f"cannot back up: {problem}"
    run_backup.assert_not_called()


def test_leftovers_are_swept_before_the_backup(
    ctx: testing.Context, data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """What killed runs left is removed first: work dirs, database copies, staging.

    Arrange: a work dir with a passphrase in /tmp, a database copy and a staging
        dir in /data, and previous data kept by keep-previous.
    Act: run create-backup (run_backup patched, recording what it finds).
    Assert: the leftovers were gone before run_backup ran; the previous data stays.
    """
    work_dir = f"{backup_container.WORK_DIR_PREFIX}0123456789abcdef"
    snapshot_dir = f"/data/{backup_container.SNAPSHOT_DIR_PREFIX}20250101T000000Z"
    staging_dir = f"/data/{backup_restore.RESTORE_STAGING_PREFIX}20250101T000000Z-0a1b2c3d"
    previous_dir = f"/data/{backup_restore.PREVIOUS_DATA_PREFIX}20250101T000000Z-0a1b2c3d"
    paths = (work_dir, snapshot_dir, staging_dir, previous_dir)
    seen: dict[str, bool] = {}

    def record(container: ops.Container, *args: Any, **kwargs: Any) -> backup.BackupManifest:
        seen.update({path: container.exists(path) for path in paths})
        return _manifest()

    run_backup.side_effect = record
    state = make_state(data_dir, CONFIG, execs=[VERSION_EXEC], mount_data=False)

    with ctx(ctx.on.action("create-backup"), state) as manager:
        container = manager.charm.unit.get_container(synapse.CONTAINER_NAME)
        container.push(backup.SYNAPSE_CONFIG_PATH, homeserver_yaml(), make_dirs=True)
        container.push(f"{work_dir}/passphrase", PASSPHRASE, make_dirs=True)
        for path in paths[1:]:
            container.push(f"{path}/data/homeserver.db", "a copy", make_dirs=True)
        manager.run()

    assert seen == {work_dir: False, snapshot_dir: False, staging_dir: False, previous_dir: True}


def test_action_after_an_interrupted_restore_starts_synapse_again(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """An action that rolls back an interrupted restore starts Synapse on the data it put back.

    The charm died mid-swap, so Synapse was left stopped; without this it would
    wait for the next hook (update-status: minutes).

    Arrange: a restore journal; the roll-back (patched: it is tested in
        test_backup_restore_container) succeeds; Synapse is planned but stopped.
    Act: run create-backup.
    Assert: the roll-back ran first, Synapse is running, the log says so, and
        the backup went on.
    """
    run_backup.return_value = _manifest()
    (configured_data_dir / backup.RESTORE_JOURNAL.removeprefix("/data/")).write_text("{}")
    state = make_state(configured_data_dir, CONFIG, running=False, execs=[VERSION_EXEC])

    with mock.patch.object(backup, "recover_interrupted_restore", return_value=None) as recover:
        out = ctx.run(ctx.on.action("create-backup"), state)

    recover.assert_called_once()
    service = out.get_container(synapse.CONTAINER_NAME).service_statuses[synapse.SERVICE_NAME]
    assert service == ops.pebble.ServiceStatus.ACTIVE
    assert "rolled back an interrupted restore; starting Synapse again" in ctx.action_logs
    run_backup.assert_called_once()


def test_action_without_an_interrupted_restore_leaves_services_alone(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """No journal, no replan: an operator who stopped Synapse keeps it stopped."""
    run_backup.return_value = _manifest()
    state = make_state(configured_data_dir, CONFIG, running=False, execs=[VERSION_EXEC])

    out = ctx.run(ctx.on.action("create-backup"), state)

    service = out.get_container(synapse.CONTAINER_NAME).service_statuses[synapse.SERVICE_NAME]
    assert service == ops.pebble.ServiceStatus.INACTIVE
    run_backup.assert_called_once()


def test_synapse_not_starting_after_the_roll_back_does_not_stop_the_action(
    ctx: testing.Context, configured_data_dir: pathlib.Path, run_backup: mock.MagicMock
):
    """If Synapse does not start on the data put back, the action says so and goes on.

    A restore may be what the operator needs next; refusing it would leave
    them stuck.
    """
    run_backup.return_value = _manifest()
    (configured_data_dir / backup.RESTORE_JOURNAL.removeprefix("/data/")).write_text("{}")
    state = make_state(configured_data_dir, CONFIG, running=False, execs=[VERSION_EXEC])
    failure = ops.pebble.ChangeError("cannot start service: exited quickly", mock.MagicMock())

    with (
        mock.patch.object(backup, "recover_interrupted_restore", return_value=None),
        mock.patch.object(ops.Container, "replan", side_effect=failure),
    ):
        ctx.run(ctx.on.action("create-backup"), state)

    assert any(
        log.startswith("Synapse did not start again: cannot start service")
        for log in ctx.action_logs
    )
    run_backup.assert_called_once()


def test_retention_skipped_after_a_backup_without_its_database(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    run_backup: mock.MagicMock,
    s3_retention: tuple[mock.MagicMock, mock.MagicMock],
):
    """A backup lacking the configured database deletes no older chain: they may be the last.

    Arrange: backup-retention-count 1; the new full backup's manifest records
        that the configured database file was missing; S3 lists older chains.
    Act: run create-backup.
    Assert: nothing deleted, S3 not even listed; the result and the log say why.
    """
    list_backups, delete_objects = s3_retention
    manifest = dataclasses.replace(
        _manifest(), metadata={"database-path": "", "database-missing": "/data/homeserver.db"}
    )
    run_backup.return_value = manifest
    state = make_state(
        configured_data_dir, {**CONFIG, "backup-retention-count": 1}, execs=[VERSION_EXEC]
    )

    ctx.run(ctx.on.action("create-backup"), state)

    assert ctx.action_results is not None
    assert ctx.action_results["retention-skipped"] == "this backup holds no database"
    assert "retention-removed" not in ctx.action_results
    assert "retention: skipped, this backup holds no database" in ctx.action_logs
    list_backups.assert_not_called()
    delete_objects.assert_not_called()
