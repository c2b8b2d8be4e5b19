"""Incremental backups without ops, Pebble or S3: the pure parts of chains.

The --transform escaping (checked in Python and by real GNU tar), the
listed-incremental backup command, the command fetching a parent's snapshot
state, BackupManifest's type and parent, dependants_of and
_manifest_databases. The scripts run under bash with real tar and python3 and
stubbed gpg and aws; the real gpg, aws CLI and SeaweedFS are in tests/workload.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from typing import Any
from unittest import mock

import ops
import pytest

import backup
import backup_chain
import backup_container
import backup_restore
import backup_store
from tests.unit.pipeline import (
    PIPELINE_START,
    check_words,
    database_words,
    split_backup_pipeline,
)
from tests.unit.tar_transform import apply_transform, literal_pattern, literal_replacement

ACCESS_KEY = "AKIAINCREMENTALTEST"
SECRET_KEY = "incremental-secret-key-4c1e"
PASSPHRASE = "incremental-passphrase-8d20"
WORK_DIR = "/tmp/synapse-backup-00112233aabbccdd"
PASSPHRASE_FILE = f"{WORK_DIR}/passphrase"
SNAPSHOT_FILE = f"{WORK_DIR}/{backup_chain.SNAPSHOT_STATE_FILE}"
FULL_ID = "20250101T000000Z"
INCREMENTAL_ID = "20250102T000000Z"
SHA256 = "ab" * 32

needs_tar = pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")


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


def _manifest(backup_id: str = FULL_ID, **changes: Any) -> backup.BackupManifest:
    values: dict[str, Any] = {
        "backup_id": backup_id,
        "created_at": "2025-01-01T00:00:00+00:00",
        "paths": ("/data/homeserver.yaml",),
        "file_count": 2,
        "size": 10,
        "sha256": SHA256,
        "duration": 0.5,
    }
    values.update(changes)
    return backup.BackupManifest(**values)


def _bash_syntax_ok(script: str) -> None:
    result = subprocess.run(
        ["bash", "-n", "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --- _sed_literal and _sed_replacement ------------------------------------------------------

HOSTILE_TEXTS = [
    pytest.param("homeserver.db", id="plain"),
    pytest.param("a.b", id="dot"),
    pytest.param("x[1]", id="brackets"),
    pytest.param("[!a-z]", id="negated-class"),
    pytest.param("st*r", id="star"),
    pytest.param("co,ma", id="comma-delimiter"),
    pytest.param("amp&", id="ampersand"),
    pytest.param("back\\slash", id="backslash"),
    pytest.param("trailing\\", id="trailing-backslash"),
    pytest.param("\\1 and \\(group\\)", id="gnu-escapes"),
    pytest.param("^caret", id="caret"),
    pytest.param("dollar$", id="dollar"),
    pytest.param("(a)+b?c{1}|d", id="ere-characters"),
    pytest.param("new\nline", id="newline"),
    pytest.param('it\'s "quoted" $(x)', id="shell-characters"),
    pytest.param("all .[*,&\\^$] of them", id="everything"),
]


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_sed_literal_matches_exactly_the_text(text: str):
    """The escaped regex, anchored, is a pure literal: it matches the text and nothing else.

    literal_pattern refuses any unescaped special character and any GNU escape,
    so the BRE means just its characters; the Python pattern built from it then
    matches the text, not the text with a special character replaced, nor more.
    """
    pattern = literal_pattern(f"^{backup._sed_literal(text)}$")

    assert pattern.fullmatch(text)
    assert not pattern.fullmatch(text + "x")
    assert not pattern.fullmatch("x" + text)
    for special in ".[*^$\\":
        decoy = text.replace(special, "x")
        if decoy != text:
            assert not pattern.fullmatch(decoy)


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_sed_replacement_produces_exactly_the_text(text: str):
    """The escaped replacement holds no & or back-reference and gives back the text."""
    assert literal_replacement(backup._sed_replacement(text)) == text


@pytest.mark.parametrize(
    ("bre", "problem"),
    [
        pytest.param("^a.b$", "unescaped special character '.'", id="dot"),
        pytest.param("^a\\(b\\)$", "GNU escape", id="group"),
        pytest.param("a$", "not anchored", id="no-caret"),
        pytest.param("^a\\$", "not anchored", id="escaped-dollar"),
    ],
)
def test_literal_pattern_refuses_what_is_not_a_literal(bre: str, problem: str):
    """The checker itself: anything but an anchored run of literals is refused."""
    with pytest.raises(ValueError, match=problem):
        literal_pattern(bre)


@needs_tar
def test_tar_transform_renames_exactly_the_hostile_name(tmp_path: pathlib.Path):
    """Real GNU tar, given the charm's escaped expression, renames exactly that member.

    For each hostile name, tar archives the file under its hostile path and a
    decoy that an unescaped regex would match too (special characters replaced);
    only the hostile one is renamed, to a hostile target, byte for byte.
    """
    root = tmp_path / "root"
    texts = [param.values[0] for param in HOSTILE_TEXTS]
    for text in texts:
        decoy = "".join("x" if char in ".[*^$\\&," else char for char in text)
        for name in {text, decoy}:
            path = root / "src" / name / "homeserver.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)
        member = f"src/{text}/homeserver.db"
        target = f"db {text}/homeserver.db"
        expression = f"s,^{backup._sed_literal(member)}$,{backup._sed_replacement(target)},"
        archive_path = tmp_path / "out.tar"
        members = sorted({member, f"src/{decoy}/homeserver.db"})

        subprocess.run(
            [
                "tar",
                "--create",
                f"--file={archive_path}",
                f"--directory={root}",
                f"--transform={expression}",
                # The names as they are: tar's unquoting of --add-file is another matter.
                "--no-unquote",
                *(f"--add-file={name}" for name in members),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C"},
        )

        with tarfile.open(archive_path) as archive:
            names = {info.name: archive.extractfile(info).read().decode() for info in archive}
        expected = {apply_transform(expression, name): pathlib.Path(name).parent.name
                    for name in members}  # fmt: skip
        assert names == expected, text
        assert target in names
        assert names[target] == text


# --- build_backup_command with a snapshot file ------------------------------------------------


def _lines(script: str) -> list[str]:
    return script.splitlines()


def _commands(text: str) -> list[list[str]]:
    """Split a shell pipeline into its commands' words."""
    commands: list[list[str]] = [[]]
    for word in shlex.split(text):
        if word == "|":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


