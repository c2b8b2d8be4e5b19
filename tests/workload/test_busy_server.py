"""Backups of a server that changes its media while the backup reads it.

Synapse purges old and remote media on its own schedule, and makes new
directories for uploads, so a backup may meet directories that disappear,
or appear, under it. GNU tar 1.34 reports a directory deleted during its
listed-incremental scan as an error (exit status 2, "Cannot stat: No such
file or directory"), where a deleted file is only a warning: such backups
must pass. A directory renamed or moved while tar reads is in the archive
under neither name: such backups must fail, clearly (the check the script
runs after tar, see docs/explanation/architecture.md). Here each change
runs for real, in the bubblewrap container, started with tar by a wrapper;
the charm's real create-backup and restore-backup actions run against
SeaweedFS (see conftest.py).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
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
# The wrapper starts the change (delete.py) with the first `tar --create` after
# it is armed: at once, racing tar's scan (RACE), or once tar has scanned
# everything and started to write, while its output waits (GATE: tar then
# meets every change while it writes, deterministically).
WRAPPER = """#!/bin/bash
case " $* " in
*" --create "*)
    if rm /test-bin/armed 2>/dev/null; then
        {start}
        status=${{PIPESTATUS[0]}}
        cat /test-bin/tar-messages >&2
        wait
        exit "$status"
    fi
    ;;
esac
exec -a tar {tar} "$@"
"""
# Named as the charm calls it: tar's messages start with "tar: ".
TAR = '(exec -a tar {tar} "$@") 2>/test-bin/tar-messages'
RACE = "python3 /test-bin/delete.py &\n        " + TAR
GATE = TAR + " | python3 /test-bin/gate.py"
GATE_PROGRAM = """
import subprocess, sys
first = sys.stdin.buffer.read1(1)  # tar has scanned the tree; its pipe fills while
subprocess.run([sys.executable, "/test-bin/delete.py"], check=True)  # this runs
sys.stdout.buffer.write(first)
while chunk := sys.stdin.buffer.read1(1 << 16):
    sys.stdout.buffer.write(chunk)
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
RENAME_ONE = """
import os
top = "/data/media_store/local_content/purged"
os.rename(os.path.join(top, "m00050"), os.path.join(top, "zz-moved"))
"""
# Synapse at work: deletes old media directories, and makes new ones for uploads
# (the file system may give them the deleted ones' inodes).
PURGE_AND_UPLOAD = """
import os, shutil
top = "/data/media_store/local_content/purged"
for name in sorted(os.listdir(top))[::2]:
    shutil.rmtree(os.path.join(top, name))
for index in range(50):
    os.makedirs(os.path.join(top, f"upload{index:02d}", "thumbnails"))
    with open(os.path.join(top, f"upload{index:02d}", "original"), "wb") as file:
        file.write(b"new media")
"""
REMOVAL_ERROR = r"Cannot (stat|open): No such file or directory"


def _purge_tree(data: Path, directories: int = DIRECTORIES) -> Path:
    top = data / "media_store/local_content/purged"
    if top.exists():
        shutil.rmtree(top)
    for index in range(directories):
        _write(top / f"m{index:05d}/thumbnails/scaled", b"x" * 64)
        _write(top / f"m{index:05d}/original", b"y" * 64)
    return top


def _racing(
    harness: Harness, s3_server: SeaweedServer, bucket: str, mutation: str, start: str = RACE
) -> Path:
    """Configure the charm, with a tar that starts ``mutation`` (a python program) when armed.

    Returns:
        The container's test-bin directory (``armed``, ``tar-messages``).
    """
    root = harness.get_filesystem_root("synapse")
    bin_dir = root / "test-bin"
    bin_dir.mkdir()
    real_tar = shutil.which("tar", path=":".join(default_path()))
    (bin_dir / "tar").write_text(WRAPPER.format(start=start.format(tar=real_tar), tar=real_tar))
    (bin_dir / "tar").chmod(0o755)
    (bin_dir / "delete.py").write_text(mutation)
    (bin_dir / "gate.py").write_text(GATE_PROGRAM)
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

    # The full backup has every survivor as it is; of the deleted directories, it
    # may have what tar wrote before they went (a backup of a server at work).
    harness.run_action("restore-backup", {"backup-id": full["backup-id"]})
    actual = snapshot(data)
    deleted = re.compile(rb"media_store/local_content/purged/m\d*[02468](/|$)")
    extra = {name: entry for name, entry in actual.items() if name not in survivors}
    assert all(deleted.match(name) for name in extra), sorted(extra)[:5]
    kept = {name: entry for name, entry in actual.items() if name in survivors}
    assert kept == survivors, describe_difference(survivors, kept)
    # The incremental one, made when they were gone, has none of them.
    harness.run_action("restore-backup", {"backup-id": incremental["backup-id"]})
    actual = snapshot(data)
    assert actual == changed, describe_difference(changed, actual)


