"""Backups of Synapse to S3: the public API, and the making of a backup.

A backup is made inside the workload container by one bash pipeline::

    tar --create ... | gpg --symmetric ... | python3 -c <upload program>

whose last stage hashes the archive and feeds it, 64 GiB at a time, to
``aws s3 cp - s3://bucket/key[.part-NNNN]``. All of it runs as the Synapse
user, with everything it needs in a private work directory that is removed
afterwards, whatever happened. A backup exists only once its manifest
(``<key>.manifest.json``) is written: that is the commit step, done from the
charm after the upload was checked. Whatever a failed run left in S3 is
removed.

This module builds and runs that pipeline and re-exports the rest of the
public API (``__all__``) from the modules that hold the parts:

- ``backup_store``: S3Parameters, S3Client, manifests and object names;
- ``synapse_layout``: what homeserver.yaml says is to be backed up;
- ``backup_container``: the private work directory and running scripts in
  the workload container;
- ``backup_chain``: incremental chains, the data id and the state kept in /data;
- ``backup_restore``: verify and restore.
"""

from __future__ import annotations

import datetime
import functools
import logging
import posixpath
import re
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import ops

from backup_chain import (
    DATABASE_STATE_FILE,
    RESTORED_FROM_FILE,
    SNAPSHOT_STATE_FILE,
    STATE_DIR,
    _choose_parent,
    _keep_state_after_commit,
    _parent_state,
    _read_state_value,
    data_id_for_backup,
)
from backup_container import (
    _BIGGER_PIPE,
    _COUNT_MEMBERS,
    AWS_COMMAND,
    BASH_COMMAND,
    GPG_S2K_COUNT,
    PASSPHRASE_FILE,
    S3_MAX_CONCURRENT_REQUESTS,
    SNAPSHOT_DIR_PREFIX,
    _gpg_command,
    _parse_digest,
    _relative,
    _remove_quietly,
    _script,
    _script_preamble,
    calculate_size,
    check_tools,
    get_environment,
    prepare_container,
    prepared_container,
    run_in_container,
)
from backup_restore import (
    RESTORE_JOURNAL,
    RestoreResult,
    _allowed_restore_path,
    build_restore_command,
    recover_interrupted_restore,
    restore_backup,
    run_restore,
    sweep_leftovers,
    verify_backup,
)
from backup_store import (
    ARCHIVE_PIECE_INFIX,
    BACKUP_ID_PATTERN,
    DATABASE_STATE_SUFFIX,
    MANIFEST_SUFFIX,
    MAX_ARCHIVE_PIECES,
    SNAPSHOT_STATE_SUFFIX,
    BackupError,
    BackupManifest,
    S3Client,
    S3Error,
    S3Parameters,
    archive_pieces,
    new_backup_id,
    validate_backup_key,
)
from synapse_layout import (
    BACKUP_FILE_PATTERNS,
    DATA_DIR,
    LOCAL_DIR_PATTERN,
    MEDIA_DIR,
    SYNAPSE_CONFIG_PATH,
    SynapseConfigError,
    _database_to_copy,
    get_database_path,
    get_media_dir,
    get_paths_to_backup,
    read_synapse_config,
)

# The public API: the names of the seed specification and what the charm calls;
# the parts live in the modules imported above.
__all__ = [
    "ARCHIVE_PIECE_SIZE",
    "AWS_COMMAND",
    "BACKUP_FILE_PATTERNS",
    "BACKUP_ID_PATTERN",
    "BASH_COMMAND",
    "DATA_DIR",
    "LOCAL_DIR_PATTERN",
    "MEDIA_DIR",
    "PASSPHRASE_FILE",
    "RESTORE_JOURNAL",
    "S3_MAX_CONCURRENT_REQUESTS",
    "SYNAPSE_CONFIG_PATH",
    "BackupError",
    "BackupManifest",
    "RestoreResult",
    "S3Client",
    "S3Error",
    "S3Parameters",
    "SynapseConfigError",
    "build_backup_command",
    "build_restore_command",
    "calculate_size",
    "check_tools",
    "create_backup",
    "get_database_path",
    "get_environment",
    "get_media_dir",
    "get_paths_to_backup",
    "new_backup_id",
    "prepare_container",
    "read_synapse_config",
    "recover_interrupted_restore",
    "restore_backup",
    "run_backup",
    "run_restore",
    "sweep_leftovers",
    "verify_backup",
]

logger = logging.getLogger(__name__)

# S3 allows 10,000 parts per object. For a larger stream the aws CLI doubles
# its part size, and its memory with it (about 10 parts are buffered), so an
# archive is stored in pieces that fit 10,000 parts of S3_MULTIPART_CHUNKSIZE
# (78 GiB): the first under the backup's id, the next ones as
# <id>.part-0001, <id>.part-0002...
ARCHIVE_PIECE_SIZE = 64 * 1024**3


