"""Pure functions of the backup modules: no ops, no Pebble, no S3."""

from __future__ import annotations

import datetime
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

import pydantic
import pytest
from s3transfer.utils import ChunksizeAdjuster

import backup
import backup_container
import backup_store
from tests.helpers.tar_state import tar_state
from tests.unit.pipeline import (
    PIPELINE_START,
    TAR_STATUS_GUARD,
    check_words,
    database_words,
    split_backup_pipeline,
)
from tests.unit.tar_transform import apply_transform

ACCESS_KEY = "AKIAPUREFUNCTIONTEST"
SECRET_KEY = "pure-function-secret-key-5d2e"
PASSPHRASE = "pure-function-passphrase-0b7a"
WORK_DIR = "/tmp/synapse-backup-0123456789abcdef"
PASSPHRASE_FILE = f"{WORK_DIR}/passphrase"


def _params(**changes: object) -> backup.S3Parameters:
    values: dict[str, object] = {
        "access-key": ACCESS_KEY,
        "secret-key": SECRET_KEY,
        "bucket": "synapse-backups",
        "endpoint": "https://s3.example.com",
    }
    values.update(changes)
    return backup.S3Parameters.model_validate(
        {key: value for key, value in values.items() if value is not None}
    )


# --- S3Parameters ---------------------------------------------------------------------------


def test_s3_parameters_aliases_and_names():
    """S3Parameters accepts Juju's hyphenated aliases and the Python field names alike."""
    by_alias = _params(**{"s3-uri-style": "host"})
    by_name = backup.S3Parameters(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        bucket="synapse-backups",
        endpoint="https://s3.example.com",
        s3_uri_style="host",
    )

    assert by_alias == by_name
    assert by_alias.access_key == ACCESS_KEY
    assert by_alias.secret_key == SECRET_KEY
    assert by_alias.s3_uri_style == "host"


@pytest.mark.parametrize(
    ("changes", "endpoint", "region"),
    [
        pytest.param({}, "https://s3.example.com", None, id="endpoint-only"),
        pytest.param({"endpoint": None, "region": "eu-west-1"}, None, "eu-west-1", id="region"),
        pytest.param(
            {"endpoint": "", "region": "eu-west-1"}, None, "eu-west-1", id="empty-endpoint"
        ),
        pytest.param(
            {"endpoint": "http://10.0.0.1:8333", "region": "us-east-1"},
            "http://10.0.0.1:8333",
            "us-east-1",
            id="both",
        ),
    ],
)
def test_s3_parameters_endpoint_or_region(
    changes: dict[str, object], endpoint: str | None, region: str | None
):
    """Either an endpoint or a region is enough; an empty endpoint becomes None."""
    parameters = _params(**changes)

    assert (parameters.endpoint, parameters.region) == (endpoint, region)


@pytest.mark.parametrize(
    ("endpoint", "data", "error"),
    [
        pytest.param("https://s3.example.com", {}, None, id="endpoint"),
        pytest.param(None, {"region": "eu-west-1"}, None, id="region"),
        pytest.param(None, {}, "one of s3-endpoint or s3-region must be set", id="neither"),
        pytest.param("s3.example.com", {}, "must be an http:// or https:// URL", id="no-scheme"),
    ],
)
def test_check_endpoint_or_region_set_takes_a_plain_dict(
    endpoint: str | None, data: dict[str, str], error: str | None
):
    """The seed's validator can be called with the other values as a plain dict."""
    if error is None:
        assert backup.S3Parameters.check_endpoint_or_region_set(endpoint, data) == endpoint
    else:
        with pytest.raises(ValueError, match=error):
            backup.S3Parameters.check_endpoint_or_region_set(endpoint, data)


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        pytest.param({"endpoint": None}, "endpoint", "one of s3-endpoint", id="neither"),
        pytest.param({"endpoint": "", "region": ""}, "endpoint", "one of", id="both-empty"),
        pytest.param({"endpoint": "s3.example.com"}, "endpoint", "http", id="no-scheme"),
        pytest.param({"endpoint": "ftp://s3.example.com"}, "endpoint", "http", id="ftp"),
        pytest.param({"endpoint": "https://"}, "endpoint", "http", id="no-host"),
        pytest.param({"access-key": ""}, "access-key", "at least 1", id="empty-access-key"),
        pytest.param({"secret-key": ""}, "secret-key", "at least 1", id="empty-secret-key"),
        pytest.param({"bucket": "ab"}, "bucket", "at least 3", id="bucket-too-short"),
        pytest.param({"bucket": "a" * 64}, "bucket", "at most 63", id="bucket-too-long"),
        pytest.param({"bucket": "My_Bucket"}, "bucket", "pattern", id="bucket-uppercase"),
        pytest.param({"bucket": "bucket-"}, "bucket", "pattern", id="bucket-trailing-dash"),
        pytest.param({"s3-uri-style": "virtual"}, "s3-uri-style", "'path' or 'host'", id="uri"),
        pytest.param({"path": "a/../b"}, "path", "'..'", id="path-dot-dot"),
        pytest.param({"path": ".."}, "path", "'..'", id="path-only-dot-dot"),
        pytest.param({"path": "a/./b"}, "path", "'.'", id="path-dot"),
    ],
)
def test_s3_parameters_invalid(changes: dict[str, object], field: str, message: str):
    """Invalid values are rejected on the field they belong to, without echoing a secret."""
    with pytest.raises(pydantic.ValidationError) as exc_info:
        _params(**changes)

    (error,) = exc_info.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]
    assert SECRET_KEY not in error["msg"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("/a//b/", "a/b", id="slashes"),
        pytest.param("synapse/prod", "synapse/prod", id="plain"),
        pytest.param("///", "", id="only-slashes"),
        pytest.param("a/.../b", "a/.../b", id="three-dots-is-a-name"),
    ],
)
def test_s3_parameters_path_normalised(path: str, expected: str):
    """The object prefix loses leading, trailing and doubled slashes."""
    assert _params(path=path).path == expected


@pytest.mark.parametrize(
    ("style", "addressing"),
    [
        pytest.param(None, "path", id="default"),
        pytest.param("path", "path", id="path"),
        pytest.param("host", "virtual", id="host"),
    ],
)
def test_addressing_style(style: str | None, addressing: str):
    """The charm's s3-uri-style maps to boto's and aws's addressing_style."""
    assert _params(**{"s3-uri-style": style}).addressing_style == addressing


def test_s3_parameters_repr_hides_keys():
    """Neither repr nor str of S3Parameters shows the access or secret key."""
    parameters = _params()

    for text in (repr(parameters), str(parameters), f"{parameters!r}"):
        assert SECRET_KEY not in text
        assert ACCESS_KEY not in text
    assert "synapse-backups" in repr(parameters)


@pytest.mark.parametrize(
    ("path", "key", "url"),
    [
        pytest.param("", "20250101T000000Z", "s3://synapse-backups/20250101T000000Z", id="top"),
        pytest.param(
            "/a//b/", "20250101T000000Z", "s3://synapse-backups/a/b/20250101T000000Z", id="nested"
        ),
        pytest.param(
            "prod",
            "x.manifest.json",
            "s3://synapse-backups/prod/x.manifest.json",
            id="manifest",
        ),
    ],
)
def test_object_key_and_url(path: str, key: str, url: str):
    """Object keys have no leading or doubled slash; URLs are s3://bucket/key."""
    parameters = _params(path=path)

    object_key = parameters.object_key(key)

    assert not object_key.startswith("/")
    assert "//" not in object_key
    assert object_key.endswith(key)
    assert parameters.object_url(key) == url
    assert "//" not in url.removeprefix("s3://")