def test_build_backup_command_listed_incremental():
    """With a snapshot file, tar keeps GNU listed-incremental state and it is uploaded encrypted.

    tar reads and updates the state (device numbers ignored: a pod moves; new
    directory warnings silenced); after the archive, the state is encrypted
    with the same gpg options and uploaded as <id>.snar.gpg; the digest line
    comes last, so a failed state upload fails the script before it. Between
    the archive and the state, tar's warning of a renamed directory stops the
    script with the line that makes run_backup start a full backup instead.
    """
    command = backup.build_backup_command(
        _params(path="prod"),
        INCREMENTAL_ID,
        ["/data/homeserver.yaml"],
        PASSPHRASE_FILE,
        database_path="/data/homeserver.db",
        work_dir=WORK_DIR,
        snapshot_file=SNAPSHOT_FILE,
    )

    script = command[2]
    _bash_syntax_ok(script)
    # The pipeline's words hold quoted newlines (the digest program): split with shlex.
    start = script.index(PIPELINE_START)
    errors = f"{WORK_DIR}/tar-errors"
    pipeline_end = script.index(f"\ncat -- {errors} >&2\n", start)
    state_start = script.index("\ngpg ", start)
    read_start = script.index("\nread -r sha256 size < ", state_start)
    tar, gpg, _, aws = split_backup_pipeline(script[start:pipeline_end])
    renamed = shlex.join(["python3", "-c", backup._RENAMED_PROGRAM, errors])
    renamed += f" {WORK_DIR}/parent-state"
    assert script[pipeline_end:state_start].splitlines()[1:4] == [
        f"cat -- {errors} >&2",
        "found=0",
        f"grep --quiet --fixed-strings -- 'Directory has been renamed' {errors} || found=$?",
    ]
    assert script[pipeline_end:state_start].endswith(
        '[ "$found" -le 1 ] || exit "$found"  # grep itself failed\n'
        f'if [ "$found" -eq 0 ] && {{ [ -e {WORK_DIR}/tar-read-deferred ] || '
        f'[ -n "$({renamed})" ]; }}; then\n'
        f"echo {backup.DIRECTORY_RENAMED}\nexit 0\nfi"
    )
    # The parent's state is copied before tar rewrites it: its snapshot time is read after.
    copy = f"if [ -e {SNAPSHOT_FILE} ]; then cp -- {SNAPSHOT_FILE} {WORK_DIR}/parent-state; fi"
    assert script.index(copy) < start
    # After tar, the check reads the state tar wrote: every directory met under its own name.
    clock = f"/data/{backup_container.SNAPSHOT_DIR_PREFIX}{INCREMENTAL_ID}/tar-started"
    deferred = f"{WORK_DIR}/tar-read-deferred"  # its finding, when tar warned of a rename
    assert check_words(script)[3:9] == [
        errors, f"{WORK_DIR}/index", SNAPSHOT_FILE, clock, deferred, "$1"
    ]  # fmt: skip
    assert f"\nrm -f -- {deferred}\n" in script[: script.index(PIPELINE_START)]
    options = tar[: tar.index("--add-file=data/homeserver.yaml")]
    assert f"--listed-incremental={SNAPSHOT_FILE}" in options
    assert "--no-check-device" in options
    assert "--warning=no-new-dir" in options
    assert options[-1] == "--no-unquote"
    assert aws[-1] == f"s3://synapse-backups/prod/{INCREMENTAL_ID}"
    # The state line comes right after the pipeline, the digest read right after it.
    state_gpg, upload = _commands(script[state_start:read_start])
    assert state_gpg == [*gpg, SNAPSHOT_FILE]
    assert upload == [
        "aws",
        "s3",
        "cp",
        "--only-show-errors",
        "--no-progress",
        "-",
        f"s3://synapse-backups/prod/{INCREMENTAL_ID}.snar.gpg",
    ]
    for value in (SECRET_KEY, ACCESS_KEY, PASSPHRASE):
        assert value not in script


