"""The list-backups, restore-backup, delete-backup and verify-backup actions.

What reaches S3 or the workload is patched here: backup.run_restore and
backup.verify_backup (they run an aws | digest | gpg | tar pipeline in the
workload, which tests/workload runs for real against SeaweedFS) and the
S3Client methods list_backups and delete_backup (tested against botocore's
Stubber and a fake S3 in test_backup_s3_lifecycle.py). These tests cover what
the observer does around them: parameter validation, preconditions, error
mapping and results.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
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
import backup_store
import synapse
from backup_observer import (
    FORMATTED_ROWS,
    NOT_CONFIGURED,
    RESULT_BACKUPS,
    BackupIdParams,
    DeleteParams,
    RestoreParams,
    format_backups,
)
from tests.unit.builders import (
    PASSPHRASE,
    SECRET_KEY,
    SECRET_VALUES,
    SERVER_NAME,
    VALID_S3_CONFIG,
    homeserver_yaml,
    make_state,
)

ACTIONS_YAML = pathlib.Path(__file__).parents[2] / "actions.yaml"
CONFIG = {"server-name": SERVER_NAME, **VALID_S3_CONFIG}
BACKUP_ID = "20250102T030405Z"
BAD_ID_MESSAGE = (
    "Error in action parameters: backup-id must be a backup id such as 20261126T120000Z"
)
SHA256 = "ab" * 32


@dataclasses.dataclass(frozen=True)
class Patched:
    """The patched functions that would reach S3 or the workload."""

    list_backups: mock.MagicMock
    delete_backup: mock.MagicMock
    run_restore: mock.MagicMock
    verify_backup: mock.MagicMock
    unlisted_backups: mock.MagicMock

    def for_action(self, action: str) -> mock.MagicMock:
        """Return the function an action calls."""
        return {
            "list-backups": self.list_backups,
            "delete-backup": self.delete_backup,
            "restore-backup": self.run_restore,
            "verify-backup": self.verify_backup,
        }[action]


@pytest.fixture
def patched() -> Iterator[Patched]:
    """Patch what the actions call (the real pipeline is tested in tests/workload)."""
    with (
        mock.patch.object(backup.S3Client, "list_backups", autospec=True) as list_backups,
        mock.patch.object(backup.S3Client, "delete_backup", autospec=True) as delete_backup,
        mock.patch.object(backup, "run_restore", autospec=True) as run_restore,
        mock.patch.object(backup, "verify_backup", autospec=True) as verify_backup,
        mock.patch.object(backup.S3Client, "unlisted_backups", autospec=True) as unlisted,
        mock.patch.object(
            backup.S3Client, "_unlisted_links", autospec=True, return_value=({}, {})
        ),
    ):
        list_backups.return_value = []
        delete_backup.return_value = [BACKUP_ID]
        unlisted.return_value = backup_store.UnlistedBackups()
        yield Patched(list_backups, delete_backup, run_restore, verify_backup, unlisted)


def _manifest(
    backup_id: str = BACKUP_ID,
    *,
    size: int = 1234,
    server_name: str | None = SERVER_NAME,
    parent: str = "",
) -> backup.BackupManifest:
    return backup.BackupManifest(
        backup_id=backup_id,
        created_at=f"{backup_id[:4]}-{backup_id[4:6]}-{backup_id[6:8]}T00:00:00+00:00",
        paths=("/data/homeserver.yaml", "/data/homeserver.db"),
        file_count=6,
        size=size,
        sha256=SHA256,
        duration=1.25,
        metadata={"server-name": server_name} if server_name is not None else {},
        backup_type="incremental" if parent else "full",
        parent=parent,
    )


def _assert_no_secret(message: str) -> None:
    for value in SECRET_VALUES:
        assert value not in message


ID_ACTIONS = ["delete-backup", "restore-backup", "verify-backup"]
ALL_ACTIONS = ["list-backups", *ID_ACTIONS]
CONTAINER_ACTIONS = ["restore-backup", "verify-backup"]


def _params(action: str) -> dict[str, Any]:
    return {"backup-id": BACKUP_ID} if action in ID_ACTIONS else {}


# --- backup-id validation -------------------------------------------------------------------

BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("20250102T030405Z\n", id="trailing-newline"),
    pytest.param("\n20250102T030405Z", id="leading-newline"),
    pytest.param(" 20250102T030405Z", id="leading-space"),
    pytest.param("20250102t030405z", id="lowercase-t-z"),
    pytest.param("20250102t030405Z", id="lowercase-t"),
    pytest.param("20250102T030405z", id="lowercase-z"),
    pytest.param("20250102T030405", id="no-z"),
    pytest.param("2025-01-02T03:04:05Z", id="iso-8601"),
    pytest.param("202501020T30405Z", id="t-misplaced"),
    pytest.param("20250102T030405Z'", id="single-quote"),
    pytest.param("'; rm -rf / #", id="quote-breakout"),
    pytest.param('"20250102T030405Z"', id="double-quotes"),
    pytest.param("2025/0102T030405Z", id="slash"),
    pytest.param("../20250102T030405Z", id="dot-dot-slash"),
    pytest.param("..", id="dot-dot"),
    pytest.param("$(touch /tmp/pwned)", id="command-substitution"),
    pytest.param("`id`", id="backticks"),
    pytest.param("20250102T030405Z;id", id="semicolon"),
    pytest.param("20250102T030405Z.manifest.json", id="manifest-name"),
    pytest.param("\u0662\u0660\u0662\u0665\u0660\u0661\u0660\u0662T030405Z", id="arabic-digits"),
]


@pytest.mark.parametrize("action", ID_ACTIONS)
@pytest.mark.parametrize("backup_id", BAD_IDS)
def test_bad_backup_id(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    patched: Patched,
    action: str,
    backup_id: str,
):
    """A backup-id that is not a UTC timestamp id fails before anything is run.

    Juju checks the schema's pattern first; the charm checks again, so that no
    other string can reach a shell word or an S3 key.

    Arrange: valid backup options; a malformed backup-id.
    Act: run the action.
    Assert: the failure says what a backup id looks like; nothing was called.
    """
    state = make_state(configured_data_dir, CONFIG)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action(action, params={"backup-id": backup_id}), state)

    assert exc_info.value.message == BAD_ID_MESSAGE
    for function in dataclasses.astuple(patched):
        function.assert_not_called()


@pytest.mark.parametrize("action", ID_ACTIONS)
def test_bad_backup_id_checked_before_config(
    ctx: testing.Context, configured_data_dir: pathlib.Path, patched: Patched, action: str
):
    """A bad backup-id is reported even when backups are not configured."""
    state = make_state(configured_data_dir, {"server-name": SERVER_NAME})

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action(action, params={"backup-id": "../etc"}), state)

    assert exc_info.value.message == BAD_ID_MESSAGE
    patched.for_action(action).assert_not_called()


@pytest.mark.parametrize("params_class", [BackupIdParams, RestoreParams, DeleteParams])
@pytest.mark.parametrize("backup_id", ["20250102T030405Z", "19991231T235959Z", "00000000T000000Z"])
def test_params_accept_backup_ids(params_class: type[BackupIdParams], backup_id: str):
    """The params classes accept ids in the backup id format, as new_backup_id makes them."""
    assert params_class(backup_id=backup_id).backup_id == backup_id


def test_restore_params_defaults():
    """The force and keep-previous params default to false, as in actions.yaml."""
    params = RestoreParams(backup_id=BACKUP_ID)

    assert (params.force, params.keep_previous) == (False, False)


def test_delete_params():
    """The chain param defaults to false; the backup id is checked as for every id action."""
    assert DeleteParams(backup_id=BACKUP_ID).chain is False
    assert DeleteParams(backup_id=BACKUP_ID, chain=True).chain is True
    with pytest.raises(ValueError, match="backup-id must be a backup id"):
        DeleteParams(backup_id="../x", chain=True)


# --- configuration and container preconditions ---------------------------------------------


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_not_configured(
    ctx: testing.Context, configured_data_dir: pathlib.Path, patched: Patched, action: str
):
    """Without backup options every action fails and lists the options to set.

    Arrange: server-name only.
    Act: run the action with a valid backup-id.
    Assert: the failure lists every option; nothing was called.
    """
    state = make_state(configured_data_dir, {"server-name": SERVER_NAME})

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action(action, params=_params(action)), state)

    assert exc_info.value.message == NOT_CONFIGURED
    for option in ("s3-bucket", "s3-endpoint", "s3-region", "s3-credentials", "backup-passphrase"):
        assert option in exc_info.value.message
    patched.for_action(action).assert_not_called()


@pytest.mark.parametrize(
    ("action", "what"),
    [
        pytest.param("list-backups", "list backups", id="list"),
        pytest.param("delete-backup", "delete the backup", id="delete"),
        pytest.param("restore-backup", "restore", id="restore"),
        pytest.param("verify-backup", "verify the backup", id="verify"),
    ],
)
@pytest.mark.parametrize(
    ("changes", "option"),
    [
        pytest.param({"s3-bucket": "Not_A_Bucket"}, "s3-bucket", id="bad-bucket"),
        pytest.param({"backup-passphrase": None}, "backup-passphrase", id="no-passphrase"),
    ],
)
def test_invalid_config(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    patched: Patched,
    *,
    action: str,
    what: str,
    changes: dict[str, str | None],
    option: str,
):
    """An invalid backup option fails the action, naming the option and no secret."""
    config = {key: value for key, value in {**CONFIG, **changes}.items() if value is not None}
    state = make_state(configured_data_dir, config)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action(action, params=_params(action)), state)

    assert exc_info.value.message.startswith(f"cannot {what}: {option}: ")
    _assert_no_secret(exc_info.value.message)
    patched.for_action(action).assert_not_called()


@pytest.mark.parametrize(
    ("action", "what"),
    [
        pytest.param("restore-backup", "restore", id="restore"),
        pytest.param("verify-backup", "verify the backup", id="verify"),
    ],
)
def test_container_not_connectable(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    patched: Patched,
    action: str,
    what: str,
):
    """Restore and verify fail while the workload container does not answer."""
    state = make_state(configured_data_dir, CONFIG, can_connect=False)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action(action, params=_params(action)), state)

    assert exc_info.value.message == f"cannot {what}: the synapse container is not reachable yet"
    patched.for_action(action).assert_not_called()


@pytest.mark.parametrize(
    ("action", "what"),
    [
        pytest.param("restore-backup", "restore", id="restore"),
        pytest.param("verify-backup", "verify the backup", id="verify"),
    ],
)
def test_no_homeserver_yaml(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched, action: str, what: str
):
    """Restore and verify fail before Synapse generated homeserver.yaml."""
    state = make_state(data_dir, CONFIG, planned=False)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action(action, params=_params(action)), state)

    assert exc_info.value.message == (
        f"cannot {what}: Synapse has not been configured yet (set server-name)"
    )
    patched.for_action(action).assert_not_called()


@pytest.mark.parametrize("action", ["list-backups", "delete-backup"])
def test_list_and_delete_need_no_container(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched, action: str
):
    """Listing and deleting only talk to S3: they work while the container is down."""
    state = make_state(data_dir, CONFIG, can_connect=False, planned=False)

    ctx.run(ctx.on.action(action, params=_params(action)), state)

    patched.for_action(action).assert_called_once()


# --- list-backups ---------------------------------------------------------------------------


def test_list_backups(ctx: testing.Context, data_dir: pathlib.Path, patched: Patched):
    """The backups come back as a table and numbered entries, newest first.

    Arrange: S3Client.list_backups (patched) returns two backups, newest first: an
        incremental one on the older, full one, which has no server name; no retention.
    Act: run list-backups.
    Assert: formatted is format_backups' table; count; backups numbered from 1 with
        hyphenated keys, their type and parent ("none" for a full one), nothing
        expiring; the listed location is logged.
    """
    newer = _manifest("20250301T000000Z", size=2048, parent="20250201T000000Z")
    older = _manifest("20250201T000000Z", size=1024, server_name=None)
    patched.list_backups.return_value = [newer, older]
    state = make_state(data_dir, {**CONFIG, "s3-path": "synapse/prod"})

    ctx.run(ctx.on.action("list-backups"), state)

    assert ctx.action_results == {
        "formatted": format_backups([newer, older]),
        "count": 2,
        "incomplete": "none",
        "incomplete-count": 0,
        "unreadable": "none",
        "unreadable-count": 0,
        "backups": {
            "1": {
                "id": "20250301T000000Z",
                "created-at": "2025-03-01T00:00:00+00:00",
                "size": 2048,
                "server-name": SERVER_NAME,
                "type": "incremental",
                "parent": "20250201T000000Z",
                "expires-after-next-full": False,
            },
            "2": {
                "id": "20250201T000000Z",
                "created-at": "2025-02-01T00:00:00+00:00",
                "size": 1024,
                "server-name": "",
                "type": "full",
                "parent": "none",
                "expires-after-next-full": False,
            },
        },
    }
    assert ctx.action_logs == ["listing s3://synapse-backups/synapse/prod/"]
    (client,) = patched.list_backups.call_args.args
    assert client._parameters.secret_key == SECRET_KEY
    # What is not a complete backup is looked for among the rest.
    assert patched.unlisted_backups.call_args.args[1] == [
        "20250301T000000Z",
        "20250201T000000Z",
    ]


def test_list_backups_names_incomplete_ids(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched
):
    """Ids with objects but no complete backup are named, apart from the backups."""
    backups = [_manifest("20250301T000000Z")]
    patched.list_backups.return_value = backups
    patched.unlisted_backups.return_value = backup_store.UnlistedBackups(
        incomplete=["20250302T000000Z", "20250101T000000Z"]
    )

    ctx.run(ctx.on.action("list-backups"), make_state(data_dir, CONFIG))

    results = ctx.action_results
    assert results is not None
    assert results["count"] == 1
    assert results["incomplete"] == "20250302T000000Z 20250101T000000Z"
    assert results["formatted"] == (
        format_backups(backups) + "\nincomplete, not backups (a failed backup, objects changed "
        "behind the charm's back, or a backup still running; delete-backup removes them): "
        "20250302T000000Z, 20250101T000000Z"
    )


def test_list_backups_names_at_most_20_incomplete_ids_in_the_table(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched
):
    """The table names the newest 20 incomplete ids and counts the rest; the result has all."""
    incomplete = [f"2025{month:02}01T000000Z" for month in range(12, 0, -1)]
    incomplete += [f"2024{month:02}01T000000Z" for month in range(12, 0, -1)]
    patched.unlisted_backups.return_value = backup_store.UnlistedBackups(incomplete=incomplete)

    ctx.run(ctx.on.action("list-backups"), make_state(data_dir, CONFIG))

    results = ctx.action_results
    assert results is not None
    assert results["incomplete"] == " ".join(incomplete)
    last = results["formatted"].splitlines()[-1]
    assert last.endswith(": " + ", ".join(incomplete[:20]) + " and 4 more")


@pytest.mark.parametrize(
    ("keep", "expiring"),
    [
        pytest.param(0, set(), id="no-retention"),
        pytest.param(1, {"20250301T000000Z", "20250201T000000Z", "20250101T000000Z"}, id="keep-1"),
        pytest.param(2, {"20250201T000000Z", "20250101T000000Z"}, id="keep-2"),
        pytest.param(3, {"20250101T000000Z"}, id="keep-3"),
        pytest.param(4, set(), id="keep-4"),
    ],
)
def test_list_backups_expiring(
    ctx: testing.Context,
    data_dir: pathlib.Path,
    patched: Patched,
    keep: int,
    expiring: set[str],
):
    """Each backup says whether retention removes it once the next full backup is made.

    Arrange: three chains (a full one, a full and an incremental, a full one) and
        backup-retention-count.
    Act: run list-backups.
    Assert: the flags and the table's notes mark the chains beyond the newest
        keep - 1, whole.
    """
    manifests = [
        _manifest("20250301T000000Z"),
        _manifest("20250202T000000Z", parent="20250201T000000Z"),
        _manifest("20250201T000000Z"),
        _manifest("20250101T000000Z"),
    ]
    if "20250201T000000Z" in expiring:
        expiring = {*expiring, "20250202T000000Z"}
    patched.list_backups.return_value = manifests
    state = make_state(data_dir, {**CONFIG, "backup-retention-count": keep})

    ctx.run(ctx.on.action("list-backups"), state)

    results = ctx.action_results
    assert results is not None
    flagged = {
        entry["id"] for entry in results["backups"].values() if entry["expires-after-next-full"]
    }
    assert flagged == expiring
    assert results["formatted"] == format_backups(manifests, expiring)
    assert results["formatted"].count("expires after the next full backup") == len(expiring)
    patched.delete_backup.assert_not_called()


def test_list_backups_many(ctx: testing.Context, data_dir: pathlib.Path, patched: Patched):
    """Past FORMATTED_ROWS backups, formatted shows the newest ones; backups has them all."""
    manifests = [
        _manifest(f"2025{month:02}{day:02}T000000Z")
        for month in range(12, 0, -1)
        for day in range(28, 0, -1)
    ]
    patched.list_backups.return_value = manifests

    ctx.run(ctx.on.action("list-backups"), make_state(data_dir, CONFIG))

    results = ctx.action_results
    assert results is not None
    assert results["count"] == len(manifests) == 336
    assert [entry["id"] for entry in results["backups"].values()] == [
        manifest.backup_id for manifest in manifests
    ]
    lines = results["formatted"].splitlines()
    assert len(lines) == 1 + FORMATTED_ROWS + 1
    assert lines[-2].split()[0] == manifests[FORMATTED_ROWS - 1].backup_id
    assert lines[-1] == "... and 236 older backups (all are in the backups result)"


def _action_set_arguments(results: dict[str, object], prefix: str = "") -> list[str]:
    """Return the key=value arguments ops gives action-set for nested results."""
    arguments = []
    for key, value in results.items():
        if isinstance(value, dict):
            arguments += _action_set_arguments(value, f"{prefix}{key}.")
        else:
            arguments.append(f"{prefix}{key}={value}")
    return arguments


def test_list_backups_results_fit_one_command_line(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched
):
    """Thousands of backups (hourly ones for a year) still list: results stay small.

    Juju's action-set gets every result on one command line, which Linux
    limits to 2 MiB in all: 7,000 backups made it fail. The newest
    RESULT_BACKUPS are in the results, and count says how many there are.
    """
    manifests = [
        _manifest(f"{year}{month:02}{day:02}T{hour:02}0000Z")
        for year in (2025, 2024)
        for month in range(12, 0, -1)
        for day in range(28, 0, -1)
        for hour in range(23, 12, -1)
    ]
    incomplete = [
        f"2023{month:02}{day:02}T000000Z" for month in range(12, 0, -1) for day in range(28, 0, -1)
    ]
    patched.list_backups.return_value = manifests
    patched.unlisted_backups.return_value = backup_store.UnlistedBackups(incomplete=incomplete * 5)

    ctx.run(ctx.on.action("list-backups"), make_state(data_dir, CONFIG))

    results = ctx.action_results
    assert results is not None
    assert results["count"] == len(manifests) == 7392
    assert [entry["id"] for entry in results["backups"].values()] == [
        manifest.backup_id for manifest in manifests[:RESULT_BACKUPS]
    ]
    assert results["incomplete"].split() == (incomplete * 5)[:RESULT_BACKUPS]
    assert results["incomplete-count"] == len(incomplete) * 5
    last = results["formatted"].splitlines()[-2]
    hidden = 7392 - FORMATTED_ROWS
    assert last == f"... and {hidden} older backups (the newest 1000 are in the backups result)"
    assert sum(len(argument) + 1 for argument in _action_set_arguments(results)) < 1024 * 1024


def test_list_backups_names_unreadable_manifests(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched
):
    """A backup whose manifest cannot be used now is named with why, never silently left out."""
    patched.list_backups.return_value = [_manifest("20250301T000000Z")]
    patched.unlisted_backups.return_value = backup_store.UnlistedBackups(
        unreadable={
            "20250302T000000Z": "cannot read object 20250302T000000Z.manifest.json: SlowDown",
            "20250201T000000Z": "its manifest has version 2, written by a newer charm",
        }
    )

    ctx.run(ctx.on.action("list-backups"), make_state(data_dir, CONFIG))

    results = ctx.action_results
    assert results is not None
    assert results["count"] == 1
    assert results["unreadable"] == "20250302T000000Z 20250201T000000Z"
    assert results["unreadable-count"] == 2
    assert results["formatted"].splitlines()[-2:] == [
        "not listed, its manifest cannot be used now: 20250302T000000Z: "
        "cannot read object 20250302T000000Z.manifest.json: SlowDown",
        "not listed, its manifest cannot be used now: 20250201T000000Z: "
        "its manifest has version 2, written by a newer charm",
    ]


def test_list_backups_names_at_most_20_unreadable_manifests_in_the_table(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched
):
    """Past 20 unreadable manifests the table counts the rest; the result names them all."""
    unreadable = {f"2025{month:02}01T000000Z": "SlowDown" for month in range(12, 0, -1)}
    unreadable.update({f"2024{month:02}01T000000Z": "SlowDown" for month in range(12, 0, -1)})
    patched.unlisted_backups.return_value = backup_store.UnlistedBackups(unreadable=unreadable)

    ctx.run(ctx.on.action("list-backups"), make_state(data_dir, CONFIG))

    results = ctx.action_results
    assert results is not None
    lines = results["formatted"].splitlines()
    assert len([line for line in lines if line.startswith("not listed, ")]) == 20
    assert lines[-1] == "... and 4 more not listed"
    assert results["unreadable"].split() == list(unreadable)
    assert results["unreadable-count"] == 24


def test_list_backups_empty(ctx: testing.Context, data_dir: pathlib.Path, patched: Patched):
    """With no backup the table says so and the count is 0."""
    ctx.run(ctx.on.action("list-backups"), make_state(data_dir, CONFIG))

    assert ctx.action_results == {
        "formatted": "no backups",
        "count": 0,
        "incomplete": "none",
        "incomplete-count": 0,
        "unreadable": "none",
        "unreadable-count": 0,
        "backups": {},
    }


def test_list_backups_s3_error(ctx: testing.Context, data_dir: pathlib.Path, patched: Patched):
    """An S3 error fails the action with its message."""
    patched.list_backups.side_effect = backup.S3Error("cannot list the backups: AccessDenied")

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("list-backups"), make_state(data_dir, CONFIG))

    assert exc_info.value.message == "cannot list backups: cannot list the backups: AccessDenied"


def test_list_backups_endpoint_boto_rejects(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched
):
    """An endpoint boto3 refuses fails the action cleanly (S3Client's constructor, unpatched)."""
    state = make_state(data_dir, {**CONFIG, "s3-endpoint": "https://bad_host.example.com"})

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("list-backups"), state)

    message = exc_info.value.message
    assert message.startswith("cannot list backups: cannot create an S3 client: ")
    assert "https://bad_host.example.com" in message
    _assert_no_secret(message)
    patched.list_backups.assert_not_called()


