"""Pure functions of the backup lifecycle: no ops, no Pebble, no S3.

BackupManifest's JSON form, ArchiveCheck, format_backups, build_restore_command
and _allowed_restore_path. The restore script is also run by bash with real tar
and stubbed aws and gpg; the real aws CLI and gpg are tested in tests/workload.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
from typing import Any

import pytest

import backup
import backup_container
import backup_restore
import backup_store
from backup_observer import FORMATTED_ROWS, format_backups

ACCESS_KEY = "AKIARESTOREPURETEST"
SECRET_KEY = "restore-pure-secret-key-8e41"
PASSPHRASE = "restore-pure-passphrase-c3d9"
WORK_DIR = "/tmp/synapse-backup-fedcba9876543210"
PASSPHRASE_FILE = f"{WORK_DIR}/passphrase"
BACKUP_ID = "20250102T030405Z"
STAGING_DIR = f"/data/.synapse-restore-{BACKUP_ID}-0a1b2c3d"
SHA256 = "ab" * 32


def _params(**changes: str) -> backup.S3Parameters:
    return backup.S3Parameters.model_validate(
        {
            "access-key": ACCESS_KEY,
            "secret-key": SECRET_KEY,
            "bucket": "synapse-backups",
            "endpoint": "https://s3.example.com",
            **changes,
        }
    )


def _manifest(**changes: Any) -> backup.BackupManifest:
    values: dict[str, Any] = {
        "backup_id": BACKUP_ID,
        "created_at": "2025-01-02T03:04:05+00:00",
        "paths": ("/data/homeserver.yaml", "/data/media_store/local_content"),
        "file_count": 6,
        "size": 1234,
        "sha256": SHA256,
        "duration": 2.5,
        "metadata": {"server-name": "example.com", "synapse-version": "1.120.2"},
    }
    values.update(changes)
    return backup.BackupManifest(**values)


# --- BackupManifest -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param(_manifest(), id="with-metadata"),
        pytest.param(_manifest(metadata={}), id="no-metadata"),
        pytest.param(_manifest(paths=()), id="no-paths"),
        pytest.param(_manifest(duration=0.0, size=0, file_count=0), id="zeros"),
        pytest.param(_manifest(paths=('/data/it\'s a "name"\n.yaml',)), id="hostile-path"),
    ],
)
def test_manifest_round_trip(manifest: backup.BackupManifest):
    """from_json(to_json(m)) == m, from text or bytes."""
    text = manifest.to_json()

    assert backup.BackupManifest.from_json(text) == manifest
    assert backup.BackupManifest.from_json(text.encode()) == manifest


def test_manifest_from_json_defaults_and_extra_keys():
    """Missing duration and version take defaults; unknown keys become metadata strings."""
    document = {
        "backup-id": BACKUP_ID,
        "created-at": "2025-01-02T03:04:05+00:00",
        "paths": ["/data/homeserver.yaml"],
        "file-count": "3",
        "size": 10,
        "sha256": SHA256,
        "server-name": "example.com",
        "answer": 42,
    }

    manifest = backup.BackupManifest.from_json(json.dumps(document))

    assert manifest.duration == 0.0
    assert manifest.version == backup_store.MANIFEST_VERSION
    assert manifest.file_count == 3
    assert manifest.paths == ("/data/homeserver.yaml",)
    assert manifest.metadata == {"server-name": "example.com", "answer": "42"}


def test_manifest_piece_size_round_trip():
    """A manifest of an archive in pieces keeps its piece size; an old one has none."""
    manifest = _manifest(size=2500, piece_size=1000)

    document = json.loads(manifest.to_json())
    assert document["piece-size"] == 1000
    assert backup.BackupManifest.from_json(manifest.to_json()) == manifest
    assert manifest.pieces() == {
        BACKUP_ID: 1000,
        f"{BACKUP_ID}.part-0001": 1000,
        f"{BACKUP_ID}.part-0002": 500,
    }
    assert "piece-size" not in json.loads(_manifest().to_json())
    assert _manifest(size=2500).pieces() == {BACKUP_ID: 2500}


@pytest.mark.parametrize(
    ("size", "piece_size", "expected"),
    [
        pytest.param(0, 0, [0], id="empty-one-object"),
        pytest.param(10**15, 0, [10**15], id="no-pieces"),
        pytest.param(999, 1000, [999], id="smaller-than-a-piece"),
        pytest.param(1000, 1000, [1000], id="exactly-one-piece"),
        pytest.param(1001, 1000, [1000, 1], id="one-byte-more"),
        pytest.param(3000, 1000, [1000, 1000, 1000], id="exact-multiple"),
    ],
)
def test_archive_pieces(size: int, piece_size: int, expected: list[int]):
    """Pieces are full but the last, which is never empty; the first keeps the id."""
    pieces = backup_store.archive_pieces(BACKUP_ID, size, piece_size)

    assert list(pieces.values()) == expected
    later = [f"{BACKUP_ID}.part-{index:04d}" for index in range(1, len(pieces))]
    assert list(pieces) == [BACKUP_ID, *later]


def _document(**changes: Any) -> str:
    document = json.loads(_manifest().to_json())
    for name, value in changes.items():
        key = name.replace("_", "-")
        if value is None:
            del document[key]
        else:
            document[key] = value
    return json.dumps(document)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(_document(backup_id=None), "'backup-id'", id="no-backup-id"),
        pytest.param(_document(created_at=None), "'created-at'", id="no-created-at"),
        pytest.param(_document(paths=None), "'paths'", id="no-paths"),
        pytest.param(_document(file_count=None), "'file-count'", id="no-file-count"),
        pytest.param(_document(size=None), "'size'", id="no-size"),
        pytest.param(_document(sha256=None), "'sha256'", id="no-sha256"),
        pytest.param(_document(size="big"), "invalid literal", id="size-not-a-number"),
        pytest.param(_document(file_count=[1]), "invalid backup manifest", id="count-a-list"),
        pytest.param(_document(paths=3), "invalid backup manifest", id="paths-a-number"),
        pytest.param(_document(duration="slow"), "could not convert", id="bad-duration"),
        pytest.param(_document(sha256="ab" * 31), "bad sha256", id="sha-too-short"),
        pytest.param(_document(sha256="AB" * 32), "bad sha256", id="sha-uppercase"),
        pytest.param(_document(sha256="zz" * 32), "bad sha256", id="sha-not-hex"),
        pytest.param(_document(sha256="ab" * 32 + "\n"), "bad sha256", id="sha-newline"),
        pytest.param(_document(size=-1), "bad size or piece size", id="negative-size"),
        pytest.param(_document(piece_size=-5), "bad size or piece size", id="negative-piece"),
        pytest.param(
            _document(size=10**12, piece_size=1), "bad size or piece size", id="too-many-pieces"
        ),
        pytest.param(_document(piece_size="big"), "invalid literal", id="piece-not-a-number"),
        pytest.param("not json", "invalid backup manifest", id="not-json"),
        pytest.param("", "invalid backup manifest", id="empty"),
        pytest.param(b"\xff\xfe\x00", "invalid backup manifest", id="not-utf8"),
        pytest.param("[]", "invalid backup manifest", id="a-list"),
        pytest.param("null", "invalid backup manifest", id="null"),
        pytest.param('"text"', "invalid backup manifest", id="a-string"),
    ],
)
def test_manifest_from_json_invalid(text: str | bytes, message: str):
    """Anything but a valid manifest raises BackupError("invalid backup manifest: ...")."""
    with pytest.raises(backup.BackupError) as exc_info:
        backup.BackupManifest.from_json(text)

    assert str(exc_info.value).startswith("invalid backup manifest")
    assert message in str(exc_info.value)


# --- ArchiveCheck ---------------------------------------------------------------------------


def _check(**changes: Any) -> backup_restore.ArchiveCheck:
    values: dict[str, Any] = {"sha256": SHA256, "size": 1234, "file_count": 6}
    values.update(changes)
    return backup_restore.ArchiveCheck(manifest=_manifest(), **values)


@pytest.mark.parametrize(
    ("check", "mismatch"),
    [
        pytest.param(_check(), "", id="matches"),
        pytest.param(_check(sha256="cd" * 32), "checksum differs", id="checksum"),
        pytest.param(_check(size=1233), "size 1233 instead of 1234", id="size"),
        pytest.param(_check(file_count=7), "7 files instead of 6", id="file-count"),
        pytest.param(
            _check(sha256="cd" * 32, size=0, file_count=0),
            "checksum differs, size 0 instead of 1234, 0 files instead of 6",
            id="all",
        ),
    ],
)
def test_archive_check(check: backup_restore.ArchiveCheck, mismatch: str):
    """An archive matches when checksum, size and member count are the manifest's."""
    assert check.matches is (mismatch == "")
    assert check.mismatch() == mismatch