# Uploads the encrypted stream from stdin in pieces of at most argv[2] bytes,
# hashing it on the way, and writes its SHA-256 and size to the file argv[1].
# argv[4:] is the upload command with the first piece's URL last; piece N > 0
# goes to that URL + argv[3] + N in 4 digits. A failed upload, or SIGTERM,
# kills the running aws (which would otherwise complete a cut-off piece at the
# end of its input) and fails the program.
_UPLOAD_PROGRAM = (
    _BIGGER_PIPE
    + """
import hashlib, signal, subprocess, sys
record, piece_size, infix, *upload = sys.argv[1:]
piece_size, url = int(piece_size), upload.pop()
signal.signal(signal.SIGTERM, lambda *_: sys.exit("the upload was terminated"))
def start(index):
    target = url + (f"{infix}{index:04d}" if index else "")
    piece = subprocess.Popen([*upload, target], stdin=subprocess.PIPE)
    bigger_pipe(piece.stdin.fileno())
    return piece
def finish(piece, index):
    try:
        piece.stdin.close()
    except BrokenPipeError:  # aws stopped reading before the end of its piece
        piece.wait()
        sys.exit(f"the upload of archive piece {index} stopped before its end")
    if piece.wait():
        sys.exit(f"the upload of archive piece {index} failed")
bigger_pipe(0)
digest, size, index, room = hashlib.sha256(), 0, 0, piece_size
# One buffer, read into and passed on as views: a new 1 MiB bytes object per
# read cost about 0.6 CPU-seconds per GiB more (see performance.md).
piece, source = start(0), sys.stdin.buffer.raw
buffer = memoryview(bytearray(1 << 20))
try:
    while count := source.readinto(buffer):
        view = buffer[:count]
        digest.update(view)
        size += count
        while view:
            if not room:
                finish(piece, index)
                index, room = index + 1, piece_size
                piece = start(index)
            part, view = view[:room], view[room:]
            try:
                piece.stdin.write(part)
            except BrokenPipeError:
                finish(piece, index)
                sys.exit(f"the upload of archive piece {index} stopped before its end")
            room -= len(part)
    finish(piece, index)
except BaseException:
    piece.kill()
    piece.wait()
    raise
with open(record, "w") as out:
    out.write(f"{digest.hexdigest()} {size}\\n")
"""
)


# What the backup pipeline prints instead of the digest when tar found a
# directory renamed since the parent backup (see build_backup_command).
DIRECTORY_RENAMED = "directory-renamed"
# GNU tar's warning, with or without "from <old name>" (LC_ALL=C).
_TAR_RENAME_WARNING = "Directory has been renamed"
# Tells whether an incremental archive lost files to a directory tar took for
# renamed (argv: tar's messages, a copy of the parent's snapshot state). Tar
# drops the rename records here (see build_backup_command), so a restore
# makes the new name's directory from the archive alone: it lacks every file
# tar left out as unchanged, i.e. not modified since the parent's snapshot
# time. A directory deleted and another made with its inode holds only new
# files, and loses nothing. Prints "lost" when a file may be missing, or when
# it cannot tell (a quoted name, no snapshot time); prints nothing otherwise.
# (GNU tar's incremen.c: a directory found under another name gets only its
# changed children archived, one whose inode alone changed gets all of them.)
_RENAMED_PROGRAM = r"""
import os, re, stat, sys
errors, state = sys.argv[1:]
def lost():
    print("lost")
    sys.exit()
try:
    with open(state, "rb") as source:
        header = re.match(rb"GNU tar-[^\n]*-2\n([0-9]+)\0([0-9]+)\0", source.read(256))
except OSError:
    header = None
if not header:
    lost()
since = int(header[1]) * 10**9 + int(header[2])
# Only "renamed from": tar archives all of a directory it knows by name but
# not by inode ("Directory has been renamed", without "from"), as after a restore.
renamed = re.compile(rb"tar: (.*): Directory has been renamed from .*$")
with open(errors, "rb") as source:
    for line in source:
        warning = renamed.match(line.rstrip(b"\n"))
        if not warning:
            continue
        name = b"/" + warning[1]
        if b"\\" in name or not os.path.isdir(name) or os.path.islink(name):
            lost()  # tar escaped something in the name: it cannot be read back
        for top, dirs, files in os.walk(name):
            for entry in dirs + files:
                info = os.lstat(os.path.join(top, entry))
                if not stat.S_ISDIR(info.st_mode) and info.st_mtime_ns <= since:
                    lost()
"""