# --- delete-backup --------------------------------------------------------------------------


def test_delete_backup(ctx: testing.Context, data_dir: pathlib.Path, patched: Patched):
    """The backup is deleted by id, without its chain by default, and the result names it."""
    state = make_state(data_dir, CONFIG)

    ctx.run(ctx.on.action("delete-backup", params=_params("delete-backup")), state)

    assert ctx.action_results == {"deleted": BACKUP_ID}
    (client, backup_id), kwargs = patched.delete_backup.call_args
    assert backup_id == BACKUP_ID
    assert kwargs == {"chain": False, "force": False}
    assert client._parameters.bucket == "synapse-backups"


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize("force", [True, False])
def test_delete_backup_chain(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched, chain: bool, force: bool
):
    """The chain and force params pass through; the result lists every backup deleted."""
    deleted = ["20250104T000000Z", "20250103T000000Z", BACKUP_ID] if chain else [BACKUP_ID]
    patched.delete_backup.return_value = deleted
    state = make_state(data_dir, CONFIG)
    params = {"backup-id": BACKUP_ID, "chain": chain, "force": force}

    ctx.run(ctx.on.action("delete-backup", params=params), state)

    assert ctx.action_results == {"deleted": " ".join(deleted)}
    assert patched.delete_backup.call_args.kwargs == {"chain": chain, "force": force}


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(
            backup.S3Error(f"there is no backup {BACKUP_ID}", option="backup-id"), id="missing"
        ),
        pytest.param(backup.S3Error("cannot delete object x: AccessDenied: no"), id="denied"),
        pytest.param(
            backup.S3Error(
                f"backup {BACKUP_ID} is needed by 20250103T000000Z; "
                "use chain=true to delete it with them",
                option="backup-id",
            ),
            id="needed",
        ),
    ],
)
def test_delete_backup_s3_error(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched, error: backup.S3Error
):
    """An S3 error (no such backup, denied, needed by others) fails the action with its message."""
    patched.delete_backup.side_effect = error
    state = make_state(data_dir, CONFIG)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("delete-backup", params=_params("delete-backup")), state)

    assert exc_info.value.message == f"cannot delete backup {BACKUP_ID}: {error}"
    assert ctx.action_results is None