def test_build_backup_command_one_directory_option():
    """Tar takes one -C with --listed-incremental: the database copy is added from /."""
    command = backup.build_backup_command(
        _params(),
        FULL_ID,
        ["/data/homeserver.yaml"],
        PASSPHRASE_FILE,
        database_path="/data/homeserver.db",
        work_dir=WORK_DIR,
        snapshot_file=SNAPSHOT_FILE,
    )

    script = command[2]
    start = script.index(PIPELINE_START)
    tar = split_backup_pipeline(script[start : script.index("\ngpg ", start)])[0]
    tar += database_words(script)
    assert [word for word in tar if word.startswith(("--directory", "-C"))] == ["--directory=/"]
    copy = f"data/{backup_container.SNAPSHOT_DIR_PREFIX}{FULL_ID}/data/homeserver.db"
    assert tar[-2:] == [
        f"--transform=s,^{backup._sed_literal(copy)}$,data/homeserver.db,",
        f"--add-file={copy}",
    ]


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


# gpg stand-in: copies its input (the file named last, or stdin) to --output (or stdout).
_GPG_STUB = """
import os, shutil, sys
args = sys.argv[1:]
output = args[args.index("--output") + 1] if "--output" in args else "-"
named = args[-1] if len(args) > 1 and args[-2] != "--output" else None
source = open(named, "rb") if named and os.path.isfile(named) else sys.stdin.buffer
sink = sys.stdout.buffer if output == "-" else open(output, "wb")
shutil.copyfileobj(source, sink)
sink.flush()
"""

# aws stand-in: `s3 cp - URL` stores stdin under the URL's last segment;
# `s3api get-object --key=K /dev/fd/3` writes that object to the outfile and a
# JSON summary to stdout. Every call is appended to calls.jsonl.
_AWS_STUB = """
import json, os, pathlib, sys
store = pathlib.Path({store!r})
args = sys.argv[1:]
with open(store / "calls.jsonl", "a") as calls:
    calls.write(json.dumps({{"argv": args, "config": os.environ.get("AWS_CONFIG_FILE")}}) + "\\n")
if args[:2] == ["s3", "cp"]:
    (store / args[-1].rsplit("/", 1)[-1]).write_bytes(sys.stdin.buffer.read())
elif args[:2] == ["s3api", "get-object"]:
    key = next(arg for arg in args if arg.startswith("--key=")).rsplit("/", 1)[-1]
    body = (store / key).read_bytes()
    with open(args[-1], "wb") as outfile:
        outfile.write(body)
    print(json.dumps({{"ContentLength": len(body)}}))
else:
    sys.exit(2)
"""


