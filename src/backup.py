"""Provides backup functionality for Synapse.

A backup is made inside the workload container by one bash pipeline::

    tar --create ... | gpg --symmetric ... | tee >(digest) | aws s3 cp - s3://bucket/key

run as the Synapse user. Everything the pipeline needs is put in a private
work directory (mode 0700, under /tmp) first: the aws configuration, the gpg
passphrase (mode 0600) and an empty GNUPGHOME. The S3 credentials reach the
container only in the exec's environment. The work directory is removed
afterwards, whatever happened.

A backup exists only once its manifest (``<key>.manifest.json``) is written:
that is the commit step, done from the charm after the upload was checked.
Whatever a failed run left in S3 is removed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal

import boto3
import ops
import yaml
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, InvalidRegionError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

logger = logging.getLogger(__name__)

AWS_COMMAND = "aws"
BASH_COMMAND = "bash"
DATA_DIR = "/data"
SYNAPSE_CONFIG_PATH = f"{DATA_DIR}/homeserver.yaml"
# Files in the data directory that Synapse's backup documentation asks for:
# configuration, signing keys and log configuration.
BACKUP_FILE_PATTERNS = ["*.yaml", "*.signing.key", "*.log.config"]
# Media directories with content that exists nowhere else (remote_* and
# url_cache* are caches that Synapse fetches again).
LOCAL_DIR_PATTERN = "local_*"
MEDIA_DIR = f"{DATA_DIR}/media_store"
SQLITE_ENGINES = ("sqlite3", "sqlite")  # homeserver.yaml's database name
POSTGRES_ENGINES = ("psycopg2", "psycopg")
# The aws CLI keeps about one multipart chunk in memory per request in
# flight (and, downloading to a pipe, the parts waiting for their turn):
# these bound the pipeline's memory whatever the size of the data. Measured
# by `tox -e bench` (docs/explanation/performance.md).
S3_MAX_CONCURRENT_REQUESTS = 4
S3_MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
S3_DOWNLOAD_CONCURRENT_REQUESTS = 1
S3_DOWNLOAD_CHUNKSIZE = 16 * 1024 * 1024
# S3 allows 10,000 parts per object. For a larger stream the aws CLI doubles
# its part size, and its memory with it (about 10 parts are buffered), so an
# archive is stored in pieces that fit 10,000 parts of S3_MULTIPART_CHUNKSIZE
# (78 GiB): the first under the backup's id, the next ones as
# <id>.part-0001, <id>.part-0002...
ARCHIVE_PIECE_SIZE = 64 * 1024**3
ARCHIVE_PIECE_INFIX = ".part-"
MAX_ARCHIVE_PIECES = 10_000
# Name of the passphrase file inside the private work directory.
PASSPHRASE_FILE = "passphrase"  # noqa: S105 - a file name, not a secret
AWS_CONFIG_FILE = "aws-config"
AWS_DOWNLOAD_CONFIG_FILE = "aws-config-download"
GNUPG_DIR = "gnupg"
DEFAULT_WORK_DIR = "/tmp/synapse-backup"  # noqa: S108 - private 0700, removed after use
WORK_DIR_PREFIX = "/tmp/synapse-backup-"  # noqa: S108 - a private 0700 dir in the container
SNAPSHOT_DIR_PREFIX = ".synapse-backup-snapshot-"
MANIFEST_SUFFIX = ".manifest.json"
# GNU tar's listed-incremental state after each backup, encrypted, so that a
# new unit can continue a chain; the newest one is also kept in the container.
SNAPSHOT_STATE_SUFFIX = ".snar.gpg"
STATE_DIR = f"{DATA_DIR}/.synapse-backup-state"
SNAPSHOT_STATE_FILE = "snapshot.snar"
DATABASE_STATE_FILE = "database.state"  # the database's fingerprint, see _SNAPSHOT_PROGRAM
DATABASE_STATE_SUFFIX = ".db-state"
# Which data this unit's /data holds: a random id made at its first backup and
# anew by each restore, recorded in each manifest as "data-id"; and the backup
# the last restore brought in, which the next backup may build on. A chain
# grows only from the data it was made of (see _choose_parent).
DATA_ID_FILE = f"{STATE_DIR}/data-id"
RESTORED_FROM_FILE = f"{STATE_DIR}/restored-from"
_DATA_ID_PATTERN = re.compile(r"^[0-9a-f]{8,64}$")
MANIFEST_VERSION = 1
# Every command the backup and restore scripts run in the workload.
REQUIRED_TOOLS = (
    BASH_COMMAND,
    "tar",
    "gpg",
    "gpgconf",
    "python3",
    AWS_COMMAND,
    "env",
    "grep",
    "du",
    "df",
    "chmod",
    "touch",
    "cp",
    "mv",
    "rm",
    "mkdir",
)
SYNAPSE_USER_ID = 991
SYNAPSE_GROUP_ID = 991
# Backup ids are UTC timestamps: sortable, and safe in a shell word or S3 key.
BACKUP_ID_FORMAT = "%Y%m%dT%H%M%SZ"
BACKUP_ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
# The name of any object of a backup: its id, then nothing or a suffix.
_BACKUP_OBJECT_PATTERN = re.compile(r"([0-9]{8}T[0-9]{6}Z)(\..*)?", re.DOTALL)
_KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
EXEC_TIMEOUT = 24 * 60 * 60.0
GPG_S2K_COUNT = 65011712  # the most passphrase hashing OpenPGP can encode

# The start of the stream programs below: 1 MiB pipes, fewer wake-ups for every stage.
_BIGGER_PIPE = """
import fcntl
def bigger_pipe(stream):
    try:
        fcntl.fcntl(stream, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
"""

# Passes the encrypted stream from stdin to stdout and writes its SHA-256 and
# size to a file, so that a restore hashes the archive while it downloads it.
_DIGEST_PROGRAM = (
    _BIGGER_PIPE
    + """
import hashlib, sys
bigger_pipe(0)
bigger_pipe(1)
digest, size = hashlib.sha256(), 0
source, sink = sys.stdin.buffer, sys.stdout.buffer
while chunk := source.read1(1 << 20):
    digest.update(chunk)
    size += len(chunk)
    sink.write(chunk)
sink.flush()
with open(sys.argv[1], "w") as out:
    out.write(f"{digest.hexdigest()} {size}\\n")
"""
)

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
piece, source = start(0), sys.stdin.buffer
try:
    while chunk := source.read1(1 << 20):
        digest.update(chunk)
        size += len(chunk)
        view = memoryview(chunk)
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

# Counts the members in tar's verbose index: one line each (names are
# escaped, so a newline in a name cannot add one), except the "tar: Deleting"
# notes of an incremental extraction. Members all start with "data/".
_COUNT_MEMBERS = "members=$(grep --count --invert-match --regexp='^tar: ' -- "

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


class BackupError(Exception):
    """Generic backup Exception."""


class SynapseConfigError(BackupError):
    """homeserver.yaml is missing, not YAML, or not shaped as Synapse's configuration."""


class S3Error(Exception):
    """Generic S3 Exception.

    Attributes:
        option: the configuration option an operator should look at, if known.
    """

    def __init__(self, message: str, *, option: str | None = None):
        """Build the error.

        Args:
            message: what went wrong.
            option: the configuration option an operator should look at.
        """
        super().__init__(message)
        self.option = option


class S3Parameters(BaseModel):
    """Configuration for accessing S3 bucket.

    Attributes:
        access_key: AWS access key.
        secret_key: AWS secret key.
        region: The region to connect to the object storage.
        bucket: The bucket name.
        endpoint: The endpoint used to connect to the object storage.
        path: The path inside the bucket to store objects.
        s3_uri_style: The S3 protocol specific bucket path lookup type. Can be "path" or "host".
        addressing_style: S3 protocol addressing style, can be "path" or "virtual".
    """

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    access_key: str = Field(alias="access-key", min_length=1, repr=False)
    secret_key: str = Field(alias="secret-key", min_length=1, repr=False)
    region: str | None = Field(default=None)
    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    endpoint: str | None = Field(default=None, validate_default=True)
    path: str = Field(default="")
    s3_uri_style: Literal["path", "host"] = Field(default="path", alias="s3-uri-style")

    @property
    def addressing_style(self) -> Literal["path", "virtual"]:
        """Translates s3_uri_style to AWS addressing_style."""
        return "virtual" if self.s3_uri_style == "host" else "path"

    @field_validator("endpoint")
    @classmethod
    def check_endpoint_or_region_set(
        cls, endpoint: str | None, values: ValidationInfo | dict[str, Any]
    ) -> str | None:
        """Validate that either region or endpoint is set.

        Args:
            endpoint: endpoint attribute
            values: all attributes in S3 configuration

        Returns:
            value of the endpoint attribute

        Raises:
            ValueError: if the configuration is invalid.
        """
        data = values if isinstance(values, dict) else values.data
        if not endpoint and not data.get("region"):
            raise ValueError("one of s3-endpoint or s3-region must be set")
        if endpoint and not re.match(r"^https?://[^\s/]+", endpoint):
            raise ValueError("s3-endpoint must be an http:// or https:// URL")
        return endpoint or None

    @field_validator("path")
    @classmethod
    def _normalise_path(cls, path: str) -> str:
        """Drop leading, trailing and doubled slashes from the object prefix.

        Args:
            path: the configured prefix.

        Returns:
            The prefix without empty segments.

        Raises:
            ValueError: if a segment is "." or "..".
        """
        parts = [part for part in path.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise ValueError("s3-path must not contain '.' or '..' segments")
        return "/".join(parts)

    def object_key(self, name: str) -> str:
        """Return the S3 key of an object of this charm's backups.

        Args:
            name: the object's name under the configured path.

        Returns:
            ``<path>/<name>``, or ``<name>`` for an empty path.
        """
        return f"{self.path}/{name}" if self.path else name

    def object_url(self, name: str) -> str:
        """Return the s3:// URL of an object, as the aws CLI takes it.

        Args:
            name: the object's name under the configured path.

        Returns:
            The s3:// URL.
        """
        return f"s3://{self.bucket}/{self.object_key(name)}"


@dataclasses.dataclass(frozen=True)
class BackupManifest:
    """What a committed backup holds; stored as JSON beside the archive.

    Attributes:
        backup_id: the backup's id (its object name).
        created_at: when the backup started, UTC, ISO 8601.
        paths: the container paths backed up.
        file_count: the number of members in the archive.
        size: the size of the encrypted object in bytes.
        sha256: the SHA-256 of the encrypted object.
        duration: how long the backup took, in seconds.
        metadata: free-form facts from the caller (server name, versions).
        version: the manifest format version.
        backup_type: "full", or "incremental" (GNU tar listed-incremental).
        parent: the backup an incremental one builds on ("" for a full one).
        piece_size: the archive is stored in pieces of this size (the last
            one smaller); 0 means one object, as before pieces existed.
    """

    backup_id: str
    created_at: str
    paths: tuple[str, ...]
    file_count: int
    size: int
    sha256: str
    duration: float
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    version: int = MANIFEST_VERSION
    backup_type: str = "full"
    parent: str = ""
    piece_size: int = 0

    @classmethod
    def from_json(cls, text: str | bytes) -> BackupManifest:
        """Parse a manifest written by to_json.

        Args:
            text: the JSON document.

        Returns:
            The manifest.

        Raises:
            BackupError: if it is not a valid manifest.
        """
        try:
            document = json.loads(text)
            known = {
                "version",
                "backup-id",
                "created-at",
                "paths",
                "file-count",
                "size",
                "sha256",
                "duration",
                "type",
                "parent",
                "piece-size",
            }
            manifest = cls(
                backup_id=str(document["backup-id"]),
                created_at=str(document["created-at"]),
                paths=tuple(str(path) for path in document["paths"]),
                file_count=int(document["file-count"]),
                size=int(document["size"]),
                sha256=str(document["sha256"]),
                duration=float(document.get("duration", 0)),
                metadata={k: str(v) for k, v in document.items() if k not in known},
                version=int(document.get("version", MANIFEST_VERSION)),
                backup_type=str(document.get("type", "full")),
                parent=str(document.get("parent", "")),
                piece_size=int(document.get("piece-size", 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BackupError(f"invalid backup manifest: {exc}") from exc
        if manifest.version > MANIFEST_VERSION:
            raise BackupError(
                f"its manifest has version {manifest.version}, written by a newer charm "
                f"(this one reads version {MANIFEST_VERSION}): upgrade the charm to use it"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", manifest.sha256):
            raise BackupError("invalid backup manifest: bad sha256")
        if manifest.backup_type not in ("full", "incremental") or (
            (manifest.backup_type == "incremental") != bool(manifest.parent)
        ):
            raise BackupError("invalid backup manifest: bad type or parent")
        if (
            manifest.size < 0
            or manifest.piece_size < 0
            or (
                manifest.piece_size
                and -(-manifest.size // manifest.piece_size) > MAX_ARCHIVE_PIECES
            )
        ):
            raise BackupError("invalid backup manifest: bad size or piece size")
        return manifest

    def pieces(self) -> dict[str, int]:
        """Return the objects that hold the archive, in order, with their sizes.

        Returns:
            Each piece's name and size in bytes.
        """
        return archive_pieces(self.backup_id, self.size, self.piece_size)

    def to_json(self) -> str:
        """Serialise the manifest.

        Returns:
            The manifest as a JSON document with hyphenated keys.
        """
        return json.dumps(
            {
                "version": self.version,
                "backup-id": self.backup_id,
                "created-at": self.created_at,
                "paths": list(self.paths),
                "file-count": self.file_count,
                "size": self.size,
                "sha256": self.sha256,
                "duration": self.duration,
                "type": self.backup_type,
                "parent": self.parent,
                **({"piece-size": self.piece_size} if self.piece_size else {}),
                **{key: str(value) for key, value in self.metadata.items()},
            },
            indent=2,
            sort_keys=True,
        )


@dataclasses.dataclass(frozen=True)
class BackupListing:
    """The complete backups under the path, and what each manifest builds on.

    Attributes:
        backups: the complete backups, newest first.
        links: each backup's parent, for every manifest that names one,
            including manifests this charm cannot use (a newer charm's).
    """

    backups: list[BackupManifest]
    links: dict[str, str]


@dataclasses.dataclass
class UnlistedBackups:
    """The ids under the path that are not complete backups (see S3Client.unlisted_backups).

    Attributes:
        incomplete: ids with objects but no complete backup, newest first.
        unreadable: ids whose manifest cannot be read or used now, with why.
    """

    incomplete: list[str] = dataclasses.field(default_factory=list)
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)


class S3Client:
    """S3 Client Wrapper around boto3 library."""

    def __init__(self, s3_parameters: S3Parameters):
        """Initialize the S3 client.

        Args:
            s3_parameters: Parameter to configure the S3 connection.

        Raises:
            S3Error: if the client cannot be created from the parameters.
        """
        self._parameters = s3_parameters
        config = BotoConfig(
            s3={"addressing_style": s3_parameters.addressing_style},
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        try:
            session = boto3.session.Session(
                aws_access_key_id=s3_parameters.access_key,
                aws_secret_access_key=s3_parameters.secret_key,
                region_name=s3_parameters.region,
            )
            self._client = session.client("s3", endpoint_url=s3_parameters.endpoint, config=config)
        except InvalidRegionError as exc:
            raise S3Error(f"cannot create an S3 client: {exc}", option="s3-region") from exc
        except (BotoCoreError, ValueError) as exc:
            raise S3Error(
                f"cannot create an S3 client: {exc}",
                option="s3-endpoint" if s3_parameters.endpoint else "s3-region",
            ) from exc

    def can_use_bucket(self) -> bool:
        """Check if a bucket exists and is accessible in an S3 compatible object store.

        Returns:
            True if the bucket exists and is accessible
        """
        try:
            self.check_bucket()
        except S3Error as exc:
            logger.warning("%s", exc)
            return False
        return True

    def check_bucket(self) -> None:
        """Check that the bucket exists and the credentials may use it.

        Raises:
            S3Error: saying why not; its ``option`` names the setting to fix.
        """
        bucket = self._parameters.bucket
        try:
            self._client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise S3Error(f"bucket {bucket} does not exist", option="s3-bucket") from exc
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise S3Error(
                    f"access to bucket {bucket} denied", option="s3-credentials"
                ) from exc
            raise S3Error(
                f"cannot use bucket {bucket}: {_client_error(exc)}", option="s3-bucket"
            ) from exc
        except BotoCoreError as exc:
            raise S3Error(f"cannot reach the S3 endpoint: {exc}", option="s3-endpoint") from exc

    def object_size(self, name: str) -> int | None:
        """Return the size of an object, or None when it does not exist.

        Args:
            name: the object's name under the configured path.

        Returns:
            The size in bytes, or None.

        Raises:
            S3Error: on any error but a missing object.
        """
        try:
            head = self._client.head_object(
                Bucket=self._parameters.bucket, Key=self._parameters.object_key(name)
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise S3Error(f"cannot read object {name}: {_client_error(exc)}") from exc
        except BotoCoreError as exc:
            raise S3Error(f"cannot read object {name}: {exc}") from exc
        return int(head["ContentLength"])

    def put_text(self, name: str, text: str) -> None:
        """Write a small text object.

        Args:
            name: the object's name under the configured path.
            text: its content.

        Raises:
            S3Error: if the object cannot be written.
        """
        try:
            self._client.put_object(
                Bucket=self._parameters.bucket,
                Key=self._parameters.object_key(name),
                Body=text.encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError) as exc:
            raise S3Error(f"cannot write object {name}: {_client_error(exc)}") from exc

    def _list_names(self) -> dict[str, int]:
        """List the objects directly under the configured path, following pagination.

        Returns:
            Each object's name (relative to the path) and size.

        Raises:
            S3Error: if the bucket cannot be listed.
        """
        prefix = f"{self._parameters.path}/" if self._parameters.path else ""
        names: dict[str, int] = {}
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self._parameters.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(prefix) :]
                    if name and "/" not in name:
                        names[name] = int(item["Size"])
        except (ClientError, BotoCoreError) as exc:
            raise S3Error(f"cannot list the backups: {_client_error(exc)}") from exc
        return names

    def read_object(self, name: str, *, first_bytes: int | None = None) -> bytes:
        """Read an object, or its beginning.

        Args:
            name: the object's name under the configured path.
            first_bytes: read only this many bytes from the start.

        Returns:
            The bytes.

        Raises:
            S3Error: if the object cannot be read.
        """
        bucket, key = self._parameters.bucket, self._parameters.object_key(name)
        try:
            if first_bytes:
                response = self._client.get_object(
                    Bucket=bucket, Key=key, Range=f"bytes=0-{first_bytes - 1}"
                )
            else:
                response = self._client.get_object(Bucket=bucket, Key=key)
            return bytes(response["Body"].read())
        except (ClientError, BotoCoreError) as exc:
            raise S3Error(f"cannot read object {name}: {_client_error(exc)}") from exc

    def get_manifest(self, backup_id: str) -> BackupManifest:
        """Return the manifest of a complete backup.

        Args:
            backup_id: the backup.

        Returns:
            Its manifest.

        Raises:
            S3Error: if there is no complete backup with that id.
            BackupError: if its manifest is not valid.
        """
        validate_backup_key(backup_id)
        archive_size = self.object_size(backup_id)
        if archive_size is None or self.object_size(backup_id + MANIFEST_SUFFIX) is None:
            raise S3Error(f"there is no backup {backup_id}", option="backup-id")
        manifest = BackupManifest.from_json(self.read_object(backup_id + MANIFEST_SUFFIX))
        if manifest.backup_id != backup_id or any(
            (archive_size if name == backup_id else self.object_size(name)) != size
            for name, size in manifest.pieces().items()
        ):
            raise S3Error(
                f"backup {backup_id} is incomplete: its objects do not match its manifest",
                option="backup-id",
            )
        return manifest

    def list_backups(self, *, strict: bool = False) -> list[BackupManifest]:
        """List the complete backups, newest first.

        A backup is complete when its manifest exists, parses and matches
        the sizes of its encrypted objects; anything else is left out.

        Args:
            strict: fail when a manifest cannot be read (a transient error),
                for callers that decide what to delete or build on from the list.

        Returns:
            The manifests.

        Raises:
            S3Error: if the bucket cannot be listed (or, when strict, a manifest read).
        """
        names = self._list_names()
        candidates = sorted(
            (
                name.removesuffix(MANIFEST_SUFFIX)
                for name in names
                if name.endswith(MANIFEST_SUFFIX)
                and name.removesuffix(MANIFEST_SUFFIX) in names
                and BACKUP_ID_PATTERN.fullmatch(name.removesuffix(MANIFEST_SUFFIX))
            ),
            reverse=True,
        )

        def read(backup_id: str) -> BackupManifest | None:
            try:
                manifest = BackupManifest.from_json(self.read_object(backup_id + MANIFEST_SUFFIX))
            except S3Error:
                if strict:
                    raise
                logger.warning("skipping backup %s: its manifest cannot be read", backup_id)
                return None
            except BackupError as exc:
                logger.warning("skipping backup %s: %s", backup_id, exc)
                return None
            ok = manifest.backup_id == backup_id and all(
                names.get(name) == size for name, size in manifest.pieces().items()
            )
            return manifest if ok else None

        with ThreadPoolExecutor(max_workers=8) as pool:
            manifests = list(pool.map(read, candidates))
        return [manifest for manifest in manifests if manifest is not None]

    def listing(self, *, strict: bool = False) -> BackupListing:
        """List the complete backups, and what every manifest says it builds on.

        A manifest this charm cannot use (one from a newer charm, say) still
        protects its parent: it is read leniently for its parent's id.

        Args:
            strict: fail when a manifest cannot be read (see list_backups).

        Returns:
            The complete backups, newest first, and each backup's parent.

        Raises:
            S3Error: if the bucket cannot be listed (or, when strict, a manifest read).
        """
        backups = self.list_backups(strict=strict)
        links = {manifest.backup_id: manifest.parent for manifest in backups if manifest.parent}
        links.update(self._unusable_links({manifest.backup_id for manifest in backups}, strict))
        return BackupListing(backups, links)

    def _unusable_links(self, complete: Collection[str], strict: bool) -> dict[str, str]:
        """Return the parent named by each manifest that does not parse as this charm's.

        Args:
            complete: the ids of the complete backups, whose manifests parse.
            strict: fail when a manifest cannot be read.

        Returns:
            Each such manifest's id and the parent it names, when it names one.

        Raises:
            S3Error: if the bucket cannot be listed (or, when strict, a manifest read).
        """
        links = {}
        for name in self._list_names():
            backup_id = name.removesuffix(MANIFEST_SUFFIX)
            if name == backup_id or backup_id in complete:
                continue
            if not BACKUP_ID_PATTERN.fullmatch(backup_id):
                continue
            try:
                text = self.read_object(name)
            except S3Error:
                if strict:
                    raise
                continue
            try:
                BackupManifest.from_json(text)
                continue  # usable, only incomplete: nothing builds on it
            except BackupError:
                pass
            try:
                parent = json.loads(text).get("parent")
            except (ValueError, AttributeError):
                continue
            if isinstance(parent, str) and BACKUP_ID_PATTERN.fullmatch(parent):
                links[backup_id] = parent
        return links

    def exists_backup(self, backup_id: str) -> bool:
        """Tell whether a complete backup exists.

        Args:
            backup_id: the backup.

        Returns:
            True when the backup and its manifest exist and agree.

        Raises:
            S3Error: on S3 errors other than a missing backup.
        """
        try:
            self.get_manifest(backup_id)
        except S3Error as exc:
            if exc.option == "backup-id":
                return False
            raise
        except BackupError:
            return False
        return True

    def chain(self, backup_id: str) -> list[BackupManifest]:
        """Return the backups needed to restore one: its full backup first, itself last.

        Args:
            backup_id: the backup.

        Returns:
            The manifests, oldest first.

        Raises:
            S3Error: if the backup or one it depends on is missing or incomplete.
        """
        chain = [self.get_manifest(backup_id)]
        while chain[-1].parent:
            parent = chain[-1].parent
            if parent in {manifest.backup_id for manifest in chain} or len(chain) > 10_000:
                raise S3Error(f"backup {backup_id} has a cyclic chain", option="backup-id")
            try:
                chain.append(self.get_manifest(parent))
            except (S3Error, BackupError) as exc:
                raise S3Error(
                    f"backup {chain[-1].backup_id} depends on {parent}, which is missing or "
                    f"incomplete: the chain of {backup_id} is broken",
                    option="backup-id",
                ) from exc
        return chain[::-1]

    def delete_backup(
        self,
        backup_id: str,
        *,
        chain: bool = False,
        force: bool = False,
        now: datetime.datetime | None = None,
    ) -> list[str]:
        """Delete a backup: its manifest first (so it stops counting), then its objects.

        An id with objects but no manifest (what a failed backup left when
        S3 could not be reached to remove it) has its objects removed,
        unless it started so recently that it may still be running.

        Args:
            backup_id: the backup.
            chain: also delete the incremental backups that depend on it.
            force: remove what a backup without a manifest left even if it
                started less than EXEC_TIMEOUT ago, and delete a backup whose
                manifest this charm cannot use (corrupt, or a newer charm's).
            now: the current time (default: now, UTC).

        Returns:
            The ids deleted, dependants first.

        Raises:
            S3Error: if there is no such backup, others depend on it and
                ``chain`` is false, or it cannot be deleted.
        """
        validate_backup_key(backup_id)
        if not self.has_manifest(backup_id):
            return self._delete_leftovers(backup_id, chain=chain, force=force, now=now)
        if not force:
            self._check_usable_or_incomplete(backup_id)
        return self._delete_with_dependants(backup_id, chain=chain)

    def _check_usable_or_incomplete(self, backup_id: str) -> None:
        """Refuse to delete a backup whose manifest this charm cannot use.

        Such a manifest may be a good backup's (one written by a newer charm,
        say): only force deletes it. An incomplete backup may go.

        Args:
            backup_id: the backup, whose manifest exists.

        Raises:
            S3Error: if its manifest cannot be used, or S3 cannot tell.
        """
        try:
            self.get_manifest(backup_id)
        except BackupError as exc:
            raise S3Error(
                f"backup {backup_id} cannot be used by this charm ({exc}), but it may be "
                "a good backup: use force=true to delete it anyway",
                option="backup-id",
            ) from exc
        except S3Error as exc:
            if exc.option != "backup-id":  # not "incomplete" or "missing": S3 failed
                raise

    def _delete_with_dependants(self, backup_id: str, *, chain: bool) -> list[str]:
        """Delete a backup's objects, after the backups that depend on it if chain is set.

        Args:
            backup_id: the backup.
            chain: also delete the incremental backups that depend on it.

        Returns:
            The ids deleted, dependants first.

        Raises:
            S3Error: if others depend on it and chain is false, or S3 fails.
        """
        dependants = descendants(backup_id, self.listing(strict=True).links)
        if dependants and not chain:
            raise S3Error(
                f"backup {backup_id} is needed by {', '.join(sorted(dependants))}; "
                "use chain=true to delete it with them",
                option="backup-id",
            )
        doomed = [*sorted(dependants, reverse=True), backup_id]
        for name in doomed:
            self.delete_backup_objects(name)
        return doomed

    def _delete_leftovers(
        self, backup_id: str, *, chain: bool, force: bool, now: datetime.datetime | None
    ) -> list[str]:
        """Delete whatever is under the id of a backup that has no manifest.

        Complete backups that name it as their parent (its manifest was
        deleted behind the charm's back) keep it unless chain is set: its
        archive is what a repair by hand would need.

        Args:
            backup_id: the id.
            chain: also delete the backups that depend on it.
            force: even if the backup started less than EXEC_TIMEOUT ago.
            now: the current time (default: now, UTC).

        Returns:
            The ids deleted, dependants first.

        Raises:
            S3Error: if nothing is under that id, the backup was committed
                meanwhile, it may still be running, others depend on it and
                chain is false, or S3 fails.
        """
        leftovers = self.backup_names(backup_id)
        if not leftovers:
            raise S3Error(f"there is no backup {backup_id}", option="backup-id")
        if backup_id + MANIFEST_SUFFIX in leftovers:
            raise S3Error(
                f"backup {backup_id} was committed while it was being deleted; "
                "delete it again if that is what you want",
                option="backup-id",
            )
        if not force and may_be_running(backup_id, now):
            raise S3Error(
                f"backup {backup_id} has no manifest, but it started less than "
                f"{EXEC_TIMEOUT / 3600:g} hours ago and may still be running on another unit; "
                "make sure no unit is making it, then use force=true",
                option="backup-id",
            )
        dependants = descendants(backup_id, self.listing(strict=True).links)
        if dependants and not chain:
            raise S3Error(
                f"backup {backup_id} has no manifest, but {', '.join(sorted(dependants))} "
                "name it as their parent: its objects are what a repair would need; "
                "use chain=true to delete it with them",
                option="backup-id",
            )
        for name in sorted(dependants, reverse=True):
            self.delete_backup_objects(name)
        self.delete_objects(leftovers)
        return [*sorted(dependants, reverse=True), backup_id]

    def delete_backup_objects(self, backup_id: str) -> None:
        """Delete whatever a backup has in S3, complete or not: manifest first.

        Its archive's pieces are found by listing, with the unfinished
        uploads of a backup that failed half way.

        Args:
            backup_id: the backup.

        Raises:
            S3Error: if the objects cannot be listed or deleted.
        """
        manifest, archive, *others = backup_object_names(backup_id)
        self.delete_objects([manifest, archive, *self._piece_names(backup_id), *others])

    def has_manifest(self, backup_id: str) -> bool:
        """Tell whether a backup's manifest object exists (complete or not).

        Args:
            backup_id: the backup.

        Returns:
            True when the object exists.

        Raises:
            S3Error: if S3 cannot be asked.
        """
        return self.object_size(backup_id + MANIFEST_SUFFIX) is not None

    def backup_names(self, backup_id: str) -> list[str]:
        """Return the names of a backup's objects and unfinished uploads, of that id only.

        Args:
            backup_id: the backup.

        Returns:
            The names, sorted: the id itself, or the id and a suffix.

        Raises:
            S3Error: if the bucket cannot be listed.
        """
        return [
            name
            for name in self._names_starting(backup_id)
            if (match := _BACKUP_OBJECT_PATTERN.fullmatch(name)) and match.group(1) == backup_id
        ]

    def _piece_names(self, backup_id: str) -> list[str]:
        """Return the names of a backup's archive pieces after the first, uploaded or not.

        Args:
            backup_id: the backup.

        Returns:
            The names, sorted.

        Raises:
            S3Error: if the bucket cannot be listed.
        """
        return self._names_starting(backup_id + ARCHIVE_PIECE_INFIX)

    def incomplete_backups(self, complete: Collection[str]) -> list[str]:
        """Return the ids that have objects (or unfinished uploads) but no complete backup.

        See unlisted_backups; an id whose manifest cannot be read or used is
        not one of them.

        Args:
            complete: the ids of the complete backups (see list_backups).

        Returns:
            The ids, newest first.

        Raises:
            S3Error: if the bucket cannot be listed.
        """
        return self.unlisted_backups(complete).incomplete

    def unlisted_backups(self, complete: Collection[str]) -> UnlistedBackups:
        """Return the ids under the path that are not complete backups, and why.

        Incomplete ones are what failed backups left when their objects
        could not be removed, backups whose objects were changed or deleted
        behind the charm's back, and backups being made right now. Unreadable
        ones have a manifest that cannot be read now (S3 refused or failed)
        or cannot be used (corrupt, or written by a newer charm): they may be
        good backups, so they are never called incomplete.

        Args:
            complete: the ids of the complete backups (see list_backups).

        Returns:
            The incomplete ids and the unreadable ones, newest first.

        Raises:
            S3Error: if the bucket cannot be listed.
        """
        names = set(self._names_starting(""))
        ids = {m.group(1) for name in names if (m := _BACKUP_OBJECT_PATTERN.fullmatch(name))}
        found = UnlistedBackups()
        for backup_id in sorted(ids - set(complete), reverse=True):
            if backup_id + MANIFEST_SUFFIX in names:
                # Its manifest may just have failed to be read: ask again.
                try:
                    self.get_manifest(backup_id)
                except BackupError as exc:
                    found.unreadable[backup_id] = str(exc)
                    continue
                except S3Error as exc:
                    if exc.option != "backup-id":
                        logger.warning("cannot tell whether %s is complete: %s", backup_id, exc)
                        found.unreadable[backup_id] = str(exc)
                        continue
                else:
                    continue  # complete after all
            found.incomplete.append(backup_id)
        return found

    def _names_starting(self, start: str) -> list[str]:
        """Return the names directly under the configured path that start with a text.

        Args:
            start: the start of the names.

        Returns:
            The names of the objects and of the unfinished multipart uploads
            (when the store lists them), sorted.

        Raises:
            S3Error: if the objects cannot be listed.
        """
        bucket, base = self._parameters.bucket, self._parameters.object_key("")
        keys: set[str] = set()
        try:
            objects = self._client.get_paginator("list_objects_v2")
            for page in objects.paginate(Bucket=bucket, Prefix=base + start):
                keys.update(item["Key"] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise S3Error(f"cannot list the backups: {_client_error(exc)}") from exc
        try:
            uploads = self._client.get_paginator("list_multipart_uploads")
            for upload_page in uploads.paginate(Bucket=bucket, Prefix=base + start):
                keys.update(item["Key"] for item in upload_page.get("Uploads", []))
        except (ClientError, BotoCoreError) as exc:
            # Some stores do not list uploads: an upload left behind costs
            # room, not correctness; a bucket lifecycle rule can abort it.
            logger.warning("cannot list unfinished uploads: %s", _client_error(exc))
        return sorted(key[len(base) :] for key in keys if "/" not in key[len(base) :])

    def delete_objects(self, names: Iterable[str]) -> None:
        """Delete objects and abort unfinished multipart uploads of them.

        Credentials that may not list unfinished uploads still delete the
        objects (a warning is logged; a bucket lifecycle rule can abort them).

        Args:
            names: the objects' names under the configured path.

        Raises:
            S3Error: if an object cannot be deleted.
        """
        bucket = self._parameters.bucket
        list_uploads = True
        for name in names:
            key = self._parameters.object_key(name)
            unfinished: list[Any] = []
            try:
                if list_uploads:
                    listed = self._client.list_multipart_uploads(Bucket=bucket, Prefix=key)
                    unfinished = list(listed.get("Uploads", []))
            except (ClientError, BotoCoreError) as exc:
                # As in _names_starting: credentials without
                # s3:ListBucketMultipartUploads (or a store without it) still delete.
                logger.warning("cannot list unfinished uploads: %s", _client_error(exc))
                list_uploads = False
            try:
                for upload in unfinished:
                    if upload.get("Key") == key:
                        self._client.abort_multipart_upload(
                            Bucket=bucket, Key=key, UploadId=upload["UploadId"]
                        )
                self._client.delete_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                raise S3Error(f"cannot delete object {name}: {_client_error(exc)}") from exc


def archive_pieces(backup_id: str, size: int, piece_size: int) -> dict[str, int]:
    """Return the objects that hold an archive, in order, with their sizes.

    Args:
        backup_id: the backup.
        size: the archive's size in bytes.
        piece_size: the size of every piece but the last; 0 for one object.

    Returns:
        Each piece's name and size: the first piece is named after the
        backup, the next ones ``<id>.part-0001`` and so on.
    """
    if not piece_size or size <= piece_size:
        return {backup_id: size}
    count = -(-size // piece_size)
    names = [backup_id]
    names += [f"{backup_id}{ARCHIVE_PIECE_INFIX}{index:04d}" for index in range(1, count)]
    sizes = [piece_size] * (count - 1) + [size - piece_size * (count - 1)]
    return dict(zip(names, sizes, strict=True))


def may_be_running(backup_id: str, now: datetime.datetime | None = None) -> bool:
    """Tell whether a backup may still be running: it started less than EXEC_TIMEOUT ago.

    Args:
        backup_id: the backup (a UTC timestamp).
        now: the current time (default: now, UTC).

    Returns:
        True when it started less than EXEC_TIMEOUT ago, in the future, or
        at a time that is not a date.
    """
    try:
        started = datetime.datetime.strptime(backup_id, BACKUP_ID_FORMAT).replace(
            tzinfo=datetime.timezone.utc
        )
    except ValueError:
        return True
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now - started < datetime.timedelta(seconds=EXEC_TIMEOUT)


def backup_object_names(backup_id: str) -> list[str]:
    """Return the objects of one backup, its manifest (the commit) first.

    Args:
        backup_id: the backup.

    Returns:
        The manifest, the encrypted archive and the encrypted tar snapshot state.
    """
    return [backup_id + MANIFEST_SUFFIX, backup_id, backup_id + SNAPSHOT_STATE_SUFFIX]


def dependants_of(backup_id: str, manifests: Iterable[BackupManifest]) -> set[str]:
    """Return the backups whose chain goes through a backup.

    Args:
        backup_id: the backup.
        manifests: the backups to look at.

    Returns:
        The ids of its incremental descendants.
    """
    return descendants(backup_id, {m.backup_id: m.parent for m in manifests if m.parent})


def descendants(backup_id: str, links: Mapping[str, str]) -> set[str]:
    """Return the backups whose chain goes through a backup.

    Args:
        backup_id: the backup.
        links: each backup's parent (see S3Client.listing).

    Returns:
        The ids of its descendants.
    """
    children: dict[str, list[str]] = {}
    for child, parent in links.items():
        children.setdefault(parent, []).append(child)
    found: set[str] = set()
    todo = list(children.get(backup_id, []))
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return found


def _client_error(exc: Exception) -> str:
    """Return a short description of a boto error.

    Args:
        exc: the error.

    Returns:
        Its code and message, for a ClientError; its text otherwise.
    """
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip(": ")
    return str(exc)


def validate_backup_key(backup_key: str) -> str:
    """Check that a backup key is a plain object name.

    Args:
        backup_key: the key to check.

    Returns:
        The key.

    Raises:
        BackupError: if it could escape the configured path or hide a manifest.
    """
    if (
        not _KEY_NAME_PATTERN.fullmatch(backup_key)
        or ".." in backup_key
        or backup_key.endswith((MANIFEST_SUFFIX, SNAPSHOT_STATE_SUFFIX))
    ):
        raise BackupError(f"invalid backup id {backup_key!r}")
    return backup_key


def new_backup_id(now: datetime.datetime | None = None) -> str:
    """Return a backup id for a backup started now.

    Args:
        now: the start time (default: the current time); must be aware.

    Returns:
        The id: a sortable UTC timestamp.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).strftime(BACKUP_ID_FORMAT)


def read_synapse_config(container: ops.Container) -> dict[str, Any]:
    """Read Synapse's configuration from the container.

    Args:
        container: Synapse Container.

    Returns:
        The parsed homeserver.yaml.

    Raises:
        SynapseConfigError: if it is missing, not YAML or not a YAML mapping.
        BackupError: if Pebble cannot be asked for it.
    """
    try:
        config = yaml.safe_load(container.pull(SYNAPSE_CONFIG_PATH).read())
    except ops.pebble.PathError as exc:
        if exc.kind == "not-found":
            raise SynapseConfigError(f"cannot read {SYNAPSE_CONFIG_PATH}: {exc}") from exc
        raise BackupError(f"cannot read {SYNAPSE_CONFIG_PATH}: {exc}") from exc
    except ops.pebble.APIError as exc:
        raise BackupError(f"cannot read {SYNAPSE_CONFIG_PATH}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SynapseConfigError(
            f"{SYNAPSE_CONFIG_PATH} is not UTF-8 (byte {exc.start} is not)"
        ) from exc
    except yaml.YAMLError as exc:
        # Never the text: PyYAML quotes the offending line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SynapseConfigError(f"{SYNAPSE_CONFIG_PATH} is not valid YAML{where}") from exc
    if not isinstance(config, dict):
        raise SynapseConfigError(f"{SYNAPSE_CONFIG_PATH} is not a YAML mapping")
    return config


_YAML_KINDS: dict[type, str] = {str: "a string", dict: "a mapping", list: "a list"}


def _config_value(config: Mapping[str, Any], key: str, kind: type) -> Any:
    """Return one setting of homeserver.yaml (None when unset), refusing a wrong type.

    Args:
        config: a YAML mapping (homeserver.yaml or one of its sections).
        key: the setting.
        kind: the type it must have when set: str, dict or list.

    Returns:
        Its value, or None.

    Raises:
        SynapseConfigError: if it is set to something of another type.
    """
    value = config.get(key)
    if value is not None and not isinstance(value, kind):
        # Not the value: database args may hold a password.
        raise SynapseConfigError(
            f"{SYNAPSE_CONFIG_PATH}: {key} must be {_YAML_KINDS[kind]}, not {type(value).__name__}"
        )
    return value


def _data_path(name: object) -> str:
    """Return a path of homeserver.yaml as an absolute, normalised path (relative to DATA_DIR).

    Args:
        name: the configured path.

    Returns:
        The absolute path.
    """
    return posixpath.normpath(posixpath.join(DATA_DIR, str(name)))


def get_database_path(container: ops.Container) -> str | None:
    """Return the SQLite database file of Synapse, if it uses SQLite.

    Args:
        container: Synapse Container.

    Returns:
        The absolute path of the database, or None when the database is not
        SQLite or its file does not exist yet.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    path = _configured_database_path(container)
    return path if path and container.exists(path) else None


def _database_to_copy(
    container: ops.Container, log: Callable[[str], None]
) -> tuple[str | None, dict[str, str]]:
    """Return the SQLite database a backup copies; say so when the configured one is missing.

    Args:
        container: Synapse Container.
        log: receives progress messages.

    Returns:
        The database's path (or None), and what the manifest records about it:
        ``database-path``, and ``database-missing`` when the configured file
        does not exist (retention then deletes nothing).

    Raises:
        BackupError: if the configuration cannot be read.
    """
    database_path = get_database_path(container)
    facts = {"database-path": database_path or ""}
    missing = None if database_path else _configured_database_path(container)
    if missing:  # Synapse creates it when it first starts; or it was lost
        log(f"Synapse's database {missing} does not exist (has Synapse ever started?): "
            "this backup holds no database")  # fmt: skip
        facts["database-missing"] = missing
    return database_path, facts


def _configured_database_path(container: ops.Container) -> str | None:
    """Return the SQLite database file Synapse's configuration names, existing or not.

    Args:
        container: Synapse Container.

    Returns:
        The absolute path, or None when Synapse does not use an SQLite file.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    return _database_in(read_synapse_config(container))


def _database_in(config: Mapping[str, Any]) -> str | None:
    """Return the SQLite database file a Synapse configuration names.

    Args:
        config: the parsed homeserver.yaml.

    Returns:
        The absolute path, or None when Synapse does not use an SQLite file.

    Raises:
        SynapseConfigError: if the database section is not shaped as Synapse's.
    """
    database = _config_value(config, "database", dict) or {}
    name = _config_value(database, "name", str) or "sqlite3"
    if name not in SQLITE_ENGINES + POSTGRES_ENGINES:
        # Guessing "not SQLite" would make backups without the database, and
        # retention would then delete the older backups that hold it.
        raise SynapseConfigError(
            f"{SYNAPSE_CONFIG_PATH}: database name must be one of "
            f"{', '.join(SQLITE_ENGINES + POSTGRES_ENGINES)}"
        )
    if name not in SQLITE_ENGINES:
        return None
    path = (_config_value(database, "args", dict) or {}).get("database")
    if not path or path == ":memory:":
        return None
    return _data_path(path)


def get_media_dir(container: ops.Container) -> str:
    """Return Synapse's media store directory.

    Args:
        container: Synapse Container.

    Returns:
        The absolute ``media_store_path`` of homeserver.yaml, or MEDIA_DIR.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    return _media_dir_in(read_synapse_config(container))


def _media_dir_in(config: Mapping[str, Any]) -> str:
    """Return the media store directory a Synapse configuration names.

    Args:
        config: the parsed homeserver.yaml.

    Returns:
        The absolute ``media_store_path``, or MEDIA_DIR.

    Raises:
        SynapseConfigError: if media_store_path is not a string.
    """
    return _data_path(_config_value(config, "media_store_path", str) or MEDIA_DIR)


def get_paths_to_backup(container: ops.Container) -> Iterable[str]:
    """Get the list of paths that should be in a backup for Synapse.

    These are the configuration, signing keys, log configuration, appservice
    registrations and the local media directories. The SQLite database is
    not among them: it is copied consistently (get_database_path) instead of
    being read while Synapse writes it.

    Args:
        container: Synapse Container.

    Returns:
        Iterable with the list of paths to backup.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    return _paths_in_layout(container, read_synapse_config(container))


def _paths_in_layout(container: ops.Container, config: Mapping[str, Any]) -> list[str]:
    """Return the paths get_paths_to_backup names, for a given configuration.

    Args:
        container: Synapse Container.
        config: the parsed homeserver.yaml; an empty mapping gives Synapse's
            standard layout (the files matching BACKUP_FILE_PATTERNS and the
            local media directories of MEDIA_DIR).

    Returns:
        The existing paths, sorted.

    Raises:
        SynapseConfigError: if a setting that names paths has a wrong type.
    """
    paths: list[str] = []
    for pattern in BACKUP_FILE_PATTERNS:
        paths.extend(
            info.path
            for info in container.list_files(DATA_DIR, pattern=pattern)
            if info.type == ops.pebble.FileType.FILE
        )
    named = [
        _config_value(config, "signing_key_path", str),
        _config_value(config, "log_config", str),
        *(_config_value(config, "app_service_config_files", list) or []),
    ]
    for name in named:
        if name:
            path = _data_path(name)
            if container.exists(path):
                paths.append(path)
    media_dir = _media_dir_in(config)
    if container.isdir(media_dir):
        paths.extend(
            info.path
            for info in container.list_files(media_dir, pattern=LOCAL_DIR_PATTERN)
            if info.type == ops.pebble.FileType.DIRECTORY
        )
    return sorted(set(paths))


def calculate_size(container: ops.Container, paths: Iterable[str]) -> int:
    """Return the combined size of all the paths given.

    Args:
        container: Container where to check the size of the paths.
        paths: Paths to check.

    Returns:
        Total size in bytes.

    Raises:
        BackupError: if the size cannot be measured.
    """
    paths = list(paths)
    if not paths:
        return 0
    # du gets the paths as argv words: no shell is involved.
    command = ["du", "--summarize", "--bytes", "--total", "--", *paths]
    try:
        stdout, _ = container.exec(
            command, user_id=SYNAPSE_USER_ID, group_id=SYNAPSE_GROUP_ID, timeout=600
        ).wait_output()
    except ops.pebble.ExecError as exc:
        raise BackupError(f"cannot measure the backup size: {_tail(exc.stderr)}") from exc
    except (ops.pebble.APIError, ops.pebble.ChangeError, ops.pebble.TimeoutError) as exc:
        raise BackupError(f"cannot measure the backup size: {exc}") from exc
    try:
        return int(stdout.strip().splitlines()[-1].split()[0])
    except (IndexError, ValueError) as exc:
        raise BackupError("cannot measure the backup size: unexpected du output") from exc


def get_environment(s3_parameters: S3Parameters, *, work_dir: str | None = None) -> dict[str, str]:
    """Get the environment variables for backup that configure aws S3 cli.

    Args:
        s3_parameters: S3 parameters.
        work_dir: the private work directory prepared by prepare_container;
            when given, HOME, GNUPGHOME and AWS_CONFIG_FILE point into it so
            that nothing depends on the Synapse user's home directory.

    Returns:
        A dictionary with aws s3 configuration variables.
    """
    environment = {
        "AWS_ACCESS_KEY_ID": s3_parameters.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_parameters.secret_key,
        "AWS_EC2_METADATA_DISABLED": "true",
        "LC_ALL": "C",
    }
    if s3_parameters.region:
        environment["AWS_DEFAULT_REGION"] = s3_parameters.region
    if s3_parameters.endpoint:
        environment["AWS_ENDPOINT_URL"] = s3_parameters.endpoint
    if work_dir:
        environment["HOME"] = work_dir
        environment["GNUPGHOME"] = posixpath.join(work_dir, GNUPG_DIR)
        environment["AWS_CONFIG_FILE"] = posixpath.join(work_dir, AWS_CONFIG_FILE)
        environment["AWS_SHARED_CREDENTIALS_FILE"] = posixpath.join(work_dir, "no-credentials")
    return environment


def build_aws_config(s3_parameters: S3Parameters, *, download: bool = False) -> str:
    """Return the aws CLI configuration file for the backup transfers.

    It holds no secret: credentials come from the environment. Payloads are
    not hashed for signing nor checksummed by the client: the archive is
    authenticated by gpg and its SHA-256 is recorded in the manifest, and
    the CPU is better spent on the pipeline.

    Args:
        s3_parameters: S3 parameters.
        download: tune for downloads to a pipe (restore) instead of uploads.

    Returns:
        The content of the aws configuration file.
    """
    concurrency = S3_DOWNLOAD_CONCURRENT_REQUESTS if download else S3_MAX_CONCURRENT_REQUESTS
    chunksize = S3_DOWNLOAD_CHUNKSIZE if download else S3_MULTIPART_CHUNKSIZE
    lines = ["[default]"]
    if s3_parameters.region:
        lines.append(f"region = {s3_parameters.region}")
    lines += [
        "request_checksum_calculation = when_required",
        "response_checksum_validation = when_required",
        "s3 =",
        f"  addressing_style = {s3_parameters.addressing_style}",
        f"  max_concurrent_requests = {concurrency}",
        f"  multipart_chunksize = {chunksize}",
        "  payload_signing_enabled = false",
        "",
    ]
    return "\n".join(lines)


def prepare_container(
    container: ops.Container,
    s3_parameters: S3Parameters,
    passphrase: str,
    *,
    work_dir: str | None = None,
) -> None:
    """Prepare container for create or restore backup.

    This means preparing the required aws configuration and gpg passphrase file.
    They go in a private work directory (mode 0700, owned by the Synapse user)
    that must not exist yet; the passphrase file is mode 0600.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters for the backup.
        passphrase: Passphrase for the backup (used for gpg).
        work_dir: the work directory to create (default: DEFAULT_WORK_DIR).

    Raises:
        BackupError: if there was an error preparing the configuration.
    """
    work_dir = work_dir or DEFAULT_WORK_DIR
    try:
        if container.exists(work_dir):
            raise BackupError(f"work directory {work_dir} exists already")
        container.make_dir(
            work_dir, permissions=0o700, user_id=SYNAPSE_USER_ID, group_id=SYNAPSE_GROUP_ID
        )
        container.make_dir(
            posixpath.join(work_dir, GNUPG_DIR),
            permissions=0o700,
            user_id=SYNAPSE_USER_ID,
            group_id=SYNAPSE_GROUP_ID,
        )
        files = {
            AWS_CONFIG_FILE: build_aws_config(s3_parameters),
            AWS_DOWNLOAD_CONFIG_FILE: build_aws_config(s3_parameters, download=True),
            PASSPHRASE_FILE: passphrase,
        }
        for name, content in files.items():
            container.push(
                posixpath.join(work_dir, name),
                content,
                permissions=0o600,
                user_id=SYNAPSE_USER_ID,
                group_id=SYNAPSE_GROUP_ID,
            )
    except (ops.pebble.PathError, ops.pebble.APIError) as exc:
        raise BackupError(f"cannot prepare the backup work directory: {exc}") from exc


def new_work_dir() -> str:
    """Return the path of a new private work directory in the container.

    Returns:
        A path under /tmp with a random name.
    """
    return f"{WORK_DIR_PREFIX}{secrets.token_hex(8)}"


@contextmanager
def prepared_container(
    container: ops.Container, s3_parameters: S3Parameters, passphrase: str
) -> Iterator[str]:
    """Prepare a private work directory and remove it afterwards, whatever happens.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters for the backup.
        passphrase: Passphrase for the backup.

    Yields:
        The work directory.
    """
    work_dir = new_work_dir()
    try:
        prepare_container(container, s3_parameters, passphrase, work_dir=work_dir)
        yield work_dir
    finally:
        _remove_quietly(container, work_dir)


def _remove_quietly(container: ops.Container, path: str) -> None:
    """Remove a path in the container, logging (not raising) on failure.

    Args:
        container: the container.
        path: what to remove.
    """
    try:
        container.remove_path(path, recursive=True)
    except (ops.pebble.PathError, ops.pebble.APIError) as exc:
        logger.error("could not remove %s from the container: %s", path, exc)


def _relative(path: str) -> str:
    """Return a container path as a tar member name (no leading slash).

    Args:
        path: an absolute container path.

    Returns:
        The path without its leading slashes.

    Raises:
        BackupError: if the path is not absolute or not normalised.
    """
    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise BackupError(f"not an absolute normalised path: {path!r}")
    return path.lstrip("/")


def _script(lines: Sequence[Sequence[str] | str]) -> str:
    """Join shell lines; each line given as a list is quoted word by word.

    Args:
        lines: raw shell syntax (str) or commands (lists of words).

    Returns:
        The script.
    """
    return "\n".join(
        line if isinstance(line, str) else " ".join(shlex.quote(word) for word in line)
        for line in lines
    )


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


def _gpg_command(passphrase_file: str, *operation: str) -> list[str]:
    """Return a gpg command that reads its passphrase from a file.

    Args:
        passphrase_file: the passphrase file.
        operation: the operation and its options.

    Returns:
        The command's words.
    """
    return [
        "gpg",
        "--no-permission-warning",  # restore runs as root in the Synapse user's work dir
        "--batch",
        "--no-tty",
        "--quiet",
        "--yes",
        "--no-symkey-cache",
        "--pinentry-mode",
        "loopback",
        "--passphrase-file",
        passphrase_file,
        *operation,
    ]


def _script_preamble(work_dir: str) -> list[Sequence[str] | str]:
    """Return the lines every pipeline starts with.

    Strict error handling, a private umask, and a trap that stops the
    gpg-agent of the private GNUPGHOME and removes temporary files.

    Args:
        work_dir: the private work directory.

    Returns:
        The script lines.
    """
    gnupg_home = posixpath.join(work_dir, GNUPG_DIR)
    return [
        "set -o errexit -o nounset -o pipefail",
        "umask 077",
        "cleanup() {",
        _script([["gpgconf", "--homedir", gnupg_home, "--kill", "gpg-agent"]])
        + " >/dev/null 2>&1 || true",
        '  if [ -n "${SNAPSHOT_DIR:-}" ]; then rm -rf -- "$SNAPSHOT_DIR"; fi',
        "}",
        "trap cleanup EXIT",
    ]


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
    if snapshot_file:
        tar += [f"--listed-incremental={snapshot_file}", "--no-check-device"]
        tar += ["--warning=no-new-dir"]
    tar.append("--no-unquote")  # names are literal: a backslash is not an escape
    tar += [f"--add-file={member}" for member in members]
    lines = _script_preamble(work_dir)
    database_members = ""
    if database_path:
        database_member = _relative(database_path)
        snapshot_dir = _database_copy_dir(backup_key)
        database_copy = posixpath.join(snapshot_dir, database_member)
        record = posixpath.join(work_dir, DATABASE_STATE_FILE)
        copy = ["python3", "-c", _SNAPSHOT_PROGRAM, database_path, database_copy, record]
        copy.append(database_state or "")
        # Tar allows one -C with --listed-incremental: the copy is added from /
        # and renamed to the database's own name in the archive.
        copy_member = _relative(database_copy)
        transform = f"s,^{_sed_literal(copy_member)}$,{_sed_replacement(database_member)},"
        lines += [
            "SNAPSHOT_DIR=" + shlex.quote(snapshot_dir),
            ["rm", "-rf", "--", snapshot_dir],  # its copy's existence means "copied"
            ["mkdir", "-p", "--", posixpath.dirname(database_copy)],
            copy,
            "database=()  # stays empty when the database has not changed since the parent",
            "if [ -e " + shlex.quote(database_copy) + " ]; then",
            ["chmod", f"--reference={database_path}", "--", database_copy],
            ["touch", f"--reference={database_path}", "--", database_copy],
            "database=("
            + _script([[f"--transform={transform}", "--add-file=" + copy_member]])
            + ")",
            "fi",
        ]
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
    upload = ["python3", "-c", _UPLOAD_PROGRAM, digest_file, str(int(piece_size))]
    upload += [ARCHIVE_PIECE_INFIX, *aws]
    lines += [
        " | ".join(
            [
                # Exit 1 is "some files changed while read" (a busy server);
                # anything worse fails the backup.
                "{ "
                + _script([tar])
                + database_members
                + ' || { status=$?; [ "$status" -eq 1 ] || exit "$status"; }; }',
                _script([gpg]),
                _script([upload]),
            ]
        ),
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


def check_tools(container: ops.Container, tools: Sequence[str] = REQUIRED_TOOLS) -> None:
    """Check that the workload has the tools a backup needs.

    Args:
        container: Synapse Container.
        tools: the commands that must be on PATH.

    Raises:
        BackupError: naming the missing tools.
    """
    script = _script(
        [
            "missing=''",
            "for tool in " + " ".join(shlex.quote(tool) for tool in tools) + "; do",
            '  command -v -- "$tool" >/dev/null 2>&1 || missing="$missing $tool"',
            "done",
            'printf "%s\\n" "$missing"',
        ]
    )
    try:
        stdout, _ = container.exec([BASH_COMMAND, "-c", script], timeout=60).wait_output()
    except ops.pebble.APIError as exc:
        # Pebble cannot start a command that does not exist.
        raise BackupError(
            f"the workload container lacks {BASH_COMMAND} ({exc.message}); "
            "use the synapse rock from synapse_rock/"
        ) from exc
    except ops.pebble.ExecError as exc:
        if exc.exit_code == 127:  # the shell itself could not be found
            raise BackupError(
                f"the workload container lacks {BASH_COMMAND}; "
                "use the synapse rock from synapse_rock/"
            ) from exc
        raise BackupError(f"cannot check the workload's tools: {_tail(exc.stderr)}") from exc
    except (ops.pebble.ChangeError, ops.pebble.TimeoutError) as exc:
        raise BackupError(f"cannot check the workload's tools: {exc}") from exc
    missing = stdout.split()
    if missing:
        raise BackupError(
            "the workload container lacks "
            + ", ".join(missing)
            + "; use the synapse rock from synapse_rock/"
        )


def run_in_container(
    container: ops.Container,
    command: list[str],
    environment: Mapping[str, str],
    *,
    secrets_to_hide: Iterable[str] = (),
    what: str,
    user_id: int = SYNAPSE_USER_ID,
) -> str:
    """Run a pipeline in the container as the Synapse user.

    Args:
        container: Synapse Container.
        command: the command.
        environment: the exec's environment (may hold credentials).
        secrets_to_hide: strings that must never appear in an error message.
        what: what the command does, for error messages.
        user_id: the user to run it as (default: the Synapse user).

    Returns:
        The command's standard output.

    Raises:
        BackupError: if the command fails, with the end of its error output.
    """
    hidden = [value for value in secrets_to_hide if value]
    try:
        process = container.exec(
            command,
            environment=dict(environment),
            user_id=user_id,
            group_id=SYNAPSE_GROUP_ID if user_id == SYNAPSE_USER_ID else user_id,
            working_dir="/",
            timeout=EXEC_TIMEOUT,
        )
        stdout, _ = process.wait_output()
    except ops.pebble.ExecError as exc:
        raise BackupError(
            f"{what} failed (exit code {exc.exit_code}): {redact(_tail(exc.stderr), hidden)}"
        ) from exc
    except ops.pebble.TimeoutError as exc:
        raise BackupError(f"{what} timed out") from exc
    except (ops.pebble.APIError, ops.pebble.ChangeError) as exc:
        raise BackupError(f"{what} could not run: {redact(str(exc), hidden)}") from exc
    return stdout


def redact(text: str, hidden: Iterable[str]) -> str:
    """Replace every secret in a text.

    Args:
        text: the text.
        hidden: the secrets.

    Returns:
        The text with each secret replaced by ``***``.
    """
    for value in hidden:
        if value:
            text = text.replace(value, "***")
    return text


def _tail(output: str | bytes | None, lines: int = 8) -> str:
    """Summarise a pipeline's error output on one line.

    The first lines usually name the stage that failed (an S3 error, say),
    the last ones what that did to the next stages; both are kept.

    Args:
        output: the output.
        lines: how many lines to keep at most.

    Returns:
        The lines joined with "; ".
    """
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    kept = [line.strip() for line in (output or "").splitlines() if line.strip()]
    if len(kept) > lines:
        kept = [*kept[: lines // 2], "...", *kept[-(lines - lines // 2) :]]
    return "; ".join(kept) or "no error output"


def _made_of_this_data(
    newest: BackupManifest, *, local: bool, data_id: str | None, restored_from: str | None
) -> bool:
    """Tell whether tar's snapshot state of a backup describes the data in /data.

    It does when this data made the backup (same data id; or, for a backup
    older than data ids, its state is in this volume), or when the backup is
    the one the last restore brought in: every restored file is new to tar
    (new inode, new ctime), so whatever that state says, each is stored.
    A backup made later by another volume is not built on, even if its data
    descends from the same backup.

    Args:
        newest: the newest backup.
        local: whether its snapshot state is in this unit's state directory.
        data_id: this data's id; None skips the check.
        restored_from: the backup the last restore brought in, if any.

    Returns:
        True when an incremental backup may build on it.
    """
    if data_id is None or newest.backup_id == restored_from:
        return True
    recorded = newest.metadata.get("data-id")
    return recorded == data_id if recorded else local


def _choose_parent(
    container: ops.Container,
    client: S3Client,
    backup_type: str,
    log: Callable[[str], None],
    deployment: str | None,
    *,
    data_id: str | None = None,
    restored_from: str | None = None,
) -> tuple[list[BackupManifest], bool]:
    """Choose the backup an incremental backup builds on.

    Only backups of this deployment count: another deployment writing to the
    same path (say, a new model restored from this one) has its own files.
    And only a backup of the data in /data now: tar's snapshot state knows
    files by device and inode, and another unit's volume may reuse them for
    other files, which an incremental backup would then silently leave out.

    Args:
        container: Synapse Container.
        client: the S3 client.
        backup_type: "full", "incremental" or "auto".
        log: receives progress messages.
        deployment: this deployment's id (model and application), if known.
        data_id: the id of the data in /data (DATA_ID_FILE), None to build
            on any newest backup; see _made_of_this_data.
        restored_from: the backup the last restore brought in, if any.

    Returns:
        The parent's chain, oldest first (empty for a full backup), and whether
        the parent's snapshot state is in the container (else it is in S3).

    Raises:
        BackupError: if an incremental backup was asked for and none can be made.
    """
    if backup_type == "full":
        return [], False
    if backup_type not in ("incremental", "auto"):
        raise BackupError(f"unknown backup type {backup_type!r}: use full or incremental")
    chain: list[BackupManifest] = []
    try:
        backups = [
            manifest
            for manifest in client.list_backups(strict=True)
            if not deployment or manifest.metadata.get("deployment", deployment) == deployment
        ]
        newest = backups[0] if backups else None
        problem = "there is no full backup to build on" if newest is None else ""
        local = False
        if newest is not None:
            local = container.exists(f"{STATE_DIR}/{newest.backup_id}.snar")
            if not _made_of_this_data(newest, local=local, data_id=data_id,
                                      restored_from=restored_from):  # fmt: skip
                problem = (
                    f"the newest backup {newest.backup_id} was made of other data (by another "
                    "unit, or before this unit's data was replaced other than by restore-backup)"
                )
        if newest is not None and not problem:
            chain = client.chain(newest.backup_id)
            remote = client.object_size(newest.backup_id + SNAPSHOT_STATE_SUFFIX) is not None
            if not local and not remote:
                problem = f"the newest backup {newest.backup_id} has no snapshot state"
    except S3Error as exc:
        problem = str(exc)
    if problem:
        if backup_type == "incremental":
            raise BackupError(f"cannot make an incremental backup: {problem}")
        log(f"making a full backup: {problem}")
        return [], False
    return chain, local


def _parent_state(
    container: ops.Container,
    client: S3Client,
    s3_parameters: S3Parameters,
    chain: list[BackupManifest],
    *,
    local: bool,
    work_dir: str,
    incremental_required: bool,
    hidden: Sequence[str],
    log: Callable[[str], None],
) -> BackupManifest | None:
    """Put the parent's snapshot state in the work dir, if the chain can go on.

    The chain can go on only if the configured passphrase decrypts its full
    backup: after a passphrase change a restore (which uses one passphrase
    for the whole chain) could not read the new backups otherwise.

    Args:
        container: Synapse Container.
        client: the S3 client.
        s3_parameters: S3 parameters.
        chain: the parent's chain, oldest first (empty: full backup).
        local: whether the parent's state is in the container.
        work_dir: the prepared work directory.
        incremental_required: fail instead of falling back to a full backup.
        hidden: the secrets no error message may show.
        log: receives progress messages.

    Returns:
        The parent, or None for a full backup.

    Raises:
        BackupError: if an incremental backup is required and cannot be made.
    """
    if not chain:
        return None
    parent = chain[-1]
    try:
        _check_passphrase(container, client, chain[0].backup_id, work_dir)
        run_in_container(
            container,
            _snapshot_state_commands(s3_parameters, parent, local, work_dir),
            get_environment(s3_parameters, work_dir=work_dir),
            secrets_to_hide=hidden,
            what=f"reading the snapshot state of {parent.backup_id}",
        )
    except (BackupError, S3Error) as exc:
        _remove_quietly(container, posixpath.join(work_dir, SNAPSHOT_STATE_FILE))
        if incremental_required:
            raise BackupError(f"cannot make an incremental backup: {exc}") from exc
        log(f"making a full backup: {exc}")
        return None
    return parent


def _snapshot_state_commands(
    s3_parameters: S3Parameters, parent: BackupManifest, local: bool, work_dir: str
) -> list[str]:
    """Build the command that puts the parent's tar snapshot state in the work dir.

    Args:
        s3_parameters: S3 parameters.
        parent: the parent backup.
        local: whether the container has the state (else it is downloaded).
        work_dir: the work directory.

    Returns:
        The command.
    """
    target = posixpath.join(work_dir, SNAPSHOT_STATE_FILE)
    lines = _script_preamble(work_dir)
    if local:
        lines.append(_script([["cp", "--", f"{STATE_DIR}/{parent.backup_id}.snar", target]]))
    else:
        key = s3_parameters.object_key(parent.backup_id + SNAPSHOT_STATE_SUFFIX)
        get = ["env", f"AWS_CONFIG_FILE={posixpath.join(work_dir, AWS_DOWNLOAD_CONFIG_FILE)}"]
        get += [AWS_COMMAND, "s3api", "get-object", "--bucket", s3_parameters.bucket]
        get += [f"--key={key}", "/dev/fd/3"]
        gpg = _gpg_command(posixpath.join(work_dir, PASSPHRASE_FILE), "--decrypt")
        gpg += ["--output", target]
        lines.append(_script([get]) + " 3>&1 >/dev/null | " + _script([gpg]))
    return [BASH_COMMAND, "-c", _script(lines)]


# What each value kept in the state directory must look like.
_STATE_VALUE_PATTERNS = {DATA_ID_FILE: _DATA_ID_PATTERN, RESTORED_FROM_FILE: BACKUP_ID_PATTERN}


def _read_state_value(container: ops.Container, path: str) -> str | None:
    """Return the data id or the restored backup's id kept in the state directory.

    Args:
        container: Synapse Container.
        path: DATA_ID_FILE or RESTORED_FROM_FILE.

    Returns:
        The value, or None when there is none (or it is damaged: it then counts as none).

    Raises:
        BackupError: if Pebble cannot be asked.
    """
    pattern = _STATE_VALUE_PATTERNS[path]
    try:
        text = container.pull(path).read().strip()
    except ops.pebble.PathError as exc:
        if exc.kind == "not-found":
            return None
        raise BackupError(f"cannot read {path}: {exc}") from exc
    except (ops.pebble.APIError, UnicodeDecodeError) as exc:
        raise BackupError(f"cannot read {path}: {exc}") from exc
    return text if pattern.fullmatch(text) else None


def read_data_id(container: ops.Container) -> str | None:
    """Return the id of the data in /data, if it has one.

    Args:
        container: Synapse Container.

    Returns:
        The id, or None when there is none (or it is damaged: a new one replaces it).

    Raises:
        BackupError: if Pebble cannot be asked.
    """
    return _read_state_value(container, DATA_ID_FILE)


def _write_state_value(container: ops.Container, path: str, value: str | None) -> None:
    """Record the data id or the restored backup's id; None removes it.

    Args:
        container: Synapse Container.
        path: DATA_ID_FILE or RESTORED_FROM_FILE.
        value: what to record.

    Raises:
        BackupError: if it cannot be written or removed.
    """
    user, group = SYNAPSE_USER_ID, SYNAPSE_GROUP_ID
    try:
        if value is None:
            container.remove_path(path)
            return
        container.make_dir(
            STATE_DIR, make_parents=True, permissions=0o700, user_id=user, group_id=group
        )
        container.push(path, value + "\n", permissions=0o600, user_id=user, group_id=group)
    except ops.pebble.PathError as exc:
        if value is not None or exc.kind != "not-found":
            raise BackupError(f"cannot write {path}: {exc}") from exc
    except ops.pebble.Error as exc:
        raise BackupError(f"cannot write {path}: {exc}") from exc


def data_id_for_backup(container: ops.Container) -> tuple[str, bool]:
    """Return the id of the data in /data, made now if it has none yet.

    A new id is recorded only once the backup is committed (see
    _keep_state_after_commit): a failed backup leaves /data as it was.

    Args:
        container: Synapse Container.

    Returns:
        The id (a new one has 32 hexadecimal digits), and whether it is new.

    Raises:
        BackupError: if it cannot be read.
    """
    data_id = read_data_id(container)
    if data_id is None:
        return secrets.token_hex(16), True
    return data_id, False


def _renew_data_id(
    container: ops.Container, restored_from: str | None, log: Callable[[str], None]
) -> None:
    """After a restore swapped data in, give /data a new id; say what it may build on.

    The data is now the restored backup's, with every file new to tar: the
    next backup may build on that backup (if it is still the newest), and on
    nothing else this data did not make. After a restore that failed with
    the restored data in place, ``restored_from`` is None: the operator may
    move the previous data back by hand, so the next backup is full.

    Args:
        container: Synapse Container.
        restored_from: the restored backup, or None.
        log: receives a note when this cannot be recorded.
    """
    try:
        _write_state_value(container, RESTORED_FROM_FILE, None)  # first: never a stale pair
        _write_state_value(container, DATA_ID_FILE, secrets.token_hex(16))
        _write_state_value(container, RESTORED_FROM_FILE, restored_from)
    except BackupError as exc:
        # The old id may stay: building on this data's own older backups is
        # sound (every restored file is new to tar), only larger.
        log(f"{exc}: the next backup may be larger than needed")


def _keep_state_after_commit(
    container: ops.Container, backup_key: str, work_dir: str, *, new_data_id: str | None
) -> None:
    """Keep the snapshot state and record a new data id; failures are only logged.

    The backup is committed: S3 holds its state. Without the local copy the
    next backup downloads it; without the data id it is full.

    Args:
        container: Synapse Container.
        backup_key: the committed backup.
        work_dir: the work directory holding the state.
        new_data_id: the data id the backup made and recorded, if it made one.
    """
    try:
        _keep_snapshot_state(container, backup_key, work_dir)
        if new_data_id:
            _write_state_value(container, DATA_ID_FILE, new_data_id)
    except BackupError as exc:
        logger.warning("%s", exc)


def _keep_snapshot_state(container: ops.Container, backup_key: str, work_dir: str) -> None:
    """Keep the new tar snapshot state and database fingerprint, replacing older ones.

    Args:
        container: Synapse Container.
        backup_key: the committed backup.
        work_dir: the work directory holding the state.

    Raises:
        BackupError: if the state cannot be kept.
    """
    target = f"{STATE_DIR}/{backup_key}.snar"
    database_state = posixpath.join(work_dir, DATABASE_STATE_FILE)
    database_target = f"{STATE_DIR}/{backup_key}{DATABASE_STATE_SUFFIX}"
    command = [BASH_COMMAND, "-c", _script([
        "set -o errexit -o nounset",
        ["mkdir", "-p", "-m", "700", "--", STATE_DIR],
        ["cp", "--", posixpath.join(work_dir, SNAPSHOT_STATE_FILE), target + ".tmp"],
        ["mv", "--", target + ".tmp", target],
        "if [ -e " + shlex.quote(database_state) + " ]; then",
        ["cp", "--", database_state, database_target + ".tmp"],
        ["mv", "--", database_target + ".tmp", database_target],
        "fi",
        "for old in " + shlex.quote(STATE_DIR) + "/*.snar "
        + shlex.quote(STATE_DIR) + "/*" + DATABASE_STATE_SUFFIX + "; do",
        '  case "$old" in ' + shlex.quote(target) + "|" + shlex.quote(database_target)
        + ') ;; *) rm -f -- "$old" ;; esac',
        "done",
    ])]  # fmt: skip
    run_in_container(container, command, {}, what="keeping the snapshot state")


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
            stdout = run_in_container(
                container, command, environment, secrets_to_hide=hidden, what="the backup pipeline"
            )
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


def _parse_digest(stdout: str) -> tuple[str, int, int]:
    """Parse the last line of the backup pipeline's output.

    Args:
        stdout: the pipeline's output.

    Returns:
        The SHA-256, size and member count of the archive.

    Raises:
        BackupError: if the line is missing or malformed.
    """
    lines = stdout.strip().splitlines()
    match = re.fullmatch(r"([0-9a-f]{64}) ([0-9]+) ([0-9]+)", lines[-1].strip()) if lines else None
    if not match:
        raise BackupError("the backup pipeline did not report the archive's digest")
    return match.group(1), int(match.group(2)), int(match.group(3))


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


# ---------------------------------------------------------------- restore

RESTORE_STAGING_PREFIX = ".synapse-restore-"
PREVIOUS_DATA_PREFIX = ".synapse-previous-"
# Written before a swap and removed after it: a later hook rolls back what
# a dying charm left half swapped.
RESTORE_JOURNAL = f"{DATA_DIR}/.synapse-restore-journal.json"
# How long a restored Synapse has to answer its health check before the
# previous data is removed (Pebble's start only waits one second).
RESTORE_HEALTH_TIMEOUT = 600.0
RESTORE_HEALTH_INTERVAL = 5.0
PASSPHRASE_PROBE_BYTES = 64 * 1024
DISK_BLOCK = 4096  # what a file's last block may waste, counted per member when staging
# Room the staging area needs beyond the archive's size.
STAGING_HEADROOM = 64 * 1024 * 1024
ROOT_USER_ID = 0

# Synapse's backup documentation: after restoring a database, forget the
# one-time keys it had handed out, or clients would be given used ones.
_POST_RESTORE_PROGRAM = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1])
try:
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    if "e2e_one_time_keys_json" in tables:
        with connection:
            connection.execute("DELETE FROM e2e_one_time_keys_json")
finally:
    connection.close()
"""


@dataclasses.dataclass(frozen=True)
class ArchiveCheck:
    """What reading a backup's archive found, against its manifest.

    Attributes:
        sha256: the SHA-256 of the encrypted object as downloaded.
        size: its size in bytes.
        file_count: the members of the archive.
        manifest: the backup's manifest.
    """

    sha256: str
    size: int
    file_count: int
    manifest: BackupManifest

    @property
    def matches(self) -> bool:
        """Whether checksum, size and member count are the manifest's."""
        return (
            self.sha256 == self.manifest.sha256
            and self.size == self.manifest.size
            and self.file_count == self.manifest.file_count
        )

    def mismatch(self) -> str:
        """Describe how the archive differs from the manifest.

        Returns:
            The differences, or an empty string.
        """
        problems = []
        if self.sha256 != self.manifest.sha256:
            problems.append("checksum differs")
        if self.size != self.manifest.size:
            problems.append(f"size {self.size} instead of {self.manifest.size}")
        if self.file_count != self.manifest.file_count:
            problems.append(f"{self.file_count} files instead of {self.manifest.file_count}")
        return ", ".join(problems)


def build_restore_command(
    s3_parameters: S3Parameters,
    backup_key: str,
    passphrase_file: str,
    *,
    staging_dir: str | None = None,
    work_dir: str | None = None,
    pieces: Sequence[str] = (),
) -> list[str]:
    """Build the command that downloads, checks, decrypts and unpacks a backup.

    ``aws s3api get-object | digest | gpg --decrypt | tar`` extracts into the staging
    directory (or, with no staging directory, only lists the archive). The
    last line of output is ``<sha256> <size> <members>`` of what was read.

    Args:
        s3_parameters: S3 parameters.
        backup_key: The backup to read.
        passphrase_file: The file with the passphrase.
        staging_dir: Where to extract; None only lists the archive.
        work_dir: the private work directory (default: the passphrase file's).
        pieces: the objects that hold the archive, in order (default: the
            backup's own object); they are downloaded one after the other
            into one stream.

    Returns:
        The command to execute.

    Raises:
        BackupError: if the key or the staging directory is not acceptable.
    """
    validate_backup_key(backup_key)
    work_dir = work_dir or posixpath.dirname(passphrase_file)
    digest_file = posixpath.join(work_dir, "digest")
    index_file = posixpath.join(work_dir, "index")
    # One streaming GET: `aws s3 cp s3://... -` buffers up to ~250 MB of parts
    # waiting for a slower reader; get-object writes the body to fd 3 (the
    # pipe) as it arrives, and its JSON summary goes to /dev/null.
    aws = ["env", f"AWS_CONFIG_FILE={posixpath.join(work_dir, AWS_DOWNLOAD_CONFIG_FILE)}"]
    aws += [AWS_COMMAND]
    aws += ["s3api", "get-object", "--bucket", s3_parameters.bucket]
    downloads = [
        _script([[*aws, f"--key={s3_parameters.object_key(piece)}", "/dev/fd/3"]])
        for piece in (pieces or [backup_key])
    ]
    gpg = _gpg_command(passphrase_file, "--decrypt", "--output", "-")
    tar = ["tar", "--file=-", "--numeric-owner", "--verbose", f"--index-file={index_file}"]
    tar += ["--quoting-style=escape"]
    if staging_dir is None:
        tar.append("--list")
    else:
        _relative(staging_dir)
        # --listed-incremental=/dev/null: extract incremental archives as such,
        # deleting what was deleted between backups (harmless on a full one).
        tar += ["--extract", f"--directory={staging_dir}", "--same-owner", "--same-permissions"]
        tar += ["--listed-incremental=/dev/null"]
        tar += ["--delay-directory-restore"]
    digest = ["python3", "-c", _DIGEST_PROGRAM, digest_file]
    lines = _script_preamble(work_dir)
    lines += [
        " | ".join(
            [
                (downloads[0] if len(downloads) == 1 else "{ " + " && ".join(downloads) + "; }")
                + " 3>&1 >/dev/null",
                *(_script([words]) for words in (digest, gpg, tar)),
            ]
        ),
        "read -r sha256 size < " + shlex.quote(digest_file),
        _COUNT_MEMBERS + shlex.quote(index_file) + " || true)",
        'printf "%s %s %s\\n" "$sha256" "$size" "$members"',
    ]
    return [BASH_COMMAND, "-c", _script(lines)]


def _check_passphrase(
    container: ops.Container, client: S3Client, backup_key: str, work_dir: str
) -> None:
    """Check that the passphrase decrypts a backup, reading only its start.

    Args:
        container: Synapse Container.
        client: the S3 client.
        backup_key: the backup.
        work_dir: the prepared work directory (with the passphrase file).

    Raises:
        BackupError: if the passphrase is wrong.
    """
    probe = posixpath.join(work_dir, "probe.gpg")
    head = client.read_object(backup_key, first_bytes=PASSPHRASE_PROBE_BYTES)
    container.push(
        probe, head, permissions=0o600, user_id=SYNAPSE_USER_ID, group_id=SYNAPSE_GROUP_ID
    )
    gpg = _gpg_command(posixpath.join(work_dir, PASSPHRASE_FILE), "--decrypt")
    command = _script([*_script_preamble(work_dir), [*gpg, "--output", "/dev/null", probe]])
    try:
        container.exec(
            [BASH_COMMAND, "-c", command],
            environment={
                "GNUPGHOME": posixpath.join(work_dir, GNUPG_DIR),
                "HOME": work_dir,
                "LC_ALL": "C",  # the message below is matched in English
            },
            timeout=120,
            user_id=SYNAPSE_USER_ID,
            group_id=SYNAPSE_GROUP_ID,
        ).wait_output()
    except ops.pebble.ExecError as exc:
        # A cut-off stream fails too, later; only a bad key means a wrong passphrase.
        if "Bad session key" in str(exc.stderr):
            raise BackupError(
                f"the backup passphrase does not decrypt backup {backup_key}"
            ) from exc
    except (ops.pebble.APIError, ops.pebble.ChangeError, ops.pebble.TimeoutError) as exc:
        raise BackupError(f"cannot check the passphrase: {exc}") from exc


def _available_bytes(container: ops.Container, path: str) -> int:
    """Return the free space of the filesystem holding a path.

    Args:
        container: Synapse Container.
        path: the path.

    Returns:
        Bytes available.

    Raises:
        BackupError: if df fails.
    """
    try:
        stdout, _ = container.exec(
            ["df", "--output=avail", "--block-size=1", "--", path], timeout=60
        ).wait_output()
        return int(stdout.split()[-1])
    except (
        ops.pebble.ExecError,
        ops.pebble.APIError,
        ops.pebble.ChangeError,
        ops.pebble.TimeoutError,
    ) as exc:
        raise BackupError(f"cannot measure the free space of {path}: {exc}") from exc
    except (ValueError, IndexError) as exc:
        raise BackupError(f"cannot measure the free space of {path}") from exc


def _read_archive(
    container: ops.Container,
    s3_parameters: S3Parameters,
    manifest: BackupManifest,
    passphrase: str,
    work_dir: str,
    *,
    staging_dir: str | None,
) -> ArchiveCheck:
    """Download, decrypt and extract (or list) an archive in the container.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters.
        manifest: the backup's manifest.
        passphrase: the passphrase.
        work_dir: the prepared work directory.
        staging_dir: where to extract, or None to list only.

    Returns:
        What was read.

    Raises:
        BackupError: if the pipeline fails.
    """
    command = build_restore_command(
        s3_parameters,
        manifest.backup_id,
        posixpath.join(work_dir, PASSPHRASE_FILE),
        staging_dir=staging_dir,
        work_dir=work_dir,
        pieces=list(manifest.pieces()),
    )
    stdout = run_in_container(
        container,
        command,
        get_environment(s3_parameters, work_dir=work_dir),
        secrets_to_hide=(s3_parameters.secret_key, passphrase),
        what="downloading and decrypting the backup",
        user_id=ROOT_USER_ID if staging_dir else SYNAPSE_USER_ID,
    )
    sha256, size, file_count = _parse_digest(stdout)
    return ArchiveCheck(sha256=sha256, size=size, file_count=file_count, manifest=manifest)


def verify_backup(
    container: ops.Container,
    s3_parameters: S3Parameters,
    backup_key: str,
    passphrase: str,
    *,
    log: Callable[[str], None] = logger.info,
) -> ArchiveCheck:
    """Download a backup, check its checksum, decrypt it and list it; touch no live data.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters.
        backup_key: the backup.
        passphrase: the passphrase.
        log: receives progress messages.

    Returns:
        What was found, with whether it matches the manifest.

    Raises:
        BackupError: if the backup is missing or cannot be read or decrypted.
    """
    try:
        manifest = S3Client(s3_parameters).get_manifest(backup_key)
    except S3Error as exc:
        raise BackupError(str(exc)) from exc
    check_tools(container)
    with prepared_container(container, s3_parameters, passphrase) as work_dir:
        log(f"downloading and listing {manifest.size} bytes")
        return _read_archive(
            container, s3_parameters, manifest, passphrase, work_dir, staging_dir=None
        )


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """The outcome of a restore.

    Attributes:
        backup_id: the restored backup.
        file_count: members restored.
        size: bytes downloaded.
        restored_paths: the live paths replaced.
        previous_dir: where the previous data was kept, if it was.
    """

    backup_id: str
    file_count: int
    size: int
    restored_paths: tuple[str, ...]
    previous_dir: str | None


def _allowed_restore_path(path: str) -> bool:
    """Tell whether a manifest's path may be replaced by a restore.

    Only paths inside the data directory: a manifest is not encrypted, and
    must not be able to name a path elsewhere in the container.

    Args:
        path: the path.

    Returns:
        True when it is a normalised path strictly inside DATA_DIR.
    """
    return (
        path.startswith(DATA_DIR + "/")
        and posixpath.normpath(path) == path
        and "/." not in path[len(DATA_DIR) :]
    )


def _manifest_databases(manifest: BackupManifest) -> list[str]:
    """Return the SQLite database a backup holds, as a one-item list (or empty).

    Args:
        manifest: the backup's manifest.

    Returns:
        The database's path.
    """
    if "database-path" in manifest.metadata:  # "" when the backup holds no database
        recorded = manifest.metadata["database-path"]
        return [recorded] if recorded and recorded in manifest.paths else []
    return [path for path in manifest.paths if path.endswith(".db")]  # older manifests


def _swap_paths(
    container: ops.Container,
    manifest: BackupManifest,
    log: Callable[[str], None] = logger.info,
) -> list[str]:
    """Return the live paths a restore replaces.

    The backed-up paths, the paths a backup would take now, and the SQLite
    journal files of the live database (which must not meet the restored
    one). When homeserver.yaml cannot be read or used, only what the backup
    holds is replaced (with its database's journal files): a restore is how
    an operator repairs a broken configuration, so it must not need one, and
    what the live configuration named cannot be known, so it is left alone.

    Args:
        container: Synapse Container.
        manifest: the backup's manifest.
        log: receives a note when only the backup's paths are replaced.

    Returns:
        The paths, sorted.

    Raises:
        BackupError: if the manifest names a path outside the data directory,
            or Pebble cannot serve homeserver.yaml.
    """
    paths = set(manifest.paths)
    bad = [path for path in paths if not _allowed_restore_path(path)]
    if bad:
        raise BackupError(f"the manifest names paths outside {DATA_DIR}: {bad[0]!r}")
    databases = _manifest_databases(manifest)
    try:
        config = read_synapse_config(container)
        live = _paths_in_layout(container, config)
        databases.append(_database_in(config) or "")
    except SynapseConfigError as exc:
        log(f"{exc}: the restore replaces only what the backup holds; other live paths "
            "the configuration may name stay as they are")  # fmt: skip
    else:
        paths.update(live)
    for name in databases:
        if name:
            paths.update({name, f"{name}-wal", f"{name}-shm", f"{name}-journal"})
    return sorted(path for path in paths if _allowed_restore_path(path))


def _move(container: ops.Container, source: str, target: str) -> None:
    """Rename a path in the container (same filesystem: no copy).

    Args:
        container: Synapse Container.
        source: what to move.
        target: where; its parent is created if missing.

    Raises:
        BackupError: if the move fails.
    """
    command = [BASH_COMMAND, "-c", _script([
        ["mkdir", "-p", "--", posixpath.dirname(target)],
        ["mv", "--no-target-directory", "--", source, target],
    ])]  # fmt: skip
    try:
        container.exec(command, timeout=600).wait_output()
    except ops.pebble.ExecError as exc:
        raise BackupError(f"cannot move {source} to {target}: {_tail(exc.stderr)}") from exc
    except (ops.pebble.APIError, ops.pebble.ChangeError, ops.pebble.TimeoutError) as exc:
        raise BackupError(f"cannot move {source} to {target}: {exc}") from exc


def _swap_in(
    container: ops.Container, paths: Sequence[str], staging_dir: str, previous_dir: str
) -> None:
    """Move the live paths aside and the staged ones in; roll back on failure.

    A journal written first lets a later hook roll back a swap that a dying
    charm left half done (recover_interrupted_restore).

    Args:
        container: Synapse Container.
        paths: the live paths to replace.
        staging_dir: where the backup was extracted.
        previous_dir: where the live data goes.

    Raises:
        BackupError: if a move fails; the message says whether the previous
            data is back or where it is.
    """
    staged = [path for path in paths if container.exists(staging_dir + path)]
    journal = {"staging": staging_dir, "previous": previous_dir, "paths": list(paths),
               "staged": staged}  # fmt: skip
    try:
        container.push(RESTORE_JOURNAL, json.dumps(journal), permissions=0o600, make_dirs=True)
    except ops.pebble.Error:
        _forget_unused_journal(container)
        raise
    try:
        for path in paths:
            if container.exists(path):
                _move(container, path, previous_dir + path)
            if path in staged:
                _move(container, staging_dir + path, path)
        # The swap is done only once its journal is gone: a journal left with
        # staging or previous removed would make a roll-back move live data
        # into a directory about to be deleted. If it cannot be removed, the
        # swap is undone now, while both are whole.
        container.remove_path(RESTORE_JOURNAL)
    except (BackupError, ops.pebble.Error) as exc:
        problems = _roll_back(container, journal)
        if problems:
            raise IncompleteRollbackError(
                f"the swap failed ({exc}) and could not be undone: {'; '.join(problems)}; "
                f"the previous data is in {previous_dir}, the restored data in {staging_dir}"
            ) from exc
        raise BackupError(f"the swap failed and was undone, nothing changed: {exc}") from exc


def _forget_unused_journal(container: ops.Container) -> None:
    """Remove a journal whose write failed, before any move: it may exist all the same.

    Args:
        container: Synapse Container.

    Raises:
        IncompleteRollbackError: if it may exist and cannot be removed; staging
            must then stay, and the next hook's roll-back (which moves
            nothing, as nothing moved) removes it.
    """
    try:
        container.remove_path(RESTORE_JOURNAL)
    except ops.pebble.Error as exc:
        if isinstance(exc, ops.pebble.PathError) and exc.kind == "not-found":
            return
        raise IncompleteRollbackError(
            f"the restore journal could not be written nor removed: {exc}; nothing was "
            "moved, and the next hook removes it"
        ) from exc


class IncompleteRollbackError(BackupError):
    """A failed swap could not be undone: Synapse must not start on the data."""


class SynapseNotStartedError(BackupError):
    """The restored data is in place but Synapse did not start: keep the previous data."""


def _roll_back(container: ops.Container, journal: Mapping[str, Any]) -> list[str]:
    """Put the previous data back after a partial swap, whatever stage it reached.

    For each path, newest first: if the previous version was moved aside,
    whatever is live now is restored data (back to staging) and the previous
    version returns; if nothing was moved aside but the path was staged and
    is live while staging no longer has it, it was moved in: back it goes.

    Args:
        container: Synapse Container.
        journal: the swap's journal (staging, previous, paths, staged).

    Returns:
        What could not be undone (empty when all is back and the journal is
        removed); the journal is removed only when all is back, and while it
        exists nobody may remove staging or previous.
    """
    staging, previous = str(journal["staging"]), str(journal["previous"])
    staged = set(journal["staged"])
    problems = []
    for path in reversed(list(journal["paths"])):
        try:
            if container.exists(previous + path):
                if container.exists(path):
                    _move(container, path, staging + path)
                _move(container, previous + path, path)
            elif (
                path in staged and container.exists(path) and not container.exists(staging + path)
            ):
                _move(container, path, staging + path)
        except (BackupError, ops.pebble.Error) as exc:
            logger.critical("could not undo the restore of %s: %s", path, exc)
            problems.append(str(exc))
    if not problems:
        try:
            container.remove_path(RESTORE_JOURNAL)
        except ops.pebble.Error as exc:
            if not (isinstance(exc, ops.pebble.PathError) and exc.kind == "not-found"):
                logger.critical("the data is back, but the restore journal stays: %s", exc)
                problems.append(f"cannot remove {RESTORE_JOURNAL}: {exc}")
    return problems


def sweep_leftovers(container: ops.Container) -> None:
    """Remove what a killed backup or restore left: work dirs, database copies, staging.

    Work dirs hold a passphrase; staging dirs hold a full copy of a backup.
    Previous data kept by keep-previous is left alone, and nothing is swept
    while an interrupted restore's journal exists.

    Args:
        container: Synapse Container.
    """
    try:
        if container.exists(RESTORE_JOURNAL):
            return
        work_parent, work_prefix = posixpath.split(WORK_DIR_PREFIX)
        found = [
            info.path
            for parent, pattern in (
                (work_parent, work_prefix + "*"),
                (DATA_DIR, SNAPSHOT_DIR_PREFIX + "*"),
                (DATA_DIR, RESTORE_STAGING_PREFIX + "*"),
            )
            if container.isdir(parent)
            for info in container.list_files(parent, pattern=pattern)
        ]
    except ops.pebble.Error as exc:
        logger.warning("cannot look for leftovers of earlier runs: %s", exc)
        return
    for path in found:
        logger.warning("removing %s, left by an interrupted run", path)
        _remove_quietly(container, path)


def recover_interrupted_restore(container: ops.Container) -> str | None:
    """Roll back a restore whose swap was interrupted (the charm or pod died).

    Args:
        container: Synapse Container.

    Returns:
        None when there was nothing to do or the previous data is back, else
        a message saying what needs the operator.
    """
    try:
        if not container.exists(RESTORE_JOURNAL):
            return None
        journal = json.loads(container.pull(RESTORE_JOURNAL).read())
    except (ops.pebble.Error, ValueError) as exc:
        return f"cannot read the journal of an interrupted restore: {exc}"
    if not (
        isinstance(journal, dict)
        and all(isinstance(journal.get(key), str) for key in ("staging", "previous"))
        and all(isinstance(journal.get(key), list) for key in ("paths", "staged"))
        and all(isinstance(path, str) for path in (*journal["paths"], *journal["staged"]))
    ):
        return f"cannot read the journal of an interrupted restore: {RESTORE_JOURNAL} is damaged"
    logger.warning("rolling back an interrupted restore: %s", journal)
    problems = _roll_back(container, journal)
    if problems:
        return (
            "an interrupted restore could not be rolled back; the previous data is in "
            f"{journal['previous']}: {problems[0]}"
        )
    _remove_quietly(container, str(journal["staging"]))
    _remove_quietly(container, str(journal["previous"]))  # empty directories only now
    return None


def restore_backup(
    container: ops.Container,
    s3_parameters: S3Parameters,
    backup_key: str,
    passphrase: str,
) -> None:
    """Restore a backup into the live data directory.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters.
        backup_key: the backup to restore.
        passphrase: its passphrase.

    Raises:
        BackupError: if the restore failed; the live data is then as it was.
    """
    run_restore(container, s3_parameters, backup_key, passphrase, force=True)


def run_restore(
    container: ops.Container,
    s3_parameters: S3Parameters,
    backup_key: str,
    passphrase: str,
    *,
    server_name: str | None = None,
    force: bool = False,
    keep_previous: bool = False,
    service: str = "synapse",
    log: Callable[[str], None] = logger.info,
    synapse_version: str | None = None,
    healthy: Callable[[], bool] | None = None,
) -> RestoreResult:
    """Check, stage and swap in a backup; Synapse is started again in every outcome.

    Pre-flight: the backup exists, its server name is ``server_name`` and no
    backup of its chain was made by a newer Synapse than ``synapse_version``
    (unless ``force``), the passphrase decrypts it, the staging area has room. Then
    the archive is downloaded, decrypted and extracted into a staging
    directory beside the live data and checked against the manifest. Only
    then is Synapse stopped and the staged data renamed into place; the
    previous data is moved aside, put back if the swap fails, and removed
    afterwards unless ``keep_previous``.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters.
        backup_key: the backup to restore.
        passphrase: its passphrase.
        server_name: this homeserver's name.
        force: restore a backup of another server name, or one made by a
            newer Synapse.
        keep_previous: keep the replaced data in the data directory.
        service: the Pebble service to stop and start.
        log: receives progress messages.
        synapse_version: the version of the Synapse that will run the
            restored data; None skips the check, and one that cannot be
            read ("unknown") skips it with a note in the log.
        healthy: tells whether Synapse answers its health check; when
            given, the previous data is removed only once it does, within
            RESTORE_HEALTH_TIMEOUT (else it is kept, and the restore fails).

    Returns:
        What was restored.

    Raises:
        BackupError: if the restore failed; the live data is then as it was.
    """
    try:
        client = S3Client(s3_parameters)
        chain = client.chain(backup_key)
    except S3Error as exc:
        raise BackupError(str(exc)) from exc
    manifest = chain[-1]
    if not force:
        _check_server_name(manifest, server_name)
        _check_synapse_version(chain, synapse_version, log)
    check_tools(container)
    _swap_paths(container, manifest, log)  # refuses a manifest naming paths outside /data
    token = secrets.token_hex(4)
    staging_dir = f"{DATA_DIR}/{RESTORE_STAGING_PREFIX}{backup_key}-{token}"
    previous_dir = f"{DATA_DIR}/{PREVIOUS_DATA_PREFIX}{backup_key}-{token}"
    try:
        checks = _stage_chain(container, client, s3_parameters, chain, passphrase,
                              staging_dir=staging_dir, log=log)  # fmt: skip
    except BaseException as exc:
        _remove_quietly(container, staging_dir)  # nothing live was touched
        if isinstance(exc, S3Error):
            raise BackupError(str(exc)) from exc
        if isinstance(exc, ops.pebble.Error):
            raise BackupError(f"restore failed: {exc}") from exc
        raise
    log("stopping Synapse and swapping the restored data in")
    try:
        paths = _stop_and_swap(container, service, manifest, staging_dir, previous_dir)
    except IncompleteRollbackError:
        raise  # staging and previous hold data the operator needs
    except SynapseNotStartedError as exc:
        _remove_quietly(container, staging_dir)
        _renew_data_id(container, None, log)  # the restored data is in place, for now
        raise SynapseNotStartedError(
            f"{exc}; the restored data is in place, the previous data is kept in {previous_dir}"
        ) from exc
    except BackupError:
        # The swap was undone (or never began): previous holds empty dirs at most.
        _remove_quietly(container, staging_dir)
        _remove_quietly(container, previous_dir)
        raise
    # Anything else (the charm dying) leaves all in place: the journal rolls it back.
    _remove_quietly(container, staging_dir)
    if healthy is not None and not _service_planned(container, service):
        healthy = None  # nothing was started to answer
    # Where the previous data stays (a failure, keep_previous) the operator may
    # move it back by hand: then the next backup is full.
    builds_on: str | None = None
    try:
        _remove_previous(
            container, previous_dir, keep_previous=keep_previous, healthy=healthy, log=log
        )
        builds_on = None if keep_previous else backup_key
    finally:
        _renew_data_id(container, builds_on, log)
    return RestoreResult(
        backup_id=backup_key,
        file_count=sum(check.file_count for check in checks),
        size=sum(check.size for check in checks),
        restored_paths=tuple(paths),
        previous_dir=previous_dir if keep_previous else None,
    )


def _service_planned(container: ops.Container, service: str) -> bool:
    """Tell whether Pebble's plan has a service (when Pebble cannot say: yes).

    Args:
        container: Synapse Container.
        service: the service.

    Returns:
        False only when the plan is known to lack it.
    """
    try:
        return service in container.get_plan().services
    except ops.pebble.Error as exc:
        logger.warning("cannot read Pebble's plan: %s", exc)
        return True


def _remove_previous(
    container: ops.Container,
    previous_dir: str,
    *,
    keep_previous: bool,
    healthy: Callable[[], bool] | None,
    log: Callable[[str], None],
) -> None:
    """Remove the data a restore replaced, unless kept, once Synapse answers on the new data.

    Args:
        container: Synapse Container.
        previous_dir: where the replaced data is.
        keep_previous: keep it anyway.
        healthy: tells whether Synapse answers its health check (None: do not ask).
        log: receives progress messages.

    Raises:
        SynapseNotStartedError: if Synapse did not answer in time; the
            previous data is then kept.
    """
    if healthy is not None and not _wait_until_healthy(healthy, log):
        raise SynapseNotStartedError(
            f"Synapse started on the restored data but did not answer its health check "
            f"within {RESTORE_HEALTH_TIMEOUT:g} s (see its log: it may still be migrating "
            f"its database); the restored data is in place, the previous data is kept in "
            f"{previous_dir}: remove it once Synapse runs"
        )
    if not keep_previous:
        log("removing the previous data")
        _remove_quietly(container, previous_dir)


def _wait_until_healthy(healthy: Callable[[], bool], log: Callable[[str], None]) -> bool:
    """Wait until Synapse answers its health check on the restored data.

    Synapse checks its database schema and configuration after Pebble
    counts it started, so a restore is not over until it answers.

    Args:
        healthy: tells whether Synapse answers.
        log: receives progress messages.

    Returns:
        Whether it answered within RESTORE_HEALTH_TIMEOUT.
    """
    log("waiting for Synapse to answer its health check")
    deadline = time.monotonic() + RESTORE_HEALTH_TIMEOUT
    while not healthy():
        if time.monotonic() >= deadline:
            return False
        time.sleep(RESTORE_HEALTH_INTERVAL)
    return True


def _check_server_name(manifest: BackupManifest, server_name: str | None) -> None:
    """Refuse a backup of another homeserver.

    Args:
        manifest: the backup to restore.
        server_name: this homeserver's name.

    Raises:
        BackupError: if the backup names another server.
    """
    backed_up_name = manifest.metadata.get("server-name", "")
    if backed_up_name != server_name:
        raise BackupError(
            f"backup {manifest.backup_id} is of server {backed_up_name!r}, "
            f"not {server_name or 'this unknown server'!r}; use force=true to restore it anyway"
        )


def _version_key(version: str) -> tuple[int, int, int] | None:
    """Return the release numbers of a Synapse version, such as (1, 98, 0) for 1.98.0rc1.

    Args:
        version: the version.

    Returns:
        The numbers, or None when the version is not of that form.
    """
    match = re.match(r"([0-9]+)\.([0-9]+)\.([0-9]+)", version.strip())
    if not match:
        return None
    major, minor, patch = (int(number) for number in match.groups())
    return major, minor, patch


def _check_synapse_version(
    chain: Sequence[BackupManifest], running: str | None, log: Callable[[str], None]
) -> None:
    """Refuse a chain that a newer Synapse made than the one that would run it.

    Synapse upgrades its database schema when it starts, and may refuse to
    start on a database that a newer Synapse upgraded: such a restore would
    swap the data in and leave the homeserver down.

    Args:
        chain: the backups to restore, the full one first.
        running: the version of the Synapse in the container; None (not
            known to the caller) skips the check.
        log: receives a note when the versions cannot be compared.

    Raises:
        BackupError: if a backup of the chain was made by a newer Synapse.
    """
    if running is None:
        return
    recorded = [manifest.metadata.get("synapse-version", "unknown") for manifest in chain]
    ours = _version_key(running)
    keys = [(_version_key(version), version) for version in recorded]
    theirs = [(key, version) for key, version in keys if key]
    unknown = [version for key, version in keys if not key]
    newest = max(theirs, default=None)
    if ours is not None and newest is not None and newest[0] > ours:
        raise BackupError(
            f"backup {chain[-1].backup_id} was made by Synapse {newest[1]}, newer than this "
            f"unit's Synapse {running}, which may not start on its database; upgrade Synapse "
            "first, or use force=true to restore it anyway"
        )
    if ours is None or unknown:
        shown = unknown[-1] if unknown else recorded[-1]
        log(f"not comparing Synapse versions: the backup's is {shown}, this unit's {running}")


def _stage_chain(
    container: ops.Container,
    client: S3Client,
    s3_parameters: S3Parameters,
    chain: Sequence[BackupManifest],
    passphrase: str,
    *,
    staging_dir: str,
    log: Callable[[str], None],
) -> list[ArchiveCheck]:
    """Check the passphrase and the room, then extract a chain into staging and check it.

    Nothing live is touched. The restored database forgets its one-time keys.

    Args:
        container: Synapse Container.
        client: the S3 client.
        s3_parameters: S3 parameters.
        chain: the backups to extract, full first.
        passphrase: the passphrase.
        staging_dir: where to extract (created here).
        log: receives progress messages.

    Returns:
        What was read of each archive.

    Raises:
        BackupError: if a check fails or an archive cannot be read.
    """
    with prepared_container(container, s3_parameters, passphrase) as work_dir:
        log("checking the passphrase")
        _check_passphrase(container, client, chain[0].backup_id, work_dir)
        # Each file takes whole blocks on disk: many small ones (thumbnails) take
        # twice their archive's bytes, so a block per member is counted too.
        needed = sum(link.size + link.file_count * DISK_BLOCK for link in chain)
        needed += STAGING_HEADROOM
        available = _available_bytes(container, DATA_DIR)
        if available < needed:
            raise BackupError(
                f"not enough room in {DATA_DIR} to stage the restore: "
                f"{needed} bytes needed, {available} available"
            )
        container.make_dir(staging_dir, permissions=0o700)
        checks = []
        for link in chain:  # the full backup, then each incremental one in order
            log(f"downloading, decrypting and extracting {link.backup_type} backup "
                f"{link.backup_id} ({link.size} bytes) into staging")  # fmt: skip
            check = _read_archive(
                container, s3_parameters, link, passphrase, work_dir, staging_dir=staging_dir
            )
            if not check.matches:
                raise BackupError(
                    f"backup {link.backup_id} does not match its manifest: {check.mismatch()}"
                )
            checks.append(check)
    for database in _manifest_databases(chain[-1]):
        run_in_container(
            container,
            ["python3", "-c", _POST_RESTORE_PROGRAM, staging_dir + database],
            {},
            what="clearing the restored database's one-time keys",
            user_id=ROOT_USER_ID,
        )
    return checks


def _stop_and_swap(
    container: ops.Container,
    service: str,
    manifest: BackupManifest,
    staging_dir: str,
    previous_dir: str,
) -> list[str]:
    """Stop Synapse, swap the data, and start Synapse again unless that would harm it.

    The live paths to replace are listed once Synapse is stopped, so that
    nothing it created meanwhile escapes the swap.

    Args:
        container: Synapse Container.
        service: the Pebble service.
        manifest: the restored backup's manifest.
        staging_dir: the extracted backup.
        previous_dir: where the live data goes.

    Returns:
        The live paths replaced.

    Raises:
        BackupError: if the swap failed (the data was put back) or Synapse
            could not be started again.
    """
    pebble_errors = (ops.pebble.ChangeError, ops.pebble.APIError, ops.pebble.TimeoutError)
    has_service = service in container.get_plan().services

    def start(after_swap: bool) -> None:
        if has_service:
            try:
                container.start(service)
            except pebble_errors as exc:
                error = SynapseNotStartedError if after_swap else BackupError
                raise error(f"Synapse did not start again: {exc}") from exc

    try:
        if has_service:
            try:
                container.stop(service)
            except pebble_errors as exc:
                raise BackupError(f"Synapse could not be stopped: {exc}") from exc
        paths = _swap_paths(container, manifest)
        _swap_in(container, paths, staging_dir, previous_dir)
    except IncompleteRollbackError:
        raise  # never start Synapse on half-restored data
    except (BackupError, ops.pebble.Error) as exc:
        # The swap was undone, or failed before its first move (_swap_in
        # undoes any Pebble error during the moves): the previous data is live.
        start(after_swap=False)
        if isinstance(exc, BackupError):
            raise
        raise BackupError(f"restore failed: {exc}") from exc
    # Anything unexpected propagates without starting Synapse: the journal
    # rolls the swap back at the next hook, which starts it again.
    start(after_swap=True)
    return paths