# --- verify-backup --------------------------------------------------------------------------


def _check(**changes: Any) -> backup_restore.ArchiveCheck:
    values: dict[str, Any] = {
        "sha256": SHA256,
        "size": 1234,
        "file_count": 6,
        "manifest": _manifest(),
    }
    values.update(changes)
    return backup_restore.ArchiveCheck(**values)


@pytest.mark.parametrize(
    ("check", "matches", "mismatch"),
    [
        pytest.param(_check(), True, "none", id="matches"),
        pytest.param(
            _check(sha256="cd" * 32, size=999),
            False,
            "checksum differs, size 999 instead of 1234",
            id="mismatch",
        ),
    ],
)
def test_verify_backup(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    patched: Patched,
    *,
    check: backup_restore.ArchiveCheck,
    matches: bool,
    mismatch: str,
):
    """Verify reports what it read and whether it matches the manifest.

    Arrange: verify_backup (patched) logs progress and returns an ArchiveCheck.
    Act: run verify-backup.
    Assert: the results with hyphenated keys; verify_backup got the charm's container,
        the S3 parameters, the id and the passphrase; its progress is in the logs.
    """

    def fake_verify(
        container: ops.Container,
        s3_parameters: backup.S3Parameters,
        backup_key: str,
        passphrase: str,
        *,
        log: Any,
    ) -> backup_restore.ArchiveCheck:
        log("downloading and listing 1234 bytes")
        return check

    patched.verify_backup.side_effect = fake_verify
    state = make_state(configured_data_dir, CONFIG)

    ctx.run(ctx.on.action("verify-backup", params=_params("verify-backup")), state)

    assert ctx.action_results == {
        "backup-id": BACKUP_ID,
        "file-count": check.file_count,
        "size": check.size,
        "sha256": check.sha256,
        "matches-manifest": matches,
        "mismatch": mismatch,
    }
    (container, s3, backup_id, passphrase), _ = patched.verify_backup.call_args
    assert isinstance(container, ops.Container)
    assert container.name == synapse.CONTAINER_NAME
    assert (s3.bucket, s3.secret_key) == ("synapse-backups", SECRET_KEY)
    assert (backup_id, passphrase) == (BACKUP_ID, PASSPHRASE)
    assert ctx.action_logs == ["downloading and listing 1234 bytes"]


