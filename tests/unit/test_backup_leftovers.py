"""sweep_leftovers: what killed backups and restores left, removed by every action and hook.

The container is the charm's own, taken from a live Scenario event. Its /data
is a plain directory of Scenario's container filesystem, not a Mount: Scenario
mounts a directory as a symlink, which Container.isdir reports as no directory,
where Pebble sees the volume as one. Nothing runs in the workload: the sweep
only lists and removes files through Pebble.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import ops
import pytest
from ops import testing

import backup
import backup_chain
import backup_container
import backup_restore
import synapse
from tests.unit.builders import homeserver_yaml, make_state

BACKUP_ID = "20250101T000000Z"
S3 = backup.S3Parameters.model_validate(
    {"access-key": "a", "secret-key": "s", "bucket": "backups", "region": "us-east-1"}
)
WORK_DIRS = (
    f"{backup_container.WORK_DIR_PREFIX}0123456789abcdef",
    f"{backup_container.WORK_DIR_PREFIX}fedcba98",
)
SNAPSHOT_DIR = f"/data/{backup_container.SNAPSHOT_DIR_PREFIX}{BACKUP_ID}"
STAGING_DIR = f"/data/{backup_restore.RESTORE_STAGING_PREFIX}{BACKUP_ID}-0a1b2c3d"
PREVIOUS_DIR = f"/data/{backup_restore.PREVIOUS_DATA_PREFIX}{BACKUP_ID}-0a1b2c3d"
LEFTOVERS = (*WORK_DIRS, SNAPSHOT_DIR, STAGING_DIR)
# What the sweep must never touch: live data, kept previous data, the kept tar
# state, and other programs' files in /tmp.
KEPT = (
    "/data/homeserver.yaml",
    "/data/homeserver.db",
    f"{PREVIOUS_DIR}/data/homeserver.db",
    f"{backup_chain.STATE_DIR}/{BACKUP_ID}.snar",
    "/tmp/other-program/synapse-backup-notes",
)


@contextlib.contextmanager
def live_container(ctx: testing.Context, data_dir: pathlib.Path) -> Iterator[ops.Container]:
    """Yield the charm's synapse container during a start event (which the charm ignores)."""
    with ctx(ctx.on.start(), make_state(data_dir, {}, mount_data=False)) as manager:
        container = manager.charm.unit.get_container(synapse.CONTAINER_NAME)
        container.make_dir("/data")
        yield container


def _leave_debris(container: ops.Container) -> None:
    """What killed runs leave (work dirs with a passphrase, a database copy, staging)."""
    container.push("/data/homeserver.yaml", homeserver_yaml())
    container.push("/data/homeserver.db", "live database")
    for work_dir in WORK_DIRS:
        container.push(f"{work_dir}/passphrase", "secret", make_dirs=True, permissions=0o600)
        container.make_dir(f"{work_dir}/gnupg", make_parents=True)
    container.push(f"{SNAPSHOT_DIR}/data/homeserver.db", "database copy", make_dirs=True)
    container.push(f"{STAGING_DIR}/data/homeserver.yaml", "staged", make_dirs=True)
    for path in KEPT[2:]:
        container.push(path, "keep me", make_dirs=True)


def test_sweep_leftovers_removes_what_killed_runs_left(
    ctx: testing.Context, data_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
):
    """Work dirs, database copies and staging go; live data and previous data stay.

    Arrange: two work dirs in /tmp, a database copy and a staging dir in /data,
        beside live data, kept previous data, the kept tar state and another
        program's files.
    Act: sweep_leftovers.
    Assert: the leftovers are gone, each removal logged; everything else is there.
    """
    caplog.set_level(logging.WARNING, logger="backup_restore")
    with live_container(ctx, data_dir) as container:
        _leave_debris(container)

        backup.sweep_leftovers(container)

        gone = [path for path in LEFTOVERS if container.exists(path)]
        kept = [path for path in KEPT if container.exists(path)]

    assert gone == []
    assert kept == list(KEPT)
    assert sorted(record.getMessage() for record in caplog.records) == sorted(
        f"removing {path}, left by an interrupted run" for path in LEFTOVERS
    )


@pytest.mark.parametrize("event", ["update_status", "config_changed", "upgrade_charm"])
def test_hooks_sweep_what_a_killed_action_left(
    ctx: testing.Context, data_dir: pathlib.Path, event: str
):
    """A killed action's passphrase does not wait in /tmp for the next action.

    Arrange: the leftovers of killed runs (work dirs with a passphrase file, a
        database copy, staging) beside data that must stay.
    Act: a hook that reconciles the workload (server-name unset: nothing else runs).
    Assert: the leftovers are gone, the rest is there.
    """
    state = make_state(data_dir, {}, mount_data=False)
    with ctx(getattr(ctx.on, event)(), state) as manager:
        container = manager.charm.unit.get_container(synapse.CONTAINER_NAME)
        container.make_dir("/data")
        _leave_debris(container)

        manager.run()

        gone = [path for path in LEFTOVERS if container.exists(path)]
        kept = [path for path in KEPT if container.exists(path)]

    assert gone == []
    assert kept == list(KEPT)