# --- format_backups -------------------------------------------------------------------------


def test_format_backups():
    """A header and one aligned row per backup, in the given order, no trailing blanks.

    A full backup's parent shows as "-"; with nothing expiring, no note is added.
    """
    manifests = [
        _manifest(backup_id="20250301T000000Z", size=123456789, file_count=1200),
        _manifest(
            backup_id="20250201T000000Z",
            created_at="2025-02-01T00:00:00+00:00",
            size=5,
            file_count=3,
            metadata={},
        ),
    ]

    table = format_backups(manifests)

    lines = table.splitlines()
    assert [line.split() for line in lines] == [
        ["backup-id", "created-at", "size", "files", "server-name", "type", "parent"],
        [
            "20250301T000000Z",
            "2025-01-02T03:04:05+00:00",
            "123456789",
            "1200",
            "example.com",
            "full",
            "-",
        ],
        ["20250201T000000Z", "2025-02-01T00:00:00+00:00", "5", "3", "full", "-"],
    ]
    starts = [
        lines[0].index(column) for column in ("created-at", "size", "files", "type", "parent")
    ]
    for line in lines[1:]:
        for start in starts:
            assert line[start - 2 : start] == "  "
            assert line[start] != " "
    assert all(line == line.rstrip() for line in lines)


def test_format_backups_chain_and_expiring():
    """Incremental backups show their parent; those retention removes next say so."""
    manifests = [
        _manifest(
            backup_id="20250302T000000Z", backup_type="incremental", parent="20250301T000000Z"
        ),
        _manifest(backup_id="20250301T000000Z"),
        _manifest(backup_id="20250201T000000Z"),
    ]

    table = format_backups(manifests, expiring={"20250201T000000Z"})

    header, newest, full, expiring = table.splitlines()
    note = "expires after the next full backup"
    assert newest.split()[-2:] == ["incremental", "20250301T000000Z"]
    assert full.split()[-2:] == ["full", "-"]
    assert expiring.endswith(note)
    assert expiring.split()[-8:] == ["full", "-", *note.split()]
    assert note not in newest + full
    assert newest.index("20250301T000000Z") == header.index("parent")
    assert all(line == line.rstrip() for line in table.splitlines())