def test_verify_backup_error(
    ctx: testing.Context, configured_data_dir: pathlib.Path, patched: Patched
):
    """A BackupError fails the action with its message."""
    patched.verify_backup.side_effect = backup.BackupError(f"there is no backup {BACKUP_ID}")
    state = make_state(configured_data_dir, CONFIG)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("verify-backup", params=_params("verify-backup")), state)

    assert exc_info.value.message == (
        f"cannot verify backup {BACKUP_ID}: there is no backup {BACKUP_ID}"
    )


# --- restore-backup -------------------------------------------------------------------------


def _result(previous_dir: str | None = None) -> backup.RestoreResult:
    return backup.RestoreResult(
        backup_id=BACKUP_ID,
        file_count=6,
        size=1234,
        restored_paths=("/data/homeserver.db", "/data/homeserver.yaml"),
        previous_dir=previous_dir,
    )


@pytest.mark.parametrize(
    ("params", "force", "keep_previous"),
    [
        pytest.param({}, False, False, id="defaults"),
        pytest.param({"force": True}, True, False, id="force"),
        pytest.param({"keep-previous": True}, False, True, id="keep-previous"),
        pytest.param({"force": True, "keep-previous": True}, True, True, id="both"),
        pytest.param({"force": False, "keep-previous": False}, False, False, id="explicit-false"),
    ],
)
def test_restore_backup_call(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    patched: Patched,
    *,
    params: dict[str, bool],
    force: bool,
    keep_previous: bool,
):
    """The restore gets server_name from config, and force and keep_previous from params.

    Arrange: run_restore (patched) returns a result.
    Act: run restore-backup with the params.
    Assert: run_restore got the container, S3 parameters, id, passphrase, server
        name, force, keep_previous and the Synapse service.
    """
    patched.run_restore.return_value = _result()
    state = make_state(configured_data_dir, CONFIG)

    ctx.run(ctx.on.action("restore-backup", params={"backup-id": BACKUP_ID, **params}), state)

    (container, s3, backup_id, passphrase), kwargs = patched.run_restore.call_args
    assert isinstance(container, ops.Container)
    assert container.name == synapse.CONTAINER_NAME
    assert (s3.bucket, s3.endpoint, s3.secret_key) == (
        "synapse-backups",
        "https://s3.example.com",
        SECRET_KEY,
    )
    assert (backup_id, passphrase) == (BACKUP_ID, PASSPHRASE)
    assert kwargs["server_name"] == SERVER_NAME
    assert (kwargs["force"], kwargs["keep_previous"]) == (force, keep_previous)
    assert kwargs["service"] == synapse.SERVICE_NAME
    assert ctx.action_logs == [f"restoring backup {BACKUP_ID}"]