def _stub_tools(tmp_path: pathlib.Path) -> tuple[dict[str, str], pathlib.Path]:
    """Put stub gpg, gpgconf, aws and python3 first on PATH.

    Returns:
        The environment, and the directory standing for the bucket.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    store = tmp_path / "bucket"
    store.mkdir()
    _stub(bin_dir, "gpg", _GPG_STUB)
    _stub(bin_dir, "gpgconf", "")
    _stub(bin_dir, "aws", _AWS_STUB.format(store=str(store)))
    _stub(
        bin_dir,
        "python3",
        "import os, sys\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n",
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LC_ALL": "C"}
    return env, store


def _run(command: list[str], env: dict[str, str], cwd: pathlib.Path) -> str:
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _restore_into(
    staging: pathlib.Path,
    backup_id: str,
    env: dict[str, str],
    tmp_path: pathlib.Path,
    *,
    cwd: pathlib.Path,
) -> str:
    """Run the restore script of one backup into staging, in its own work dir; return stdout."""
    work = tmp_path / f"restore-{backup_id}"
    work.mkdir()
    command = backup.build_restore_command(
        _params(path="prod"),
        backup_id,
        str(work / "passphrase"),
        staging_dir=str(staging),
        work_dir=str(work),
    )
    return _run(command, env, cwd)


def _tree(directory: pathlib.Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@needs_tar
def test_incremental_chain_round_trip(tmp_path: pathlib.Path):
    """A full and an incremental backup, made and restored by the charm's scripts, with real tar.

    Arrange: a data dir whose database lives under a hostile directory name
        (dot, brackets, star, comma, ampersand and a backslash in it), with stub
        gpg and aws storing objects in a dir.
    Act: a full backup (no state yet); changes (modify, delete, add); an
        incremental backup continuing a copy of the full one's state; then both
        archives extracted in order into one staging dir, as run_restore does.
    Assert: each backup uploads its archive and its state; the database is
        archived under its own name; the incremental holds only what changed;
        each extraction counts the members its backup counted (tar's "Deleting"
        notes left out); the staging dir is the data at the second backup.
    """
    env, bucket = _stub_tools(tmp_path)
    data = tmp_path / "data"
    media = data / "media_store" / "local_content"
    media.mkdir(parents=True)
    (data / "homeserver.yaml").write_text("server_name: example.com\n")
    (media / "kept").write_bytes(b"unchanged media")
    (media / "deleted").write_bytes(b"deleted later")
    db_dir = data / "db .[*,&\\ x"
    db_dir.mkdir()
    database = db_dir / "homeserver.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (x)")
        connection.execute("INSERT INTO t VALUES ('first')")
    connection.close()
    paths = [str(data / "homeserver.yaml"), str(media)]

    def make_backup(backup_id: str, state: pathlib.Path | None) -> tuple[int, pathlib.Path]:
        work = tmp_path / f"work-{backup_id}"
        work.mkdir()
        snapshot = work / backup_chain.SNAPSHOT_STATE_FILE
        if state is not None:
            shutil.copy(state, snapshot)  # what _snapshot_state_commands does
        command = backup.build_backup_command(
            _params(path="prod"),
            backup_id,
            paths,
            str(work / "passphrase"),
            database_path=str(database),
            work_dir=str(work),
            snapshot_file=str(snapshot),
        )
        _, size, members = backup_container._parse_digest(_run(command, env, tmp_path))
        assert size == (bucket / backup_id).stat().st_size
        assert (bucket / f"{backup_id}.snar.gpg").read_bytes() == snapshot.read_bytes()
        return members, snapshot

    full_members, full_state = make_backup(FULL_ID, None)
    time.sleep(1.1)  # changes strictly after the full backup, even with coarse timestamps
    (media / "deleted").unlink()
    (media / "added").write_bytes(b"new media")
    (data / "homeserver.yaml").write_text("server_name: example.com\nchanged: true\n")
    with sqlite3.connect(database) as connection:
        connection.execute("INSERT INTO t VALUES ('second')")
    connection.close()
    expected = {
        str(path.relative_to("/")): content
        for path, content in (
            (data / "homeserver.yaml", (data / "homeserver.yaml").read_bytes()),
            (media / "kept", b"unchanged media"),
            (media / "added", b"new media"),
        )
    }
    incremental_members, _ = make_backup(INCREMENTAL_ID, full_state)

    relative_db = str(database.relative_to("/"))
    with tarfile.open(bucket / FULL_ID) as archive:
        full_names = archive.getnames()
    with tarfile.open(bucket / INCREMENTAL_ID) as archive:
        incremental_names = archive.getnames()
    assert relative_db in full_names
    assert relative_db in incremental_names
    assert not [name for name in full_names if backup_container.SNAPSHOT_DIR_PREFIX in name]
    relative_media = str(media.relative_to("/"))
    assert f"{relative_media}/deleted" in full_names
    assert f"{relative_media}/added" in incremental_names
    assert f"{relative_media}/deleted" not in incremental_names
    assert not list(db_dir.glob(backup_container.SNAPSHOT_DIR_PREFIX + "*"))

    staging = tmp_path / "staging"
    staging.mkdir()
    for backup_id, members in ((FULL_ID, full_members), (INCREMENTAL_ID, incremental_members)):
        output = _restore_into(staging, backup_id, env, tmp_path, cwd=tmp_path)
        _, size, restored_members = backup_container._parse_digest(output)
        assert size == (bucket / backup_id).stat().st_size
        assert restored_members == members, backup_id
    assert "tar: Deleting" in (tmp_path / f"restore-{INCREMENTAL_ID}" / "index").read_text()

    restored = _tree(staging)
    restored_db = restored.pop(relative_db)
    assert restored == expected
    copy = tmp_path / "restored.db"
    copy.write_bytes(restored_db)
    with sqlite3.connect(copy) as connection:
        rows = [row[0] for row in connection.execute("SELECT x FROM t ORDER BY rowid")]
    connection.close()
    assert rows == ["first", "second"]
    calls = [json.loads(line) for line in (bucket / "calls.jsonl").read_text().splitlines()]
    assert [call["argv"][-1] for call in calls if call["argv"][:2] == ["s3", "cp"]] == [
        f"s3://synapse-backups/prod/{FULL_ID}",
        f"s3://synapse-backups/prod/{FULL_ID}.snar.gpg",
        f"s3://synapse-backups/prod/{INCREMENTAL_ID}",
        f"s3://synapse-backups/prod/{INCREMENTAL_ID}.snar.gpg",
    ]


# --- _snapshot_state_commands ----------------------------------------------------------------


def test_snapshot_state_command_local():
    """With the parent's state in the container, it is copied into the work dir."""
    command = backup_chain._snapshot_state_commands(_params(), _manifest(), True, WORK_DIR)

    assert command[:2] == ["bash", "-c"]
    _bash_syntax_ok(command[2])
    assert _lines(command[2])[-1] == (
        f"cp -- {backup_chain.STATE_DIR}/{FULL_ID}.snar {SNAPSHOT_FILE}"
    )
    assert "aws" not in command[2]


def test_snapshot_state_command_from_s3():
    """Without it, the encrypted state is streamed from S3 and decrypted into the work dir."""
    command = backup_chain._snapshot_state_commands(
        _params(path="prod", region="eu-west-1"), _manifest(), False, WORK_DIR
    )

    script = command[2]
    _bash_syntax_ok(script)
    assert script.startswith("set -o errexit -o nounset -o pipefail\n")
    assert "trap cleanup EXIT" in script
    get, gpg = _lines(script)[-1].split(" | ")
    assert shlex.split(get) == [
        "env",
        f"AWS_CONFIG_FILE={WORK_DIR}/{backup_container.AWS_DOWNLOAD_CONFIG_FILE}",
        "aws",
        "s3api",
        "get-object",
        "--bucket",
        "synapse-backups",
        f"--key=prod/{FULL_ID}.snar.gpg",
        "/dev/fd/3",
        "3>&1",
        ">/dev/null",
    ]
    gpg_words = shlex.split(gpg)
    assert gpg_words[gpg_words.index("--passphrase-file") + 1] == PASSPHRASE_FILE
    assert gpg_words[-3:] == ["--decrypt", "--output", SNAPSHOT_FILE]
    for value in (SECRET_KEY, ACCESS_KEY, PASSPHRASE):
        assert value not in script


