"""What a backup is in the S3 bucket, and the client that reads and writes it.

A backup with id ``ID`` (a UTC timestamp) is a set of objects under the
configured path: the encrypted archive ``ID`` (with ``ID.part-0001``... when
it is stored in pieces), the encrypted listed-incremental state
``ID.snar.gpg``, the database's fingerprint ``ID.db-state`` and the manifest
``ID.manifest.json``, written last: a backup exists once its manifest does.
The client never sees a passphrase; the archive is encrypted in the
workload container.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, InvalidRegionError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

logger = logging.getLogger(__name__)

ARCHIVE_PIECE_INFIX = ".part-"
MAX_ARCHIVE_PIECES = 10_000
MANIFEST_SUFFIX = ".manifest.json"
# GNU tar's listed-incremental state after each backup, encrypted, so that a
# new unit can continue a chain; the newest one is also kept in the container.
SNAPSHOT_STATE_SUFFIX = ".snar.gpg"
DATABASE_STATE_SUFFIX = ".db-state"
MANIFEST_VERSION = 1
# Backup ids are UTC timestamps: sortable, and safe in a shell word or S3 key.
BACKUP_ID_FORMAT = "%Y%m%dT%H%M%SZ"
BACKUP_ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
# The name of any object of a backup: its id, then nothing or a suffix.
_BACKUP_OBJECT_PATTERN = re.compile(r"([0-9]{8}T[0-9]{6}Z)(\..*)?", re.DOTALL)
_KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
EXEC_TIMEOUT = 24 * 60 * 60.0


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
        protects its parent: it is read leniently for its parent's id. So
        does an incomplete backup that another backup builds on: it was
        complete when that backup was made, and its parent is still needed
        to mend the chain.

        Args:
            strict: fail when a manifest cannot be read (see list_backups).

        Returns:
            The complete backups, newest first, and each backup's parent.

        Raises:
            S3Error: if the bucket cannot be listed (or, when strict, a manifest read).
        """
        backups = self.list_backups(strict=strict)
        links = {manifest.backup_id: manifest.parent for manifest in backups if manifest.parent}
        unusable, incomplete = self._unlisted_links({m.backup_id for m in backups}, strict)
        links.update(unusable)
        links.update(_links_built_through(incomplete, links))
        return BackupListing(backups, links)

    def _unlisted_links(
        self, complete: Collection[str], strict: bool
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Return the parent named by each manifest of a backup that is not complete.

        Args:
            complete: the ids of the complete backups, whose manifests parse.
            strict: fail when a manifest cannot be read.

        Returns:
            Each id and the parent its manifest names: first for the manifests
            this charm cannot use, then for those of incomplete backups.

        Raises:
            S3Error: if the bucket cannot be listed (or, when strict, a manifest read).
        """
        unusable: dict[str, str] = {}
        incomplete: dict[str, str] = {}
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
            parent, usable = _named_parent(text)
            if parent:
                (incomplete if usable else unusable)[backup_id] = parent
        return unusable, incomplete

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
                manifest this charm cannot use (corrupt, or a newer charm's),
                or with chain, a dependant whose manifest it cannot use.
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
        return self._delete_with_dependants(backup_id, chain=chain, force=force)

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

    def _delete_with_dependants(self, backup_id: str, *, chain: bool, force: bool) -> list[str]:
        """Delete a backup's objects, after the backups that depend on it if chain is set.

        Args:
            backup_id: the backup.
            chain: also delete the incremental backups that depend on it.
            force: also dependants whose manifests this charm cannot use.

        Returns:
            The ids deleted, dependants first.

        Raises:
            S3Error: if others depend on it and chain is false, or S3 fails.
        """
        listing = self.listing(strict=True)
        dependants = descendants(backup_id, listing.links)
        if dependants and not chain:
            raise S3Error(
                f"backup {backup_id} is needed by {', '.join(sorted(dependants))}; "
                "use chain=true to delete it with them",
                option="backup-id",
            )
        if not force:
            self._check_dependants_usable(dependants, listing)
        doomed = children_first([*dependants, backup_id], listing.links)
        for name in doomed:
            self.delete_backup_objects(name)
        return doomed

    def _check_dependants_usable(self, dependants: Iterable[str], listing: BackupListing) -> None:
        """Refuse to delete dependants whose manifests this charm cannot use.

        Args:
            dependants: the backups that chain=true would delete too.
            listing: the listing they were found in.

        Raises:
            S3Error: if one of them cannot be used, or S3 cannot tell.
        """
        complete = {manifest.backup_id for manifest in listing.backups}
        for name in sorted(set(dependants) - complete):
            self._check_usable_or_incomplete(name)

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
            force: even if the backup started less than EXEC_TIMEOUT ago, and
                dependants whose manifests this charm cannot use.
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
        listing = self.listing(strict=True)
        dependants = descendants(backup_id, listing.links)
        if dependants and not chain:
            raise S3Error(
                f"backup {backup_id} has no manifest, but {', '.join(sorted(dependants))} "
                "name it as their parent: its objects are what a repair would need; "
                "use chain=true to delete it with them",
                option="backup-id",
            )
        if not force:
            self._check_dependants_usable(dependants, listing)
        doomed = children_first(dependants, listing.links)
        for name in doomed:
            self.delete_backup_objects(name)
        self.delete_objects(leftovers)
        return [*doomed, backup_id]

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


def _named_parent(text: bytes) -> tuple[str, bool]:
    """Return the parent a manifest names, read leniently, and whether this charm can use it.

    Args:
        text: the manifest.

    Returns:
        The parent's id ("" for none, or none that can be read), and whether
        the manifest parses as this charm's.
    """
    try:
        return BackupManifest.from_json(text).parent, True
    except BackupError:
        pass
    try:
        parent = json.loads(text).get("parent")
    except (ValueError, AttributeError):
        return "", False
    if isinstance(parent, str) and BACKUP_ID_PATTERN.fullmatch(parent):
        return parent, False
    return "", False


def _links_built_through(
    incomplete: Mapping[str, str], links: Mapping[str, str]
) -> dict[str, str]:
    """Return the links of the incomplete backups that other backups build on.

    An incomplete backup protects nothing by itself: it cannot be restored,
    and delete-backup removes it. But a backup made on it while it was
    complete still needs, through it, the backups it built on.

    Args:
        incomplete: each incomplete backup's parent.
        links: each other backup's parent.

    Returns:
        The incomplete backups' links that some other backup's chain goes through.
    """
    kept: dict[str, str] = {}
    parents = set(links.values())
    todo = [backup_id for backup_id in incomplete if backup_id in parents]
    while todo:
        backup_id = todo.pop()
        if backup_id not in kept:
            kept[backup_id] = incomplete[backup_id]
            if kept[backup_id] in incomplete:
                todo.append(kept[backup_id])
    return kept


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
    found.discard(backup_id)  # a hand-made manifest may name itself as its parent
    return found


def children_first(backup_ids: Iterable[str], links: Mapping[str, str]) -> list[str]:
    """Order backups for deletion: each before the backups it builds on, newest first otherwise.

    Ids are times from the clock of the unit that made each backup: one whose
    clock was ahead makes a parent newer than its child. Deleting children
    first still leaves every backup that remains with its parent, wherever
    the deletion stops.

    Args:
        backup_ids: the backups.
        links: each backup's parent (see S3Client.listing).

    Returns:
        The ids, dependants before what they depend on.
    """
    wanted = set(backup_ids)
    children: dict[str, list[str]] = {}
    for child, parent in links.items():
        if child in wanted and parent in wanted:
            children.setdefault(parent, []).append(child)
    order: list[str] = []
    seen: set[str] = set()
    for start in sorted(wanted, reverse=True):
        todo = [(start, False)]
        while todo:
            current, expanded = todo.pop()
            if expanded:
                order.append(current)
            elif current not in seen:
                seen.add(current)
                todo.append((current, True))
                todo.extend((child, False) for child in sorted(children.get(current, [])))
    return order


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
