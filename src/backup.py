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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
# The aws CLI keeps one multipart chunk in memory per request in flight.
S3_MAX_CONCURRENT_REQUESTS = 10
S3_MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
# Name of the passphrase file inside the private work directory.
PASSPHRASE_FILE = "passphrase"  # noqa: S105 - a file name, not a secret
AWS_CONFIG_FILE = "aws-config"
GNUPG_DIR = "gnupg"
WORK_DIR_PREFIX = "/tmp/synapse-backup-"  # noqa: S108 - a private 0700 dir in the container
SNAPSHOT_DIR_PREFIX = ".synapse-backup-snapshot-"
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1
REQUIRED_TOOLS = (
    BASH_COMMAND,
    "tar",
    "gpg",
    "gpgconf",
    "python3",
    AWS_COMMAND,
    "du",
    "tee",
    "chmod",
    "touch",
    "rm",
    "mkdir",
)
SYNAPSE_USER_ID = 991
SYNAPSE_GROUP_ID = 991
# Backup ids are UTC timestamps: sortable, and safe in a shell word or S3 key.
BACKUP_ID_FORMAT = "%Y%m%dT%H%M%SZ"
BACKUP_ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
_KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
EXEC_TIMEOUT = 24 * 60 * 60.0

# Passes the encrypted stream from stdin to stdout and writes its SHA-256 and
# size to a file, so the archive is hashed while it is uploaded, not read twice.
_DIGEST_PROGRAM = """
import hashlib, sys
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

# Copies a live SQLite database consistently while Synapse writes to it.
_SNAPSHOT_PROGRAM = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], timeout=60)
try:
    connection.execute("VACUUM INTO ?", (sys.argv[2],))
finally:
    connection.close()
"""


class BackupError(Exception):
    """Generic backup Exception."""


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
        cls, endpoint: str | None, values: ValidationInfo
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
        if not endpoint and not values.data.get("region"):
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
                **{key: str(value) for key, value in self.metadata.items()},
            },
            indent=2,
            sort_keys=True,
        )


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

    def delete_objects(self, names: Iterable[str]) -> None:
        """Delete objects and abort unfinished multipart uploads of them.

        Args:
            names: the objects' names under the configured path.

        Raises:
            S3Error: if an object cannot be deleted.
        """
        bucket = self._parameters.bucket
        for name in names:
            key = self._parameters.object_key(name)
            try:
                uploads = self._client.list_multipart_uploads(Bucket=bucket, Prefix=key)
                for upload in uploads.get("Uploads", []):
                    if upload.get("Key") == key:
                        self._client.abort_multipart_upload(
                            Bucket=bucket, Key=key, UploadId=upload["UploadId"]
                        )
                self._client.delete_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                raise S3Error(f"cannot delete object {name}: {_client_error(exc)}") from exc


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
        or backup_key.endswith(MANIFEST_SUFFIX)
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
        BackupError: if it is missing or not a YAML mapping.
    """
    try:
        config = yaml.safe_load(container.pull(SYNAPSE_CONFIG_PATH).read())
    except (ops.pebble.PathError, ops.pebble.APIError) as exc:
        raise BackupError(f"cannot read {SYNAPSE_CONFIG_PATH}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise BackupError(f"{SYNAPSE_CONFIG_PATH} is not valid YAML") from exc
    if not isinstance(config, dict):
        raise BackupError(f"{SYNAPSE_CONFIG_PATH} is not a YAML mapping")
    return config


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
    database = read_synapse_config(container).get("database") or {}
    if database.get("name", "sqlite3") not in ("sqlite3", "sqlite"):
        return None
    path = (database.get("args") or {}).get("database")
    if not path or path == ":memory:":
        return None
    path = posixpath.normpath(posixpath.join(DATA_DIR, str(path)))
    return path if container.exists(path) else None


def get_media_dir(container: ops.Container) -> str:
    """Return Synapse's media store directory.

    Args:
        container: Synapse Container.

    Returns:
        The absolute ``media_store_path`` of homeserver.yaml, or MEDIA_DIR.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    path = read_synapse_config(container).get("media_store_path") or MEDIA_DIR
    return posixpath.normpath(posixpath.join(DATA_DIR, str(path)))


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
    config = read_synapse_config(container)
    paths: list[str] = []
    for pattern in BACKUP_FILE_PATTERNS:
        paths.extend(
            info.path
            for info in container.list_files(DATA_DIR, pattern=pattern)
            if info.type == ops.pebble.FileType.FILE
        )
    named = [config.get("signing_key_path"), config.get("log_config")]
    named.extend(config.get("app_service_config_files") or [])
    for name in named:
        if name:
            path = posixpath.normpath(posixpath.join(DATA_DIR, str(name)))
            if container.exists(path):
                paths.append(path)
    media_dir = get_media_dir(container)
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