def test_format_backups_empty():
    """No backups: a plain sentence instead of a lonely header."""
    assert format_backups([]) == "no backups"


def _many(count: int) -> list[backup.BackupManifest]:
    """``count`` full backups, newest first, one a day from 2025-01-01."""
    first = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    days = [first + datetime.timedelta(days=day) for day in reversed(range(count))]
    return [_manifest(backup_id=backup.new_backup_id(day)) for day in days]


@pytest.mark.parametrize(
    ("count", "shown", "note"),
    [
        pytest.param(1, 1, None, id="one"),
        pytest.param(FORMATTED_ROWS, FORMATTED_ROWS, None, id="exactly-the-cap"),
        pytest.param(
            FORMATTED_ROWS + 1,
            FORMATTED_ROWS,
            "... and 1 older backups (all are in the backups result)",
            id="one-over",
        ),
        pytest.param(
            1200,
            FORMATTED_ROWS,
            "... and 1100 older backups (the newest 1000 are in the backups result)",
            id="1200",
        ),
    ],
)
def test_format_backups_caps_the_rows(count: int, shown: int, note: str | None):
    """The table shows the newest FORMATTED_ROWS backups, then says how many it left out.

    Juju passes a result as one argument: 1,200 rows were past its 128 KiB limit.
    """
    manifests = _many(count)

    lines = format_backups(manifests).splitlines()

    assert FORMATTED_ROWS == 100
    assert lines[0].split()[0] == "backup-id"
    rows = lines[1 : 1 + shown]
    assert [row.split()[0] for row in rows] == [m.backup_id for m in manifests[:shown]]
    assert lines[1 + shown :] == ([note] if note else [])