# --- backup ids and keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "20250101T000000Z",
        "my-backup_1.tar.gpg",
        "a",
        "A" * 200,
    ],
)
def test_validate_backup_key_accepts(key: str):
    """Plain object names are accepted and returned."""
    assert backup_store.validate_backup_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("", id="empty"),
        pytest.param("a/b", id="slash"),
        pytest.param("/abs", id="leading-slash"),
        pytest.param("..", id="dot-dot"),
        pytest.param("a..b", id="inner-dot-dot"),
        pytest.param(".hidden", id="leading-dot"),
        pytest.param("-rf", id="leading-dash"),
        pytest.param("it's", id="single-quote"),
        pytest.param('say"hi"', id="double-quote"),
        pytest.param("$(touch /tmp/pwned)", id="command-substitution"),
        pytest.param("`id`", id="backticks"),
        pytest.param("a b", id="space"),
        pytest.param("a\nb", id="newline"),
        pytest.param("x.manifest.json", id="manifest-name"),
        pytest.param("20250101T000000Z.manifest.json", id="backup-manifest-name"),
        pytest.param("20250101T000000Z.snar.gpg", id="snapshot-state-name"),
        pytest.param("A" * 201, id="too-long"),
    ],
)
def test_validate_backup_key_rejects(key: str):
    """Keys that could escape the prefix, break a shell word or hide a manifest are rejected.

    Nor can a backup be named like another backup's manifest or snapshot state.
    """
    with pytest.raises(backup.BackupError, match="invalid backup id"):
        backup_store.validate_backup_key(key)


def test_new_backup_id_now_is_utc():
    """The default backup id is the current UTC time, in the backup id format."""
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)

    backup_id = backup.new_backup_id()

    after = datetime.datetime.now(datetime.timezone.utc)
    assert backup.BACKUP_ID_PATTERN.fullmatch(backup_id)
    parsed = datetime.datetime.strptime(backup_id, backup_store.BACKUP_ID_FORMAT).replace(
        tzinfo=datetime.timezone.utc
    )
    assert before <= parsed <= after
    assert backup_store.validate_backup_key(backup_id) == backup_id


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        pytest.param(
            datetime.datetime(2025, 3, 9, 1, 2, 3, tzinfo=datetime.timezone.utc),
            "20250309T010203Z",
            id="utc",
        ),
        pytest.param(
            datetime.datetime(
                2025, 1, 1, 1, 30, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
            ),
            "20241231T233000Z",
            id="utc-plus-2-crosses-new-year",
        ),
        pytest.param(
            datetime.datetime(
                2025, 6, 30, 20, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))
            ),
            "20250701T010000Z",
            id="utc-minus-5",
        ),
    ],
)
def test_new_backup_id_from_aware_time(now: datetime.datetime, expected: str):
    """An aware time in any zone gives the UTC time."""
    assert backup.new_backup_id(now) == expected


def test_new_backup_ids_sort_by_time():
    """Backup ids sort like the times they were made at, across zones."""
    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    times = [
        datetime.datetime(2024, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc),
        datetime.datetime(2025, 1, 1, 1, 0, 0, tzinfo=plus_one),  # 00:00:00 UTC
        datetime.datetime(2025, 1, 1, 0, 0, 1, tzinfo=datetime.timezone.utc),
        datetime.datetime(2025, 2, 1, 0, 0, 0, tzinfo=datetime.timezone.utc),
        datetime.datetime(2025, 10, 1, 0, 0, 0, tzinfo=datetime.timezone.utc),
    ]

    ids = [backup.new_backup_id(time) for time in times]

    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


# --- environment and aws configuration ------------------------------------------------------