# Checks, after tar, that the archive holds every directory under the
# backed-up paths (argv: tar's messages, its index, the snapshot state tar
# wrote or "", a file made on the data volume just before tar started or "",
# where to leave a finding for the script or "", tar's exit status, then the
# top-level members). Synapse keeps running
# during a backup and deletes media on its own schedule. GNU tar 1.34
# reports a file deleted under it as a warning (status 1), but a directory
# deleted while its listed-incremental scan runs as an error ("Cannot stat"
# or "Cannot open: No such file or directory", status 2); the archive and
# its state are sound then, the directory left out as if deleted before. So
# status 2 passes when there was such an error, each path it names is gone,
# or a directory again (made anew, as by an upload, and judged by the walk
# below), and is not a member, and every other message is one of tar's
# warnings; any other message, or a name tar escaped, keeps the error (exit
# 1, no message). A directory *renamed* or moved while tar reads gets the same
# messages, or only "File removed before we read it", or none (moved to a
# place tar has passed), and the archive has it under neither name. So,
# with a snapshot state, every directory under the members must have been
# archived under its own name (in tar's index, and recorded in its state
# with its inode: a directory tar read and then replaced by another has
# the other's), or be new: one that was not, and holds an entry whose
# ctime is older than tar's start (a rename leaves its entries' ctimes;
# anything made or moved in since has a newer one), fails the backup with a
# message. Directories match by inode alone, as tar matches them with
# --no-check-device (it keeps a directory's old device number in the
# state). A new directory that got a deleted one's inode holds only new
# entries, and passes. On the data volume, "tar's start" is the ctime of the
# file made before it: file times there come from the volume's clock (a
# network file server's), which may disagree with the unit's, where tar
# takes its own. Where tar warned that a directory was renamed *from*
# another name (between backups), its state may pair a name with another
# directory's inode: then the index alone counts, and a directory replaced
# under a name tar had archived goes unnoticed. And then tar itself may
# leave out a live directory (tar 1.34 keeps stale names in its table after
# a rename, and skips a directory found under one): a finding then goes to a
# file, and the script makes a full backup instead, as for a rename the
# incremental archive cannot record (_RENAMED_PROGRAM).
_TAR_READ_CHECK_PROGRAM = r"""
import bisect, heapq, itertools, os, re, stat, sys
from array import array
errors, listing, state, clock, deferred = sys.argv[1:6]
status, members = int(sys.argv[6]), [os.fsencode(name) for name in sys.argv[7:]]
if status not in (0, 1, 2):
    sys.exit(1)
with open(errors, "rb") as source:
    messages = source.read()
if status == 2:
    removed = re.compile(rb"tar: (.*): Cannot (?:stat|open): No such file or directory")
    warning = re.compile(
        rb"tar: .*: (file changed as we read it|File removed before we read it"
        rb"|Directory has been renamed( from .*)?)"
        rb"|tar: Exiting with failure status due to previous errors"
    )
    seen, again = False, []
    for line in messages.splitlines():
        error = removed.fullmatch(line)
        if error:
            name = error[1].rstrip(b"/")
            if b"\\" in name or name in members:
                sys.exit(1)
            if os.path.lexists(b"/" + name):
                again.append(name)  # made again since (an upload): the walk below judges it
            seen = True
        elif not warning.fullmatch(line):
            sys.exit(1)
    if not seen:
        sys.exit(1)
    for name in again:
        if not state or os.path.islink(b"/" + name) or not os.path.isdir(b"/" + name):
            sys.exit(1)
# (A name in tar's messages has its colons escaped: a file's name cannot pass for one.)
renamed = re.search(rb"^tar: (?:[^:\\\n]|\\.)*: Directory has been renamed from ", messages, re.M)
if not state:
    sys.exit(0)
def fail(problem):
    message = f"{problem} while tar read the data: run the backup again"
    if renamed and deferred:  # the script decides after its rename check
        with open(deferred, "w") as file:
            file.write(message + "\n")
        sys.exit(0)
    sys.exit(message)
# GNU tar's snapshot format 2: a header line, the snapshot time (s, ns), then
# per directory: nfs, mtime (s, ns), device, inode, name, its entries, "", "".
# Read as a stream: a state can hold millions of names.
def fields():
    with open(state, "rb") as source:
        source.readline()
        rest = b""
        for chunk in iter(lambda: source.read(1 << 16), b""):  # a list of its fields at a time
            *done, rest = (rest + chunk).split(b"\0")
            yield from done
        yield rest
def directories():
    stream = fields()
    for _ in range(2):
        next(stream, None)
    while (head := list(itertools.islice(stream, 6))) != [b""]:  # the end: "\0\0" after the last
        if len(head) < 6:
            raise ValueError("a record cut short")
        yield int(head[4]), head[5]
        for entry in stream:
            if not entry:
                break
        else:
            raise ValueError("a record cut short")
        if next(stream, None) != b"":
            raise ValueError("a record without its end")
with open(state, "rb") as source:
    header = source.readline()
stream = fields()
try:
    # A second of margin: file times come from the kernel's coarse clock.
    since = (int(next(stream)) - 1) * 10**9 + int(next(stream))
except (StopIteration, ValueError):
    since = None
if not re.fullmatch(rb"GNU tar-[^\n]*-2\n", header) or since is None:
    fail("tar's snapshot state could not be read")
volume = since_volume = None
if clock:
    try:
        marker = os.stat(clock)
    except FileNotFoundError:
        fail(f"{clock} (the time tar started, on the data volume) went missing")
    volume, since_volume = marker.st_dev, marker.st_ctime_ns - 10**9
# What tar recorded and archived is kept as 64-bit hashes (with a key new to
# each run) in sorted arrays, 8 bytes a directory: a large server's thumbnails
# make millions of directories. At a million, the chance that two hashes
# collide, which could hide one directory, is about one in fifteen million.
# (tar's state names each directory once; were a name there twice, with two
# inodes, either would do.)
def sorted_hashes(values):
    runs, run = [], array("q")
    for value in values:
        run.append(value)
        if len(run) == 1 << 16:  # sorted a run at a time: a list of a run's ints at most
            runs.append(array("q", sorted(run)))
            run = array("q")
    runs.append(array("q", sorted(run)))
    return array("q", heapq.merge(*runs))
def holds(hashes, value):
    at = bisect.bisect_left(hashes, value)
    return at < len(hashes) and hashes[at] == value
try:
    # A name with its inode, as one hash: the same name with another inode differs.
    recorded = sorted_hashes(hash((name, inode)) for inode, name in directories())
except ValueError:
    fail("tar's snapshot state could not be read")
# The directories tar archived: in its index, one name per line, escaped
# (--quoting-style=escape), with a "/" at the end.
escapes = dict(zip(b"abfnrtv\\", b"\a\b\f\n\r\t\v\\"))
def unescape(match):
    if match[1]:
        return bytes([int(match[1], 8)])
    if match[2][0] not in escapes:
        fail("tar's index could not be read")
    return bytes([escapes[match[2][0]]])
def index_names():
    with open(listing, "rb") as source:
        for line in source:
            if line.endswith(b"/\n"):
                yield re.sub(rb"\\(?:([0-3][0-7]{2})|(.))", unescape, line[:-2], flags=re.S)
archived = sorted_hashes(hash(name) for name in index_names())
made_again = {hash(name) for name in (again if status == 2 else ())}
def entries(path):
    try:
        with os.scandir(b"/" + path) as found:
            return list(found)
    except FileNotFoundError:  # deleted since tar read it
        return []
def older(entry):
    try:
        info = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return False
    return info.st_ctime_ns < (since_volume if info.st_dev == volume else since)
todo = list(members)
while todo:
    path = todo.pop()
    try:
        info = os.lstat(b"/" + path)
    except FileNotFoundError:
        continue
    if not stat.S_ISDIR(info.st_mode):
        continue
    inside = entries(path)
    # Where tar warned of a directory renamed from another name, its state may
    # record a name with another directory's inode: the index alone counts.
    key = hash(path)
    known = (key not in made_again and holds(archived, key)
             and (renamed or holds(recorded, hash((path, info.st_ino)))))
    if not known and any(older(entry) for entry in inside):
        others = [name for inode, name in directories() if inode == info.st_ino and name != path]
        if not renamed and others:
            fail(f"tar met a directory under two names ({os.fsdecode(others[-1])!r} "
                 f"is now {os.fsdecode(path)!r})")
        fail(f"a directory was moved to {os.fsdecode(path)!r}")
    todo += [path + b"/" + entry.name for entry in inside if entry.is_dir(follow_symlinks=False)]
"""

