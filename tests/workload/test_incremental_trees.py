"""Incremental chains under hard changes: each point restored is the tree at that point.

Each test changes the sample data in ways GNU tar's listed-incremental mode
finds hard (type changes, renames, links, odd names, times set back...),
takes a backup after every step through the charm's create-backup action
(real bash, tar, gpg, aws CLI in the bubblewrap container, SeaweedFS), and
then restores every point, in an order that goes back and forth, comparing
the backed-up part of /data with what it was at that point: file type, mode,
owner, content, symlink target, hard-link grouping and file mtimes.

Two of these once lost data silently: a directory renamed between backups
(GNU tar drops its rename records when the first member in its sorted order
is a file, as homeserver.yaml is: the backup after a rename is now a full
one), and a top-level path deleted before an incremental backup, which its
restore brought back from an older backup of the chain.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable, Collection
from pathlib import Path

import pytest
from ops import testing

from charm import SynapseCharm
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import SYNAPSE_GID, SYNAPSE_UID
from tests.workload.test_charm_action import configure

Harness = testing.Harness[SynapseCharm]
Step = Callable[[Path], None]

# What a backup does not cover (see test_restore_action.EXCLUDED), as bytes prefixes.
_EXCLUDED = (
    b"media_store/remote_content",
    b"media_store/url_cache",
    b"homeserver.pid",
    b"homeserver.db",
    b".synapse-",
)


def _own(*paths: Path) -> None:
    """Give paths to the Synapse user (lchown: symlinks themselves)."""
    for path in paths:
        os.lchown(path, SYNAPSE_UID, SYNAPSE_GID)


def _write(path: Path | bytes, data: bytes, mode: int = 0o600) -> None:
    """Write a file (and any missing parents) as the Synapse user would."""
    target = os.fsencode(path)
    parent = os.path.dirname(target)
    missing = []
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        os.mkdir(directory, 0o700)
        os.lchown(directory, SYNAPSE_UID, SYNAPSE_GID)
    with open(target, "wb") as file:
        file.write(data)
    os.chmod(target, mode)
    os.lchown(target, SYNAPSE_UID, SYNAPSE_GID)


def _mkdir(path: Path | bytes, mode: int = 0o700) -> None:
    os.mkdir(os.fsencode(path), mode)
    os.chmod(os.fsencode(path), mode)
    os.lchown(os.fsencode(path), SYNAPSE_UID, SYNAPSE_GID)


def _symlink(target: str | bytes, path: Path | bytes) -> None:
    os.symlink(target, os.fsencode(path))
    os.lchown(os.fsencode(path), SYNAPSE_UID, SYNAPSE_GID)


Entry = tuple[object, ...]


def snapshot(data: Path) -> dict[bytes, Entry]:
    """Describe the backed-up part of /data, names as bytes (non-UTF-8 safe).

    Each entry: type, mode, uid, gid, content (file bytes, link target), file
    mtime in ns (not directories': extracting sets them), and for files with
    several links the first name (sorted) of the same inode, so hard-link
    groups compare.
    """
    top = os.fsencode(data)
    found: dict[bytes, os.stat_result] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, top)
            if not relative.startswith(_EXCLUDED):
                found[relative] = os.lstat(full)
    first_of_inode: dict[int, bytes] = {}
    for relative in sorted(found):
        st = found[relative]
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            first_of_inode.setdefault(st.st_ino, relative)
    return {
        relative: _entry(os.path.join(top, relative), found[relative], first_of_inode)
        for relative in sorted(found)
    }


def _entry(full: bytes, st: os.stat_result, first_of_inode: dict[int, bytes]) -> Entry:
    """Describe one path of a snapshot (see snapshot)."""
    if stat.S_ISLNK(st.st_mode):
        return ("link", st.st_uid, st.st_gid, os.readlink(full))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid)
    if stat.S_ISREG(st.st_mode):
        with open(full, "rb") as file:
            content = file.read()
        link_group = first_of_inode.get(st.st_ino, b"") if st.st_nlink > 1 else b""
        return ("file", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, content,
                st.st_mtime_ns, link_group)  # fmt: skip
    return ("other", oct(st.st_mode), st.st_uid, st.st_gid)


def describe_difference(expected: dict[bytes, Entry], actual: dict[bytes, Entry]) -> str:
    """A readable list of the differences between two snapshots."""
    lines = []
    for name in sorted(set(expected) | set(actual)):
        want, got = expected.get(name), actual.get(name)
        if want == got:
            continue

        def short(entry: Entry | None) -> str:
            if entry is None:
                return "absent"
            shown = [
                (item[:40] + b"..." if isinstance(item, bytes) and len(item) > 40 else item)
                for item in entry
            ]
            return repr(tuple(shown))

        lines.append(f"  {name!r}: expected {short(want)}, got {short(got)}")
    return "\n".join(lines)


def _backup(harness: Harness, **params: str) -> dict[str, str]:
    """Run create-backup; ids are per second, so never two in one second."""
    time.sleep(1.05)
    return harness.run_action("create-backup", params).results


@pytest.fixture
def configured(harness: Harness, s3_server: SeaweedServer, bucket: str) -> Harness:
    """The charm configured for backups, Synapse's layer planned."""
    configure(harness, s3_server, bucket)
    harness.container_pebble_ready("synapse")
    return harness


def _data(harness: Harness) -> Path:
    return harness.get_filesystem_root("synapse") / "data"


def _content(data: Path) -> Path:
    return data / "media_store/local_content"


def run_chain(
    harness: Harness,
    steps: list[Step],
    restore_order: list[int] | None = None,
    full_at: Collection[int] = (),
    maybe_full: Collection[int] = (),
) -> list[tuple[str, dict[bytes, Entry]]]:
    """Full backup, then one automatic backup after each step; restore every point.

    Args:
        harness: the configured harness.
        steps: mutations of /data, one backup after each.
        restore_order: indexes of the points to restore (0 = full), default:
            newest, then the middle ones, the full one, and the newest again.
        full_at: the points whose step renames a directory: tar's warning
            makes them full backups. The others are incremental on the point
            before,
        maybe_full: except these, whose step deletes a directory and makes
            another, which may get its inode: tar takes that for a rename.

    Returns:
        The points (backup id, snapshot).
    """
    data = _data(harness)
    points: list[tuple[str, dict[bytes, Entry]]] = []
    full = _backup(harness, type="full")
    assert full["type"] == "full"
    points.append((full["backup-id"], snapshot(data)))
    for step in steps:
        step(data)
        result = _backup(harness)
        if len(points) in full_at or (len(points) in maybe_full and result["type"] == "full"):
            assert (result["type"], result["parent"]) == ("full", "none"), result
        else:
            assert result["type"] == "incremental", result
            assert result["parent"] == points[-1][0]
        points.append((result["backup-id"], snapshot(data)))
    last = len(points) - 1
    order = restore_order or [last, *range(last - 1, 0, -1), 0, last]
    failures = []
    for index in order:
        backup_id, expected = points[index]
        harness.run_action("restore-backup", {"backup-id": backup_id})
        actual = snapshot(data)
        if actual != expected:
            failures.append(
                f"point {index} ({backup_id}) differs:\n{describe_difference(expected, actual)}"
            )
    assert not failures, "\n".join(failures)
    return points


# ---------------------------------------------------------------- type changes


def test_directory_replaced_by_file_and_back(configured: Harness) -> None:
    """A directory becomes a file of the same name, then a directory again."""

    def prepare(data: Path) -> None:  # step 1: a directory with files
        _write(_content(data) / "zz/dirfile/inner", b"inner")
        _write(_content(data) / "zz/dirfile/sub/deeper", b"deeper")

    def to_file(data: Path) -> None:
        shutil.rmtree(_content(data) / "zz/dirfile")
        _write(_content(data) / "zz/dirfile", b"now a file")

    def to_dir(data: Path) -> None:
        (_content(data) / "zz/dirfile").unlink()
        _write(_content(data) / "zz/dirfile/other", b"a directory again, other content")

    run_chain(configured, [prepare, to_file, to_dir])


def test_file_replaced_by_symlink_and_symlinks_retargeted(configured: Harness) -> None:
    """A file becomes a symlink; a symlink is retargeted, then becomes a file again."""

    def prepare(data: Path) -> None:
        _write(_content(data) / "ln/plain", b"plain file")
        _write(_content(data) / "ln/target-a", b"A")
        _write(_content(data) / "ln/target-b", b"B")
        _symlink("target-a", _content(data) / "ln/link")
        _symlink("../ln", _content(data) / "ln/dirlink")  # a symlink to a directory
        _symlink("does-not-exist", _content(data) / "ln/dangling")

    def to_symlink(data: Path) -> None:
        (_content(data) / "ln/plain").unlink()
        _symlink("target-b", _content(data) / "ln/plain")
        (_content(data) / "ln/link").unlink()
        _symlink("target-b", _content(data) / "ln/link")  # retargeted, same length

    def back_to_files(data: Path) -> None:
        (_content(data) / "ln/plain").unlink()
        _write(_content(data) / "ln/plain", b"plain again")
        (_content(data) / "ln/dangling").unlink()
        _symlink("now/a/much/longer/target/than/before", _content(data) / "ln/dangling")

    run_chain(configured, [prepare, to_symlink, back_to_files])


def test_directory_replaced_by_symlink_to_directory_and_back(configured: Harness) -> None:
    """A directory becomes a symlink to another directory, then a directory again.

    An extraction that followed the symlink would write into the other directory.
    """

    def prepare(data: Path) -> None:
        _write(_content(data) / "sd/real/inside", b"inside real")
        _write(_content(data) / "sd/other/kept", b"other's own file")

    def to_symlink(data: Path) -> None:
        shutil.rmtree(_content(data) / "sd/real")
        _symlink("other", _content(data) / "sd/real")

    def back_to_dir(data: Path) -> None:
        (_content(data) / "sd/real").unlink()
        _write(_content(data) / "sd/real/new", b"a real directory again")

    run_chain(configured, [prepare, to_symlink, back_to_dir])


# ---------------------------------------------------------------- links, empties


def test_hard_links(configured: Harness) -> None:
    """Hard links created, written through, and one name removed."""

    def prepare(data: Path) -> None:
        _write(_content(data) / "hl/a", b"shared content")
        os.link(_content(data) / "hl/a", _content(data) / "hl/b")
        os.makedirs(_content(data) / "hl2", exist_ok=True)
        _own(_content(data) / "hl2")
        os.link(_content(data) / "hl/a", _content(data) / "hl2/c")  # across directories

    def write_through(data: Path) -> None:
        with open(_content(data) / "hl/b", "r+b") as file:
            file.write(b"SHARED")  # same size

    def unlink_one(data: Path) -> None:
        (_content(data) / "hl/a").unlink()

    def link_to_old_file(data: Path) -> None:
        # A new link to a file the parent backup holds unchanged.
        os.link(_content(data) / "hl/b", _content(data) / "hl/d")

    run_chain(configured, [prepare, write_through, unlink_one, link_to_old_file])


def test_empty_files_and_directories(configured: Harness) -> None:
    """Empty files and directories created, then removed."""

    def create(data: Path) -> None:
        _write(_content(data) / "em/empty-file", b"")
        _mkdir(_content(data) / "em/empty-dir")
        _mkdir(_content(data) / "empty-top")
        _mkdir(_content(data) / "empty-top/nested-empty")

    def remove(data: Path) -> None:
        (_content(data) / "em/empty-file").unlink()
        (_content(data) / "em/empty-dir").rmdir()
        shutil.rmtree(_content(data) / "empty-top")

    def truncate_existing(data: Path) -> None:
        victim = sorted(p for p in _content(data).rglob("*") if p.is_file())[0]
        os.truncate(victim, 0)

    run_chain(configured, [create, remove, truncate_existing])


# ---------------------------------------------------------------- times and modes


def test_content_changed_with_size_and_mtime_set_back(configured: Harness) -> None:
    """Content changed, size kept, mtime restored with touch: only the ctime tells."""

    def change(data: Path) -> None:
        for victim in sorted(p for p in _content(data).rglob("*") if p.is_file())[:3]:
            before = victim.stat()
            content = victim.read_bytes()
            victim.write_bytes(bytes(b ^ 0xFF for b in content))  # same size
            os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
            assert victim.stat().st_mtime_ns == before.st_mtime_ns

    def change_top_level(data: Path) -> None:
        config = data / "homeserver.yaml"
        before = config.stat()
        text = config.read_bytes()
        config.write_bytes(text.replace(b"report_stats: false", b"report_stats: FALSE"))
        os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
        key = data / "demo.example.signing.key"
        before = key.stat()
        key.write_bytes(key.read_bytes().upper())
        os.utime(key, ns=(before.st_atime_ns, before.st_mtime_ns))

    run_chain(configured, [change, change_top_level])


def test_mtime_set_to_the_past_and_future(configured: Harness) -> None:
    """Files written with an mtime far in the past, or in the future."""

    def past(data: Path) -> None:
        _write(_content(data) / "tm/old", b"claims 1990")
        os.utime(_content(data) / "tm/old", (631152000, 631152000))
        victim = sorted(p for p in _content(data).rglob("*") if p.is_file())[5]
        victim.write_bytes(b"rewritten, mtime to 2001")
        os.utime(victim, (1000000000, 1000000000))

    def future(data: Path) -> None:
        _write(_content(data) / "tm/future", b"claims 2100")
        os.utime(_content(data) / "tm/future", (4102444800, 4102444800))

    def after_future(data: Path) -> None:
        (_content(data) / "tm/future").write_bytes(b"changed again, same future mtime")
        os.utime(_content(data) / "tm/future", (4102444800, 4102444800))

    run_chain(configured, [past, future, after_future])


def test_only_mode_changes(configured: Harness) -> None:
    """Only the permission bits of a file, a directory and a top-level file change."""

    def change(data: Path) -> None:
        files = sorted(p for p in _content(data).rglob("*") if p.is_file())
        files[0].chmod(0o644)
        files[1].chmod(0o400)
        directory = sorted(p for p in _content(data).rglob("*") if p.is_dir())[0]
        directory.chmod(0o750)
        (data / "homeserver.yaml").chmod(0o600)

    def change_again(data: Path) -> None:
        files = sorted(p for p in _content(data).rglob("*") if p.is_file())
        files[0].chmod(0o600)
        directory = sorted(p for p in _content(data).rglob("*") if p.is_dir())[0]
        directory.chmod(0o700)

    run_chain(configured, [change, change_again])


# ---------------------------------------------------------------- names

_ODD_NAMES = [
    b"with space",
    b"  leading and trailing  ",
    b"new\nline",
    b"back\\slash",
    b"back\\nslash-n",  # a backslash then n: must not become a newline
    b"-leading-dash",
    b"--add-file=x",
    b"--listed-incremental=y",
    b"non-utf8-\xff\xfe",
    b"tab\there",
    b"star*and?glob[1]",
    b"quote'double\"",
    b"$(echo pwned)",
    b"tar: Deleting lookalike",
    b"\xc3\xa9t\xc3\xa9",
]


def test_odd_names(configured: Harness) -> None:
    """Names with spaces, newlines, backslashes, dashes, non-UTF-8 bytes, added and removed."""
    base = b"media_store/local_content/odd"

    def add(data: Path) -> None:
        top = os.path.join(os.fsencode(data), base)
        for name in _ODD_NAMES:
            _write(os.path.join(top, name), b"content of " + name)
        _write(os.path.join(top, b"dir \n\\ \xff", b"inner \xfe"), b"nested odd")

    def modify_and_rename(data: Path) -> None:
        top = os.path.join(os.fsencode(data), base)
        for name in _ODD_NAMES[::2]:
            _write(os.path.join(top, name), b"changed " + name)
        for name in _ODD_NAMES[1::2]:
            os.rename(os.path.join(top, name), os.path.join(top, name + b".renamed\n"))
        # A new odd directory (renaming one is test_directory_renamed_keeps_its_files).
        _write(os.path.join(top, b"-dir\\n\xfe", b"inner \xfe"), b"nested odd 2")

    def remove(data: Path) -> None:
        top = os.path.join(os.fsencode(data), base)
        for name in _ODD_NAMES[::2]:
            os.unlink(os.path.join(top, name))
        shutil.rmtree(os.path.join(top, b"dir \n\\ \xff"))

    run_chain(configured, [add, modify_and_rename, remove])


# ---------------------------------------------------------------- sparse


def test_sparse_file(configured: Harness) -> None:
    """A sparse file, then data written into its hole."""

    def create(data: Path) -> None:
        path = _content(data) / "sp/sparse"
        _write(path, b"")
        with open(path, "r+b") as file:
            file.write(b"start")
            file.seek(20 * 1024 * 1024)
            file.write(b"middle")
            file.seek(40 * 1024 * 1024)
            file.write(b"end")

    def fill(data: Path) -> None:
        with open(_content(data) / "sp/sparse", "r+b") as file:
            file.seek(10 * 1024 * 1024)
            file.write(os.urandom(4096))

    def extend_hole(data: Path) -> None:
        os.truncate(_content(data) / "sp/sparse", 64 * 1024 * 1024)  # a trailing hole

    run_chain(configured, [create, fill, extend_hole])
    sparse = _content(_data(configured)) / "sp/sparse"
    assert sparse.stat().st_blocks * 512 < 8 * 1024 * 1024, "the restored file is not sparse"


# ---------------------------------------------------------------- deletions, renames


def test_directory_deleted_and_recreated(configured: Harness) -> None:
    """A directory removed and made again with other content (its inode may be reused)."""
    inodes = []

    def prepare(data: Path) -> None:
        for n in range(5):
            _write(_content(data) / f"rc/dir/f{n}", f"first {n}".encode())
        _write(_content(data) / "rc/dir/sub/s", b"sub")
        inodes.append((_content(data) / "rc/dir").stat().st_ino)

    def recreate(data: Path) -> None:
        shutil.rmtree(_content(data) / "rc/dir")
        _mkdir(_content(data) / "rc/dir")
        inodes.append((_content(data) / "rc/dir").stat().st_ino)
        _write(_content(data) / "rc/dir/f0", b"second 0")  # same name, new content
        _write(_content(data) / "rc/dir/g1", b"second 1")
        _write(_content(data) / "rc/dir/sub", b"sub is a file now")

    def recreate_with_moved_old_files(data: Path) -> None:
        # Files from elsewhere in the backup, moved in with their old mtimes.
        shutil.rmtree(_content(data) / "rc/dir")
        _mkdir(_content(data) / "rc/dir")
        for n, media in enumerate(sorted(p for p in _content(data).rglob("*")
                                         if p.is_file() and "rc" not in p.parts)[:3]):  # fmt: skip
            media.rename(_content(data) / f"rc/dir/moved{n}")

    run_chain(configured, [prepare, recreate, recreate_with_moved_old_files], maybe_full={2, 3})
    print("inodes of rc/dir:", inodes)


def test_many_renames_in_one_step(configured: Harness) -> None:
    """Swaps and rotations of directories and files, nested renames, moves across.

    Both steps rename directories: both backups are full ones.
    """

    def prepare(data: Path) -> None:
        for d in ("a", "b", "c"):
            for n in range(3):
                _write(_content(data) / f"rn/{d}/{n}", f"{d}{n}".encode())
            _write(_content(data) / f"rn/{d}/deep/x", f"{d}-deep".encode())
        _write(_content(data) / "rn/f1", b"f1")
        _write(_content(data) / "rn/f2", b"f2")

    def shuffle(data: Path) -> None:
        rn = _content(data) / "rn"
        (rn / "a").rename(rn / "tmp")  # rotate a -> b -> c -> a
        (rn / "c").rename(rn / "a")
        (rn / "b").rename(rn / "c")
        (rn / "tmp").rename(rn / "b")
        (rn / "f1").rename(rn / "tmpf")  # swap two files
        (rn / "f2").rename(rn / "f1")
        (rn / "tmpf").rename(rn / "f2")
        (rn / "a/deep").rename(rn / "b/deeper")  # a directory moved into another
        (rn / "c/0").rename(rn / "a/from-c")  # a file moved across
        _write(rn / "c/deep/new", b"new in a renamed directory")

    def nest(data: Path) -> None:
        rn = _content(data) / "rn"
        (rn / "a").rename(rn / "x")
        _mkdir(rn / "a")
        (rn / "x").rename(rn / "a/x")  # renamed into a new directory of its old name
        (rn / "b/deeper").rename(rn / "top-deeper")
        # Move a whole media shard into the renamed tree.
        shard = sorted(p for p in _content(data).iterdir() if p.is_dir() and p.name != "rn")[0]
        shard.rename(rn / "a/x/shard")

    run_chain(configured, [prepare, shuffle, nest], full_at={2, 3})


def test_a_directory_tar_leaves_out_after_a_rename(configured: Harness) -> None:
    """A live directory GNU tar 1.34 leaves out after "renamed from": a full backup instead.

    When 'ab' is purged and a new 'aa' gets its inode, tar takes 'aa' for 'ab'
    renamed, keeps the name 'ab/cd' for what is now 'aa/cd' in its table, and
    skips the new 'ab/cd' it then meets. 'aa' holds only new files, so the
    rename check alone found nothing lost, and the incremental backup was
    kept without 'ab/cd'. The check after tar finds the directory missing
    from tar's index: the backup is a full one, and every point restores.
    """

    def prepare(data: Path) -> None:
        _write(_content(data) / "lo/ab/cd/f", b"old")

    def reuse(data: Path) -> None:
        lo = _content(data) / "lo"
        (lo / "ab").rename(lo / "aa")  # what tar sees of a purge and an inode reused
        shutil.rmtree(lo / "aa" / "cd")
        _write(lo / "aa/upload", b"new")
        _write(lo / "ab/cd/upload", b"new")
        time.sleep(1.2)  # older than the backup's start: not made while tar read

    run_chain(configured, [prepare, reuse], full_at={2})


def test_middle_point_has_no_later_files(configured: Harness) -> None:
    """Restoring a middle point after the newest: nothing created later remains."""
    harness = configured
    data = _data(harness)

    def first(data: Path) -> None:
        _write(_content(data) / "mid/one", b"one")

    def second(data: Path) -> None:
        _write(_content(data) / "mid/two", b"two")
        _write(_content(data) / "later-shard/file", b"later")
        _write(data / "media_store/local_thumbnails/later/t", b"later thumb")

    points = run_chain(harness, [first, second], restore_order=[2, 1])
    assert not (_content(data) / "mid/two").exists()
    assert not (_content(data) / "later-shard").exists()
    assert points[1][1] == snapshot(data)


# ---------------------------------------------------------------- top-level paths


def test_removed_media_directory_is_not_resurrected(configured: Harness) -> None:
    """A local_* directory removed before an incremental backup stays absent in its restore.

    The media directories are named to tar one by one: no directory list
    records that local_thumbnails went away. If the live data has it again at
    restore time, the restore must still give the point's tree (without it).
    """
    harness = configured
    data = _data(harness)
    full = _backup(harness, type="full")
    thumbnails = data / "media_store/local_thumbnails"
    shutil.rmtree(thumbnails)
    incremental = _backup(harness)
    assert incremental["type"] == "incremental"
    expected = snapshot(data)
    assert not any(name.startswith(b"media_store/local_thumbnails") for name in expected)

    _write(thumbnails / "aa/bb/recent", b"made after the backup")  # Synapse made it again

    harness.run_action("restore-backup", {"backup-id": incremental["backup-id"]})
    actual = snapshot(data)
    assert actual == expected, describe_difference(expected, actual)
    del full


def test_removed_top_level_file_is_not_resurrected(configured: Harness) -> None:
    """A *.yaml file removed before an incremental backup stays absent in its restore."""
    harness = configured
    data = _data(harness)
    _write(data / "extra.yaml", b"extra: old\n")
    _backup(harness, type="full")
    (data / "extra.yaml").unlink()
    incremental = _backup(harness)
    assert incremental["type"] == "incremental"
    expected = snapshot(data)

    _write(data / "extra.yaml", b"extra: recreated after the backup\n")

    harness.run_action("restore-backup", {"backup-id": incremental["backup-id"]})
    actual = snapshot(data)
    assert actual == expected, describe_difference(expected, actual)


def test_removed_appservice_file_is_not_resurrected(configured: Harness) -> None:
    """An appservice registration removed before an incremental backup stays absent."""
    harness = configured
    data = _data(harness)
    _backup(harness, type="full")
    (data / "appservices/bridge.yaml").unlink()
    incremental = _backup(harness)
    expected = snapshot(data)
    _write(data / "appservices/bridge.yaml", b"id: bridge\nurl: http://new-bridge:9000\n")

    harness.run_action("restore-backup", {"backup-id": incremental["backup-id"]})
    actual = snapshot(data)
    assert actual == expected, describe_difference(expected, actual)


# ---------------------------------------------------------------- after a restore


def test_chain_continued_after_restore_with_inode_reuse(configured: Harness) -> None:
    """Restore the newest, continue the chain with changes, restore again.

    The restored directories have new inodes, which may be numbers the
    parent's snapshot state knew for other directories.
    """
    harness = configured
    data = _data(harness)
    for n in range(30):
        _write(_content(data) / f"ir/d{n:02d}/file", f"dir {n}".encode())
    full = _backup(harness, type="full")
    shutil.rmtree(_content(data) / "ir/d00")  # frees inodes for reuse
    for n in range(1, 30, 3):
        _write(_content(data) / f"ir/d{n:02d}/file", f"dir {n} changed".encode())
    first = _backup(harness)
    assert first["parent"] == full["backup-id"]
    expected_first = snapshot(data)

    harness.run_action("restore-backup", {"backup-id": first["backup-id"]})
    actual = snapshot(data)
    assert actual == expected_first, describe_difference(expected_first, actual)

    for n in range(2, 30, 4):
        shutil.rmtree(_content(data) / f"ir/d{n:02d}")
    for n in range(40, 50):
        _write(_content(data) / f"ir/d{n:02d}/file", f"new dir {n}".encode())
    (_content(data) / "ir/d05").rename(_content(data) / "ir/renamed05")
    # Since the restore every directory has a new inode: tar takes renamed05 for
    # a new directory and archives all of it, so the backup stays incremental,
    # unless a new directory got an inode the state knew for another one and
    # tar left a live directory out: then it is a full one.
    second = _backup(harness)
    assert (second["type"], second["parent"]) in {
        ("incremental", first["backup-id"]),
        ("full", "none"),
    }, second
    expected_second = snapshot(data)
    third_change = _content(data) / "ir/d07/file"
    third_change.write_bytes(b"third")
    third = _backup(harness)
    assert (third["type"], third["parent"]) == ("incremental", second["backup-id"])
    expected_third = snapshot(data)

    for backup_id, expected in [
        (second["backup-id"], expected_second),
        (third["backup-id"], expected_third),
        (first["backup-id"], expected_first),
        (second["backup-id"], expected_second),
    ]:
        harness.run_action("restore-backup", {"backup-id": backup_id})
        actual = snapshot(data)
        assert actual == expected, f"{backup_id}:\n" + describe_difference(expected, actual)


def test_swapped_directory_names(configured: Harness) -> None:
    """Two directories swap names between backups (a rename cycle for tar).

    An incremental archive would hold no rename records (GNU tar attaches them
    to the first member in its sorted order, and drops them when it is a
    file, as here), and its restore would give each name the other's files,
    silently: the backup is a full one. Nothing of tar's is left in the live
    data.
    """
    harness = configured
    data = _data(harness)

    def prepare(data: Path) -> None:
        for d in ("a", "b"):
            _write(_content(data) / f"sw/{d}/file", d.encode())

    def swap(data: Path) -> None:
        sw = _content(data) / "sw"
        (sw / "a").rename(sw / "tmp")
        (sw / "b").rename(sw / "a")
        (sw / "tmp").rename(sw / "b")

    points = run_chain(harness, [prepare, swap], restore_order=[2, 1, 2], full_at={2})
    del points
    assert not list(data.rglob("tar.*")), "tar left temporary directories in the live data"


def test_directory_renamed_keeps_its_files(configured: Harness) -> None:
    """A media directory renamed between backups; later points still have its files.

    An incremental archive would not hold the renamed directory's files (tar
    knows the directory by inode and its files did not change), and not the
    rename either: every later point would restore it empty. The backup
    after the rename is a full one; the one after it is incremental again.
    """

    def prepare(data: Path) -> None:
        _write(_content(data) / "mv/old-name/file1", b"one")
        _write(_content(data) / "mv/old-name/sub/file2", b"two")

    def rename(data: Path) -> None:
        (_content(data) / "mv/old-name").rename(_content(data) / "mv/new-name")

    def later(data: Path) -> None:
        _write(_content(data) / "mv/unrelated", b"a later change")

    run_chain(configured, [prepare, rename, later], restore_order=[3, 2, 1], full_at={2})


def test_a_required_incremental_backup_after_a_rename_fails_and_leaves_nothing(
    configured: Harness, s3_server: SeaweedServer, bucket: str
) -> None:
    """type=incremental after a directory was renamed: a clear failure, nothing in S3.

    The charm makes a full backup instead only when the type is automatic.
    """
    harness = configured
    data = _data(harness)
    _write(_content(data) / "mv/old-name/file", b"one")
    full = _backup(harness, type="full")
    (_content(data) / "mv/old-name").rename(_content(data) / "mv/new-name")
    time.sleep(1.05)

    with pytest.raises(testing.ActionFailed) as failure:
        harness.run_action("create-backup", {"type": "incremental"})

    assert (
        f"a directory was renamed since {full['backup-id']}, which an incremental backup "
        "cannot record here: make a full backup (type=full)"
    ) in failure.value.message
    names = [obj["Key"] for obj in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert all(full["backup-id"] in name for name in names), names