def test_get_environment_credentials():
    """The environment carries the credentials, endpoint and region for the aws CLI."""
    environment = backup.get_environment(_params(region="eu-west-1"))

    assert environment["AWS_ACCESS_KEY_ID"] == ACCESS_KEY
    assert environment["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    assert environment["AWS_ENDPOINT_URL"] == "https://s3.example.com"
    assert environment["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert environment["AWS_EC2_METADATA_DISABLED"] == "true"
    assert "HOME" not in environment
    assert "GNUPGHOME" not in environment


def test_get_environment_region_only():
    """Without an endpoint, the aws CLI is not pointed at one."""
    environment = backup.get_environment(_params(endpoint=None, region="eu-west-1"))

    assert "AWS_ENDPOINT_URL" not in environment
    assert environment["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_get_environment_endpoint_only():
    """Without a region, none is set."""
    assert "AWS_DEFAULT_REGION" not in backup.get_environment(_params())


def test_get_environment_work_dir():
    """With a work dir, HOME, GNUPGHOME and the aws files all live inside it."""
    environment = backup.get_environment(_params(), work_dir=WORK_DIR)

    assert environment["HOME"] == WORK_DIR
    for variable in ("GNUPGHOME", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        assert environment[variable].startswith(WORK_DIR + "/")
    assert environment["GNUPGHOME"] == f"{WORK_DIR}/{backup_container.GNUPG_DIR}"
    assert environment["AWS_CONFIG_FILE"] == f"{WORK_DIR}/{backup_container.AWS_CONFIG_FILE}"


@pytest.mark.parametrize(
    ("changes", "lines"),
    [
        pytest.param({}, ["addressing_style = path"], id="path-style"),
        pytest.param({"s3-uri-style": "host"}, ["addressing_style = virtual"], id="host-style"),
        pytest.param({"region": "eu-west-1"}, ["region = eu-west-1"], id="region"),
    ],
)
def test_build_aws_config(changes: dict[str, str], lines: list[str]):
    """The aws config sets the addressing style and limits, and holds no secret."""
    config = backup_container.build_aws_config(_params(**changes))

    assert config.startswith("[default]\n")
    for line in lines:
        assert line in config
    assert f"max_concurrent_requests = {backup.S3_MAX_CONCURRENT_REQUESTS}" in config
    assert f"multipart_chunksize = {backup_container.S3_MULTIPART_CHUNKSIZE}" in config
    assert SECRET_KEY not in config
    assert ACCESS_KEY not in config


# --- build_backup_command ---------------------------------------------------------------------

HOSTILE_NAMES = [
    pytest.param("with space.yaml", id="space"),
    pytest.param("it's.yaml", id="single-quote"),
    pytest.param('say "hi".yaml', id="double-quote"),
    pytest.param("line\nbreak.yaml", id="newline"),
    pytest.param("$(touch /tmp/pwned)", id="command-substitution"),
    pytest.param("`touch /tmp/pwned`", id="backticks"),
    pytest.param("-rf", id="leading-dash"),
    pytest.param("--to-command=sh", id="tar-option"),
    pytest.param("a;b|c&d>e<f", id="shell-operators"),
    pytest.param("*.yaml", id="glob"),
    pytest.param("~root", id="tilde"),
]


def _pipeline_end(script: str, start: int) -> int:
    """Return where the pipeline starting at ``start`` ends.

    That is the line that passes tar's messages on, which comes right after it:
    words of the pipeline may hold quoted newlines, so the first newline is not it.
    """
    return script.index("\ncat -- ", start)


def _pipeline_words(script: str) -> list[list[str]]:
    """Split the tar | gpg | digest | aws pipeline of a backup script into its commands."""
    start = script.index(PIPELINE_START)
    commands = split_backup_pipeline(script[start : _pipeline_end(script, start)])
    commands[0] += database_words(script)
    return commands


def _bash_syntax_ok(script: str) -> None:
    result = subprocess.run(
        ["bash", "-n", "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_build_backup_command_shape():
    """The command is bash -c SCRIPT: tar | gpg | digest | aws, and the digest is printed."""
    command = backup.build_backup_command(
        _params(path="/prod//synapse/"),
        "20250101T000000Z",
        ["/data/homeserver.yaml", "/data/media_store/local_content"],
        PASSPHRASE_FILE,
        expected_size=12345,
    )

    assert command[:2] == ["bash", "-c"]
    assert len(command) == 3
    script = command[2]
    _bash_syntax_ok(script)
    assert script.startswith("set -o errexit -o nounset -o pipefail\n")
    assert "set -x" not in script
    tar, gpg, digest, aws = _pipeline_words(script)
    assert tar[0] == "tar"
    assert "--directory=/" in tar
    assert tar[-3:] == [
        "--no-unquote",
        "--add-file=data/homeserver.yaml",
        "--add-file=data/media_store/local_content",
    ]
    # tar's exit status 1 (a file changed while read) passes, 2 from deleted
    # directories only too; any other fails the pipeline (check_tar_read).
    assert check_words(script) == [
        "python3",
        "-c",
        backup._TAR_READ_CHECK_PROGRAM,
        f"{WORK_DIR}/tar-errors",
        f"{WORK_DIR}/index",  # what tar archived, one name per line
        "",  # no snapshot state: a plain archive
        "",  # no database copied: no file made on the data volume before tar
        "",  # no state, so no rename check to wait for
        "$1",  # tar's exit status
        "data/homeserver.yaml",
        "data/media_store/local_content",
    ]
    (pipeline,) = [line for line in script.splitlines() if line.startswith(PIPELINE_START)]
    guard = TAR_STATUS_GUARD.match(pipeline, len("{ " + shlex.join(tar)))
    assert guard
    assert pipeline[guard.end() :].startswith(" | gpg ")
    assert guard[1] == f"{WORK_DIR}/tar-errors"  # tar's messages, passed on after the pipeline
    assert f"cat -- {WORK_DIR}/tar-errors >&2" in script.splitlines()
    assert backup.DIRECTORY_RENAMED not in script  # a full backup: no parent to rename from
    assert gpg[0] == "gpg"
    assert gpg[gpg.index("--passphrase-file") + 1] == PASSPHRASE_FILE
    assert "--symmetric" in gpg
    # The upload program hashes the stream and runs aws for each piece.
    assert digest[:2] == ["python3", "-c"]
    assert digest[3:] == [f"{WORK_DIR}/digest", str(backup.ARCHIVE_PIECE_SIZE), ".part-"]
    assert aws[:3] == ["aws", "s3", "cp"]
    assert aws[aws.index("--expected-size") + 1] == "12345"
    assert aws[-2:] == ["-", "s3://synapse-backups/prod/synapse/20250101T000000Z"]
    assert "//" not in aws[-1].removeprefix("s3://")
    # Without a snapshot file, a plain (not listed-incremental) archive, no state upload.
    assert not [word for word in tar if word.startswith("--listed-incremental")]
    assert ".snar.gpg" not in script
    # Members are counted from tar's index, leaving out tar's own notes.
    assert (
        f"members=$(grep --count --invert-match --regexp='^tar: ' -- {WORK_DIR}/index || true)"
        in script.splitlines()
    )
    assert "wc -l" not in script


def test_build_backup_command_no_secret():
    """Neither the secret key, the access key nor the passphrase is in the command."""
    command = backup.build_backup_command(
        _params(),
        "20250101T000000Z",
        ["/data/homeserver.yaml"],
        PASSPHRASE_FILE,
        database_path="/data/homeserver.db",
        work_dir=WORK_DIR,
    )

    text = "\n".join(command)
    for value in (SECRET_KEY, ACCESS_KEY, PASSPHRASE):
        assert value not in text


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_build_backup_command_quotes_hostile_paths(name: str):
    """Hostile file names stay single, intact words of the tar command.

    The script parses (bash -n) and shlex.split of the pipeline gives back each
    path as exactly one --add-file=data/... word.
    """
    paths = [f"/data/{name}", f"/data/media_store/{name}/x"]
    database = f"/data/db {name}/homeserver.db"

    command = backup.build_backup_command(
        _params(),
        "20250101T000000Z",
        paths,
        PASSPHRASE_FILE,
        database_path=database,
        work_dir=WORK_DIR,
    )

    script = command[2]
    _bash_syntax_ok(script)
    tar = _pipeline_words(script)[0]
    assert f"--add-file=data/{name}" in tar
    assert f"--add-file=data/media_store/{name}/x" in tar
    # The copy goes on the data volume, where sweep_leftovers looks for it.
    snapshot_dir = f"/data/{backup_container.SNAPSHOT_DIR_PREFIX}20250101T000000Z"
    copy_member = f"{snapshot_dir}/data/db {name}/homeserver.db".lstrip("/")
    # The database's copy is added from / (one -C only) and renamed to its own name.
    assert tar[-1] == f"--add-file={copy_member}"
    assert tar[-2].startswith("--transform=s,^")
    expression = tar[-2].removeprefix("--transform=")
    # The check of tar's exit status 2 knows the same members, word for word.
    # The file whose ctime is tar's start by the data volume's clock, made
    # after the copy, beside it (not archived: tar is given the copy alone).
    clock_file = f"{snapshot_dir}/tar-started"
    assert check_words(script)[6] == clock_file
    assert f"\ntouch -- {shlex.quote(clock_file)}\n{{ tar --create " in script
    assert check_words(script)[9:] == [
        f"data/{name}",
        f"data/media_store/{name}/x",
        copy_member,  # the database's copy gone is no purge either
    ]
    assert apply_transform(expression, copy_member) == f"data/db {name}/homeserver.db"
    assert apply_transform(expression, f"data/db {name}/homeserver.db") == (
        f"data/db {name}/homeserver.db"
    )
    assert [word for word in tar if word.startswith("--directory")] == ["--directory=/"]
    # Every name is literal: --no-unquote comes before the first --add-file.
    first_member = next(i for i, word in enumerate(tar) if word.startswith("--add-file="))
    assert tar.index("--no-unquote") < first_member
    assert "SNAPSHOT_DIR=" + shlex.quote(snapshot_dir) in script


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("data/homeserver.yaml", id="relative"),
        pytest.param("/data/../etc/shadow", id="dot-dot"),
        pytest.param("/data/./homeserver.yaml", id="dot"),
        pytest.param("/data//homeserver.yaml", id="double-slash"),
        pytest.param("/data/media/", id="trailing-slash"),
        pytest.param("/", id="root"),
        pytest.param("", id="empty"),
    ],
)
def test_build_backup_command_rejects_paths(path: str):
    """Relative or non-normalised paths raise BackupError, as backup or database paths."""
    with pytest.raises(backup.BackupError, match="not an absolute normalised path"):
        backup.build_backup_command(_params(), "20250101T000000Z", [path], PASSPHRASE_FILE)
    with pytest.raises(backup.BackupError, match="not an absolute normalised path"):
        backup.build_backup_command(
            _params(),
            "20250101T000000Z",
            ["/data/homeserver.yaml"],
            PASSPHRASE_FILE,
            database_path=path or "relative.db",
        )


@pytest.mark.parametrize("key", ["../x", "a/b", "$(id)", "x.manifest.json", ""])
def test_build_backup_command_rejects_keys(key: str):
    """An unsafe backup key is rejected before any script is built."""
    with pytest.raises(backup.BackupError, match="invalid backup id"):
        backup.build_backup_command(_params(), key, ["/data/homeserver.yaml"], PASSPHRASE_FILE)


def test_build_backup_command_work_dir_defaults_to_passphrase_dir():
    """Without work_dir, temporary files go beside the passphrase file."""
    command = backup.build_backup_command(
        _params(), "20250101T000000Z", ["/data/homeserver.yaml"], PASSPHRASE_FILE
    )

    tar, _, digest, _ = _pipeline_words(command[2])
    assert f"--index-file={WORK_DIR}/index" in tar
    assert digest[3] == f"{WORK_DIR}/digest"


PIECE = backup.ARCHIVE_PIECE_SIZE


@pytest.mark.parametrize(
    ("expected_size", "piece_size", "announced"),
    [
        pytest.param(10 * 2**40, PIECE, PIECE, id="10-tib"),
        pytest.param(5000, PIECE, 5000, id="small"),
        pytest.param(5000, 4096, 4096, id="small-pieces"),
    ],
)
def test_build_backup_command_pieces(expected_size: int, piece_size: int, announced: int):
    """The aws CLI is told the size of one piece at most, the program the piece size."""
    command = backup.build_backup_command(
        _params(),
        "20250101T000000Z",
        ["/data/homeserver.yaml"],
        PASSPHRASE_FILE,
        expected_size=expected_size,
        piece_size=piece_size,
    )

    _, _, upload, aws = _pipeline_words(command[2])
    assert upload[4:] == [str(piece_size), ".part-"]
    assert aws[aws.index("--expected-size") + 1] == str(announced)


@pytest.mark.parametrize("piece_size", [0, -1])
def test_build_backup_command_rejects_piece_size(piece_size: int):
    """A piece size that could hold nothing is refused."""
    with pytest.raises(backup.BackupError, match="piece size must be positive"):
        backup.build_backup_command(
            _params(), "20250101T000000Z", ["/x"], PASSPHRASE_FILE, piece_size=piece_size
        )


def test_aws_keeps_its_part_size_for_any_archive():
    """The real aws CLI's part sizing keeps 8 MiB parts for what it is told.

    s3transfer (the aws CLI's transfer library) doubles the part size, and the
    memory of the buffered parts with it, when the announced size needs more
    than 10,000 parts. The most a backup announces is one piece.
    """
    command = backup.build_backup_command(
        _params(), "20250101T000000Z", ["/x"], PASSPHRASE_FILE, expected_size=100 * 2**40
    )
    aws = _pipeline_words(command[2])[-1]
    announced = int(aws[aws.index("--expected-size") + 1])
    adjuster = ChunksizeAdjuster()
    chunk = backup_container.S3_MULTIPART_CHUNKSIZE
    assert adjuster.adjust_chunksize(chunk, announced) == chunk
    # ...whereas announcing the whole 100 TiB would have grown the parts.
    assert adjuster.adjust_chunksize(chunk, 100 * 2**40) > chunk


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_build_backup_command_runs_with_hostile_names(tmp_path: pathlib.Path):
    """The script, run by bash with real tar and python3, archives hostile names intact.

    The command substitutions in the names would create files in the working
    directory if they ever reached the shell unquoted.

    gpg, gpgconf and aws are stubs (gpg copies its input, aws stores it in a file);
    the real encryption and upload are tested in tests/workload.
    """
    names = [
        "with space",
        "it's",
        'say "hi"',
        "line\nbreak",
        "$(touch pwned)",
        "`touch pwned2`",
        "-rf",
    ]
    data = tmp_path / "data dir"
    data.mkdir()
    for name in names:
        (data / name).write_text(name)
    database = data / "homeserver.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (x)")
        connection.execute("INSERT INTO t VALUES ('row')")
    connection.close()
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    upload = tmp_path / "uploaded"
    _stub(
        bin_dir,
        "gpg",
        "import shutil, sys\nshutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)\n",
    )
    _stub(bin_dir, "gpgconf", "")
    _stub(
        bin_dir,
        "aws",
        "import json, os, shutil, sys\n"
        f"open({str(tmp_path / 'aws-argv')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"shutil.copyfileobj(sys.stdin.buffer, open({str(upload)!r}, 'wb'))\n",
    )
    _stub(
        bin_dir,
        "python3",
        "import os, sys\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n",
    )
    command = backup.build_backup_command(
        _params(path="prod"),
        "20250101T000000Z",
        sorted(str(data / name) for name in names),
        str(work_dir / "passphrase"),
        database_path=str(database),
        work_dir=str(work_dir),
    )

    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "pwned2").exists()
    sha256, size, members = backup_container._parse_digest(result.stdout)
    assert size == upload.stat().st_size
    assert members == len(names) + 1
    with tarfile.open(upload) as archive:
        archived = set(archive.getnames())
    relative = str(data).lstrip("/")
    assert archived == {f"{relative}/{name}" for name in names} | {f"{relative}/homeserver.db"}
    assert json.loads((tmp_path / "aws-argv").read_text())[-1] == (
        "s3://synapse-backups/prod/20250101T000000Z"
    )
    # The snapshot directory is gone (trap cleanup).
    assert not any(
        path.name.startswith(backup_container.SNAPSHOT_DIR_PREFIX) for path in data.iterdir()
    )
    assert len(sha256) == 64


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_build_backup_command_archives_names_with_backslashes(tmp_path: pathlib.Path):
    r"""A name with a backslash escape in it is archived as it is, not as tar unquotes it.

    GNU tar unquotes --add-file names by default: without --no-unquote, the file
    named 'a\tb.yaml' (a backslash, then t) would be read as 'a<TAB>b.yaml'.
    """
    data = tmp_path / "data"
    data.mkdir()
    literal = data / "a\\tb.yaml"
    literal.write_text("the backed-up file")
    (data / "a\tb.yaml").write_text("another file")
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    upload = tmp_path / "uploaded"
    _stub(
        bin_dir,
        "gpg",
        "import shutil, sys\nshutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)\n",
    )
    _stub(bin_dir, "gpgconf", "")
    _stub(
        bin_dir,
        "aws",
        f"import shutil, sys\nshutil.copyfileobj(sys.stdin.buffer, open({str(upload)!r}, 'wb'))\n",
    )
    command = backup.build_backup_command(
        _params(), "20250101T000000Z", [str(literal)], str(work_dir / "passphrase")
    )

    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        stdin=subprocess.DEVNULL,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    with tarfile.open(upload) as archive:
        (member,) = archive.getmembers()
        content = archive.extractfile(member).read()
    assert member.name == str(literal).lstrip("/")
    assert content == b"the backed-up file"


def _pipeline_stubs(tmp_path: pathlib.Path) -> tuple[dict[str, str], pathlib.Path]:
    """Stub gpg (copies its input), gpgconf and aws (stores its input); python3 is real.

    Returns:
        The environment with the stubs first on PATH, and where aws stores the upload.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    upload = tmp_path / "uploaded"
    _stub(
        bin_dir,
        "gpg",
        "import shutil, sys\nshutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)\n",
    )
    _stub(bin_dir, "gpgconf", "")
    _stub(
        bin_dir,
        "aws",
        f"import shutil, sys\nshutil.copyfileobj(sys.stdin.buffer, open({str(upload)!r}, 'wb'))\n",
    )
    _stub(
        bin_dir,
        "python3",
        "import os, sys\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n",
    )
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, upload


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_build_backup_command_archives_a_database_with_a_backslash(tmp_path: pathlib.Path):
    r"""The database's copy is added literally too: 'home\tserver.db' keeps its backslash."""
    data = tmp_path / "data"
    data.mkdir()
    database = data / "home\\tserver.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    (data / "home\tserver.db").write_text("another file")
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    environment, upload = _pipeline_stubs(tmp_path)
    command = backup.build_backup_command(
        _params(),
        "20250101T000000Z",
        [],
        str(work_dir / "passphrase"),
        database_path=str(database),
        work_dir=str(work_dir),
    )

    result = subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment, timeout=60
    )

    assert result.returncode == 0, result.stderr
    with tarfile.open(upload) as archive:
        assert archive.getnames() == [str(database).lstrip("/")]


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
@pytest.mark.parametrize(
    ("tar_status", "message", "script_status"),
    [
        pytest.param(0, "", 0, id="tar-ok"),
        pytest.param(1, "", 0, id="file-changed-while-read"),
        pytest.param(2, "", 2, id="fatal-error"),
        pytest.param(2, "{gone}: Cannot stat", 0, id="directory-deleted-while-read"),
        # The member itself deleted: real tar's own "Cannot stat" (exit 2) stays an error.
        pytest.param(0, "deleted", 2, id="member-deleted"),
        pytest.param(141, "", 141, id="killed-by-sigpipe"),
    ],
)
def test_build_backup_command_tar_exit_status(
    tmp_path: pathlib.Path, tar_status: int, message: str, script_status: int
):
    """A busy server makes tar exit 1, or 2 for directories it deleted: the backup counts.

    Any other status fails it.

    Arrange: a real tar wrapped to exit with a given status once it archived
    the data, after printing an error (ENOENT) about a path.
    Act: run the backup script with bash.
    Assert: the script's exit status; on success, the digest line of the whole archive.
    """
    data = tmp_path / "data"
    data.mkdir()
    (data / "homeserver.yaml").write_text("server_name: example.com\n")
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    environment, upload = _pipeline_stubs(tmp_path)
    real_tar = shutil.which("tar")
    gone = str(data / "purged").lstrip("/")
    error = (
        message.startswith("{") and f"tar: {message.format(gone=gone)}: No such file or directory"
    )
    _stub(
        pathlib.Path(environment["PATH"].split(":")[0]),
        "tar",
        "import subprocess, sys\n"
        f"code = subprocess.call([{real_tar!r}, *sys.argv[1:]])\n"
        f"if {error!r}: print({error!r}, file=sys.stderr)\n"
        f"sys.exit(code or {tar_status})\n",
    )
    command = backup.build_backup_command(
        _params(),
        "20250101T000000Z",
        [str(data / "homeserver.yaml")],
        str(work_dir / "passphrase"),
        work_dir=str(work_dir),
    )
    if message == "deleted":
        (data / "homeserver.yaml").unlink()

    result = subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment, timeout=60
    )

    assert result.returncode == script_status, result.stderr
    if message == "deleted":
        assert "homeserver.yaml: Cannot stat: No such file or directory" in result.stderr
    if script_status == 0:
        _, size, members = backup_container._parse_digest(result.stdout)
        assert (size, members) == (upload.stat().st_size, 1)
    else:
        assert not result.stdout.strip()