# Copies a live SQLite database consistently while Synapse writes to it, unless
# it has not changed since the parent backup. argv: the database, the copy,
# where to record its fingerprint, and the parent's recorded fingerprint (or
# ""). The fingerprint (device, inode, size, mtime and ctime of the database
# and its -wal, in ns) is recorded only when it is the same before and after
# the copy and older than two seconds, so that no write can hide in it (the
# "racy clean" rule of git). Prints "unchanged" when it copied nothing.
_SNAPSHOT_PROGRAM = """
import os, sqlite3, sys, time, urllib.parse
database, copy, record, parent = sys.argv[1:5]
def fingerprint():
    parts = [database]
    for path in (database, database + "-wal"):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            parts.append("-")
            continue
        if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < 2_000_000_000:
            return None
        parts.append(f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}"
                     f":{stat.st_mtime_ns}:{stat.st_ctime_ns}")
    return " ".join(parts)
before = fingerprint()
recorded = None
try:
    with open(parent) as file:
        recorded = file.read()
except OSError:  # none (""), or unreadable: copy
    pass
if before is not None and before == recorded:
    with open(record, "w") as file:
        file.write(before)
    print("unchanged")
    sys.exit(0)
# mode=rw: a database that vanished since the charm looked is an error, not a new empty one
uri = "file:" + urllib.parse.quote(database) + "?mode=rw"
connection = sqlite3.connect(uri, uri=True, timeout=60)
try:
    connection.execute("VACUUM INTO ?", (copy,))
finally:
    connection.close()
if before is not None and before == fingerprint():
    with open(record, "w") as file:
        file.write(before)
"""


def _database_copy_dir(backup_key: str) -> str:
    """Return where a backup copies the database: on the data volume, where sweeps look.

    Args:
        backup_key: the backup.

    Returns:
        The directory.
    """
    return f"{DATA_DIR}/{SNAPSHOT_DIR_PREFIX}{backup_key}"


def _sed_literal(text: str) -> str:
    """Escape a text for a POSIX basic regular expression delimited by commas.

    Args:
        text: the text.

    Returns:
        A regex matching exactly the text.
    """
    return re.sub(r"([\\.\[\]*^$,])", r"\\\1", text)


def _sed_replacement(text: str) -> str:
    """Escape a text for the replacement of a comma-delimited sed expression.

    Args:
        text: the text.

    Returns:
        The replacement producing exactly the text.
    """
    return re.sub(r"([\\&,])", r"\\\1", text)