def test_format_backups_capped_table_is_small():
    """1,200 backups, every one expiring (the widest rows): the table stays well under 128 KiB.

    Its columns are as wide as the rows it shows, not as the ones it leaves out.
    """
    manifests = _many(1200)
    manifests[-1] = _manifest(
        backup_id=manifests[-1].backup_id, metadata={"server-name": "x" * 200}
    )
    expiring = {manifest.backup_id for manifest in manifests}

    table = format_backups(manifests, expiring)

    assert len(table.encode()) < 32 * 1024
    assert "x" * 200 not in table
    assert max(len(line) for line in table.splitlines()) < 200


# --- _allowed_restore_path ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        pytest.param("/data/x", True, id="data-file"),
        pytest.param("/data/homeserver.db-wal", True, id="wal"),
        pytest.param("/data/media_store/local_content", True, id="nested"),
        pytest.param("/data/x..y", True, id="dots-inside-a-name"),
        pytest.param("/etc/passwd", False, id="etc-passwd"),
        pytest.param("/data", False, id="data-itself"),
        pytest.param("/data/", False, id="data-slash"),
        pytest.param("/data/../etc", False, id="dot-dot"),
        pytest.param("/data/x/../../etc", False, id="nested-dot-dot"),
        pytest.param("/data/./x", False, id="dot"),
        pytest.param("/data//x", False, id="double-slash"),
        pytest.param("/data/x/", False, id="trailing-slash"),
        pytest.param("/datax/y", False, id="datax"),
        pytest.param("/data/.synapse-restore-x", False, id="hidden"),
        pytest.param("data/x", False, id="relative"),
        pytest.param("x", False, id="bare-name"),
        pytest.param("", False, id="empty"),
        pytest.param("/", False, id="root"),
    ],
)
def test_allowed_restore_path(path: str, allowed: bool):
    """Only normalised paths strictly inside /data may be replaced by a restore."""
    assert backup_restore._allowed_restore_path(path) is allowed


# --- build_restore_command ------------------------------------------------------------------