def test_snapshot_state_command_from_s3_runs(tmp_path: pathlib.Path):
    """Run by bash with stub aws and gpg, the state arrives intact; aws's JSON does not.

    The work dir needs quoting (a space): env(1) keeps AWS_CONFIG_FILE one word.
    """
    env, bucket = _stub_tools(tmp_path)
    state = b"GNU tar-1.34-2\n\x00some\x00state\x00"
    (bucket / f"{FULL_ID}.snar.gpg").write_bytes(state)
    work = tmp_path / "work dir"
    work.mkdir()

    _run(
        backup_chain._snapshot_state_commands(_params(path="prod"), _manifest(), False, str(work)),
        env,
        tmp_path,
    )

    assert (work / backup_chain.SNAPSHOT_STATE_FILE).read_bytes() == state
    (call,) = [json.loads(line) for line in (bucket / "calls.jsonl").read_text().splitlines()]
    assert call["config"] == str(work / backup_container.AWS_DOWNLOAD_CONFIG_FILE)


# --- BackupManifest: type and parent ------------------------------------------------------------


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param(_manifest(), id="full"),
        pytest.param(
            _manifest(INCREMENTAL_ID, backup_type="incremental", parent=FULL_ID),
            id="incremental",
        ),
    ],
)
def test_manifest_type_and_parent_round_trip(manifest: backup.BackupManifest):
    """Type and parent are written as "type" and "parent" and read back, not as metadata."""
    document = json.loads(manifest.to_json())

    assert (document["type"], document["parent"]) == (manifest.backup_type, manifest.parent)
    parsed = backup.BackupManifest.from_json(manifest.to_json())
    assert parsed == manifest
    assert "type" not in parsed.metadata
    assert "parent" not in parsed.metadata


def test_manifest_without_type_is_a_full_backup():
    """A manifest written before incremental backups (no type, no parent) is a full backup."""
    document = json.loads(_manifest().to_json())
    del document["type"], document["parent"]

    manifest = backup.BackupManifest.from_json(json.dumps(document))

    assert (manifest.backup_type, manifest.parent) == ("full", "")


@pytest.mark.parametrize(
    ("changes", "valid"),
    [
        pytest.param({"type": "incremental", "parent": FULL_ID}, True, id="incremental"),
        pytest.param({"type": "full", "parent": ""}, True, id="full"),
        pytest.param({"type": "incremental", "parent": ""}, False, id="incremental-no-parent"),
        pytest.param({"type": "incremental"}, False, id="incremental-parent-missing"),
        pytest.param({"type": "full", "parent": FULL_ID}, False, id="full-with-parent"),
        pytest.param({"parent": FULL_ID}, False, id="default-full-with-parent"),
        pytest.param({"type": "differential", "parent": FULL_ID}, False, id="unknown-type"),
        pytest.param({"type": "Full", "parent": ""}, False, id="type-case"),
        pytest.param({"type": "", "parent": ""}, False, id="empty-type"),
    ],
)
def test_manifest_type_and_parent_must_agree(changes: dict[str, str], valid: bool):
    """An incremental backup has a parent and a full one has none; no other type exists."""
    document = json.loads(_manifest(INCREMENTAL_ID).to_json())
    del document["type"], document["parent"]
    document.update(changes)

    if valid:
        manifest = backup.BackupManifest.from_json(json.dumps(document))
        assert manifest.backup_type == changes["type"]
    else:
        with pytest.raises(
            backup.BackupError, match="invalid backup manifest: bad type or parent"
        ):
            backup.BackupManifest.from_json(json.dumps(document))


# --- dependants_of --------------------------------------------------------------------------

#   A (full) <- B <- C <- D      E (full) <- F      B <- G (a branch)
TREE = [
    _manifest("A"),
    _manifest("B", backup_type="incremental", parent="A"),
    _manifest("C", backup_type="incremental", parent="B"),
    _manifest("D", backup_type="incremental", parent="C"),
    _manifest("G", backup_type="incremental", parent="B"),
    _manifest("E"),
    _manifest("F", backup_type="incremental", parent="E"),
]


@pytest.mark.parametrize(
    ("backup_id", "expected"),
    [
        pytest.param("A", {"B", "C", "D", "G"}, id="full-with-branches"),
        pytest.param("B", {"C", "D", "G"}, id="middle"),
        pytest.param("C", {"D"}, id="one-below"),
        pytest.param("D", set(), id="newest-incremental"),
        pytest.param("E", {"F"}, id="other-chain"),
        pytest.param("Z", set(), id="unknown"),
    ],
)
def test_dependants_of(backup_id: str, expected: set[str]):
    """Every backup whose chain goes through a backup, however deep, and no other."""
    assert backup_store.dependants_of(backup_id, TREE) == expected
    assert backup_store.dependants_of(backup_id, reversed(TREE)) == expected


def test_dependants_of_a_cycle_terminates():
    """Manifests naming each other as parents (written by hand) do not loop forever."""
    cycle = [
        _manifest("X", backup_type="incremental", parent="Y"),
        _manifest("Y", backup_type="incremental", parent="X"),
    ]

    assert "Y" in backup_store.dependants_of("X", cycle)