def _database_copy_lines(
    database_path: str, backup_key: str, work_dir: str, database_state: str | None
) -> tuple[list[Sequence[str] | str], str, str]:
    """Return the backup script's lines that copy the database before tar runs.

    They copy it (unless unchanged since the parent) and set the array
    ``database`` to tar's words for the copy (empty when not copied). The
    script makes a file beside the copy just before tar starts: its ctime is
    tar's start by the data volume's clock (check_tar_read).

    Args:
        database_path: the SQLite database.
        backup_key: the backup being made.
        work_dir: the private work directory.
        database_state: the parent's database fingerprint file, if any.

    Returns:
        The lines, the copy's member name (relative to /), and that file.
    """
    database_member = _relative(database_path)
    snapshot_dir = _database_copy_dir(backup_key)
    database_copy = posixpath.join(snapshot_dir, database_member)
    record = posixpath.join(work_dir, DATABASE_STATE_FILE)
    copy = ["python3", "-c", _SNAPSHOT_PROGRAM, database_path, database_copy, record]
    copy.append(database_state or "")
    # Tar allows one -C with --listed-incremental: the copy is added from /
    # and renamed to the database's own name in the archive.
    copy_member = _relative(database_copy)
    clock_file = posixpath.join(snapshot_dir, "tar-started")
    transform = f"s,^{_sed_literal(copy_member)}$,{_sed_replacement(database_member)},"
    lines: list[Sequence[str] | str] = [
        "SNAPSHOT_DIR=" + shlex.quote(snapshot_dir),
        ["rm", "-rf", "--", snapshot_dir],  # its copy's existence means "copied"
        ["mkdir", "-p", "--", posixpath.dirname(database_copy)],
        copy,
        "database=()  # stays empty when the database has not changed since the parent",
        "if [ -e " + shlex.quote(database_copy) + " ]; then",
        ["chmod", f"--reference={database_path}", "--", database_copy],
        ["touch", f"--reference={database_path}", "--", database_copy],
        "database=(" + _script([[f"--transform={transform}", "--add-file=" + copy_member]]) + ")",
        "fi",
    ]
    return lines, copy_member, clock_file