def _check_tar_read(
    errors: pathlib.Path,
    state: pathlib.Path | None,
    status: int,
    *members: str,
    clock: pathlib.Path | None = None,
    deferred: pathlib.Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the check the backup script runs after tar, as it runs it.

    tar's index is read from ``index`` beside its messages (tar_state puts it there).
    """
    return subprocess.run(
        [
            sys.executable, "-c", backup._TAR_READ_CHECK_PROGRAM, str(errors),
            str(errors.with_name("index")), str(state) if state else "",
            str(clock) if clock else "", str(deferred) if deferred else "", str(status),
            *members,
        ],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def _assert_check_outcome(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Assert that the check passed quietly (no message) or failed with the message."""
    if message:
        assert result.returncode == 1
        assert result.stderr.startswith(message), result.stderr
        assert result.stderr.endswith(" while tar read the data: run the backup again\n")
    else:
        assert (result.returncode, result.stderr) == (0, "")


_GONE = "tar: {gone}: Cannot stat: No such file or directory"
_TRAILER = "tar: Exiting with failure status due to previous errors"


@pytest.mark.parametrize(
    ("messages", "removed_only"),
    [
        pytest.param([_GONE, _TRAILER], True, id="a-deleted-directory"),
        pytest.param(
            ["tar: {gone}/: Cannot open: No such file or directory", _TRAILER],
            True,
            id="deleted-before-listed",
        ),
        pytest.param(
            [
                "tar: {here}: file changed as we read it",
                "tar: {gone}/sub: File removed before we read it",
                "tar: {here}: Directory has been renamed from 'data/old'",
                _GONE,
                _TRAILER,
            ],
            True,
            id="with-warnings",
        ),
        pytest.param(["tar: {here}: Cannot stat: No such file or directory"], False, id="exists"),
        pytest.param(
            ["tar: {member}: Cannot stat: No such file or directory"], False, id="member"
        ),
        pytest.param([_GONE.replace("{gone}", "{gone}\\303")], False, id="escaped-name"),
        pytest.param([_GONE, "tar: {here}: Cannot open: Permission denied"], False, id="denied"),
        pytest.param([_GONE, "tar: {here}: Read error at byte 0"], False, id="read-error"),
        pytest.param(
            ["tar: {here}: file changed as we read it", _TRAILER], False, id="no-removal"
        ),
        pytest.param([], False, id="no-message"),
    ],
)
def test_tar_exit_status_2_passes_only_for_deleted_directories(
    tmp_path: pathlib.Path, messages: list[str], removed_only: bool
):
    """Tar's exit status 2 passes only when every error names a deleted, non-member path.

    Arrange: tar's messages naming paths (relative to /, as tar names them) that
    exist, are gone, or are a top-level member (gone too); no snapshot state.
    Act: run the check program with python3.
    Assert: its exit status, silent.
    """
    here = tmp_path / "data" / "media"
    here.mkdir(parents=True)
    names = {
        "here": str(here).lstrip("/"),
        "gone": str(here / "purged").lstrip("/"),
        "member": str(tmp_path / "data" / "gone-member").lstrip("/"),
    }
    errors = tmp_path / "tar-errors"
    errors.write_text("".join(line.format(**names) + "\n" for line in messages))

    result = _check_tar_read(errors, None, 2, names["here"], names["member"])

    assert (result.returncode, result.stderr) == (0 if removed_only else 1, "")


@pytest.mark.parametrize(("status", "passes"), [(0, True), (1, True), (141, False), (3, False)])
def test_tar_exit_status_other_than_2(tmp_path: pathlib.Path, status: int, passes: bool):
    """0 and 1 pass (without a state, nothing more is checked); a status above 2 fails."""
    errors = tmp_path / "tar-errors"
    errors.write_text("tar: data/x: file changed as we read it\n")

    assert (_check_tar_read(errors, None, status).returncode == 0) == passes


def _odd_tree(top: pathlib.Path) -> None:
    """Directories with names that test a parser of tar's state: NULs apart, anything goes."""
    for name in ("plain", "with\nnewline", "123", "-1", "Ylike", "Dlike", "empty", "a/b/c/d"):
        (top / name).mkdir(parents=True)
    # And what tar escapes in its index: a name that looks escaped, control
    # characters, a backslash at the end, bytes that are not UTF-8.
    odd = ["back\\101slash", "tab\tbell\a\x01\x7f", "ütf8", "ends\\", "non-utf8-\udcff\udcfe"]
    for name in odd:
        (top / name).mkdir()
    for directory in ("plain", "with\nnewline", "123", "a/b", *odd):
        (top / directory / "file").write_text("x")


def _change_after_tar(
    change: str, top: pathlib.Path, state: pathlib.Path, outside: pathlib.Path
) -> None:
    """Change the tree (or tar's state) as if while tar read it, after it passed."""
    member = str(top).lstrip("/")
    if change in ("new-directory", "inode-reused"):
        (top / "new" / "sub").mkdir(parents=True)
        (top / "new" / "sub" / "file").write_text("made after tar started")
    if change == "inode-reused":
        gone = f"{member}/gone".encode()
        inode = (top / "new").stat().st_ino
        with state.open("ab") as file:
            file.write(b"0\x001\x002\x003\x00%d\x00%s\x00Yfile\x00\x00\x00" % (inode, gone))
    elif change == "device-changed":
        device = top.stat().st_dev
        text = state.read_bytes()
        changed = text.replace(b"\x00%d\x00" % device, b"\x00%d\x00" % (device + 7))
        assert changed.count(b"\x00%d\x00" % (device + 7)) == len(list(top.rglob("*/"))) + 1
        state.write_bytes(changed)
    elif change == "deleted":
        shutil.rmtree(top / "a")
    elif change == "renamed":
        (top / "with\nnewline").rename(top / "renamed")
    elif change == "moved-in":
        (outside / "old").rename(top / "plain" / "old")
    elif change == "replaced":
        shutil.rmtree(top / "123")
        (outside / "old").rename(top / "123")


_MOVED = "a directory was moved to"
_FILE_NAMED_LIKE_IT = "file-named-like-the-warning"


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
@pytest.mark.parametrize("incremental", [False, True], ids=["full", "incremental"])
@pytest.mark.parametrize(
    ("change", "warning", "message"),
    [
        pytest.param("none", None, "", id="nothing-changed"),
        pytest.param("new-directory", None, "", id="a-directory-made-since"),
        pytest.param("deleted", None, "", id="a-directory-deleted-since"),
        # tar keeps a directory's old device number (--no-check-device): inodes match.
        pytest.param("device-changed", None, "", id="another-device-number"),
        # A new directory given a deleted one's inode holds only new entries.
        pytest.param("inode-reused", None, "", id="a-deleted-directory's-inode-reused"),
        pytest.param("renamed", None, "tar met a directory under two names", id="renamed"),
        pytest.param("moved-in", None, "a directory was moved to", id="moved-in-from-outside"),
        pytest.param("replaced", None, "a directory was moved to", id="replaced-by-an-old-one"),
        # A directory known by name with a new inode (after a restore): still checked.
        pytest.param("moved-in", "", "a directory was moved to", id="moved-in-after-a-restore"),
        # Renamed from another name: the state may pair names and inodes
        # wrongly, so tar's index alone counts; a directory it did not
        # archive is still found.
        pytest.param("moved-in", " from 'x'", _MOVED, id="moved-in-with-a-rename-warning"),
        pytest.param("renamed", " from 'x'", _MOVED, id="renamed-with-a-rename-warning"),
        # A file whose name looks like the warning is no warning: the state counts.
        pytest.param("replaced", _FILE_NAMED_LIKE_IT, _MOVED, id="a-file-named-like-it"),
    ],
)
def test_tar_read_check_against_real_tar_states(
    tmp_path: pathlib.Path, incremental: bool, change: str, warning: str | None, message: str
):
    """After tar, every directory under the members must be in its state under its own name.

    Arrange: a tree with odd names, archived by real tar with a snapshot state
    (after a first run, for an incremental one); then a change to the tree,
    as if made while tar read it, after tar had passed (or to the state).
    Act: run the check program with tar's exit status 0.
    Assert: new and deleted directories pass; a directory under another name
    (its inode recorded under the old one), or an old one moved in from
    outside the members (entries older than tar's start), fails with a message.
    A misread state would fail the unchanged odd tree.
    """
    top = tmp_path / "data" / "media"
    _odd_tree(top)
    outside = tmp_path / "elsewhere"
    (outside / "old").mkdir(parents=True)
    (outside / "old" / "file").write_text("made before tar ran")
    if message:
        time.sleep(1.1)  # older than tar's start, with the check's second of margin
    member = str(top).lstrip("/")
    state = tmp_path / "state"
    if incremental:
        assert tar_state(tmp_path, member, state) == 0
        (top / "plain" / "file").write_text("changed")
    assert tar_state(tmp_path, member, state) == 0
    _change_after_tar(change, top, state, outside)
    renamed = "" if warning is None else f"tar: {member}/x: Directory has been renamed{warning}\n"
    if warning == _FILE_NAMED_LIKE_IT:  # tar escapes the colon in the file's name
        renamed = (
            f"tar: {member}/x\\: Directory has been renamed from y: file changed as we read it\n"
        )
    (tmp_path / "tar-errors").write_text(renamed)

    result = _check_tar_read(tmp_path / "tar-errors", state, 0, member)

    _assert_check_outcome(result, message)


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
@pytest.mark.parametrize("warning", [False, True], ids=["no-rename-warning", "renamed-from"])
def test_tar_read_check_leaves_its_finding_for_after_the_rename_check(
    tmp_path: pathlib.Path, warning: bool
):
    """After "renamed from", a finding goes to a file for the script, not to a failure.

    Arrange: a real tar state, then an old directory moved in after tar passed.
    Act: run the check program with a file to defer to, with and without
    tar's warning.
    Assert: with the warning it passes and the file holds the message (the
    script reads it after deciding on a full backup); without, it fails at
    once and writes no file.
    """
    top = tmp_path / "data" / "media"
    _odd_tree(top)
    (tmp_path / "elsewhere" / "old").mkdir(parents=True)
    (tmp_path / "elsewhere" / "old" / "file").write_text("made before tar ran")
    time.sleep(1.1)  # older than tar's start, with the check's second of margin
    member = str(top).lstrip("/")
    state = tmp_path / "state"
    assert tar_state(tmp_path, member, state) == 0
    _change_after_tar("moved-in", top, state, tmp_path / "elsewhere")
    errors = tmp_path / "tar-errors"
    errors.write_text(f"tar: {member}/x: Directory has been renamed from 'y'\n" if warning else "")
    deferred = tmp_path / "deferred"

    result = _check_tar_read(errors, state, 0, member, deferred=deferred)

    message = f"{_MOVED} '{member}/plain/old' while tar read the data: run the backup again\n"
    if warning:
        assert (result.returncode, result.stderr) == (0, "")
        assert deferred.read_text() == message
    else:
        assert (result.returncode, result.stderr) == (1, message)
        assert not deferred.exists()


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
@pytest.mark.parametrize(
    "between",
    [
        pytest.param("nothing", id="unchanged"),
        # Two directories swapped names: tar warns "renamed from" for both,
        # and its state pairs one name with the other's inode.
        pytest.param("swapped", id="renamed-from-between-backups"),
    ],
)
def test_tar_read_check_reads_back_every_name_tar_archived(tmp_path: pathlib.Path, between: str):
    """Every directory tar archived is found by its name in tar's index, however odd.

    Arrange: a tree with names tar escapes in its index, archived twice by
    real tar (an incremental backup), with two directories swapping names
    in between or not; then tar's recorded time moved 5 s on, so that every
    entry in the tree looks older than tar's start.
    Act: run the check program with tar's own messages; then again after an
    old directory was moved in under a new name.
    Assert: the first passes: a name misread from the index, or a name paired
    with another inode in the state (after "renamed from"), would look like a
    directory moved in; the second fails, with or without the warning.
    """
    top = tmp_path / "data" / "media"
    _odd_tree(top)
    member = str(top).lstrip("/")
    state = tmp_path / "state"
    assert tar_state(tmp_path, member, state) == 0
    if between == "swapped":
        (top / "plain").rename(top / "swap")
        (top / "123").rename(top / "plain")
        (top / "swap").rename(top / "123")
    assert tar_state(tmp_path, member, state) == 0
    errors = tmp_path / "tar-errors"
    assert ("Directory has been renamed from" in errors.read_text()) == (between == "swapped")
    assert "\\\\101" in (tmp_path / "index").read_text()  # escaped: read back to one backslash
    _shift_tar_clock(state, 5)

    assert _check_tar_read(errors, state, 0, member).returncode == 0
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "old").write_text("made before tar ran")
    (tmp_path / "elsewhere").rename(top / "a" / "moved")
    result = _check_tar_read(errors, state, 0, member)
    assert result.returncode == 1
    assert result.stderr.startswith(f"a directory was moved to '{member}/a/moved'"), result.stderr


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_the_check_keeps_every_directory_past_one_sorted_run(tmp_path: pathlib.Path):
    """Past 65,536 directories the check sorts its hashes in runs and merges them: none lost.

    Arrange: 70,000 directories, each with a file older than tar's start,
    archived by real tar (its state and index).
    Act: run the check on the tree as tar read it, then after one directory
    was moved to a new name.
    Assert: the first passes (a hash lost or misplaced in the merge would
    make a directory look moved in); the second names both of its names.
    """
    top = tmp_path / "data" / "thumbnails"
    for outer in range(280):
        for inner in range(250):
            directory = top / f"{outer:03d}" / f"{inner:03d}"
            directory.mkdir(parents=True)
            (directory / "thumbnail").write_bytes(b"")
    time.sleep(1.1)  # older than tar's start, with the check's second of margin
    member = str(top).lstrip("/")
    state = tmp_path / "state"
    assert tar_state(tmp_path, member, state) == 0
    errors = tmp_path / "tar-errors"
    assert (tmp_path / "index").read_text().count("/\n") > 70_000

    _assert_check_outcome(_check_tar_read(errors, state, 0, member), "")
    (top / "279" / "249").rename(top / "279" / "moved")
    result = _check_tar_read(errors, state, 0, member)
    moved = f"('{member}/279/249' is now '{member}/279/moved')"
    _assert_check_outcome(result, f"tar met a directory under two names {moved}")


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
@pytest.mark.parametrize(
    ("again", "message"),
    [
        pytest.param("new-directory", "", id="made-again-by-an-upload"),
        pytest.param("old-directory", _MOVED, id="an-old-one-moved-there"),
        # tar's state then counts for nothing: a name in the index that tar
        # could not read is no directory archived.
        pytest.param("old-directory-renamed-from", _MOVED, id="an-old-one-after-renamed-from"),
        pytest.param("file", None, id="a-file-now"),
    ],
)
def test_tar_exit_status_2_for_a_directory_made_again(
    tmp_path: pathlib.Path, again: str, message: str | None
):
    """A purged directory made again before tar ended (an upload): the walk judges it.

    Arrange: a real tar state of a tree; tar's "Cannot stat" (status 2) for a
    directory that was deleted while tar read, and is there again: a new
    directory with new files, an old directory moved there, or a file.
    Act: run the check program.
    Assert: the new directory passes; the old one fails as moved; a file
    fails silently (exit 1: tar's messages say the rest).
    """
    top = tmp_path / "data" / "media"
    _odd_tree(top)
    outside = tmp_path / "elsewhere" / "old"
    outside.mkdir(parents=True)
    (outside / "file").write_text("made before tar ran")
    time.sleep(1.1)  # older than tar's start, with the check's second of margin
    member = str(top).lstrip("/")
    state = tmp_path / "state"
    assert tar_state(tmp_path, member, state) == 0
    shutil.rmtree(top / "plain")
    if again == "new-directory":
        (top / "plain").mkdir()
        (top / "plain" / "upload").write_text("new")
    elif again.startswith("old-directory"):
        outside.rename(top / "plain")
    else:
        (top / "plain").write_text("a file")
    errors = tmp_path / "tar-errors"
    messages = [f"tar: {member}/plain: Cannot stat: No such file or directory"]
    if again.endswith("renamed-from"):
        messages.append(f"tar: {member}/123: Directory has been renamed from 'x'")
    errors.write_text("".join(line + "\n" for line in messages))
    assert f"{member}/plain/\n" in (tmp_path / "index").read_text()  # archived before it went

    result = _check_tar_read(errors, state, 2, member)

    if message is None:
        assert (result.returncode, result.stderr) == (1, "")
    else:
        _assert_check_outcome(result, message)