# --- _manifest_databases -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "metadata", "expected"),
    [
        pytest.param(
            ("/data/homeserver.yaml", "/data/db/synapse.sqlite"),
            {"database-path": "/data/db/synapse.sqlite"},
            ["/data/db/synapse.sqlite"],
            id="recorded",
        ),
        pytest.param(
            ("/data/homeserver.yaml", "/data/bridge.db"),
            {"database-path": ""},
            [],
            id="recorded-none",
        ),
        pytest.param(
            ("/data/homeserver.yaml",),
            {"database-path": "/data/homeserver.db"},
            [],
            id="recorded-but-not-backed-up",
        ),
        pytest.param(
            ("/data/homeserver.yaml", "/data/homeserver.db"),
            {},
            ["/data/homeserver.db"],
            id="older-manifest-guesses-by-suffix",
        ),
    ],
)
def test_manifest_databases(paths: tuple[str, ...], metadata: dict[str, str], expected: list[str]):
    """The database a restore fixes up is the recorded one; older manifests guess by .db.

    An empty recorded database-path means the backup holds no database (say,
    Synapse on PostgreSQL): a backed-up /data/bridge.db is then not taken for one.
    """
    manifest = _manifest(paths=paths, metadata=metadata)

    assert backup_restore._manifest_databases(manifest) == expected


@needs_tar
def test_a_renamed_directory_stops_the_incremental_script_and_restores_replay_in_staging(
    tmp_path: pathlib.Path,
):
    """Tar's rename warning ends the script before the digest; renames replay inside staging.

    Arrange: two media directories, a full backup, then the directories swap
        names (a rename cycle). The only member is a directory, so tar keeps
        its rename records here (the charm's members start with files, where
        tar drops them).
    Act: the incremental backup script; then both archives restored into a
        staging dir by scripts started in another working directory.
    Assert: the script prints only the line that makes run_backup start a full
        backup (no digest, no snapshot state uploaded); the restore of what it
        uploaded swaps the directories back, and tar made nothing in its
        starting directory (it breaks rename cycles through a temporary
        directory relative to it): archives that hold renames, as an older
        charm's could, still restore.
    """
    env, bucket = _stub_tools(tmp_path)
    media = tmp_path / "data" / "media_store" / "local_content"
    for name in ("a", "b"):
        (media / name).mkdir(parents=True)
        (media / name / "file").write_text(name)

    def backup_script(backup_id: str, state: pathlib.Path | None) -> tuple[str, pathlib.Path]:
        work = tmp_path / f"work-{backup_id}"
        work.mkdir()
        snapshot = work / backup_chain.SNAPSHOT_STATE_FILE
        if state is not None:
            shutil.copy(state, snapshot)
        command = backup.build_backup_command(
            _params(path="prod"),
            backup_id,
            [str(media)],
            str(work / "passphrase"),
            work_dir=str(work),
            snapshot_file=str(snapshot),
        )
        return _run(command, env, tmp_path), snapshot

    full_output, full_state = backup_script(FULL_ID, None)
    assert backup.DIRECTORY_RENAMED not in full_output.splitlines()
    time.sleep(1.1)
    (media / "a").rename(media / "swap")
    (media / "b").rename(media / "a")
    (media / "swap").rename(media / "b")

    output, _ = backup_script(INCREMENTAL_ID, full_state)

    assert output.splitlines() == [backup.DIRECTORY_RENAMED]
    assert (bucket / INCREMENTAL_ID).exists()  # uploaded before tar's warning was read
    assert not (bucket / f"{INCREMENTAL_ID}.snar.gpg").exists()
    staging, elsewhere = tmp_path / "staging", tmp_path / "elsewhere"
    staging.mkdir()
    elsewhere.mkdir()
    for backup_id in (FULL_ID, INCREMENTAL_ID):
        _restore_into(staging, backup_id, env, tmp_path, cwd=elsewhere)
    restored = staging / media.relative_to("/")
    assert (restored / "a" / "file").read_text() == "b"
    assert (restored / "b" / "file").read_text() == "a"
    assert not list(elsewhere.iterdir())


# tar stand-in: the real tar, then a directory from outside moved in, as if
# while tar read (after tar had passed that place).
_TAR_THEN_MOVE_STUB = """
import os, subprocess, sys
path = [d for d in os.environ["PATH"].split(os.pathsep) if d != os.path.dirname(__file__)]
real = subprocess.run(["tar", *sys.argv[1:]], env={{**os.environ, "PATH": os.pathsep.join(path)}})
os.rename({old!r}, {new!r})
sys.exit(real.returncode)
"""


def _change_between_backups(between: str, media: pathlib.Path) -> None:
    """Rename directories of media/{a,b,c,ab} between two backups, as a test asks."""
    if between == "rotated":
        for source, target in (("a", "tmp"), ("c", "a"), ("b", "c"), ("tmp", "b")):
            (media / source).rename(media / target)
        (media / "a" / "deep").rename(media / "b" / "deeper")
    elif between == "renamed-and-rewritten":
        (media / "a").rename(media / "renamed")
        for file in (media / "renamed").rglob("*"):
            if file.is_file():
                file.write_text("written since")
    elif between == "tar-leaves-one-out":
        # What tar sees when 'ab' is purged and a new 'aa' gets its inode.
        (media / "ab").rename(media / "aa")
        for entry in list((media / "aa").iterdir()):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        (media / "aa" / "upload").write_text("new")
        (media / "ab" / "cd").mkdir(parents=True)
        (media / "ab" / "cd" / "upload").write_text("new")