VERSION_COMMAND = ["python3", "-c", "import synapse; print(synapse.__version__)"]


@pytest.mark.parametrize(
    ("execs", "version"),
    [
        pytest.param(
            [testing.Exec(VERSION_COMMAND, stdout="1.98.0\n")],
            "1.98.0",
            id="read",
        ),
        pytest.param(
            [testing.Exec(VERSION_COMMAND, return_code=1)],
            "unknown",
            id="unreadable",
        ),
    ],
)
def test_restore_backup_passes_the_running_synapse_version(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    patched: Patched,
    execs: list[testing.Exec],
    version: str,
):
    """The container's Synapse version goes to run_restore, which refuses newer backups."""
    patched.run_restore.return_value = _result()
    state = make_state(configured_data_dir, CONFIG, execs=execs)

    ctx.run(ctx.on.action("restore-backup", params={"backup-id": BACKUP_ID}), state)

    assert patched.run_restore.call_args.kwargs["synapse_version"] == version


@pytest.mark.parametrize(
    ("previous_dir", "previous_data"),
    [
        pytest.param(None, "removed", id="removed"),
        pytest.param(
            f"/data/.synapse-previous-{BACKUP_ID}-0a1b2c3d",
            f"/data/.synapse-previous-{BACKUP_ID}-0a1b2c3d",
            id="kept",
        ),
    ],
)
def test_restore_backup_results(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    patched: Patched,
    previous_dir: str | None,
    previous_data: str,
):
    """A restore returns the id, file count, size and where the previous data went."""

    def fake_restore(*args: Any, log: Any, **kwargs: Any) -> backup.RestoreResult:
        log("checking the passphrase")
        return _result(previous_dir)

    patched.run_restore.side_effect = fake_restore
    state = make_state(configured_data_dir, CONFIG)

    ctx.run(ctx.on.action("restore-backup", params=_params("restore-backup")), state)

    assert ctx.action_results == {
        "backup-id": BACKUP_ID,
        "file-count": 6,
        "size": 1234,
        "previous-data": previous_data,
    }
    assert ctx.action_logs == [f"restoring backup {BACKUP_ID}", "checking the passphrase"]


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(f"there is no backup {BACKUP_ID}", id="missing"),
        pytest.param(
            f"backup {BACKUP_ID} is of server 'other.org', not 'example.com'; "
            "use force=true to restore it anyway",
            id="other-server",
        ),
        pytest.param(
            f"the backup passphrase does not decrypt backup {BACKUP_ID}", id="passphrase"
        ),
        pytest.param("Synapse did not start again: boom", id="not-restarted"),
    ],
)
def test_restore_backup_error(
    ctx: testing.Context, configured_data_dir: pathlib.Path, patched: Patched, error: str
):
    """A BackupError fails the action with its message and sets no result."""
    patched.run_restore.side_effect = backup.BackupError(error)
    state = make_state(configured_data_dir, CONFIG)

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(ctx.on.action("restore-backup", params=_params("restore-backup")), state)

    assert exc_info.value.message == f"restore of {BACKUP_ID} failed: {error}"
    assert ctx.action_results is None


