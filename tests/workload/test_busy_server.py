"""Backups of a server that deletes media while the backup reads it.

Synapse purges old and remote media on its own schedule, so a backup may
meet directories that disappear under it. GNU tar 1.34 reports a directory
deleted during its listed-incremental scan as an error (exit status 2,
"Cannot stat: No such file or directory"), where a deleted file is only a
warning. Here the deletion runs for real, in the bubblewrap container,
started with tar by a wrapper; the charm's real create-backup and
restore-backup actions run against SeaweedFS (see conftest.py).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ops import testing

from charm import SynapseCharm
from tests.helpers.sandbox import Sandbox, default_path
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import SYNAPSE_GID, SYNAPSE_UID
from tests.workload.test_charm_action import configure
from tests.workload.test_incremental_trees import _backup, _write, describe_difference, snapshot

Harness = testing.Harness[SynapseCharm]

DIRECTORIES = 3000  # enough for the scan to overlap the deletions (10 of 10 tries here)
ATTEMPTS = 4
# The wrapper starts the deleter with the first `tar --create` after it is armed.
WRAPPER = """#!/bin/bash
case " $* " in
*" --create "*)
    if rm /test-bin/armed 2>/dev/null; then
        python3 /test-bin/delete.py &
        (exec -a tar {tar} "$@") 2>/test-bin/tar-messages  # named as the charm calls it
        status=$?
        cat /test-bin/tar-messages >&2
        wait
        exit "$status"
    fi
    ;;
esac
exec -a tar {tar} "$@"
"""
# Deletes every other directory of the purge tree, as Synapse's media purge
# would: files first, then their directories.
DELETER = """
import os, shutil
top = "/data/media_store/local_content/purged"
for name in sorted(os.listdir(top))[::2]:
    shutil.rmtree(os.path.join(top, name))
"""
# Renames them instead, as an operator moving media by hand might.
RENAMER = """
import os
top = "/data/media_store/local_content/purged"
for name in sorted(os.listdir(top))[::2]:
    os.rename(os.path.join(top, name), os.path.join(top, "moved-" + name))
"""
REMOVAL_ERROR = r"Cannot (stat|open): No such file or directory"


def _purge_tree(data: Path) -> Path:
    top = data / "media_store/local_content/purged"
    if top.exists():
        shutil.rmtree(top)
    for index in range(DIRECTORIES):
        _write(top / f"m{index:05d}/thumbnails/scaled", b"x" * 64)
        _write(top / f"m{index:05d}/original", b"y" * 64)
    return top


def _racing(harness: Harness, s3_server: SeaweedServer, bucket: str, mutation: str) -> Path:
    """Configure the charm, with a tar that starts ``mutation`` (a python program) when armed.

    Returns:
        The container's test-bin directory (``armed``, ``tar-messages``).
    """
    root = harness.get_filesystem_root("synapse")
    bin_dir = root / "test-bin"
    bin_dir.mkdir()
    real_tar = shutil.which("tar", path=":".join(default_path()))
    (bin_dir / "tar").write_text(WRAPPER.format(tar=real_tar))
    (bin_dir / "tar").chmod(0o755)
    (bin_dir / "delete.py").write_text(mutation)
    shutil.chown(bin_dir, SYNAPSE_UID, SYNAPSE_GID)
    sandbox = Sandbox(root, path_dirs=["/test-bin", *default_path()])
    configure(harness, s3_server, bucket)
    harness.container_pebble_ready("synapse")
    harness.handle_exec("synapse", [], handler=sandbox.handle)
    return bin_dir


def test_directories_deleted_during_the_backup_do_not_fail_it(
    harness: Harness, s3_server: SeaweedServer, bucket: str
) -> None:
    """Tar's "Cannot stat" for a deleted directory: a sound backup, and a sound chain after it.

    Before, every such backup failed with tar's exit code 2.
    """
    bin_dir = _racing(harness, s3_server, bucket, DELETER)
    data = harness.get_filesystem_root("synapse") / "data"

    messages = ""
    for _ in range(ATTEMPTS):
        _purge_tree(data)
        (bin_dir / "armed").touch()
        full = _backup(harness, type="full")  # failed here before
        messages = (bin_dir / "tar-messages").read_text()
        if re.search(REMOVAL_ERROR, messages):
            break
    assert re.search(REMOVAL_ERROR, messages), (
        f"tar never met a deleted directory in {ATTEMPTS} tries; its messages: {messages!r}"
    )
    survivors = snapshot(data)
    purged = data / "media_store/local_content/purged"
    assert len(list(purged.iterdir())) == DIRECTORIES // 2

    # The next backup builds on the snapshot state tar wrote during the race.
    _write(purged / "m00001/original", b"changed")
    incremental = _backup(harness)
    assert (incremental["type"], incremental["parent"]) == ("incremental", full["backup-id"])
    changed = snapshot(data)

    for backup_id, expected in (
        (full["backup-id"], survivors),
        (incremental["backup-id"], changed),
    ):
        harness.run_action("restore-backup", {"backup-id": backup_id})
        actual = snapshot(data)
        assert actual == expected, describe_difference(expected, actual)


def test_directories_renamed_during_the_backup_fail_it_clearly(
    harness: Harness, s3_server: SeaweedServer, bucket: str
) -> None:
    """A directory renamed while tar reads: the same error for its old name, a clear failure.

    The archive has it under neither name, so its old inode found under a
    new name fails the backup, and nothing of it is listed. Before, the
    check let the backup pass without the renamed files.
    """
    bin_dir = _racing(harness, s3_server, bucket, RENAMER)
    data = harness.get_filesystem_root("synapse") / "data"

    failure = None
    for _ in range(ATTEMPTS):
        _purge_tree(data)
        (bin_dir / "armed").touch()
        time.sleep(1.05)  # ids are per second
        try:
            harness.run_action("create-backup", {"type": "full"})
        except testing.ActionFailed as exc:
            failure = exc.message
            break
        # tar met no rename this time (all before or after its scan): it must have said nothing
        assert not re.search(REMOVAL_ERROR, (bin_dir / "tar-messages").read_text())
    assert failure, f"tar never met a renamed directory in {ATTEMPTS} tries"
    assert "tar met a directory under two names while it read the data: " in failure
    assert re.search(r"/purged/(m\d+)' is now '[^']*/purged/moved-\1'", failure), failure
    assert harness.run_action("list-backups").results["backups"] == {}