@needs_tar
@pytest.mark.parametrize(
    ("between", "moved_in"),
    [
        # Renamed, with every file in it written since (the rename check finds
        # nothing lost), and an old directory moved in while tar read.
        pytest.param("renamed-and-rewritten", True, id="renamed-then-moved-in"),
        # A rotation with a nested move: the rename check finds files lost.
        pytest.param("rotated", True, id="rotated-then-moved-in"),
        # Nothing moves while tar reads, but tar 1.34 leaves out the new
        # 'ab/cd' (its table still has that name for the renamed one's 'cd'),
        # and the rename check finds nothing lost: such a backup used to be
        # kept, without 'ab/cd'.
        pytest.param("tar-leaves-one-out", False, id="tar-left-out-a-live-directory"),
        pytest.param("nothing", True, id="no-rename-warning"),
    ],
)
def test_after_a_rename_warning_what_check_tar_read_found_makes_a_full_backup(
    tmp_path: pathlib.Path, between: str, moved_in: bool
):
    """After tar's "renamed from", a directory missing from the archive means a full backup.

    Arrange: media directories, a full backup (real tar, stub gpg and aws),
        then changes between backups; tar wrapped, where asked, so that once
        it is done an old directory from outside moves in under a name tar
        did not see.
    Act: the incremental backup script.
    Assert: after a rename warning the script asks for a full backup (which
        checks again from scratch) and uploads no snapshot state, whether or
        not the rename check found files lost; without one, the backup fails
        with check_tar_read's message.
    """
    env, bucket = _stub_tools(tmp_path)
    media = tmp_path / "data" / "media_store" / "local_content"
    for name in ("a", "b", "c", "ab"):
        for file in ("0", "1", "deep/x", "cd/f"):
            (media / name / file).parent.mkdir(parents=True, exist_ok=True)
            (media / name / file).write_text(name + file)
    old = tmp_path / "outside" / "old"
    old.mkdir(parents=True)
    (old / "file").write_text("made before tar ran")
    work = tmp_path / "work"
    work.mkdir()
    snapshot = work / backup_chain.SNAPSHOT_STATE_FILE

    def backup_script(backup_id: str) -> subprocess.CompletedProcess[str]:
        command = backup.build_backup_command(
            _params(path="prod"), backup_id, [str(media)], str(work / "passphrase"),
            work_dir=str(work), snapshot_file=str(snapshot),
        )  # fmt: skip
        return subprocess.run(
            command, capture_output=True, text=True, check=False, cwd=tmp_path, env=env,
            stdin=subprocess.DEVNULL, timeout=120,
        )  # fmt: skip

    assert backup_script(FULL_ID).returncode == 0
    time.sleep(1.1)  # files older than the full backup's snapshot time
    _change_between_backups(between, media)
    time.sleep(1.1)  # and what changed older than the next tar's start: no new directory
    if moved_in:
        _stub(
            pathlib.Path(env["PATH"].split(os.pathsep)[0]),
            "tar",
            _TAR_THEN_MOVE_STUB.format(old=str(old), new=str(media / "c" / "moved")),
        )

    result = backup_script(INCREMENTAL_ID)

    assert not (bucket / f"{INCREMENTAL_ID}.snar.gpg").exists()
    if between == "nothing":
        assert "Directory has been renamed" not in result.stderr
        assert result.returncode == 1
        moved = str(media / "c" / "moved").lstrip("/")
        assert result.stderr.startswith(
            f"a directory was moved to {moved!r} while tar read the data: run the backup again\n"
        ), result.stderr
        return
    assert "Directory has been renamed from" in result.stderr
    assert (result.returncode, result.stdout.splitlines()) == (0, [backup.DIRECTORY_RENAMED])


# Pebble cannot run here: the container is a mock, and so is the S3 client
# (the real ones are in tests/workload/test_incremental_trees.py).
def test_after_a_directory_rename_an_automatic_backup_starts_again_as_a_full_one():
    """What the incremental run uploaded is removed, and the parent's state: tar starts afresh."""
    container, client, logged = mock.Mock(), mock.Mock(), []
    client.has_manifest.return_value = False

    backup._after_directory_rename(
        container, client, INCREMENTAL_ID, WORK_DIR, _manifest(), required=False, log=logged.append
    )

    client.delete_backup_objects.assert_called_once_with(INCREMENTAL_ID)
    assert container.remove_path.call_args_list == [
        mock.call(SNAPSHOT_FILE, recursive=True),
        mock.call(f"{WORK_DIR}/{backup_chain.DATABASE_STATE_FILE}", recursive=True),
    ]
    assert logged == [
        f"a directory was renamed since {FULL_ID}, which an incremental backup cannot record "
        "here: making a full backup instead"
    ]