def test_restore_without_server_name_config_keeps_the_server_check(
    ctx: testing.Context, configured_data_dir: pathlib.Path, patched: Patched
):
    """The server-name guard holds even when the server-name option is unset.

    homeserver.yaml says the server is example.com: that is the name the backup's
    must match (the action checks it "of this unit's server-name, unless force=true").
    """
    patched.run_restore.return_value = _result()
    config = {key: value for key, value in CONFIG.items() if key != "server-name"}
    state = make_state(configured_data_dir, config)

    ctx.run(ctx.on.action("restore-backup", params=_params("restore-backup")), state)

    kwargs = patched.run_restore.call_args.kwargs
    assert (kwargs["server_name"], kwargs["force"]) == (SERVER_NAME, False)


def test_restore_without_any_server_name_passes_none(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched
):
    """No option and no server_name in homeserver.yaml: run_restore gets None (and refuses)."""
    (data_dir / "homeserver.yaml").write_text("pid_file: /data/homeserver.pid\n")
    patched.run_restore.return_value = _result()
    config = {key: value for key, value in CONFIG.items() if key != "server-name"}

    ctx.run(
        ctx.on.action("restore-backup", params=_params("restore-backup")),
        make_state(data_dir, config),
    )

    assert patched.run_restore.call_args.kwargs["server_name"] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            "server_name: [unclosed\n",
            "cannot restore: /data/homeserver.yaml is not valid YAML (line 2, column 1)",
            id="invalid-yaml",
        ),
        pytest.param(
            "- a list\n",
            "cannot restore: /data/homeserver.yaml is not a YAML mapping",
            id="a-list",
        ),
    ],
)
def test_restore_unreadable_homeserver_yaml(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched, content: str, message: str
):
    """With server-name unset and homeserver.yaml unreadable, the restore fails before anything."""
    (data_dir / "homeserver.yaml").write_text(content)
    config = {key: value for key, value in CONFIG.items() if key != "server-name"}

    with pytest.raises(testing.ActionFailed) as exc_info:
        ctx.run(
            ctx.on.action("restore-backup", params=_params("restore-backup")),
            make_state(data_dir, config),
        )

    assert exc_info.value.message.startswith(message)
    patched.run_restore.assert_not_called()