def _shift_tar_clock(state: pathlib.Path, seconds: int) -> None:
    """Move the snapshot time in tar's state, as if the unit's clock were off by so much."""
    header, _, body = state.read_bytes().partition(b"\n")
    time_s, _, rest = body.partition(b"\0")
    state.write_bytes(b"%s\n%d\0%s" % (header, int(time_s) + seconds, rest))


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
@pytest.mark.parametrize(
    ("shift", "marker", "change", "message"),
    [
        # A network volume whose clock is behind the unit's: a directory made
        # during the backup looked moved in; by the volume's own clock it is new.
        pytest.param(5, "data-volume", "new-directory", "", id="volume-behind-new-directory"),
        pytest.param(5, None, "new-directory", "a directory was moved to", id="no-marker"),
        pytest.param(5, "data-volume", "moved-in", "a directory was moved to", id="moved-in"),
        # A volume ahead of the unit: an old directory moved in is still old.
        pytest.param(-5, "data-volume", "moved-in", "a directory was moved to", id="volume-ahead"),
        # The marker's clock is its file system's: elsewhere tar's own clock counts.
        pytest.param(5, "another-device", "new-directory", "a directory was moved to", id="tmpfs"),
        pytest.param(5, "gone", "new-directory", "/", id="marker-deleted"),
    ],
)
def test_tar_read_check_reads_the_data_volume_clock(
    tmp_path: pathlib.Path, shift: int, marker: str | None, change: str, message: str
):
    """New or old is judged by the data volume's clock, from a file made before tar.

    Arrange: a tree archived by real tar, after a file was made beside it
    (on the same file system, as the backup script makes it on the data
    volume; or on a tmpfs); tar's snapshot time then shifted by some
    seconds, as if the unit's clock and the volume's disagreed; then a
    directory made, or an old one moved in, as if while tar read.
    Act: run the check program.
    Assert: on the marker's file system the marker's time decides (a new
    directory passes, an old one moved in fails, whichever clock is ahead);
    elsewhere, or without a marker, tar's shifted time does; a marker gone
    is an error.
    """
    top = tmp_path / "data" / "media"
    _odd_tree(top)
    outside = tmp_path / "elsewhere"
    (outside / "old").mkdir(parents=True)
    (outside / "old" / "file").write_text("made before tar ran")
    time.sleep(1.1)  # older than the marker, with the check's second of margin
    clock = None
    if marker == "another-device":
        shm = pathlib.Path("/dev/shm")
        assert shm.stat().st_dev != tmp_path.stat().st_dev, "no tmpfs at /dev/shm"
        clock = shm / f"tar-started-{os.getpid()}-{time.monotonic_ns()}"
    elif marker:
        clock = tmp_path / "tar-started"
    if clock:
        clock.touch()
    member = str(top).lstrip("/")
    state = tmp_path / "state"
    try:
        assert tar_state(tmp_path, member, state) == 0
        _shift_tar_clock(state, shift)
        _change_after_tar(change, top, state, outside)
        (tmp_path / "tar-errors").write_text("")
        if marker == "gone" and clock:
            clock.unlink()

        result = _check_tar_read(tmp_path / "tar-errors", state, 0, member, clock=clock)
    finally:
        if clock and marker == "another-device":
            clock.unlink()

    _assert_check_outcome(result, message)
    if marker == "gone":
        assert f"{clock} (the time tar started, on the data volume) went missing" in result.stderr


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
@pytest.mark.parametrize(
    "damage",
    ["format-1", "cut-in-a-record", "cut-after-a-name", "no-end", "not-a-number", "empty"],
)
def test_tar_read_check_fails_on_a_state_it_cannot_read(tmp_path: pathlib.Path, damage: str):
    """A state that is not whole GNU tar format 2 fails the check: nothing is taken on trust.

    Also after a "renamed from" warning, where the index decides and the
    state's records are otherwise not needed: the finding then goes to the
    deferred file, which makes the script take a full backup.
    """
    top = tmp_path / "data" / "media"
    _odd_tree(top)
    member = str(top).lstrip("/")
    state = tmp_path / "state"
    assert tar_state(tmp_path, member, state) == 0
    whole = state.read_bytes()
    name = f"{member}/plain".encode()
    damaged = {
        "format-1": b"GNU tar-1.34-1\n123\n",
        "cut-in-a-record": whole[: whole.index(name) - 3],
        "cut-after-a-name": whole[: whole.index(name) + len(name) + 1],
        "no-end": whole[:-2],
        "not-a-number": whole.replace(
            b"\0%d\0%s\0" % ((top / "plain").stat().st_ino, name), b"\0x\0%s\0" % name
        ),
        "empty": b"",
    }[damage]
    assert damaged != whole
    state.write_bytes(damaged)
    errors = tmp_path / "tar-errors"
    renamed = f"tar: {member}/x: Directory has been renamed from 'y'\n"
    for warning, deferred in ((False, None), (True, tmp_path / "deferred")):
        errors.write_text(renamed if warning else "")

        result = _check_tar_read(errors, state, 0, member, deferred=deferred)

        message = "tar's snapshot state could not be read while tar read the data"
        if deferred:
            assert (result.returncode, result.stderr) == (0, "")
            assert deferred.read_text().startswith(message)
        else:
            assert result.returncode == 1
            assert result.stderr.startswith(message), result.stderr