@pytest.mark.parametrize(
    ("required", "remove_error", "message"),
    [
        pytest.param(True, None, r"cannot record here: make a full backup \(type=full\)$",
                     id="required"),
        pytest.param(False, ops.pebble.PathError("generic-file-error", "denied"),
                     "cannot remove the parent's snapshot state: ", id="state-not-removed"),
        pytest.param(False, ops.pebble.ConnectionError("pebble went away"),
                     "cannot remove the parent's snapshot state: ", id="pebble-gone"),
    ],
)  # fmt: skip
def test_after_a_directory_rename_errors(
    required: bool, remove_error: Exception | None, message: str
):
    """A required incremental backup fails as it is; a state that stays fails the backup."""
    container, client = mock.Mock(), mock.Mock()
    client.has_manifest.return_value = False
    container.remove_path.side_effect = remove_error

    with pytest.raises(backup.BackupError, match=message):
        backup._after_directory_rename(
            container, client, INCREMENTAL_ID, WORK_DIR, _manifest(), required=required,
            log=lambda _: None,
        )  # fmt: skip

    assert client.delete_backup_objects.called is not required  # the caller's finally discards


def test_a_full_backup_that_met_a_directory_under_two_names_fails_clearly():
    """A full backup's tar warning (a directory renamed while it read) is a clear error.

    The pipeline itself is faked (its output only): Pebble cannot run here.
    """
    with (
        mock.patch.object(backup, "run_in_container", return_value="directory-renamed\n"),
        pytest.raises(backup.BackupError, match=r"under two names .* run the backup again"),
    ):
        backup._run_pipeline(
            mock.Mock(), _params(), FULL_ID, paths=["/data/homeserver.yaml"],
            database_path=None, size=10, work_dir=WORK_DIR, parent=None,
            piece_size=backup.ARCHIVE_PIECE_SIZE, environment={}, hidden=(),
            log=lambda _: None,
        )  # fmt: skip


def _renamed(tmp_path: pathlib.Path, errors: bytes, since: int | None) -> str:
    """Run the rename check on tar's messages and a parent state of that snapshot time (ns)."""
    (tmp_path / "errors").write_bytes(errors)
    state = tmp_path / "parent-state"
    if since is not None:
        seconds, nanoseconds = divmod(since, 10**9)
        state.write_bytes(b"GNU tar-1.34-2\n%d\0%d\0rest of the state" % (seconds, nanoseconds))
    result = subprocess.run(
        [sys.executable, "-c", backup._RENAMED_PROGRAM, str(tmp_path / "errors"), str(state)],
        capture_output=True, check=True, text=True,
    )  # fmt: skip
    return result.stdout.strip()


@pytest.mark.parametrize(
    ("layout", "message", "lost"),
    [
        pytest.param({"new": 10}, "renamed from 'old'", False, id="only-new-files"),
        pytest.param({"sub/deeper/new": 10}, "renamed from 'o'", False, id="only-new-files-deep"),
        pytest.param({}, "renamed from 'old'", False, id="empty"),
        pytest.param({"new": 10, "old": -10}, "renamed from 'old'", True, id="an-unchanged-file"),
        pytest.param({"sub/old": -10}, "renamed from 'o'", True, id="an-unchanged-file-deep"),
        pytest.param({"same": 0}, "renamed from 'o'", True, id="modified-at-the-snapshot-time"),
        # Known by name, not by inode (a restored directory): tar archived all of it.
        pytest.param({"old": -10}, "renamed", False, id="a-new-inode-only"),
    ],
)
def test_rename_check_finds_unchanged_files_of_a_renamed_directory(
    tmp_path: pathlib.Path, layout: dict[str, int], message: str, lost: bool
):
    """Lost: a file of a directory tar took for renamed was not modified since the parent.

    Such a file is not in the archive, and without tar's rename records the
    restore would not have it. A directory whose files are all newer (a
    deleted directory's inode given to a new one) loses nothing.
    """
    since = time.time_ns() - 100 * 10**9
    directory = tmp_path / "data" / "renamed"
    directory.mkdir(parents=True)
    for name, offset in layout.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, ns=(since + offset * 10**9, since + offset * 10**9))
    relative = str(directory).lstrip("/").encode()
    errors = b"tar: something else\ntar: %s: Directory has been %s\n" % (
        relative,
        message.encode(),
    )

    assert _renamed(tmp_path, errors, since) == ("lost" if lost else "")


@pytest.mark.parametrize(
    ("name", "since"),
    [
        pytest.param(b"data/with\\040escape", 0, id="an-escaped-name"),
        pytest.param(b"data/not-there", 0, id="not-a-directory"),
        pytest.param(b"data/renamed", None, id="no-parent-state"),
        pytest.param(b"data/link", 0, id="a-symlink"),
    ],
)
def test_rename_check_says_lost_when_it_cannot_tell(
    tmp_path: pathlib.Path, name: bytes, since: int | None
):
    """Any doubt is "lost": the charm then makes a full backup, slower and never wrong."""
    (tmp_path / "data" / "renamed").mkdir(parents=True)
    (tmp_path / "data" / "link").symlink_to(tmp_path / "data" / "renamed")
    relative = str(tmp_path).lstrip("/").encode() + b"/" + name
    errors = b"tar: %s: Directory has been renamed from 'x'\n" % relative

    assert _renamed(tmp_path, errors, since) == "lost"


def test_rename_check_without_a_rename_warning_finds_nothing(tmp_path: pathlib.Path):
    """Other warnings of tar are not renames."""
    errors = b"tar: data/x: file changed as we read it\n"

    assert _renamed(tmp_path, errors, time.time_ns()) == ""