# --- actions.yaml ---------------------------------------------------------------------------


def _actions() -> dict[str, Any]:
    return yaml.safe_load(ACTIONS_YAML.read_text())


def test_actions_declared():
    """actions.yaml declares exactly the actions the backup observer handles."""
    assert set(_actions()) == {
        "create-backup",
        "list-backups",
        "restore-backup",
        "delete-backup",
        "verify-backup",
    }


@pytest.mark.parametrize("action", sorted(_actions()))
def test_actions_refuse_unknown_params(action: str):
    """Every action sets additionalProperties: false, so Juju rejects unknown params."""
    spec = _actions()[action]

    assert spec["additionalProperties"] is False
    assert spec["description"].strip()


@pytest.mark.parametrize("action", ID_ACTIONS)
def test_backup_id_param_schema(action: str):
    """backup-id is a required string with the charm's own backup id pattern."""
    spec = _actions()[action]
    param = spec["params"]["backup-id"]

    assert param["type"] == "string"
    assert param["pattern"] == backup.BACKUP_ID_PATTERN.pattern
    assert "backup-id" in spec["required"]
    assert param["description"].strip()


@pytest.mark.parametrize(
    ("action", "params_class"),
    [
        pytest.param("delete-backup", DeleteParams, id="delete"),
        pytest.param("verify-backup", BackupIdParams, id="verify"),
        pytest.param("restore-backup", RestoreParams, id="restore"),
    ],
)
def test_params_match_the_params_class(action: str, params_class: type[BackupIdParams]):
    """Each declared param is a field of the class the observer loads, with its default."""
    declared = _actions()[action]["params"]
    fields = {field.name: field for field in dataclasses.fields(params_class)}

    assert {name.replace("-", "_") for name in declared} == set(fields)
    for name, spec in declared.items():
        field = fields[name.replace("-", "_")]
        if "default" in spec:
            assert field.default == spec["default"]
            assert spec["type"] == "boolean"
        else:
            assert field.default is dataclasses.MISSING


