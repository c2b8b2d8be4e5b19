"""S3Client's backup lifecycle: list, read, get_manifest, exists and delete.

Two stand-ins for S3, without a network: botocore's Stubber, which checks the
exact calls and their parameters, and FakeS3, a small in-memory bucket with
pagination that records the calls it gets (list_backups reads manifests in a
thread pool, in no fixed order). The real client is exercised against SeaweedFS
in tests/workload.
"""

from __future__ import annotations

import datetime
import io
import json
import threading
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.response import StreamingBody
from botocore.stub import Stubber

import backup
import backup_store
import retention

SECRET_KEY = "s3-lifecycle-secret-key-6b0f"
BUCKET = "synapse-backups"
PREFIX = "prod"
SHA256 = "ab" * 32


def _params(**changes: str) -> backup.S3Parameters:
    return backup.S3Parameters.model_validate(
        {
            "access-key": "AKIALIFECYCLETEST",
            "secret-key": SECRET_KEY,
            "bucket": BUCKET,
            "endpoint": "https://s3.example.com",
            "path": PREFIX,
            **changes,
        }
    )


def _manifest(backup_id: str, size: int = 100, **changes: Any) -> backup.BackupManifest:
    values: dict[str, Any] = {
        "backup_id": backup_id,
        "created_at": "2025-01-01T00:00:00+00:00",
        "paths": ("/data/homeserver.yaml",),
        "file_count": 2,
        "size": size,
        "sha256": SHA256,
        "duration": 0.5,
        "metadata": {"server-name": "example.com"},
    }
    values.update(changes)
    return backup.BackupManifest(**values)


OTHER_ID_MANIFEST = _manifest("20250202T000000Z").to_json().encode()


