"""The database copy of a backup, run for real: python3 and SQLite on a real file.

The program copies the database with VACUUM INTO unless its fingerprint is
the one the parent backup recorded, and records a fingerprint only when no
write can hide in it. These tests run it as the backup script does, without
the container (it needs nothing of it).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backup

RACY_SECONDS = 2.1  # the program trusts no fingerprint younger than two seconds


def _copy(database: Path, parent: Path | None) -> tuple[str, Path, Path]:
    """Run the copy program; return its output, the copy and the record it wrote."""
    copy = database.parent / "copy" / database.name
    copy.parent.mkdir(exist_ok=True)
    copy.unlink(missing_ok=True)
    record = database.parent / "record"
    record.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", backup._SNAPSHOT_PROGRAM, str(database), str(copy), str(record),
         str(parent) if parent else ""],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout, copy, record


def _rows(database: Path) -> list[tuple[int]]:
    connection = sqlite3.connect(database)
    try:
        return connection.execute("SELECT x FROM t ORDER BY x").fetchall()
    finally:
        connection.close()


def _insert(database: Path, value: int) -> None:
    connection = sqlite3.connect(database)
    try:
        with connection:
            connection.execute("INSERT INTO t VALUES (?)", (value,))
    finally:
        connection.close()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A WAL-mode database last written more than two seconds ago."""
    path = tmp_path / "homeserver.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE t (x INTEGER)")
    connection.execute("INSERT INTO t VALUES (1)")
    connection.commit()
    connection.close()
    time.sleep(RACY_SECONDS)
    return path


def test_unchanged_database_is_not_copied_again(database: Path, tmp_path: Path) -> None:
    """A copy and a fingerprint; with that fingerprint as the parent's, nothing is copied."""
    output, copy, record = _copy(database, None)
    assert output == ""
    assert _rows(copy) == [(1,)]
    fingerprint = record.read_text()
    assert fingerprint.startswith(f"{database} ")
    parent = tmp_path / "parent"
    parent.write_text(fingerprint)

    output, copy, record = _copy(database, parent)

    assert output == "unchanged\n"
    assert not copy.exists()
    assert record.read_text() == fingerprint  # the chain's database is still this one


def test_changed_database_is_copied(database: Path, tmp_path: Path) -> None:
    """A write since the parent's fingerprint makes a new copy, with the write in it."""
    _, _, record = _copy(database, None)
    parent = tmp_path / "parent"
    parent.write_text(record.read_text())
    _insert(database, 2)
    time.sleep(RACY_SECONDS)

    output, copy, record = _copy(database, parent)

    assert output == ""
    assert _rows(copy) == [(1,), (2,)]
    assert record.read_text() != parent.read_text()


def test_recent_write_records_no_fingerprint(database: Path, tmp_path: Path) -> None:
    """Within two seconds of a write, a later write could keep the same times: no record."""
    _insert(database, 2)

    _, copy, record = _copy(database, None)

    assert _rows(copy) == [(1,), (2,)]
    assert not record.exists()


def test_write_during_copy_records_no_fingerprint(database: Path) -> None:
    """A fingerprint that changed while copying is not recorded.

    A writer that died leaves frames in the -wal; closing the copy's connection
    checkpoints them into the database file, which changes its fingerprint.
    """
    subprocess.run(
        [sys.executable, "-c",
         "import os, sqlite3, sys\n"
         "connection = sqlite3.connect(sys.argv[1])\n"
         "connection.execute('INSERT INTO t VALUES (2)')\n"
         "connection.commit()\n"
         "os._exit(0)  # no close: the frames stay in the -wal\n",
         str(database)],
        check=True,
    )  # fmt: skip
    assert Path(f"{database}-wal").stat().st_size > 0
    time.sleep(RACY_SECONDS)

    _, copy, record = _copy(database, None)

    assert _rows(copy) == [(1,), (2,)]
    assert not record.exists()
    time.sleep(RACY_SECONDS)
    _, _, record = _copy(database, None)  # settled: now it is recorded
    assert record.exists()


def test_fingerprint_names_the_database(database: Path, tmp_path: Path) -> None:
    """Another name for the same file (same inode, size and times) is not the recorded one."""
    other = tmp_path / "other.db"
    os.link(database, other)
    time.sleep(RACY_SECONDS)  # the link changed the ctime
    _, _, record = _copy(database, None)
    parent = tmp_path / "parent"
    parent.write_text(record.read_text())
    assert _copy(database, parent)[0] == "unchanged\n"

    output, copy, _ = _copy(other, parent)

    assert output == ""
    assert copy.exists()


def test_unreadable_parent_fingerprint_means_a_copy(database: Path, tmp_path: Path) -> None:
    """A parent fingerprint that cannot be read is no reason to fail: the database is copied."""
    unreadable = tmp_path / "parent"
    unreadable.mkdir()  # open() fails on it, even for root

    output, copy, record = _copy(database, unreadable)

    assert output == ""
    assert _rows(copy) == [(1,)]
    assert record.exists()


def test_missing_database_fails_and_creates_nothing(tmp_path: Path) -> None:
    """A database gone since the charm looked fails the copy; no empty one appears.

    sqlite3.connect would otherwise create an empty database, which the backup
    would then hold instead of Synapse's.
    """
    database = tmp_path / "gone" / "homeserver.db"
    database.parent.mkdir()

    with pytest.raises(subprocess.CalledProcessError) as exc_info:
        _copy(database, None)

    assert "unable to open database file" in exc_info.value.stderr
    assert sorted(path.name for path in database.parent.iterdir()) == ["copy"]  # _copy's dir
    assert list((database.parent / "copy").iterdir()) == []


@pytest.mark.parametrize("name", ["with space", "percent%41", "question?mark", "hash#x", "a&b=c"])
def test_database_names_are_taken_literally(tmp_path: Path, name: str) -> None:
    """Characters that mean something in an SQLite URI are part of the file's name."""
    directory = tmp_path / name
    directory.mkdir()
    database = directory / "homeserver.db"
    connection = sqlite3.connect(database)
    with connection:
        connection.execute("CREATE TABLE t (x INTEGER)")
        connection.execute("INSERT INTO t VALUES (7)")
    connection.close()

    _, copy, _ = _copy(database, None)

    assert _rows(copy) == [(7,)]