def build_backup_command(
    s3_parameters: S3Parameters,
    backup_key: str,
    backup_paths: Iterable[str],
    passphrase_file: str,
    expected_size: int = 10000000000,
    *,
    database_path: str | None = None,
    work_dir: str | None = None,
    snapshot_file: str | None = None,
    database_state: str | None = None,
    piece_size: int = ARCHIVE_PIECE_SIZE,
) -> list[str]:
    """Build the command to execute the backup.

    The command is ``bash -c SCRIPT``; every word of the script is quoted with
    shlex.quote. It copies the SQLite database with ``VACUUM INTO`` (if any,
    and unless it has not changed since the parent),
    streams ``tar | gpg | upload``, where upload hashes the stream and feeds
    it to ``aws s3 cp``, one process per piece of ``piece_size`` bytes, and
    prints ``<sha256> <size> <members>`` of the whole archive on its last
    line of output.

    Args:
        s3_parameters: S3 parameters.
        backup_key: The name of the object to back up.
        backup_paths: List of paths to back up.
        passphrase_file: Passphrase to use to encrypt the backup file.
        expected_size: expected size of the backup, so AWS S3 Client can calculate
            a reasonable size for the upload parts.
        database_path: the SQLite database to copy consistently into the backup.
        work_dir: the private work directory for temporary files (default:
            the directory of the passphrase file).
        snapshot_file: GNU tar's listed-incremental state: missing for a
            full backup, the parent's state (a copy) for an incremental one.
            Tar updates it; it is then uploaded, encrypted, as
            ``<backup_key>.snar.gpg``.
        database_state: for an incremental backup, the database's fingerprint
            recorded by the parent (a file that may be missing). It leaves
            out a database that has not changed since; a restore then keeps
            the parent's copy. The new fingerprint goes to
            ``database.state`` in the work directory.
        piece_size: the largest object the archive is stored in; larger
            archives are stored in pieces (see archive_pieces).

    Returns:
        The backup command to execute.

    Raises:
        BackupError: if a path or the key is not acceptable.
    """
    validate_backup_key(backup_key)
    if piece_size < 1:
        raise BackupError(f"the archive's piece size must be positive, not {piece_size}")
    work_dir = work_dir or posixpath.dirname(passphrase_file)
    digest_file = posixpath.join(work_dir, "digest")
    index_file = posixpath.join(work_dir, "index")
    tar_errors = posixpath.join(work_dir, "tar-errors")
    members = [_relative(path) for path in backup_paths]
    tar = [
        "tar",
        "--create",
        "--file=-",
        "--format=posix",
        "--sparse",
        "--numeric-owner",
        "--verbose",
        f"--index-file={index_file}",
        "--quoting-style=escape",
        "--directory=/",
    ]
    parent_state = posixpath.join(work_dir, "parent-state")
    if snapshot_file:
        tar += [f"--listed-incremental={snapshot_file}", "--no-check-device"]
        tar += ["--warning=no-new-dir"]
    tar.append("--no-unquote")  # names are literal: a backslash is not an escape
    tar += [f"--add-file={member}" for member in members]
    lines = _script_preamble(work_dir)
    if snapshot_file:  # tar rewrites it: its snapshot time is read after tar
        lines.append(
            "if [ -e " + shlex.quote(snapshot_file) + " ]; then "
            + _script([["cp", "--", snapshot_file, parent_state]]) + "; fi"
        )  # fmt: skip
    database_members = copy_member = clock_file = ""
    if database_path:
        database_lines, copy_member, clock_file = _database_copy_lines(
            database_path, backup_key, work_dir, database_state
        )
        lines += database_lines
        database_members = ' ${database[@]+"${database[@]}"}'
    aws = [
        AWS_COMMAND,
        "s3",
        "cp",
        "--only-show-errors",
        "--no-progress",
        "--expected-size",
        str(int(min(expected_size, piece_size))),
        "-",
        s3_parameters.object_url(backup_key),
    ]
    gpg = _gpg_command(
        passphrase_file,
        "--symmetric",
        "--cipher-algo",
        "AES256",
        "--compress-algo",
        "none",
        # Given, not calibrated: calibration by a new gpg-agent (every run has
        # its own GNUPGHOME) took 1.2 s here, and picked a larger count that
        # OpenPGP caps at this one anyway.
        "--s2k-digest-algo",
        "SHA512",
        "--s2k-count",
        str(GPG_S2K_COUNT),
        "--output",
        "-",
    )
    # The database's copy gone is a missing database, not a purge.
    checked = [*members, copy_member] if database_path else members
    check = ["python3", "-c", _TAR_READ_CHECK_PROGRAM, tar_errors, index_file]
    deferred = posixpath.join(work_dir, "tar-read-deferred") if snapshot_file else ""
    check += [snapshot_file or "", clock_file, deferred]
    check_call = _script([check]) + ' "$1" ' + _script([checked])  # $1: tar's exit status
    lines += ["check_tar_read() {", check_call, "}"]
    if deferred:  # left by an earlier run in this work directory
        lines.append(["rm", "-f", "--", deferred])
    if clock_file:  # its ctime is tar's start by the data volume's clock
        lines.append(["touch", "--", clock_file])
    upload = ["python3", "-c", _UPLOAD_PROGRAM, digest_file, str(int(piece_size))]
    upload += [ARCHIVE_PIECE_INFIX, *aws]
    lines += [
        " | ".join(
            [
                # Exit 1 is "some files changed while read" (a busy server),
                # 2 only from directories deleted while read is the same; tar
                # must also have met every directory under its own name
                # (_TAR_READ_CHECK_PROGRAM). Anything else fails the backup.
                "{ "
                + _script([tar])
                + database_members
                + " 2>"
                + shlex.quote(tar_errors)
                + ' || tar_status=$?; check_tar_read "${tar_status:-0}" || { cat -- '
                + shlex.quote(tar_errors)
                + ' >&2; exit "${tar_status:-1}"; }; }',
                _script([gpg]),
                _script([upload]),
            ]
        ),
    ]
    lines.append(_script([["cat", "--", tar_errors]]) + " >&2")  # its warnings, as before
    if snapshot_file:
        # GNU tar (1.34) attaches the records of renamed directories to the
        # first name it was given, in its sorted order, and drops them when
        # that is a file, as here (homeserver.yaml sorts before media_store): the
        # archive would restore a renamed directory without its unchanged
        # files, or swapped with another. When tar warned of one, and such
        # files exist (_RENAMED_PROGRAM), the script tells run_backup to make
        # a full backup instead; nothing more of this one is uploaded.
        # (Keeping the records is no cure: tar 1.34 replays nested renames,
        # and directories whose inodes were reused, wrongly. See
        # docs/explanation/architecture.md.)
        renamed = ["python3", "-c", _RENAMED_PROGRAM, tar_errors, parent_state]
        lines += [
            "found=0",
            "grep --quiet --fixed-strings -- "
            + shlex.quote(_TAR_RENAME_WARNING)
            + " "
            + shlex.quote(tar_errors)
            + " || found=$?",
            '[ "$found" -le 1 ] || exit "$found"  # grep itself failed',
            # After such a warning tar 1.34 may also leave out a live directory
            # (its table keeps stale names): what check_tar_read found then
            # asks for a full backup too.
            'if [ "$found" -eq 0 ] && { [ -e ' + shlex.quote(deferred) + " ] || "
            '[ -n "$(' + _script([renamed]) + ')" ]; }; then',
            ["echo", DIRECTORY_RENAMED],
            "exit 0",
            "fi",
        ]
    if snapshot_file:
        state_url = s3_parameters.object_url(backup_key + SNAPSHOT_STATE_SUFFIX)
        state_gpg = [*gpg, snapshot_file]  # same options, the state file as input
        upload = [AWS_COMMAND, "s3", "cp", "--only-show-errors", "--no-progress", "-", state_url]
        lines.append(_script([state_gpg]) + " | " + _script([upload]))
    lines += [
        "read -r sha256 size < " + shlex.quote(digest_file),
        _COUNT_MEMBERS + shlex.quote(index_file) + " || true)",
        'printf "%s %s %s\\n" "$sha256" "$size" "$members"',
    ]
    return [BASH_COMMAND, "-c", _script(lines)]


def _client_for_new_backup(s3_parameters: S3Parameters, backup_key: str) -> S3Client:
    """Return an S3 client after checking the bucket and that the backup's names are free.

    Args:
        s3_parameters: S3 parameters.
        backup_key: the new backup.

    Returns:
        The client.

    Raises:
        BackupError: if the bucket cannot be used or a backup has the name.
    """
    try:
        client = S3Client(s3_parameters)
        client.check_bucket()
        # Objects and unfinished uploads: another unit may be making it right now.
        if client.backup_names(backup_key):
            raise BackupError(f"a backup named {backup_key} exists already, or is being made")
    except S3Error as exc:
        raise BackupError(str(exc)) from exc
    return client