@pytest.mark.parametrize(
    "backup_id", ["20250102T030405Z", "20250102t030405z", "2025", "../x", "20250102T030405Z;id"]
)
def test_schema_pattern_agrees_with_the_charm(backup_id: str):
    """The schema's pattern, anchored as JSON schema does, accepts what the charm accepts."""
    pattern = _actions()["restore-backup"]["params"]["backup-id"]["pattern"]

    assert bool(re.fullmatch(pattern, backup_id)) == bool(
        backup.BACKUP_ID_PATTERN.fullmatch(backup_id)
    )
    assert bool(re.fullmatch(pattern, backup_id)) == (backup_id == "20250102T030405Z")


# --- an interrupted restore ------------------------------------------------------------------

ROLLBACK_PROBLEM = (
    "an interrupted restore could not be rolled back; the previous data is in "
    "/data/.synapse-previous-20250101T000000Z-0a1b2c3d: cannot move a to b: mv: I/O error"
)


@pytest.mark.parametrize(
    ("action", "what"),
    [
        pytest.param("restore-backup", "restore", id="restore"),
        pytest.param("verify-backup", "verify the backup", id="verify"),
    ],
)
def test_interrupted_restore_not_rolled_back_stops_the_action(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    patched: Patched,
    action: str,
    what: str,
):
    """A restore a dying charm left half swapped is rolled back first; if that fails, stop.

    Arrange: recover_interrupted_restore (patched; tested in
        test_backup_restore_container.py) cannot roll back.
    Act: run the action.
    Assert: it fails saying so and where the previous data is; nothing else runs.
    """
    state = make_state(configured_data_dir, CONFIG)

    with (
        mock.patch.object(
            backup, "recover_interrupted_restore", return_value=ROLLBACK_PROBLEM
        ) as recover,
        pytest.raises(testing.ActionFailed) as exc_info,
    ):
        ctx.run(ctx.on.action(action, params=_params(action)), state)

    assert exc_info.value.message == f"cannot {what}: {ROLLBACK_PROBLEM}"
    (container,) = recover.call_args.args
    assert container.name == synapse.CONTAINER_NAME
    patched.for_action(action).assert_not_called()


def test_interrupted_restore_rolled_back_lets_the_action_run(
    ctx: testing.Context, configured_data_dir: pathlib.Path, patched: Patched
):
    """A roll-back that succeeds (None) lets the action go on."""
    patched.verify_backup.return_value = _check()
    state = make_state(configured_data_dir, CONFIG)

    with mock.patch.object(backup, "recover_interrupted_restore", return_value=None) as recover:
        ctx.run(ctx.on.action("verify-backup", params=_params("verify-backup")), state)

    recover.assert_called_once()
    patched.verify_backup.assert_called_once()


# --- leftovers of killed runs ----------------------------------------------------------------

WORK_LEFTOVER = f"{backup_container.WORK_DIR_PREFIX}0123456789abcdef"
STAGING_LEFTOVER = f"/data/{backup_restore.RESTORE_STAGING_PREFIX}{BACKUP_ID}-0a1b2c3d"
SNAPSHOT_LEFTOVER = f"/data/{backup_container.SNAPSHOT_DIR_PREFIX}{BACKUP_ID}"
PREVIOUS_DATA = f"/data/{backup_restore.PREVIOUS_DATA_PREFIX}{BACKUP_ID}-0a1b2c3d"


@pytest.mark.parametrize("action", CONTAINER_ACTIONS)
def test_leftovers_are_swept_before_the_action(
    ctx: testing.Context, data_dir: pathlib.Path, patched: Patched, action: str
):
    """A work dir (with a passphrase), a database copy and staging go; previous data stays.

    Arrange: what killed runs left in /tmp and /data, and data kept by keep-previous.
    Act: run the action (its backup function patched, recording what it finds).
    Assert: the leftovers were gone before the backup function ran; the previous
        data is still there.
    """
    paths = (WORK_LEFTOVER, STAGING_LEFTOVER, SNAPSHOT_LEFTOVER, PREVIOUS_DATA)
    seen: dict[str, bool] = {}

    def record(container: ops.Container, *args: Any, **kwargs: Any) -> Any:
        seen.update({path: container.exists(path) for path in paths})
        return _check() if action == "verify-backup" else _result()

    patched.for_action(action).side_effect = record
    state = make_state(data_dir, CONFIG, mount_data=False)

    with ctx(ctx.on.action(action, params=_params(action)), state) as manager:
        container = manager.charm.unit.get_container(synapse.CONTAINER_NAME)
        container.push(backup.SYNAPSE_CONFIG_PATH, homeserver_yaml(), make_dirs=True)
        container.push(f"{WORK_LEFTOVER}/passphrase", PASSPHRASE, make_dirs=True)
        for path in paths[1:]:
            container.push(f"{path}/data/homeserver.db", "a copy", make_dirs=True)
        manager.run()

    assert seen == {
        WORK_LEFTOVER: False,
        STAGING_LEFTOVER: False,
        SNAPSHOT_LEFTOVER: False,
        PREVIOUS_DATA: True,
    }