def test_sweep_leftovers_does_nothing_while_a_journal_exists(
    ctx: testing.Context, data_dir: pathlib.Path
):
    """An interrupted restore's staging and previous data are what its roll-back needs."""
    with live_container(ctx, data_dir) as container:
        _leave_debris(container)
        container.push(backup.RESTORE_JOURNAL, "{}")

        backup.sweep_leftovers(container)

        left = [path for path in (*LEFTOVERS, *KEPT) if container.exists(path)]
        assert container.exists(backup.RESTORE_JOURNAL)

    assert left == [*LEFTOVERS, *KEPT]


def test_sweep_leftovers_without_tmp(ctx: testing.Context, data_dir: pathlib.Path):
    """A container without /tmp still has its /data swept."""
    with live_container(ctx, data_dir) as container:
        container.push(f"{STAGING_DIR}/data/homeserver.yaml", "staged", make_dirs=True)
        container.push(f"{SNAPSHOT_DIR}/data/homeserver.db", "database copy", make_dirs=True)
        assert not container.exists("/tmp")

        backup.sweep_leftovers(container)

        assert not container.exists(STAGING_DIR)
        assert not container.exists(SNAPSHOT_DIR)


def test_sweep_leftovers_on_an_empty_container(ctx: testing.Context, data_dir: pathlib.Path):
    """Nothing to sweep: nothing happens, and nothing is logged."""
    with (
        live_container(ctx, data_dir) as container,
        mock.patch.object(container, "remove_path") as remove_path,
    ):
        backup.sweep_leftovers(container)

    remove_path.assert_not_called()


@pytest.mark.parametrize(
    "method", ["exists", "isdir", "list_files"], ids=["journal-check", "isdir", "list-files"]
)
@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ops.pebble.ConnectionError("cannot connect to Pebble"), id="connection"),
        pytest.param(ops.pebble.APIError({}, 500, "Internal Server Error", "boom"), id="api"),
        pytest.param(ops.pebble.PathError("permission-denied", "permission denied"), id="path"),
    ],
)
def test_sweep_leftovers_survives_pebble_errors(
    ctx: testing.Context,
    data_dir: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    method: str,
    error: ops.pebble.Error,
):
    """A Pebble error while looking for leftovers is logged; the action goes on."""
    caplog.set_level(logging.WARNING, logger="backup_restore")
    with live_container(ctx, data_dir) as container:
        _leave_debris(container)
        with (
            mock.patch.object(container, method, side_effect=error),
            mock.patch.object(container, "remove_path") as remove_path,
        ):
            backup.sweep_leftovers(container)

    remove_path.assert_not_called()
    (record,) = caplog.records
    assert record.getMessage() == f"cannot look for leftovers of earlier runs: {error}"


def test_sweep_leftovers_goes_on_after_a_failed_removal(
    ctx: testing.Context, data_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
):
    """A leftover that cannot be removed is logged; the others are still removed."""
    with live_container(ctx, data_dir) as container:
        _leave_debris(container)
        real_remove = container.remove_path

        def remove_path(path: str, **kwargs: Any) -> None:
            if path == WORK_DIRS[0]:
                raise ops.pebble.PathError("permission-denied", f"remove {path}: denied")
            real_remove(path, **kwargs)

        with mock.patch.object(container, "remove_path", side_effect=remove_path):
            backup.sweep_leftovers(container)

        left = [path for path in LEFTOVERS if container.exists(path)]

    assert left == [WORK_DIRS[0]]
    assert f"could not remove {WORK_DIRS[0]} from the container: " in caplog.text


def test_sweep_leftovers_removes_a_database_copy_in_a_sub_directory(
    ctx: testing.Context, data_dir: pathlib.Path
):
    """A database in a sub-directory is copied onto /data itself, where sweeps look."""
    snapshot_dir = f"/data/{backup_container.SNAPSHOT_DIR_PREFIX}{BACKUP_ID}"
    config = homeserver_yaml().replace("/data/homeserver.db", "/data/db/homeserver.db")
    with live_container(ctx, data_dir) as container:
        container.push("/data/homeserver.yaml", config)
        container.push("/data/db/homeserver.db", "live database", make_dirs=True)
        database = backup.get_database_path(container)
        assert database == "/data/db/homeserver.db"
        script = backup.build_backup_command(
            S3, BACKUP_ID, [], "/tmp/w/passphrase", database_path=database, work_dir="/tmp/w"
        )[2]
        assert f"SNAPSHOT_DIR={snapshot_dir}" in script
        container.push(f"{snapshot_dir}/data/db/homeserver.db", "database copy", make_dirs=True)

        backup.sweep_leftovers(container)

        assert not container.exists(snapshot_dir)