# --- redact and _parse_digest ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hidden", "expected"),
    [
        pytest.param("key=abc; again abc", ["abc"], "key=***; again ***", id="every-occurrence"),
        pytest.param("a secret and a pass", ["secret", "pass"], "a *** and a ***", id="several"),
        pytest.param("nothing here", ["absent"], "nothing here", id="absent"),
        pytest.param("keep me", ["", ""], "keep me", id="empty-secret-ignored"),
        pytest.param("", ["x"], "", id="empty-text"),
    ],
)
def test_redact(text: str, hidden: list[str], expected: str):
    """Redact replaces each secret by ***, and ignores empty ones."""
    assert backup_container.redact(text, hidden) == expected


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        pytest.param(f"{'a' * 64} 10 3\n", ("a" * 64, 10, 3), id="plain"),
        pytest.param(
            f"some progress\nmore\n{'0123456789abcdef' * 4} 1048576 42\n\n",
            ("0123456789abcdef" * 4, 1048576, 42),
            id="last-line-after-output",
        ),
        pytest.param(f"  {'b' * 64} 0 0  ", ("b" * 64, 0, 0), id="surrounding-space"),
    ],
)
def test_parse_digest(stdout: str, expected: tuple[str, int, int]):
    """The last line gives the SHA-256, the size and the member count."""
    assert backup_container._parse_digest(stdout) == expected