def _client_error(code: str, operation: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


class FakeS3:
    """An in-memory bucket answering the boto3 calls S3Client makes.

    Attributes:
        objects: the bucket's objects by key.
        page_size: the most keys one list_objects_v2 page holds.
        calls: (operation, key or prefix) in call order.
        broken: keys whose get_object fails.
        undeletable: keys whose delete_object is denied.
        uploads_denied: listing unfinished uploads is denied (a minimal policy).
    """

    def __init__(self, objects: dict[str, bytes], page_size: int = 2):
        """Create the bucket."""
        self.objects = dict(objects)
        self.page_size = page_size
        self.calls: list[tuple[str, str]] = []
        self.broken: set[str] = set()
        self.undeletable: set[str] = set()
        self.uploads_denied = False
        self._lock = threading.Lock()

    def _record(self, operation: str, key: str) -> None:
        with self._lock:
            self.calls.append((operation, key))

    def get_paginator(self, operation: str) -> Any:
        """Return the list_objects_v2 paginator (this object) or list_multipart_uploads'."""
        if operation == "list_multipart_uploads":
            return _NoUploads(self)
        assert operation == "list_objects_v2"
        return self

    def paginate(self, *, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:  # noqa: N803
        """Yield pages of at most page_size keys, in key order, as S3 does."""
        assert Bucket == BUCKET
        keys = sorted(key for key in self.objects if key.startswith(Prefix))
        for start in range(0, max(len(keys), 1), self.page_size):
            self._record("list_objects_v2", Prefix)
            page = keys[start : start + self.page_size]
            contents = [{"Key": key, "Size": len(self.objects[key])} for key in page]
            yield {"Contents": contents} if contents else {}

    def get_object(self, *, Bucket: str, Key: str, **extra: Any) -> dict[str, Any]:  # noqa: N803
        """Return an object's body; a missing or broken key raises a ClientError."""
        self._record("get_object", Key)
        if Key not in self.objects or Key in self.broken:
            raise _client_error("NoSuchKey", "GetObject", 404)
        return {"Body": io.BytesIO(self.objects[Key])}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        """Return an object's size; a missing key raises a 404 ClientError."""
        self._record("head_object", Key)
        if Key not in self.objects:
            raise _client_error("404", "HeadObject", 404)
        return {"ContentLength": len(self.objects[Key])}

    def list_multipart_uploads(self, *, Bucket: str, Prefix: str) -> dict[str, Any]:  # noqa: N803
        """Return no unfinished uploads, or deny the listing."""
        self._record("list_multipart_uploads", Prefix)
        if self.uploads_denied:
            raise _client_error("AccessDenied", "ListMultipartUploads", 403)
        return {}

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        """Delete an object (S3 does not mind a missing one); undeletable ones are denied."""
        self._record("delete_object", Key)
        if Key in self.undeletable:
            raise _client_error("AccessDenied", "DeleteObject", 403)
        self.objects.pop(Key, None)
        return {}


class _NoUploads:
    """FakeS3's list_multipart_uploads paginator: the bucket has no unfinished uploads."""

    def __init__(self, fake: FakeS3):
        self._fake = fake

    def paginate(self, *, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:  # noqa: N803
        """Yield one empty page, or deny the listing."""
        assert Bucket == BUCKET
        self._fake._record("list_multipart_uploads", Prefix)
        if self._fake.uploads_denied:
            raise _client_error("AccessDenied", "ListMultipartUploads", 403)
        yield {}


def _backup_objects(manifest: backup.BackupManifest, archive_size: int | None = None) -> dict:
    key = f"{PREFIX}/{manifest.backup_id}"
    return {
        key: b"x" * (manifest.size if archive_size is None else archive_size),
        key + backup_store.MANIFEST_SUFFIX: manifest.to_json().encode(),
    }


def _fake_client(
    objects: dict[str, bytes], page_size: int = 2, **changes: str
) -> tuple[backup.S3Client, FakeS3]:
    """Return an S3Client whose boto3 client is a FakeS3 (no boto3 session is made)."""
    client = backup.S3Client.__new__(backup.S3Client)
    client._parameters = _params(**changes)
    fake = FakeS3(objects, page_size=page_size)
    client._client = fake
    return client, fake


@pytest.fixture
def client() -> backup.S3Client:
    """An S3Client for the test parameters."""
    return backup.S3Client(_params())


@pytest.fixture
def stubber(client: backup.S3Client) -> Iterator[Stubber]:
    """A Stubber on the client's boto3 client; every queued response must be used."""
    with Stubber(client._client) as stub:
        yield stub
        stub.assert_no_pending_responses()


def _body(data: bytes) -> StreamingBody:
    return StreamingBody(io.BytesIO(data), len(data))


# --- listing --------------------------------------------------------------------------------


def test_list_names_follows_pagination(client: backup.S3Client, stubber: Stubber):
    """Every page is read (real botocore paginator); only objects directly under the path."""
    pages = [
        (
            [("prod/20250101T000000Z", 10), ("prod/20250101T000000Z.manifest.json", 3)],
            "token-1",
        ),
        ([("prod/", 0), ("prod/sub/20250102T000000Z", 4)], "token-2"),
        ([("prod/20250103T000000Z", 30)], None),
    ]
    for index, (items, next_token) in enumerate(pages):
        response: dict[str, Any] = {
            "Contents": [{"Key": key, "Size": size} for key, size in items],
            "IsTruncated": next_token is not None,
        }
        if next_token:
            response["NextContinuationToken"] = next_token
        expected = {"Bucket": BUCKET, "Prefix": "prod/"}
        if index:
            expected["ContinuationToken"] = pages[index - 1][1]
        stubber.add_response("list_objects_v2", response, expected)

    names = client._list_names()

    assert names == {
        "20250101T000000Z": 10,
        "20250101T000000Z.manifest.json": 3,
        "20250103T000000Z": 30,
    }


def test_list_names_error(client: backup.S3Client, stubber: Stubber):
    """A bucket that cannot be listed raises S3Error."""
    stubber.add_client_error("list_objects_v2", "AccessDenied", "no", http_status_code=403)

    with pytest.raises(backup.S3Error, match="cannot list the backups: AccessDenied: no"):
        client.list_backups()


def test_list_backups_over_pages_newest_first():
    """Complete backups from every page, newest first; incomplete ones are left out.

    Arrange: a bucket listed two keys per page holding three complete backups and
        every kind of incomplete one.
    Act: list_backups.
    Assert: only the complete backups, newest first; every page was listed.
    """
    complete = [_manifest(f"2025010{day}T000000Z", size=10 * day) for day in (3, 1, 5)]
    objects: dict[str, bytes] = {}
    for manifest in complete:
        objects.update(_backup_objects(manifest))
    # An upload that failed before its manifest: no manifest.
    objects["prod/20250106T000000Z"] = b"partial"
    # A manifest whose archive is gone.
    objects.update(
        {
            key: value
            for key, value in _backup_objects(_manifest("20250107T000000Z")).items()
            if key.endswith(backup_store.MANIFEST_SUFFIX)
        }
    )
    # A manifest that does not match the size of its archive.
    objects.update(_backup_objects(_manifest("20250108T000000Z", size=50), archive_size=49))
    # A manifest that names another backup.
    other = _backup_objects(_manifest("20250101T000000Z", size=5))
    objects["prod/20250109T000000Z"] = other["prod/20250101T000000Z"]
    objects["prod/20250109T000000Z.manifest.json"] = other["prod/20250101T000000Z.manifest.json"]
    # A manifest that is not valid JSON.
    objects["prod/20250110T000000Z"] = b"x"
    objects["prod/20250110T000000Z.manifest.json"] = b"{not json"
    # A manifest that cannot be read.
    objects.update(_backup_objects(_manifest("20250111T000000Z")))
    # Objects whose names are not backup ids, and one in a sub-directory.
    objects.update(_backup_objects(_manifest("notes")))
    nested = _backup_objects(_manifest("20250112T000000Z"))
    objects.update({key.replace("prod/", "prod/old/"): value for key, value in nested.items()})
    # A neighbouring prefix.
    neighbour = _backup_objects(_manifest("20250113T000000Z"))
    objects.update({key.replace("prod/", "prod2/"): value for key, value in neighbour.items()})
    client, fake = _fake_client(objects, page_size=2)
    fake.broken.add("prod/20250111T000000Z.manifest.json")

    manifests = client.list_backups()

    assert manifests == sorted(complete, key=lambda m: m.backup_id, reverse=True)
    assert [m.backup_id for m in manifests] == [
        "20250105T000000Z",
        "20250103T000000Z",
        "20250101T000000Z",
    ]
    listed = [key for operation, key in fake.calls if operation == "list_objects_v2"]
    in_prefix = [key for key in objects if key.startswith("prod/")]
    assert listed == ["prod/"] * -(-len(in_prefix) // 2)
    assert len(listed) > 5
    read = {key for operation, key in fake.calls if operation == "get_object"}
    assert "prod/notes.manifest.json" not in read
    assert "prod/20250107T000000Z.manifest.json" not in read


@pytest.mark.parametrize("path", ["", "a/b"])
def test_list_backups_path(path: str):
    """Backups are found at the top of the bucket or under a nested path."""
    prefix = f"{path}/" if path else ""
    manifest = _manifest("20250101T000000Z")
    objects = {
        prefix + key.removeprefix(f"{PREFIX}/"): value
        for key, value in _backup_objects(manifest).items()
    }
    client, fake = _fake_client(objects, path=path)

    assert client.list_backups() == [manifest]
    assert fake.calls[0] == ("list_objects_v2", prefix)


def test_list_backups_strict_fails_on_a_manifest_it_cannot_read():
    """A manifest S3 fails to return is skipped by default, and an error when strict.

    A caller that decides what to delete or build on must not take a transient
    read failure for a missing backup.
    """
    objects: dict[str, bytes] = {}
    for day in (1, 2):
        objects.update(_backup_objects(_manifest(f"2025010{day}T000000Z")))
    client, fake = _fake_client(objects)
    fake.broken.add("prod/20250102T000000Z.manifest.json")

    assert [m.backup_id for m in client.list_backups()] == ["20250101T000000Z"]
    with pytest.raises(backup.S3Error) as exc_info:
        client.list_backups(strict=True)

    assert str(exc_info.value) == (
        "cannot read object 20250102T000000Z.manifest.json: NoSuchKey: NoSuchKey"
    )


def test_list_backups_strict_still_skips_what_is_not_a_backup():
    """Strict fails on reads only: an invalid or mismatched manifest is still left out."""
    objects = _backup_objects(_manifest("20250101T000000Z"))
    objects["prod/20250102T000000Z"] = b"x"
    objects["prod/20250102T000000Z.manifest.json"] = b"{not json"
    objects.update(_backup_objects(_manifest("20250103T000000Z", size=50), archive_size=49))
    client, _ = _fake_client(objects)

    assert [m.backup_id for m in client.list_backups(strict=True)] == ["20250101T000000Z"]


def _pieced_objects(manifest: backup.BackupManifest) -> dict[str, bytes]:
    """The objects of a backup stored in pieces: each of its size, and the manifest."""
    objects = {f"{PREFIX}/{name}": b"x" * size for name, size in manifest.pieces().items()}
    objects[f"{PREFIX}/{manifest.backup_id}{backup_store.MANIFEST_SUFFIX}"] = (
        manifest.to_json().encode()
    )
    return objects


@pytest.mark.parametrize(
    ("damage", "complete"),
    [
        pytest.param({}, True, id="all-pieces"),
        pytest.param({"20250101T000000Z.part-0001": None}, False, id="middle-missing"),
        pytest.param({"20250101T000000Z.part-0002": b"x" * 9}, False, id="last-short"),
        pytest.param({"20250101T000000Z.part-0002": b"x" * 11}, False, id="last-long"),
        pytest.param({"20250101T000000Z": b"x" * 9}, False, id="first-short"),
    ],
)
def test_a_backup_in_pieces_is_complete_only_with_every_piece(
    damage: dict[str, bytes | None], complete: bool
):
    """list_backups and get_manifest check each piece's size against the manifest."""
    manifest = _manifest("20250101T000000Z", size=30, piece_size=10)
    objects = _pieced_objects(manifest)
    for name, body in damage.items():
        if body is None:
            del objects[f"{PREFIX}/{name}"]
        else:
            objects[f"{PREFIX}/{name}"] = body
    client, _ = _fake_client(objects)

    assert client.list_backups() == ([manifest] if complete else [])
    if complete:
        assert client.get_manifest(manifest.backup_id) == manifest
    else:
        with pytest.raises(backup.S3Error, match="is incomplete"):
            client.get_manifest(manifest.backup_id)


def test_list_backups_empty_bucket():
    """An empty bucket has no backups."""
    client, _ = _fake_client({})

    assert client.list_backups() == []


# --- reading --------------------------------------------------------------------------------


def test_read_object(client: backup.S3Client, stubber: Stubber):
    """read_object reads a whole object, or its first bytes with a Range header."""
    stubber.add_response(
        "get_object", {"Body": _body(b"whole")}, {"Bucket": BUCKET, "Key": "prod/a"}
    )
    stubber.add_response(
        "get_object",
        {"Body": _body(b"head")},
        {"Bucket": BUCKET, "Key": "prod/b", "Range": "bytes=0-65535"},
    )

    assert client.read_object("a") == b"whole"
    assert client.read_object("b", first_bytes=65536) == b"head"


def test_read_object_error(client: backup.S3Client, stubber: Stubber):
    """An object that cannot be read raises S3Error naming it."""
    stubber.add_client_error("get_object", "NoSuchKey", "gone", http_status_code=404)

    with pytest.raises(backup.S3Error, match="cannot read object a: NoSuchKey: gone"):
        client.read_object("a")


def test_read_object_unreachable(client: backup.S3Client):
    """A connection error while reading raises S3Error, not a botocore exception."""
    error = EndpointConnectionError(endpoint_url="https://s3.example.com")
    with (
        mock.patch.object(client._client, "get_object", side_effect=error),
        pytest.raises(backup.S3Error, match="cannot read object a"),
    ):
        client.read_object("a")


def test_get_manifest():
    """get_manifest returns the manifest of a complete backup."""
    manifest = _manifest("20250101T000000Z")
    client, fake = _fake_client(_backup_objects(manifest))

    assert client.get_manifest("20250101T000000Z") == manifest
    assert fake.calls == [
        ("head_object", "prod/20250101T000000Z"),
        ("head_object", "prod/20250101T000000Z.manifest.json"),
        ("get_object", "prod/20250101T000000Z.manifest.json"),
    ]


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        pytest.param({}, "there is no backup 20250101T000000Z", id="nothing"),
        pytest.param(
            {"prod/20250101T000000Z": b"x" * 100},
            "there is no backup 20250101T000000Z",
            id="no-manifest",
        ),
        pytest.param(
            {
                k: v
                for k, v in _backup_objects(_manifest("20250101T000000Z")).items()
                if k.endswith(".json")
            },
            "there is no backup 20250101T000000Z",
            id="no-archive",
        ),
        pytest.param(
            _backup_objects(_manifest("20250101T000000Z", size=100), archive_size=99),
            "backup 20250101T000000Z is incomplete",
            id="size-mismatch",
        ),
        pytest.param(
            {
                "prod/20250101T000000Z": b"x" * 100,
                "prod/20250101T000000Z.manifest.json": OTHER_ID_MANIFEST,
            },
            "backup 20250101T000000Z is incomplete",
            id="other-id",
        ),
    ],
)
def test_get_manifest_incomplete(objects: dict[str, bytes], message: str):
    """A missing or incomplete backup raises S3Error with option backup-id."""
    client, _ = _fake_client(objects)

    with pytest.raises(backup.S3Error, match=message) as exc_info:
        client.get_manifest("20250101T000000Z")

    assert exc_info.value.option == "backup-id"


def test_get_manifest_invalid_manifest():
    """A manifest that is not valid raises BackupError."""
    client, _ = _fake_client(
        {"prod/20250101T000000Z": b"x", "prod/20250101T000000Z.manifest.json": b"{}"}
    )

    with pytest.raises(backup.BackupError, match="invalid backup manifest"):
        client.get_manifest("20250101T000000Z")


@pytest.mark.parametrize("backup_id", ["../x", "a/b", "x.manifest.json", ""])
def test_get_manifest_rejects_keys(backup_id: str):
    """An unsafe id is refused before any S3 call."""
    client, fake = _fake_client({})

    with pytest.raises(backup.BackupError, match="invalid backup id"):
        client.get_manifest(backup_id)

    assert fake.calls == []


def test_exists_backup():
    """exists_backup: True for a complete backup, False for missing or incomplete ones."""
    objects = _backup_objects(_manifest("20250101T000000Z"))
    objects.update(_backup_objects(_manifest("20250102T000000Z", size=10), archive_size=9))
    objects["prod/20250103T000000Z"] = b"x"
    objects["prod/20250103T000000Z.manifest.json"] = b"not json"
    client, _ = _fake_client(objects)

    assert client.exists_backup("20250101T000000Z") is True
    assert client.exists_backup("20250102T000000Z") is False
    assert client.exists_backup("20250103T000000Z") is False
    assert client.exists_backup("20250104T000000Z") is False
    assert client.exists_backup("../etc") is False


def test_exists_backup_raises_other_errors(client: backup.S3Client, stubber: Stubber):
    """An S3 error other than a missing backup is raised, not taken for "no backup"."""
    stubber.add_client_error("head_object", "AccessDenied", "no", http_status_code=403)

    with pytest.raises(backup.S3Error, match="AccessDenied") as exc_info:
        client.exists_backup("20250101T000000Z")

    assert exc_info.value.option is None


# --- deleting -------------------------------------------------------------------------------


def _leftover_objects() -> dict[str, bytes]:
    """A complete backup, and what failed backups left under other ids."""
    objects = _backup_objects(_manifest("20250103T000000Z"))
    objects.update(
        {
            f"{PREFIX}/20250101T000000Z": b"archive without a manifest",
            f"{PREFIX}/20250101T000000Z.part-0001": b"its second piece",
            f"{PREFIX}/20250101T000000Z.tmp": b"something else under its id",
            f"{PREFIX}/20250101T000000Zx": b"not of that id",
            f"{PREFIX}/20250102T000000Z.snar.gpg": b"a snapshot state alone",
            f"{PREFIX}/20250104T000000Z.manifest.json": b"{not json",
            f"{PREFIX}/notes.txt": b"not a backup",
            f"{PREFIX}/nested/20250105T000000Z": b"another path",
            "other/20250106T000000Z": b"outside the path",
        }
    )
    return objects


def test_incomplete_backups_are_the_ids_with_objects_but_no_backup():
    """Every id with an object under the path but no complete backup, newest first."""
    client, _ = _fake_client(_leftover_objects())

    complete = [manifest.backup_id for manifest in client.list_backups()]

    assert complete == ["20250103T000000Z"]
    assert client.incomplete_backups(complete) == [
        "20250104T000000Z",
        "20250102T000000Z",
        "20250101T000000Z",
    ]


def test_delete_backup_removes_what_a_failed_backup_left():
    """An id without a manifest has every object under its id removed; nothing else is."""
    objects = _leftover_objects()
    client, fake = _fake_client(objects)

    assert client.delete_backup("20250101T000000Z") == ["20250101T000000Z"]

    removed = {key for key in objects if key.startswith(f"{PREFIX}/20250101T000000Z")}
    removed.discard(f"{PREFIX}/20250101T000000Zx")
    assert removed == {
        f"{PREFIX}/20250101T000000Z",
        f"{PREFIX}/20250101T000000Z.part-0001",
        f"{PREFIX}/20250101T000000Z.tmp",
    }
    assert set(fake.objects) == set(objects) - removed
    assert client.incomplete_backups(["20250103T000000Z"]) == [
        "20250104T000000Z",
        "20250102T000000Z",
    ]


def test_incomplete_backups_asks_again_before_calling_a_backup_incomplete():
    """A complete backup the listing missed is not called incomplete, nor is an unreadable one.

    list-backups tolerates a manifest it cannot read, and would then leave a
    complete backup out of the ids it gives as complete: before an id is
    named incomplete (and offered for deletion), its manifest is read again.
    """
    client, fake = _fake_client(_leftover_objects())

    assert "20250103T000000Z" not in client.incomplete_backups([])
    fake.broken.add(f"{PREFIX}/20250103T000000Z{backup_store.MANIFEST_SUFFIX}")
    assert "20250103T000000Z" not in client.incomplete_backups([])
    fake.broken.clear()
    fake.objects[f"{PREFIX}/20250103T000000Z"] = b"short"
    assert "20250103T000000Z" in client.incomplete_backups([])


def _newer_charm_manifest(backup_id: str, parent: str = "") -> bytes:
    document = json.loads(_manifest(backup_id).to_json())
    document["parent"] = parent
    document["version"] = backup_store.MANIFEST_VERSION + 1
    document["type"] = "differential"  # something this charm does not know
    return json.dumps(document).encode()


def test_a_manifest_from_a_newer_charm_is_refused_not_misread():
    """A newer manifest format is not read as this one: its meaning may have changed."""
    document = json.loads(_manifest("20250101T000000Z").to_json())
    document["version"] = backup_store.MANIFEST_VERSION + 1

    with pytest.raises(backup.BackupError, match=r"written by a newer charm .* upgrade the charm"):
        backup.BackupManifest.from_json(json.dumps(document))


def test_unreadable_manifests_are_named_apart_never_incomplete():
    """A manifest that cannot be read or used may be a good backup's: never "incomplete".

    list-backups names such ids apart, with the reason, so that a backup never
    silently disappears from the listing (a newer charm's, or S3 refusing one
    read), and delete-backup does not offer to remove them as leftovers.
    """
    objects = _backup_objects(_manifest("20250101T000000Z"))
    objects.update(_backup_objects(_manifest("20250102T000000Z")))
    objects[f"{PREFIX}/20250102T000000Z{backup_store.MANIFEST_SUFFIX}"] = _newer_charm_manifest(
        "20250102T000000Z"
    )
    objects.update(_backup_objects(_manifest("20250103T000000Z")))
    objects[f"{PREFIX}/20250104T000000Z"] = b"archive without a manifest"
    client, fake = _fake_client(objects)
    fake.broken.add(f"{PREFIX}/20250103T000000Z{backup_store.MANIFEST_SUFFIX}")

    complete = [manifest.backup_id for manifest in client.list_backups()]
    unlisted = client.unlisted_backups(complete)

    assert complete == ["20250101T000000Z"]
    assert unlisted.incomplete == ["20250104T000000Z"]
    assert list(unlisted.unreadable) == ["20250103T000000Z", "20250102T000000Z"]
    assert (
        "cannot read object 20250103T000000Z.manifest.json"
        in (unlisted.unreadable["20250103T000000Z"])
    )
    assert "written by a newer charm" in unlisted.unreadable["20250102T000000Z"]
    assert client.incomplete_backups(complete) == ["20250104T000000Z"]


def test_delete_backup_keeps_a_manifest_it_cannot_use_unless_forced():
    """A newer charm's backup is not deleted as if it were broken; force deletes it."""
    objects = _backup_objects(_manifest("20250102T000000Z"))
    objects[f"{PREFIX}/20250102T000000Z{backup_store.MANIFEST_SUFFIX}"] = _newer_charm_manifest(
        "20250102T000000Z"
    )
    client, fake = _fake_client(objects)

    with pytest.raises(
        backup.S3Error, match=r"cannot be used by this charm .* force=true"
    ) as info:
        client.delete_backup("20250102T000000Z")
    assert info.value.option == "backup-id"
    assert fake.objects == objects

    assert client.delete_backup("20250102T000000Z", force=True) == ["20250102T000000Z"]
    assert fake.objects == {}


def test_a_manifest_this_charm_cannot_use_still_protects_its_parent():
    """A newer charm's incremental depends on its parent all the same.

    Its manifest is left out of list_backups, but delete-backup and retention
    (through listing's links) must not take its parent from under it.
    """
    objects = _backup_objects(_manifest("20250101T000000Z"))
    newer = _manifest("20250102T000000Z", backup_type="incremental", parent="20250101T000000Z")
    objects.update(_backup_objects(newer))
    objects[f"{PREFIX}/20250102T000000Z{backup_store.MANIFEST_SUFFIX}"] = _newer_charm_manifest(
        "20250102T000000Z", parent="20250101T000000Z"
    )
    objects[f"{PREFIX}/20250103T000000Z"] = b"x" * 100  # an incomplete backup on it
    objects[f"{PREFIX}/20250103T000000Z{backup_store.MANIFEST_SUFFIX}"] = (
        _manifest("20250103T000000Z", size=7, backup_type="incremental", parent="20250101T000000Z")
        .to_json()
        .encode()
    )
    objects[f"{PREFIX}/20250104T000000Z"] = b"x"
    objects[f"{PREFIX}/20250104T000000Z{backup_store.MANIFEST_SUFFIX}"] = b"{not json"
    client, fake = _fake_client(objects)

    listing = client.listing(strict=True)

    assert [m.backup_id for m in listing.backups] == ["20250101T000000Z"]
    assert listing.links == {"20250102T000000Z": "20250101T000000Z"}
    with pytest.raises(backup.S3Error, match="is needed by 20250102T000000Z"):
        client.delete_backup("20250101T000000Z")
    assert fake.objects == objects


def test_listing_of_unusable_manifests_strict_or_not():
    """A manifest read that fails: strict listings fail, others leave its link out.

    Its archive is gone, so list_backups does not read it: the lenient read does.
    """
    objects = _backup_objects(_manifest("20250101T000000Z"))
    objects[f"{PREFIX}/20250102T000000Z{backup_store.MANIFEST_SUFFIX}"] = _newer_charm_manifest(
        "20250102T000000Z", parent="20250101T000000Z"
    )
    client, fake = _fake_client(objects)
    fake.broken.add(f"{PREFIX}/20250102T000000Z{backup_store.MANIFEST_SUFFIX}")

    assert client.listing().links == {}
    with pytest.raises(
        backup.S3Error, match=r"cannot read object 20250102T000000Z\.manifest\.json"
    ):
        client.listing(strict=True)


def test_delete_backup_stops_when_s3_cannot_say_whether_the_manifest_is_usable():
    """A manifest read that fails is no reason to delete, nor to call it incomplete."""
    objects = _backup_objects(_manifest("20250102T000000Z"))
    client, fake = _fake_client(objects)
    fake.broken.add(f"{PREFIX}/20250102T000000Z{backup_store.MANIFEST_SUFFIX}")

    with pytest.raises(backup.S3Error, match=r"cannot read object 20250102T000000Z\.manifest"):
        client.delete_backup("20250102T000000Z")
    assert fake.objects == objects


def test_delete_backup_of_leftovers_when_the_bucket_cannot_be_listed(
    client: backup.S3Client, stubber: Stubber
):
    """An id without a manifest whose objects cannot be listed: an S3 error, nothing deleted."""
    stubber.add_client_error("head_object", "404", http_status_code=404)
    stubber.add_client_error("list_objects_v2", "AccessDenied", "denied", http_status_code=403)

    with pytest.raises(backup.S3Error, match="cannot list the backups: AccessDenied"):
        client.delete_backup("20250101T000000Z", force=True)


def test_delete_backup_of_an_incomplete_backup_with_a_manifest_needs_no_force():
    """A manifest whose objects do not match is an incomplete backup: delete-backup removes it."""
    objects = _backup_objects(_manifest("20250102T000000Z"), archive_size=7)
    client, fake = _fake_client(objects)

    assert client.delete_backup("20250102T000000Z") == ["20250102T000000Z"]
    assert fake.objects == {}


def test_delete_backup_of_leftovers_keeps_what_complete_backups_depend_on():
    """An archive whose manifest went missing is kept while backups name it as parent.

    Those backups are broken already, but its objects are what a repair by
    hand would need; chain=true deletes it with them.
    """
    objects = _backup_objects(_manifest("20250101T000000Z"))
    del objects[f"{PREFIX}/20250101T000000Z{backup_store.MANIFEST_SUFFIX}"]
    child = _manifest("20250102T000000Z", backup_type="incremental", parent="20250101T000000Z")
    objects.update(_backup_objects(child))
    objects.update(_backup_objects(_manifest("20250103T000000Z")))
    client, fake = _fake_client(objects)

    with pytest.raises(backup.S3Error, match="20250102T000000Z name it as their parent"):
        client.delete_backup("20250101T000000Z", force=True)
    assert fake.objects == objects

    deleted = client.delete_backup("20250101T000000Z", force=True, chain=True)

    assert deleted == ["20250102T000000Z", "20250101T000000Z"]
    assert set(fake.objects) == set(_backup_objects(_manifest("20250103T000000Z")))


def test_delete_backup_refuses_a_recent_incomplete_backup_without_force():
    """An id without a manifest that started less than 24 hours ago may be running."""
    client, fake = _fake_client(_leftover_objects())
    started = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    before = dict(fake.objects)

    for age in (datetime.timedelta(hours=23, minutes=59), -datetime.timedelta(minutes=5)):
        with pytest.raises(backup.S3Error, match="may still be running on another unit"):
            client.delete_backup("20250101T000000Z", now=started + age)
    assert fake.objects == before

    assert client.delete_backup("20250101T000000Z", now=started, force=True) == [
        "20250101T000000Z"
    ]
    assert not [key for key in fake.objects if key.startswith(f"{PREFIX}/20250101T000000Z.")]


@pytest.mark.parametrize(
    ("backup_id", "running"),
    [
        pytest.param("20250101T000000Z", True, id="just-started"),
        pytest.param("20241231T000001Z", True, id="23h59m59s-ago"),
        pytest.param("20241231T000000Z", False, id="24h-ago"),
        pytest.param("20250101T010000Z", True, id="in-the-future"),
        pytest.param("20251399T999999Z", True, id="not-a-date"),
    ],
)
def test_may_be_running(backup_id: str, running: bool):
    """A backup may run up to EXEC_TIMEOUT; an id that is not a date cannot be ruled out."""
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)

    assert backup_store.may_be_running(backup_id, now) is running


def test_delete_backup_of_leftovers_stops_at_a_manifest_written_meanwhile():
    """A manifest that appears after the check (a commit) stops the deletion of leftovers."""
    objects = _backup_objects(_manifest("20250101T000000Z"))
    client, fake = _fake_client(objects)

    with (
        mock.patch.object(client, "object_size", return_value=None),
        pytest.raises(backup.S3Error, match="was committed while it was being deleted"),
    ):
        client.delete_backup("20250101T000000Z")

    assert fake.objects == objects


@pytest.mark.parametrize("backup_id", ["2025", "20250101T00", "latest"])
def test_delete_backup_of_a_part_of_an_id_deletes_nothing(backup_id: str):
    """A key that only starts other ids never takes their objects with it."""
    objects = _leftover_objects()
    client, fake = _fake_client(objects)

    with pytest.raises(backup.S3Error, match=f"there is no backup {backup_id}$"):
        client.delete_backup(backup_id)

    assert fake.objects == objects


def test_delete_backup_manifest_first():
    """The manifest is deleted before the archive, so a half-deleted backup stops counting."""
    objects = _backup_objects(_manifest("20250101T000000Z"))
    objects.update(_backup_objects(_manifest("20250102T000000Z")))
    client, fake = _fake_client(objects)

    client.delete_backup("20250101T000000Z")

    deleted = [key for operation, key in fake.calls if operation == "delete_object"]
    manifest_key = "prod/20250101T000000Z.manifest.json"
    archive_key = "prod/20250101T000000Z"
    assert deleted.index(manifest_key) < deleted.index(archive_key)
    assert set(fake.objects) == set(_backup_objects(_manifest("20250102T000000Z")))


def test_a_store_that_does_not_list_uploads_still_lists_objects(
    client: backup.S3Client, stubber: Stubber, caplog: pytest.LogCaptureFixture
):
    """list_multipart_uploads refused: the objects are still listed, with a warning."""
    listed = {"Bucket": BUCKET, "Prefix": f"{PREFIX}/"}
    contents = [{"Key": f"{PREFIX}/20250101T000000Z", "Size": 3}]
    stubber.add_response("list_objects_v2", {"Contents": contents, "KeyCount": 1}, listed)
    stubber.add_client_error(
        "list_multipart_uploads", "NotImplemented", "not here", http_status_code=501
    )

    assert client.incomplete_backups([]) == ["20250101T000000Z"]
    assert "cannot list unfinished uploads: NotImplemented" in caplog.text


@pytest.mark.parametrize("manifest", [True, False], ids=["backup", "leftovers"])
def test_delete_without_the_right_to_list_uploads(
    manifest: bool, caplog: pytest.LogCaptureFixture
):
    """Credentials that may not list unfinished uploads still delete, with one warning.

    AWS needs s3:ListBucketMultipartUploads for that listing, which a minimal
    policy often leaves out; deleting must not depend on it.
    """
    objects = _backup_objects(_manifest("20250101T000000Z"))
    objects["prod/20250101T000000Z.snar.gpg"] = b"state"
    if not manifest:
        del objects["prod/20250101T000000Z.manifest.json"]
    objects.update(_backup_objects(_manifest("20250102T000000Z")))
    client, fake = _fake_client(objects)
    fake.uploads_denied = True

    assert client.delete_backup("20250101T000000Z", force=True) == ["20250101T000000Z"]

    assert set(fake.objects) == set(_backup_objects(_manifest("20250102T000000Z")))
    listings = [call for call in fake.calls if call[0] == "list_multipart_uploads"]
    assert len(listings) == 2  # once to find the pieces, once to delete: not per object
    assert caplog.text.count("cannot list unfinished uploads: AccessDenied") == 2


def test_delete_backup_missing(client: backup.S3Client, stubber: Stubber):
    """An id with no manifest and no object is not found, and nothing is deleted."""
    stubber.add_client_error("head_object", "404", http_status_code=404)
    listed = {"Bucket": BUCKET, "Prefix": f"{PREFIX}/20250101T000000Z"}
    stubber.add_response("list_objects_v2", {"KeyCount": 0}, listed)
    stubber.add_response("list_multipart_uploads", {}, listed)

    with pytest.raises(backup.S3Error, match="there is no backup 20250101T000000Z") as exc_info:
        client.delete_backup("20250101T000000Z")

    assert exc_info.value.option == "backup-id"


def test_delete_backup_archive_fails_after_manifest():
    """If the archive cannot be deleted, the error says so; the manifest is already gone."""
    objects = _backup_objects(_manifest("20250101T000000Z"))
    client, fake = _fake_client(objects)
    fake.undeletable.add("prod/20250101T000000Z")

    with pytest.raises(backup.S3Error, match="cannot delete object 20250101T000000Z: "):
        client.delete_backup("20250101T000000Z")

    assert set(fake.objects) == {"prod/20250101T000000Z"}


@pytest.mark.parametrize("backup_id", ["../x", "a/b", "x.manifest.json", "", "$(id)"])
def test_delete_backup_rejects_keys(backup_id: str):
    """An unsafe id is refused before any S3 call."""
    client, fake = _fake_client({})

    with pytest.raises(backup.BackupError, match="invalid backup id"):
        client.delete_backup(backup_id)

    assert fake.calls == []


# --- chains ---------------------------------------------------------------------------------

FULL = "20250101T000000Z"
FIRST = "20250102T000000Z"
SECOND = "20250103T000000Z"
OTHER_FULL = "20250104T000000Z"
BRANCH = "20250105T000000Z"


def _incremental(backup_id: str, parent: str, size: int = 100) -> backup.BackupManifest:
    return _manifest(backup_id, size, backup_type="incremental", parent=parent)


def _with_state(manifest: backup.BackupManifest) -> dict[str, bytes]:
    """A backup's objects: archive, manifest and encrypted snapshot state."""
    objects = _backup_objects(manifest)
    objects[f"{PREFIX}/{manifest.backup_id}{backup_store.SNAPSHOT_STATE_SUFFIX}"] = b"state"
    return objects


def _chain_objects(*manifests: backup.BackupManifest) -> dict[str, bytes]:
    objects: dict[str, bytes] = {}
    for manifest in manifests:
        objects.update(_with_state(manifest))
    return objects


#   FULL <- FIRST <- SECOND        OTHER_FULL
CHAIN = (_manifest(FULL), _incremental(FIRST, FULL), _incremental(SECOND, FIRST))


@pytest.mark.parametrize(
    ("backup_id", "expected"),
    [
        pytest.param(SECOND, [FULL, FIRST, SECOND], id="two-incrementals"),
        pytest.param(FIRST, [FULL, FIRST], id="one-incremental"),
        pytest.param(FULL, [FULL], id="full"),
        pytest.param(OTHER_FULL, [OTHER_FULL], id="other-full"),
    ],
)
def test_chain_order(backup_id: str, expected: list[str]):
    """A backup's chain is its full backup first, each incremental in order, itself last."""
    client, _ = _fake_client(_chain_objects(*CHAIN, _manifest(OTHER_FULL)))

    chain = client.chain(backup_id)

    assert [manifest.backup_id for manifest in chain] == expected
    assert chain[-1] == client.get_manifest(backup_id)


def _without(objects: dict[str, bytes], *keys: str) -> dict[str, bytes]:
    return {key: value for key, value in objects.items() if key not in keys}


@pytest.mark.parametrize(
    ("objects", "link", "missing"),
    [
        pytest.param(
            _chain_objects(*CHAIN[1:]),
            FIRST,
            FULL,
            id="full-deleted",
        ),
        pytest.param(
            _without(_chain_objects(*CHAIN), f"prod/{FULL}.manifest.json"),
            FIRST,
            FULL,
            id="full-manifest-deleted",
        ),
        pytest.param(
            _without(_chain_objects(*CHAIN), f"prod/{FIRST}"),
            SECOND,
            FIRST,
            id="parent-archive-deleted",
        ),
        pytest.param(
            {**_chain_objects(*CHAIN), f"prod/{FULL}": b"x" * 99},
            FIRST,
            FULL,
            id="full-incomplete",
        ),
        pytest.param(
            {**_chain_objects(*CHAIN), f"prod/{FIRST}.manifest.json": b"{not json"},
            SECOND,
            FIRST,
            id="parent-manifest-invalid",
        ),
    ],
)
def test_chain_broken(objects: dict[str, bytes], link: str, missing: str):
    """A chain with a missing, incomplete or invalid link is broken: the error names the link."""
    client, _ = _fake_client(objects)

    with pytest.raises(backup.S3Error) as exc_info:
        client.chain(SECOND)

    assert str(exc_info.value) == (
        f"backup {link} depends on {missing}, which is missing or incomplete: "
        f"the chain of {SECOND} is broken"
    )
    assert exc_info.value.option == "backup-id"
    assert isinstance(exc_info.value.__cause__, (backup.S3Error, backup.BackupError))


@pytest.mark.parametrize(
    "manifests",
    [
        pytest.param(
            [_incremental(FIRST, SECOND), _incremental(SECOND, FIRST)], id="two-naming-each-other"
        ),
        pytest.param([_incremental(SECOND, SECOND)], id="own-parent"),
        pytest.param(
            [_incremental(FULL, SECOND), _incremental(FIRST, FULL), _incremental(SECOND, FIRST)],
            id="three",
        ),
    ],
)
def test_chain_cyclic(manifests: list[backup.BackupManifest]):
    """Manifests that name each other as parents (hand-made) fail instead of looping."""
    client, fake = _fake_client(_chain_objects(*manifests))

    with pytest.raises(backup.S3Error, match=f"^backup {SECOND} has a cyclic chain$") as exc_info:
        client.chain(SECOND)

    assert exc_info.value.option == "backup-id"
    assert len([call for call in fake.calls if call[0] == "get_object"]) == len(manifests)


def test_chain_of_a_missing_backup():
    """The backup itself missing is "there is no backup", not a broken chain."""
    client, _ = _fake_client(_chain_objects(*CHAIN))

    with pytest.raises(backup.S3Error, match=f"^there is no backup {OTHER_FULL}$"):
        client.chain(OTHER_FULL)


# --- deleting with chains ---------------------------------------------------------------------


def _deleted(fake: FakeS3) -> list[str]:
    return [key for operation, key in fake.calls if operation == "delete_object"]


def test_delete_backup_removes_its_three_objects():
    """The manifest, then the archive, then the snapshot state; other backups stay."""
    objects = _chain_objects(_manifest(FULL), _manifest(OTHER_FULL))
    client, fake = _fake_client(objects)

    assert client.delete_backup(FULL) == [FULL]

    assert _deleted(fake) == [
        f"prod/{FULL}.manifest.json",
        f"prod/{FULL}",
        f"prod/{FULL}.snar.gpg",
    ]
    assert set(fake.objects) == set(_with_state(_manifest(OTHER_FULL)))


@pytest.mark.parametrize(
    ("backup_id", "needed_by"),
    [
        pytest.param(FULL, f"{FIRST}, {SECOND}", id="full"),
        pytest.param(FIRST, SECOND, id="middle"),
    ],
)
def test_delete_backup_refuses_a_needed_backup(backup_id: str, needed_by: str):
    """A backup others depend on is not deleted without chain=true; nothing is touched."""
    objects = _chain_objects(*CHAIN)
    client, fake = _fake_client(objects)

    with pytest.raises(backup.S3Error) as exc_info:
        client.delete_backup(backup_id)

    assert str(exc_info.value) == (
        f"backup {backup_id} is needed by {needed_by}; use chain=true to delete it with them"
    )
    assert exc_info.value.option == "backup-id"
    assert _deleted(fake) == []
    assert fake.objects == objects


def test_delete_backup_newest_incremental_needs_no_chain():
    """The newest incremental backup has no dependants: it is deleted alone."""
    client, fake = _fake_client(_chain_objects(*CHAIN))

    assert client.delete_backup(SECOND) == [SECOND]

    assert client.chain(FIRST)[-1].backup_id == FIRST
    assert not [key for key in fake.objects if SECOND in key]


@pytest.mark.parametrize("chain", [False, True], ids=["alone", "with-chain"])
def test_delete_backup_refuses_when_a_manifest_cannot_be_read(chain: bool):
    """A dependant whose manifest S3 fails to return is not taken for a missing one.

    Arrange: FULL <- FIRST <- SECOND; reading FIRST's manifest fails.
    Act: delete FULL.
    Assert: S3Error naming the manifest; nothing is deleted (FULL alone would
        break the chain; with chain=true FIRST would be missed).
    """
    objects = _chain_objects(*CHAIN)
    client, fake = _fake_client(objects)
    fake.broken.add(f"prod/{FIRST}.manifest.json")

    with pytest.raises(backup.S3Error, match=f"^cannot read object {FIRST}.manifest.json: "):
        client.delete_backup(FULL, chain=chain)

    assert _deleted(fake) == []
    assert fake.objects == objects


@pytest.mark.parametrize(
    ("backup_id", "extra", "expected", "kept"),
    [
        pytest.param(FULL, (), [SECOND, FIRST, FULL], [OTHER_FULL], id="whole-chain"),
        pytest.param(FIRST, (), [SECOND, FIRST], [OTHER_FULL, FULL], id="from-the-middle"),
        pytest.param(
            FULL,
            (_incremental(BRANCH, FIRST),),
            [BRANCH, SECOND, FIRST, FULL],
            [OTHER_FULL],
            id="with-a-branch",
        ),
        pytest.param(OTHER_FULL, (), [OTHER_FULL], [SECOND, FIRST, FULL], id="no-dependants"),
    ],
)
def test_delete_backup_with_chain(
    backup_id: str,
    extra: tuple[backup.BackupManifest, ...],
    expected: list[str],
    kept: list[str],
):
    """chain=true deletes the dependants first, newest first, then the backup itself.

    Each backup goes manifest first, so that a deletion cut short leaves no
    listed backup whose parent is gone.
    """
    client, fake = _fake_client(_chain_objects(*CHAIN, _manifest(OTHER_FULL), *extra))

    assert client.delete_backup(backup_id, chain=True) == expected

    assert _deleted(fake) == [
        key
        for name in expected
        for key in (f"prod/{name}.manifest.json", f"prod/{name}", f"prod/{name}.snar.gpg")
    ]
    assert sorted(manifest.backup_id for manifest in client.list_backups()) == sorted(kept)
    for name in kept:
        client.chain(name)  # every kept backup is still restorable


# --- chains that a damaged backup, a skewed clock or a newer charm left -------------------------
# R1 <- I1 <- I2, and R2: I1's archive was damaged after I2 was made on it.
R1, I1, I2, R2 = "20250101T000000Z", "20250102T000000Z", "20250103T000000Z", "20250201T000000Z"


def _chain_with_a_damaged_link() -> dict[str, bytes]:
    objects = _backup_objects(_manifest(R1))
    objects.update(_backup_objects(_manifest(I1, backup_type="incremental", parent=R1), 99))
    objects.update(_backup_objects(_manifest(I2, backup_type="incremental", parent=I1)))
    objects.update(_backup_objects(_manifest(R2)))
    return objects


def test_an_incomplete_backup_that_another_builds_on_still_protects_its_parent():
    """I2 needs R1 through I1, damaged or not: the link is kept, R1 is neither deleted nor expired.

    Dropping it would let delete-backup and retention take R1, the one part
    of I2's chain that a repair of I1 (from a copy of its archive) would
    still need.
    """
    client, fake = _fake_client(_chain_with_a_damaged_link())

    listing = client.listing(strict=True)

    assert [m.backup_id for m in listing.backups] == [R2, I2, R1]
    assert listing.links == {I1: R1, I2: I1}
    with pytest.raises(backup.S3Error, match=f"is needed by {I1}, {I2}"):
        client.delete_backup(R1)
    assert retention.expired(listing.backups, 1, links=listing.links) == []
    assert fake.calls.count(("delete_object", f"{PREFIX}/{R1}")) == 0


def test_two_damaged_links_in_a_row_still_protect_the_full_backup():
    """R1 <- I1 <- I2 <- I3, I1 and I2 both damaged: I3 still needs R1, through both links.

    I1B, complete, also builds on I1: I1 is reached twice.
    """
    objects = _backup_objects(_manifest(R1))
    objects.update(_backup_objects(_manifest(I1, backup_type="incremental", parent=R1), 99))
    objects.update(_backup_objects(_manifest(I2, backup_type="incremental", parent=I1), 99))
    i3, i1b = "20250104T000000Z", "20250105T000000Z"
    objects.update(_backup_objects(_manifest(i3, backup_type="incremental", parent=I2)))
    objects.update(_backup_objects(_manifest(i1b, backup_type="incremental", parent=I1)))
    objects.update(_backup_objects(_manifest(R2)))
    client, fake = _fake_client(objects)

    listing = client.listing(strict=True)

    assert [m.backup_id for m in listing.backups] == [R2, i1b, i3, R1]
    assert listing.links == {I1: R1, I2: I1, i3: I2, i1b: I1}
    with pytest.raises(backup.S3Error, match=f"is needed by {I1}, {I2}, {i3}, {i1b}"):
        client.delete_backup(R1)
    assert retention.expired(listing.backups, 1, links=listing.links) == []
    assert fake.calls.count(("delete_object", f"{PREFIX}/{R1}")) == 0


def test_an_incomplete_backup_that_nothing_builds_on_protects_nothing():
    """A damaged backup alone does not pin its chain: retention still expires it."""
    objects = _chain_with_a_damaged_link()
    del objects[f"{PREFIX}/{I2}"], objects[f"{PREFIX}/{I2}{backup_store.MANIFEST_SUFFIX}"]
    client, _ = _fake_client(objects)

    listing = client.listing(strict=True)

    assert listing.links == {}
    assert retention.expired(listing.backups, 1, links=listing.links) == [R1]


def test_delete_chain_deletes_each_backup_before_its_parent_whatever_the_clock_said():
    """B was made on A, whose unit's clock was years ahead: B is deleted before A.

    Cut short after the first backup (S3 denies A's archive), the deletion
    leaves every backup still listed with its parent.
    """
    full, ahead, after = "20250101T000000Z", "20300101T000000Z", "20250102T000000Z"
    objects = _backup_objects(_manifest(full))
    objects.update(_backup_objects(_manifest(ahead, backup_type="incremental", parent=full)))
    objects.update(_backup_objects(_manifest(after, backup_type="incremental", parent=ahead)))
    client, fake = _fake_client(objects)
    fake.undeletable.add(f"{PREFIX}/{ahead}")

    with pytest.raises(backup.S3Error):
        client.delete_backup(full, chain=True)

    listed = {m.backup_id: m.parent for m in client.list_backups()}
    assert listed == {full: ""}  # `after` went first; `ahead` lost its manifest, not its parent
    fake.undeletable.clear()
    assert client.delete_backup(full, chain=True) == [full]  # `ahead` is only leftovers now


def test_delete_chain_keeps_a_dependant_this_charm_cannot_use_unless_forced():
    """chain=true does not delete a newer charm's incremental without force, as for the target."""
    objects = _backup_objects(_manifest(R1))
    objects.update(_backup_objects(_manifest(I1)))
    objects[f"{PREFIX}/{I1}{backup_store.MANIFEST_SUFFIX}"] = _newer_charm_manifest(I1, parent=R1)
    client, fake = _fake_client(objects)

    with pytest.raises(backup.S3Error, match=f"backup {I1} cannot be used by this charm"):
        client.delete_backup(R1, chain=True)
    assert fake.objects == objects

    assert client.delete_backup(R1, chain=True, force=True) == [I1, R1]
    assert fake.objects == {}


def test_a_manifest_that_names_itself_as_parent_is_not_its_own_dependant():
    """A hand-made manifest naming itself: deleted once, not refused as needed by itself."""
    objects = _backup_objects(_manifest(R1, backup_type="incremental", parent=R1))
    client, fake = _fake_client(objects)

    assert client.delete_backup(R1) == [R1]
    assert fake.objects == {}