@pytest.mark.parametrize(
    ("renamer", "new_name"),
    [
        pytest.param(RENAMER, r"purged/moved-\1", id="many"),
        # One, to a name after it that tar had not reached.
        pytest.param(RENAME_ONE, "purged/zz-moved", id="one"),
    ],
)
def test_directories_renamed_during_the_backup_fail_it_clearly(
    harness: Harness, s3_server: SeaweedServer, bucket: str, renamer: str, new_name: str
) -> None:
    """Directories renamed after tar's scan, before it wrote them: a clear failure.

    tar reports the old names as removed and the archive has them under
    neither name. The check after tar finds their inodes, recorded in tar's
    state under the old names, under new ones.
    """
    bin_dir = _racing(harness, s3_server, bucket, renamer, start=GATE)
    data = harness.get_filesystem_root("synapse") / "data"
    _purge_tree(data, 100)
    # Written before the purge tree, and more than a pipe holds: tar waits in it.
    _write(data / "media_store/local_content/aaa-large", os.urandom(1 << 20))
    (bin_dir / "armed").touch()
    time.sleep(1.1)  # the check gives tar's start a second of margin

    with pytest.raises(testing.ActionFailed) as failure:
        harness.run_action("create-backup", {"type": "full"})

    assert "File removed before we read it" in (bin_dir / "tar-messages").read_text()
    message = failure.value.message
    assert "tar met a directory under two names (" in message, message
    assert re.search(rf"/purged/(m\d+)' is now '[^']*/{new_name}'\)", message), message
    assert "while tar read the data: run the backup again" in message
    assert harness.run_action("list-backups").results["backups"] == {}


def test_directory_moved_in_during_the_backup_fails_it_clearly(
    harness: Harness, s3_server: SeaweedServer, bucket: str
) -> None:
    """A directory of old files moved in after tar passed its new place: a clear failure.

    tar says nothing at all (exit status 0), and the archive lacks it.
    """
    mover = """
import os
os.rename("/data/staged", "/data/media_store/local_content/aaa-large-dir")
"""
    bin_dir = _racing(harness, s3_server, bucket, mover, start=GATE)
    data = harness.get_filesystem_root("synapse") / "data"
    _write(data / "staged/old-file", b"made before the backup")
    _write(data / "media_store/local_content/aaa-large", os.urandom(1 << 20))
    (bin_dir / "armed").touch()
    time.sleep(1.1)  # the check gives tar's start a second of margin

    with pytest.raises(testing.ActionFailed) as failure:
        harness.run_action("create-backup", {"type": "full"})

    assert (bin_dir / "tar-messages").read_text() == ""
    assert "a directory was moved to 'data/media_store/local_content/aaa-large-dir'" in (
        failure.value.message
    )
    assert harness.run_action("list-backups").results["backups"] == {}


def test_a_purge_and_uploads_while_tar_writes_pass(
    harness: Harness, s3_server: SeaweedServer, bucket: str
) -> None:
    """Deleted directories, and new ones (maybe with their inodes), made while tar writes: fine.

    The backup has every directory that was there throughout, as it was.
    """
    bin_dir = _racing(harness, s3_server, bucket, PURGE_AND_UPLOAD, start=GATE)
    data = harness.get_filesystem_root("synapse") / "data"
    _purge_tree(data, 100)
    _write(data / "media_store/local_content/aaa-large", os.urandom(1 << 20))
    before = snapshot(data)
    (bin_dir / "armed").touch()

    full = _backup(harness, type="full")

    after = snapshot(data)
    harness.run_action("restore-backup", {"backup-id": full["backup-id"]})
    restored = snapshot(data)
    throughout = {name: entry for name, entry in before.items() if after.get(name) == entry}
    assert len(throughout) > len(before) // 2
    kept = {name: restored.get(name) for name in throughout}
    assert kept == throughout, describe_difference(throughout, kept)