def run_backup(
    container: ops.Container,
    s3_parameters: S3Parameters,
    backup_key: str,
    passphrase: str,
    *,
    backup_type: str = "auto",
    metadata: Mapping[str, str] | None = None,
    log: Callable[[str], None] = logger.info,
) -> BackupManifest:
    """Create and commit a backup; remove what a failure left.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters for the backup.
        backup_key: Name of the object in the backup.
        passphrase: Passphrase used to encrypt the backup.
        backup_type: "full", "incremental" (on the newest backup), or "auto":
            incremental when the newest backup has an intact chain and its
            snapshot state exists, full otherwise.
        metadata: facts recorded in the manifest (server name, versions).
        log: receives progress messages.

    Returns:
        The manifest of the committed backup.

    Raises:
        BackupError: If there was an error creating the backup.
    """
    validate_backup_key(backup_key)
    if not passphrase:
        raise BackupError("the backup passphrase is empty")
    started = time.monotonic()
    created_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    client = _client_for_new_backup(s3_parameters, backup_key)
    check_tools(container)
    data_id, new_data_id = data_id_for_backup(container)
    chain, local_state = _choose_parent(
        container, client, backup_type, log, (metadata or {}).get("deployment"),
        data_id=data_id, restored_from=_read_state_value(container, RESTORED_FROM_FILE),
    )  # fmt: skip
    paths = list(get_paths_to_backup(container))
    database_path, database_facts = _database_to_copy(container, log)
    outside = [p for p in [*paths, database_path] if p and not _allowed_restore_path(p)]
    if outside:
        raise BackupError(
            f"{outside[0]} is outside {DATA_DIR}, where a restore can put it back: "
            f"keep Synapse's files under {DATA_DIR}"
        )
    size = calculate_size(container, [*paths, *([database_path] if database_path else [])])
    piece_size = ARCHIVE_PIECE_SIZE
    committed = False
    try:
        with prepared_container(container, s3_parameters, passphrase) as work_dir:
            environment = get_environment(s3_parameters, work_dir=work_dir)
            hidden = (s3_parameters.secret_key, passphrase)
            parent = _parent_state(
                container, client, s3_parameters, chain, local=local_state, work_dir=work_dir,
                incremental_required=backup_type == "incremental", hidden=hidden, log=log,
            )  # fmt: skip

            run = functools.partial(
                _run_pipeline, container, s3_parameters, backup_key, paths=paths,
                database_path=database_path, size=size, work_dir=work_dir,
                piece_size=piece_size, environment=environment, hidden=hidden, log=log,
            )  # fmt: skip
            stdout = run(parent=parent)
            if parent and DIRECTORY_RENAMED in stdout.splitlines():
                required = backup_type == "incremental"
                _after_directory_rename(
                    container, client, backup_key, work_dir, parent, required=required, log=log
                )
                parent = None
                stdout = run(parent=parent)
            if parent and "unchanged" in stdout.splitlines():
                log(f"the database has not changed since {parent.backup_id}: not copied again")
            sha256, archive_size, file_count = _parse_digest(stdout)
            _check_uploaded(client, archive_pieces(backup_key, archive_size, piece_size))
            manifest = BackupManifest(
                backup_id=backup_key,
                created_at=created_at,
                paths=(*paths, *([database_path] if database_path else [])),
                file_count=file_count,
                size=archive_size,
                sha256=sha256,
                duration=round(time.monotonic() - started, 3),
                metadata={**(metadata or {}), **database_facts, "data-id": data_id},
                backup_type="incremental" if parent else "full",
                parent=parent.backup_id if parent else "",
                piece_size=piece_size,
            )
            if client.has_manifest(backup_key):
                raise BackupError(
                    f"another backup named {backup_key} was committed while this one was "
                    "made (two units backing up at once?): this one is not committed"
                )
            log("writing the manifest")
            client.put_text(backup_key + MANIFEST_SUFFIX, manifest.to_json())
            committed = True
            _keep_state_after_commit(
                container, backup_key, work_dir, new_data_id=data_id if new_data_id else None
            )
        return manifest
    except S3Error as exc:
        raise BackupError(str(exc)) from exc
    finally:
        if database_path:
            _remove_quietly(container, _database_copy_dir(backup_key))
        if not committed:
            _discard(client, backup_key)