def _bash_syntax_ok(script: str) -> None:
    result = subprocess.run(
        ["bash", "-n", "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def _pipeline_words(script: str) -> list[list[str]]:
    """Split the aws | digest | gpg | tar pipeline of a restore script into its commands.

    The aws command starts with env(1) setting AWS_CONFIG_FILE and ends with its
    redirections (the body goes to fd 3, the pipe; its JSON summary to /dev/null).
    An extracting tar runs in the staging directory (``{ cd -- DIR && tar ...; }``):
    that is checked here, and tar's words are returned without the group.
    """
    start = script.index("env AWS_CONFIG_FILE=")
    end = script.index("\nread -r sha256")
    commands: list[list[str]] = [[]]
    for word in shlex.split(script[start:end]):
        if word == "|":
            commands.append([])
        else:
            commands[-1].append(word)
    last = commands[-1]
    if last[0] == "{":
        assert [*last[1:3], last[4]] == ["cd", "--", "&&"], last[:5]
        assert (last[-2][-1:], last[-1]) == (";", "}"), last[-2:]
        tar = [*last[5:-2], last[-2].removesuffix(";")]
        assert f"--directory={last[3]}" in tar, "tar does not run in the staging directory"
        commands[-1] = tar
    return commands


@pytest.mark.parametrize("staging_dir", [None, STAGING_DIR])
def test_build_restore_command_shape(staging_dir: str | None):
    """The command is bash -c SCRIPT: aws | digest | gpg | tar, then the digest line."""
    command = backup.build_restore_command(
        _params(path="prod/synapse"),
        BACKUP_ID,
        PASSPHRASE_FILE,
        staging_dir=staging_dir,
        work_dir=WORK_DIR,
    )

    assert command[:2] == ["bash", "-c"]
    assert len(command) == 3
    script = command[2]
    _bash_syntax_ok(script)
    assert script.startswith("set -o errexit -o nounset -o pipefail\n")
    assert "set -x" not in script
    assert "trap cleanup EXIT" in script
    aws, digest, gpg, tar = _pipeline_words(script)
    assert aws == [
        "env",
        f"AWS_CONFIG_FILE={WORK_DIR}/{backup_container.AWS_DOWNLOAD_CONFIG_FILE}",
        "aws",
        "s3api",
        "get-object",
        "--bucket",
        "synapse-backups",
        f"--key=prod/synapse/{BACKUP_ID}",
        "/dev/fd/3",
        "3>&1",
        ">/dev/null",
    ]
    assert digest[:2] == ["python3", "-c"]
    assert digest[-1] == f"{WORK_DIR}/digest"
    assert gpg[0] == "gpg"
    assert gpg[gpg.index("--passphrase-file") + 1] == PASSPHRASE_FILE
    assert gpg[-3:] == ["--decrypt", "--output", "-"]
    assert tar[:2] == ["tar", "--file=-"]
    assert f"--index-file={WORK_DIR}/index" in tar
    # Whole records of 1 MiB from the pipe, not tar's 10 KiB ones.
    assert tar[tar.index("--read-full-records") - 1] == f"--record-size={1 << 20}"
    # Members are counted from the index, leaving out tar's own notes ("tar: Deleting ...").
    assert (
        f"members=$(grep --count --invert-match --regexp='^tar: ' -- {WORK_DIR}/index || true)"
        in script.splitlines()
    )
    assert script.endswith('printf "%s %s %s\\n" "$sha256" "$size" "$members"')


def test_build_restore_command_lists_without_staging_dir():
    """Without a staging directory the archive is only listed: nothing is extracted."""
    command = backup.build_restore_command(_params(), BACKUP_ID, PASSPHRASE_FILE)

    tar = _pipeline_words(command[2])[-1]
    assert "--list" in tar
    assert "--extract" not in tar
    assert not any(word.startswith("--directory") for word in tar)
    assert not any(word.startswith("--listed-incremental") for word in tar)


def test_build_restore_command_extracts_into_staging_dir():
    """With a staging directory the archive is extracted there, owners and modes kept.

    It is extracted as an incremental archive (--listed-incremental=/dev/null), so
    that the deletions and renames an incremental backup recorded are replayed.
    """
    command = backup.build_restore_command(
        _params(), BACKUP_ID, PASSPHRASE_FILE, staging_dir=STAGING_DIR
    )

    tar = _pipeline_words(command[2])[-1]
    assert "--list" not in tar
    for word in (
        "--extract",
        f"--directory={STAGING_DIR}",
        "--same-owner",
        "--same-permissions",
        "--listed-incremental=/dev/null",
        "--delay-directory-restore",
    ):
        assert word in tar


@pytest.mark.parametrize("staging_dir", [None, STAGING_DIR])
def test_build_restore_command_no_secret(staging_dir: str | None):
    """Neither key nor the passphrase is in argv: they come from the env and a 0600 file."""
    command = backup.build_restore_command(
        _params(region="eu-west-1"), BACKUP_ID, PASSPHRASE_FILE, staging_dir=staging_dir
    )

    text = "\n".join(command)
    for value in (SECRET_KEY, ACCESS_KEY, PASSPHRASE):
        assert value not in text


def test_build_restore_command_work_dir_defaults_to_passphrase_dir():
    """Without work_dir, the digest and index files go beside the passphrase file."""
    command = backup.build_restore_command(_params(), BACKUP_ID, PASSPHRASE_FILE)

    _, digest, _, tar = _pipeline_words(command[2])
    assert digest[-1] == f"{WORK_DIR}/digest"
    assert f"--index-file={WORK_DIR}/index" in tar


HOSTILE_DIRS = [
    pytest.param("/data/with space", id="space"),
    pytest.param("/data/it's", id="single-quote"),
    pytest.param('/data/say "hi"', id="double-quote"),
    pytest.param("/data/line\nbreak", id="newline"),
    pytest.param("/data/$(touch pwned)", id="command-substitution"),
    pytest.param("/data/`touch pwned`", id="backticks"),
    pytest.param("/data/a;b|c&d>e<f", id="shell-operators"),
    pytest.param("/data/*", id="glob"),
]


@pytest.mark.parametrize("staging_dir", HOSTILE_DIRS)
def test_build_restore_command_quotes_staging_dir(staging_dir: str):
    """A hostile but absolute staging dir stays one intact --directory word of tar."""
    command = backup.build_restore_command(
        _params(), BACKUP_ID, PASSPHRASE_FILE, staging_dir=staging_dir
    )

    _bash_syntax_ok(command[2])
    tar = _pipeline_words(command[2])[-1]
    assert f"--directory={staging_dir}" in tar


@pytest.mark.parametrize(
    "staging_dir",
    [
        pytest.param("", id="empty"),
        pytest.param("staging", id="relative"),
        pytest.param("$(touch pwned)", id="relative-command-substitution"),
        pytest.param("-rf", id="relative-option"),
        pytest.param("../etc", id="relative-dot-dot"),
        pytest.param("/data/../etc", id="dot-dot"),
        pytest.param("/data/./x", id="dot"),
        pytest.param("/data//x", id="double-slash"),
        pytest.param("/data/x/", id="trailing-slash"),
        pytest.param("/", id="root"),
    ],
)
def test_build_restore_command_rejects_staging_dir(staging_dir: str):
    """A relative or non-normalised staging dir raises BackupError."""
    with pytest.raises(backup.BackupError, match="not an absolute normalised path"):
        backup.build_restore_command(
            _params(), BACKUP_ID, PASSPHRASE_FILE, staging_dir=staging_dir
        )


@pytest.mark.parametrize("key", ["../x", "a/b", "$(id)", "it's", "x.manifest.json", ""])
def test_build_restore_command_rejects_keys(key: str):
    """An unsafe backup key is rejected before any script is built."""
    with pytest.raises(backup.BackupError, match="invalid backup id"):
        backup.build_restore_command(_params(), key, PASSPHRASE_FILE, staging_dir=STAGING_DIR)


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


def _stub_tools(tmp_path: pathlib.Path, aws_body: str) -> dict[str, str]:
    """Put stub aws, gpg (copies stdin to stdout), gpgconf and python3 first on PATH.

    Returns:
        The environment to run the script with.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "aws", aws_body)
    _stub(
        bin_dir,
        "gpg",
        "import shutil, sys\nshutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)\n",
    )
    _stub(bin_dir, "gpgconf", "")
    _stub(
        bin_dir,
        "python3",
        "import os, sys\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n",
    )
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _aws_get_object_stub(tmp_path: pathlib.Path) -> str:
    """Return an aws stub that answers s3api get-object with the prepared archive.

    It records its argv and AWS_CONFIG_FILE, writes the archive to its last
    argument (the outfile) and its JSON summary to stdout.
    """
    return (
        "import json, os, sys\n"
        f"open({str(tmp_path / 'aws-call')!r}, 'w').write(json.dumps("
        "{'argv': sys.argv[1:], 'config': os.environ.get('AWS_CONFIG_FILE')}))\n"
        f"body = open({str(tmp_path / 'archive')!r}, 'rb').read()\n"
        "open(sys.argv[-1], 'wb').write(body)\n"
        "print(json.dumps({'ContentLength': len(body), 'ETag': 'x'}))\n"
    )


def _archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o640
            info.uid, info.gid = os.getuid(), os.getgid()
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
@pytest.mark.parametrize("extract", [True, False], ids=["extract", "list"])
def test_build_restore_command_runs(tmp_path: pathlib.Path, extract: bool):
    """The script, run by bash with real tar, extracts (or lists) into a hostile staging dir.

    aws is a stub that writes a prepared archive to its outfile (/dev/fd/3) and
    a JSON summary to stdout, and gpg one that copies stdin to stdout; the
    printed digest is that of the downloaded bytes, so the JSON did not leak
    into the pipe.
    """
    members = {
        "data/homeserver.yaml": b"server_name: example.com\n",
        "data/it's $(touch pwned).yaml": b"hostile\n",
        "data/media_store/local_content/ab/cd": b"\x00\x01media",
    }
    archive = _archive(members)
    (tmp_path / "archive").write_bytes(archive)
    env = _stub_tools(tmp_path, _aws_get_object_stub(tmp_path))
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    staging = tmp_path / "staging it's $(touch pwned)"
    staging.mkdir()
    command = backup.build_restore_command(
        _params(path="prod"),
        BACKUP_ID,
        str(work_dir / "passphrase"),
        staging_dir=str(staging) if extract else None,
        work_dir=str(work_dir),
    )

    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert backup_container._parse_digest(result.stdout) == (
        hashlib.sha256(archive).hexdigest(),
        len(archive),
        len(members),
    )
    call = json.loads((tmp_path / "aws-call").read_text())
    assert call["argv"] == [
        "s3api",
        "get-object",
        "--bucket",
        "synapse-backups",
        f"--key=prod/{BACKUP_ID}",
        "/dev/fd/3",
    ]
    assert call["config"] == str(work_dir / backup_container.AWS_DOWNLOAD_CONFIG_FILE)
    assert not (tmp_path / "pwned").exists()
    extracted = {
        str(path.relative_to(staging)): path.read_bytes()
        for path in staging.rglob("*")
        if path.is_file()
    }
    assert extracted == (members if extract else {})


def test_build_restore_command_downloads_pieces_in_order():
    """An archive in pieces is downloaded piece after piece into the one stream."""
    pieces = [BACKUP_ID, f"{BACKUP_ID}.part-0001", f"{BACKUP_ID}.part-0002"]
    command = backup.build_restore_command(
        _params(path="prod"), BACKUP_ID, PASSPHRASE_FILE, work_dir=WORK_DIR, pieces=pieces
    )

    script = command[2]
    _bash_syntax_ok(script)
    start = script.index("{ env AWS_CONFIG_FILE=")
    group, rest = script[start:].split(" 3>&1 >/dev/null | ", 1)
    downloads = [shlex.split(text) for text in group[2:].removesuffix("; }").split(" && ")]
    assert [words[-2:] for words in downloads] == [
        [f"--key=prod/{piece}", "/dev/fd/3"] for piece in pieces
    ]
    assert rest.startswith("python3 -c ")


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_build_restore_command_fails_when_a_later_piece_fails(tmp_path: pathlib.Path):
    """The second piece's download fails: the script fails and the third is not fetched."""
    archive = _archive({"data/homeserver.yaml": b"server_name: example.com\n"})
    (tmp_path / "archive").write_bytes(archive)
    calls = tmp_path / "calls"
    env = _stub_tools(
        tmp_path,
        "import sys\n"
        f"open({str(calls)!r}, 'a').write(sys.argv[-2] + '\\n')\n"
        "if sys.argv[-2].endswith('.part-0001'):\n"
        "    sys.stderr.write('NoSuchKey\\n')\n"
        "    sys.exit(1)\n"
        f"open(sys.argv[-1], 'wb').write(open({str(tmp_path / 'archive')!r}, 'rb').read())\n",
    )
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    pieces = [BACKUP_ID, f"{BACKUP_ID}.part-0001", f"{BACKUP_ID}.part-0002"]
    command = backup.build_restore_command(
        _params(path="prod"),
        BACKUP_ID,
        str(work_dir / "passphrase"),
        work_dir=str(work_dir),
        pieces=pieces,
    )

    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)

    assert result.returncode != 0
    assert "NoSuchKey" in result.stderr
    assert calls.read_text().split() == [f"--key=prod/{piece}" for piece in pieces[:2]]
    with pytest.raises(backup.BackupError):
        backup_container._parse_digest(result.stdout)


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_build_restore_command_fails_on_a_broken_stream(tmp_path: pathlib.Path):
    """A failing download fails the script (pipefail) and prints no digest line."""
    env = _stub_tools(tmp_path, "import sys\nsys.stderr.write('denied\\n')\nsys.exit(1)\n")
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    command = backup.build_restore_command(
        _params(), BACKUP_ID, str(work_dir / "passphrase"), work_dir=str(work_dir)
    )

    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )

    assert result.returncode != 0
    assert "denied" in result.stderr
    with pytest.raises(backup.BackupError):
        backup_container._parse_digest(result.stdout)


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_build_restore_command_work_dir_needing_quotes(tmp_path: pathlib.Path):
    """A work dir with a space still gives aws its download configuration.

    env(1) sets AWS_CONFIG_FILE: a quoted assignment word stays one argument of env.
    """
    archive = _archive({"data/homeserver.yaml": b"server_name: example.com\n"})
    (tmp_path / "archive").write_bytes(archive)
    env = _stub_tools(tmp_path, _aws_get_object_stub(tmp_path))
    work_dir = tmp_path / "work dir"
    work_dir.mkdir()
    command = backup.build_restore_command(
        _params(), BACKUP_ID, str(work_dir / "passphrase"), work_dir=str(work_dir)
    )

    result = subprocess.run(
        command, capture_output=True, text=True, check=False, env=env, timeout=60
    )

    assert result.returncode == 0, result.stderr
    call = json.loads((tmp_path / "aws-call").read_text())
    assert call["config"] == str(work_dir / backup_container.AWS_DOWNLOAD_CONFIG_FILE)