@pytest.mark.parametrize(
    "stdout",
    [
        pytest.param("", id="empty"),
        pytest.param("\n\n", id="blank"),
        pytest.param(f"{'a' * 63} 10 3", id="short-digest"),
        pytest.param(f"{'A' * 64} 10 3", id="uppercase-digest"),
        pytest.param(f"{'a' * 64} 10", id="no-member-count"),
        pytest.param(f"{'a' * 64} -1 3", id="negative-size"),
        pytest.param(f"{'a' * 64} 10 3\nextra", id="not-last-line"),
    ],
)
def test_parse_digest_rejects(stdout: str):
    """A missing or malformed digest line raises BackupError."""
    with pytest.raises(backup.BackupError, match="did not report"):
        backup_container._parse_digest(stdout)


# --- small helpers ---------------------------------------------------------------------------


def test_backup_object_names():
    """A backup's objects: its manifest (the commit) first, then the archive and the state."""
    assert backup_store.backup_object_names("20250101T000000Z") == [
        "20250101T000000Z.manifest.json",
        "20250101T000000Z",
        "20250101T000000Z.snar.gpg",
    ]


def test_manifest_to_json():
    """The manifest is JSON with hyphenated keys, its type and parent, and the metadata."""
    manifest = backup.BackupManifest(
        backup_id="20250101T000000Z",
        created_at="2025-01-01T00:00:00+00:00",
        paths=("/data/homeserver.yaml",),
        file_count=2,
        size=100,
        sha256="c" * 64,
        duration=0.5,
        metadata={"server-name": "example.com"},
    )

    document = json.loads(manifest.to_json())

    assert document == {
        "version": backup_store.MANIFEST_VERSION,
        "backup-id": "20250101T000000Z",
        "created-at": "2025-01-01T00:00:00+00:00",
        "paths": ["/data/homeserver.yaml"],
        "file-count": 2,
        "size": 100,
        "sha256": "c" * 64,
        "duration": 0.5,
        "type": "full",
        "parent": "",
        "server-name": "example.com",
    }


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        pytest.param(None, "no error output", id="none"),
        pytest.param("", "no error output", id="empty"),
        pytest.param(b"one\n\ntwo\n", "one; two", id="bytes"),
        pytest.param(
            "\n".join(str(n) for n in range(8)), "0; 1; 2; 3; 4; 5; 6; 7", id="eight-kept"
        ),
        pytest.param(
            "\n".join(str(n) for n in range(20)),
            "0; 1; 2; 3; ...; 16; 17; 18; 19",
            id="first-and-last-four",
        ),
    ],
)
def test_tail(output: str | bytes | None, expected: str):
    """Error output is shortened to one line, keeping its first and last lines.

    The first lines name the stage that failed (an S3 error, say), the last ones
    what that did to the next stages.
    """
    assert backup_container._tail(output) == expected


def test_expected_size_is_generous():
    """The announced size is above the data size, with room for the archive overhead."""
    assert backup._expected_size(0) >= 64 * 1024 * 1024
    assert backup._expected_size(10**9) > 10**9


def test_new_work_dir_is_random_and_private():
    """Work directories are fresh, under the private prefix."""
    first, second = backup_container.new_work_dir(), backup_container.new_work_dir()

    assert first != second
    assert first.startswith(backup_container.WORK_DIR_PREFIX)