def _run_pipeline(
    container: ops.Container,
    s3_parameters: S3Parameters,
    backup_key: str,
    *,
    paths: Sequence[str],
    database_path: str | None,
    size: int,
    work_dir: str,
    parent: BackupManifest | None,
    piece_size: int,
    environment: Mapping[str, str],
    hidden: Sequence[str],
    log: Callable[[str], None],
) -> str:
    """Run the backup pipeline, full or on a parent, and return its output.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters for the backup.
        backup_key: the backup being made.
        paths: the paths to back up.
        database_path: the SQLite database to copy, if any.
        size: the data's size in bytes.
        work_dir: the private work directory.
        parent: the backup to build on, or None for a full backup.
        piece_size: the largest object the archive is stored in.
        environment: the pipeline's environment.
        hidden: secrets to keep out of error messages.
        log: receives progress messages.

    Returns:
        The pipeline's standard output.

    Raises:
        BackupError: if the pipeline fails, or a full backup saw a directory
            renamed while it ran.
    """
    kind = f"incremental on {parent.backup_id}" if parent else "full"
    log(f"{kind} backup of {len(paths) + bool(database_path)} paths, about {size} bytes")
    command = build_backup_command(
        s3_parameters,
        backup_key,
        paths,
        posixpath.join(work_dir, PASSPHRASE_FILE),
        expected_size=_expected_size(size),
        database_path=database_path,
        work_dir=work_dir,
        snapshot_file=posixpath.join(work_dir, SNAPSHOT_STATE_FILE),
        database_state=(
            f"{STATE_DIR}/{parent.backup_id}{DATABASE_STATE_SUFFIX}" if parent else None
        ),
        piece_size=piece_size,
    )
    log("streaming tar | gpg | aws to " + s3_parameters.object_url(backup_key))
    output = run_in_container(
        container, command, environment, secrets_to_hide=hidden, what="the backup pipeline"
    )
    if parent is None and DIRECTORY_RENAMED in output.splitlines():
        raise BackupError(
            "tar met a directory under two names while it read the data (renamed, or "
            "deleted and made again, during the backup): run the backup again"
        )
    return output


def _after_directory_rename(
    container: ops.Container,
    client: S3Client,
    backup_key: str,
    work_dir: str,
    parent: BackupManifest,
    *,
    required: bool,
    log: Callable[[str], None],
) -> None:
    """Get ready to make a full backup after tar found a directory renamed since the parent.

    The incremental archive would restore the renamed directory empty (see
    build_backup_command): what it uploaded is removed, with the parent's
    snapshot state and database fingerprint in the work directory, so that
    tar starts afresh and the database is copied.

    Args:
        container: Synapse Container.
        client: the S3 client.
        backup_key: the backup being made.
        work_dir: the private work directory.
        parent: the backup the incremental one was made on.
        required: whether the operator asked for an incremental backup.
        log: receives progress messages.

    Raises:
        BackupError: if an incremental backup was required, or the state
            cannot be removed.
    """
    problem = (
        f"a directory was renamed since {parent.backup_id}, which an incremental backup "
        "cannot record here"
    )
    if required:
        raise BackupError(f"{problem}: make a full backup (type=full)")
    log(f"{problem}: making a full backup instead")
    _discard(client, backup_key)
    try:
        for name in (SNAPSHOT_STATE_FILE, DATABASE_STATE_FILE):
            container.remove_path(posixpath.join(work_dir, name), recursive=True)
    except ops.pebble.Error as exc:
        raise BackupError(f"cannot remove the parent's snapshot state: {exc}") from exc


def _check_uploaded(client: S3Client, pieces: Mapping[str, int]) -> None:
    """Check that S3 holds each piece of an archive with the size the pipeline wrote.

    Args:
        client: the S3 client.
        pieces: each piece's name and the bytes written into it.

    Raises:
        BackupError: if a piece is missing or of another size, or there are
            more than a manifest may name.
        S3Error: if S3 cannot be asked.
    """
    if len(pieces) > MAX_ARCHIVE_PIECES:
        piece_size = next(iter(pieces.values()))
        raise BackupError(
            f"the archive has {len(pieces)} pieces of {piece_size} bytes, "
            f"more than the {MAX_ARCHIVE_PIECES} a manifest may name"
        )
    for name, size in pieces.items():
        uploaded = client.object_size(name)
        if uploaded != size:
            raise BackupError(
                f"the uploaded object {name} has {uploaded} bytes, the pipeline wrote {size}"
            )


def _discard(client: S3Client, backup_key: str) -> None:
    """Remove what a failed backup left in S3, logging failures.

    Nothing is removed when the id has a manifest: this run did not write
    it, so another run with the same id (another unit) committed it.

    Args:
        client: the S3 client.
        backup_key: the backup that failed.
    """
    try:
        if client.has_manifest(backup_key):
            logger.error(
                "not removing the objects of the failed backup %s: another run committed "
                "a backup with that id",
                backup_key,
            )
            return
        client.delete_backup_objects(backup_key)
    except S3Error as exc:
        logger.error("could not remove the partial backup: %s", exc)


def _expected_size(size: int) -> int:
    """Return the size to announce to aws: the data plus archive overhead.

    aws derives the multipart chunk size from it; S3 allows 10,000 parts, so
    it must not be smaller than the real stream.

    Args:
        size: the size of the data on disk.

    Returns:
        A generous upper estimate of the encrypted archive's size.
    """
    return int(size * 1.25) + 64 * 1024 * 1024


def create_backup(
    container: ops.Container,
    s3_parameters: S3Parameters,
    backup_key: str,
    passphrase: str,
) -> None:
    """Create a backup for Synapse running it in the workload.

    Args:
        container: Synapse Container
        s3_parameters: S3 parameters for the backup.
        backup_key: Name of the object in the backup.
        passphrase: Passphrase use to encrypt the backup.

    Raises:
        BackupError: If there was an error creating the backup.
    """
    run_backup(container, s3_parameters, backup_key, passphrase)