def build_aws_config(s3_parameters: S3Parameters) -> str:
    """Return the aws CLI configuration file for the backup transfers.

    It holds no secret: credentials come from the environment.

    Args:
        s3_parameters: S3 parameters.

    Returns:
        The content of the aws configuration file.
    """
    lines = ["[default]"]
    if s3_parameters.region:
        lines.append(f"region = {s3_parameters.region}")
    lines += [
        "s3 =",
        f"  addressing_style = {s3_parameters.addressing_style}",
        f"  max_concurrent_requests = {S3_MAX_CONCURRENT_REQUESTS}",
        f"  multipart_chunksize = {S3_MULTIPART_CHUNKSIZE}",
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
        work_dir: the work directory to create (default: a new random one).

    Raises:
        BackupError: if there was an error preparing the configuration.
    """
    work_dir = work_dir or new_work_dir()
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
        container.push(
            posixpath.join(work_dir, AWS_CONFIG_FILE),
            build_aws_config(s3_parameters),
            permissions=0o600,
            user_id=SYNAPSE_USER_ID,
            group_id=SYNAPSE_GROUP_ID,
        )
        container.push(
            posixpath.join(work_dir, PASSPHRASE_FILE),
            passphrase,
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
) -> list[str]:
    """Build the command to execute the backup.

    The command is ``bash -c SCRIPT``; every word of the script is quoted with
    shlex.quote. It copies the SQLite database with ``VACUUM INTO`` (if any),
    streams ``tar | gpg | aws s3 cp`` and prints ``<sha256> <size> <members>``
    of the uploaded object on its last line of output.

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

    Returns:
        The backup command to execute.

    Raises:
        BackupError: if a path or the key is not acceptable.
    """
    validate_backup_key(backup_key)
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
    tar += [f"--add-file={member}" for member in members]
    lines = _script_preamble(work_dir)
    if database_path:
        database_member = _relative(database_path)
        snapshot_dir = posixpath.join(
            posixpath.dirname(database_path), SNAPSHOT_DIR_PREFIX + backup_key
        )
        snapshot_file = posixpath.join(snapshot_dir, database_member)
        lines += [
            "SNAPSHOT_DIR=" + shlex.quote(snapshot_dir),
            ["mkdir", "-p", "--", posixpath.dirname(snapshot_file)],
            ["python3", "-c", _SNAPSHOT_PROGRAM, database_path, snapshot_file],
            ["chmod", f"--reference={database_path}", "--", snapshot_file],
            ["touch", f"--reference={database_path}", "--", snapshot_file],
        ]
        tar += [f"--directory={snapshot_dir}", f"--add-file={database_member}"]
    aws = [
        AWS_COMMAND,
        "s3",
        "cp",
        "--only-show-errors",
        "--no-progress",
        "--expected-size",
        str(int(expected_size)),
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
        "--output",
        "-",
    )
    digest = ["python3", "-c", _DIGEST_PROGRAM, digest_file]
    lines += [
        " | ".join(
            [
                _script([tar]),
                _script([gpg]),
                _script([digest]),
                _script([aws]),
            ]
        ),
        "read -r sha256 size < " + shlex.quote(digest_file),
        "members=$(wc -l < " + shlex.quote(index_file) + ")",
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
) -> str:
    """Run a pipeline in the container as the Synapse user.

    Args:
        container: Synapse Container.
        command: the command.
        environment: the exec's environment (may hold credentials).
        secrets_to_hide: strings that must never appear in an error message.
        what: what the command does, for error messages.

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
            user_id=SYNAPSE_USER_ID,
            group_id=SYNAPSE_GROUP_ID,
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


def _tail(output: str | bytes | None, lines: int = 5) -> str:
    """Return the last lines of a command's output, on one line.

    Args:
        output: the output.
        lines: how many lines to keep.

    Returns:
        The lines joined with "; ".
    """
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    kept = [line.strip() for line in (output or "").splitlines() if line.strip()]
    return "; ".join(kept[-lines:]) or "no error output"


def run_backup(
    container: ops.Container,
    s3_parameters: S3Parameters,
    backup_key: str,
    passphrase: str,
    *,
    metadata: Mapping[str, str] | None = None,
    log: Callable[[str], None] = logger.info,
) -> BackupManifest:
    """Create and commit a backup; remove what a failure left.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters for the backup.
        backup_key: Name of the object in the backup.
        passphrase: Passphrase used to encrypt the backup.
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
    names = (backup_key, backup_key + MANIFEST_SUFFIX)
    try:
        client = S3Client(s3_parameters)
        client.check_bucket()
        if any(client.object_size(name) is not None for name in names):
            raise BackupError(f"a backup named {backup_key} exists already")
    except S3Error as exc:
        raise BackupError(str(exc)) from exc
    check_tools(container)
    paths = list(get_paths_to_backup(container))
    database_path = get_database_path(container)
    size = calculate_size(container, [*paths, *([database_path] if database_path else [])])
    log(f"backing up {len(paths) + bool(database_path)} paths, about {size} bytes")
    committed = False
    try:
        with prepared_container(container, s3_parameters, passphrase) as work_dir:
            command = build_backup_command(
                s3_parameters,
                backup_key,
                paths,
                posixpath.join(work_dir, PASSPHRASE_FILE),
                expected_size=_expected_size(size),
                database_path=database_path,
                work_dir=work_dir,
            )
            log("streaming tar | gpg | aws to " + s3_parameters.object_url(backup_key))
            stdout = run_in_container(
                container,
                command,
                get_environment(s3_parameters, work_dir=work_dir),
                secrets_to_hide=(s3_parameters.secret_key, passphrase),
                what="the backup pipeline",
            )
        sha256, archive_size, file_count = _parse_digest(stdout)
        uploaded = client.object_size(backup_key)
        if uploaded != archive_size:
            raise BackupError(
                f"the uploaded object has {uploaded} bytes, the pipeline wrote {archive_size}"
            )
        manifest = BackupManifest(
            backup_id=backup_key,
            created_at=created_at,
            paths=(*paths, *([database_path] if database_path else [])),
            file_count=file_count,
            size=archive_size,
            sha256=sha256,
            duration=round(time.monotonic() - started, 3),
            metadata=dict(metadata or {}),
        )
        log("writing the manifest")
        client.put_text(backup_key + MANIFEST_SUFFIX, manifest.to_json())
        committed = True
        return manifest
    except S3Error as exc:
        raise BackupError(str(exc)) from exc
    finally:
        if database_path:
            _remove_quietly(
                container,
                posixpath.join(posixpath.dirname(database_path), SNAPSHOT_DIR_PREFIX + backup_key),
            )
        if not committed:
            _discard(client, names)


def _discard(client: S3Client, names: Sequence[str]) -> None:
    """Remove what a failed backup left in S3, logging failures.

    Args:
        client: the S3 client.
        names: the objects to remove.
    """
    try:
        client.delete_objects(names)
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
