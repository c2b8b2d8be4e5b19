"""list-backups over a bucket with 1,200 backups and every kind of debris.

The backups are written straight to SeaweedFS (small fake archives with
valid manifests of the same size), so that listing more than one page of
S3 keys (1,000 per page) costs seconds, not hours of real backups.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import random
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from ops import testing

import backup
import backup_store
from backup_observer import FORMATTED_ROWS, RESULT_BACKUPS
from charm import SynapseCharm
from tests.helpers.seaweed import SeaweedServer
from tests.workload.conftest import SERVER_NAME, parameters_for
from tests.workload.test_charm_action import configure

BACKUPS = 1200
PREFIX = "homeserver/backups"  # configure()'s s3-path, normalised
START = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)


def backup_ids(count: int) -> list[str]:
    """Distinct backup ids, oldest first, spread over months."""
    return [
        backup.new_backup_id(START + datetime.timedelta(minutes=97 * index, seconds=index % 60))
        for index in range(count)
    ]


def manifest_for(backup_id: str, body: bytes, **overrides: Any) -> str:
    """A manifest as run_backup writes it, for an archive body."""
    fields: dict[str, Any] = {
        "backup_id": backup_id,
        "created_at": "2025-01-01T00:00:00+00:00",
        "paths": ("/data/homeserver.yaml", "/data/media_store/local_content"),
        "file_count": 3,
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "duration": 1.5,
        "metadata": {"server-name": SERVER_NAME, "synapse-version": "1.120.0"},
    }
    if backup.BACKUP_ID_PATTERN.fullmatch(backup_id):
        created = datetime.datetime.strptime(backup_id, backup_store.BACKUP_ID_FORMAT)
        fields["created_at"] = created.replace(tzinfo=datetime.timezone.utc).isoformat()
    fields.update(overrides)
    return backup.BackupManifest(**fields).to_json()


@dataclasses.dataclass(frozen=True)
class Crowded:
    """A bucket of 1,200 backups and debris.

    Attributes:
        bucket: the bucket.
        newest_first: the complete backups' ids, newest first.
        debris: the ids that look like backups but are not complete ones.
        incomplete: what list-backups gives as incomplete, newest first.
        unreadable: what it gives as unreadable (a manifest that does not parse).
    """

    bucket: str
    newest_first: list[str]
    debris: dict[str, str]
    incomplete: list[str]
    unreadable: list[str]


@pytest.fixture(scope="module")
def crowded(s3_server: SeaweedServer) -> Crowded:
    """1,200 complete backups plus incomplete ones, uploaded once for the module."""
    bucket = f"crowded-{secrets.token_hex(6)}"
    s3_server.create_bucket(bucket)
    rng = random.Random(1200)  # noqa: S311 - test data
    ids = backup_ids(BACKUPS + 20)
    complete, spare = ids[:BACKUPS], ids[BACKUPS:]
    objects: dict[str, bytes] = {}
    for backup_id in complete:
        body = rng.randbytes(rng.randint(40, 400))
        objects[f"{PREFIX}/{backup_id}"] = body
        objects[f"{PREFIX}/{backup_id}{backup_store.MANIFEST_SUFFIX}"] = manifest_for(
            backup_id, body
        ).encode()
    # Debris: the newest ids, so that a debris entry listed by mistake is on top.
    body = b"x" * 100
    no_manifest, no_object, wrong_size, not_json, wrong_id, bad_sha = spare[-6:]
    debris: dict[str, bytes] = {
        f"{PREFIX}/{no_manifest}": body,
        f"{PREFIX}/{no_object}{backup_store.MANIFEST_SUFFIX}": manifest_for(
            no_object, body
        ).encode(),
        f"{PREFIX}/{wrong_size}": body,
        f"{PREFIX}/{wrong_size}{backup_store.MANIFEST_SUFFIX}": manifest_for(
            wrong_size, body, size=101
        ).encode(),
        f"{PREFIX}/{not_json}": body,
        f"{PREFIX}/{not_json}{backup_store.MANIFEST_SUFFIX}": b"{not json",
        f"{PREFIX}/{wrong_id}": body,
        f"{PREFIX}/{wrong_id}{backup_store.MANIFEST_SUFFIX}": manifest_for(
            complete[0], body
        ).encode(),
        f"{PREFIX}/{bad_sha}": body,
        f"{PREFIX}/{bad_sha}{backup_store.MANIFEST_SUFFIX}": manifest_for(
            bad_sha, body, sha256="not-a-digest"
        ).encode(),
        # Deeper, beside and above the prefix.
        f"{PREFIX}/old/{spare[0]}": body,
        f"{PREFIX}/old/{spare[0]}{backup_store.MANIFEST_SUFFIX}": manifest_for(
            spare[0], body
        ).encode(),
        f"{PREFIX}-old/{spare[1]}": body,
        f"{PREFIX}-old/{spare[1]}{backup_store.MANIFEST_SUFFIX}": manifest_for(
            spare[1], body
        ).encode(),
        f"homeserver/{spare[2]}": body,
        f"homeserver/{spare[2]}{backup_store.MANIFEST_SUFFIX}": manifest_for(
            spare[2], body
        ).encode(),
        # Names that are not backup ids.
        f"{PREFIX}/latest": body,
        f"{PREFIX}/latest{backup_store.MANIFEST_SUFFIX}": manifest_for("latest", body).encode(),
        f"{PREFIX}/{spare[3]}.tmp": body,
        f"{PREFIX}/{spare[3]}.tmp{backup_store.MANIFEST_SUFFIX}": manifest_for(
            f"{spare[3]}.tmp", body
        ).encode(),
        f"{PREFIX}/{spare[4].lower()}": body,
        f"{PREFIX}/{spare[4].lower()}{backup_store.MANIFEST_SUFFIX}": manifest_for(
            spare[4].lower(), body
        ).encode(),
    }
    objects.update(debris)
    client = s3_server.client(max_pool_connections=32)
    items = list(objects.items())
    rng.shuffle(items)

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=bucket, Key=item[0], Body=item[1])

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(put, items))
    # A "directory" object, put alone: SeaweedFS stalls a put racing with it for 60 s.
    put((f"{PREFIX}/", b""))
    named = {
        "no-manifest": no_manifest,
        "no-object": no_object,
        "wrong-size": wrong_size,
        "not-json": not_json,
        "wrong-id": wrong_id,
        "bad-sha256": bad_sha,
    }
    # Ids with objects but no complete backup: the named debris, and an odd
    # object under a backup id (spare[3].tmp); not deeper, beside or above.
    # A manifest that does not parse may be a good backup's: not incomplete.
    unreadable = sorted([not_json, bad_sha], reverse=True)
    named_incomplete = sorted({*named.values(), spare[3]} - set(unreadable), reverse=True)
    return Crowded(bucket, complete[::-1], named, named_incomplete, unreadable)


def test_list_backups_action_lists_exactly_the_complete_backups(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, crowded: Crowded
) -> None:
    """1,200 backups over two S3 pages: all counted, the newest 1,000 listed; no debris."""
    configure(harness, s3_server, crowded.bucket)

    results = harness.run_action("list-backups").results

    assert results["count"] == BACKUPS
    listed = results["backups"]
    assert list(listed) == [str(index) for index in range(1, RESULT_BACKUPS + 1)]
    assert [entry["id"] for entry in listed.values()] == crowded.newest_first[:RESULT_BACKUPS]
    newest = listed["1"]
    assert newest["server-name"] == SERVER_NAME
    assert newest["created-at"].startswith(crowded.newest_first[0][:4])
    assert 40 <= int(newest["size"]) <= 400
    # The table shows the newest rows (Juju passes each result as one
    # argument, at most 128 KiB) and says how many more `backups` has.
    lines = results["formatted"].splitlines()
    shown = FORMATTED_ROWS
    assert len(lines) == shown + 5  # header, rows, "... and N older", incomplete, 2 unreadable
    assert len(results["formatted"].encode()) < 64 * 1024
    header = lines[0].split()
    assert header[0] == "backup-id"
    assert {"created-at", "size", "server-name"} <= set(header)
    rows = lines[1 : 1 + shown]
    assert [line.split()[0] for line in rows] == crowded.newest_first[:shown]
    assert all(SERVER_NAME in line.split() for line in rows)
    assert lines[-4] == (
        f"... and {BACKUPS - shown} older backups (the newest 1000 are in the backups result)"
    )
    assert lines[-3].startswith("incomplete, not backups")
    assert lines[-3].endswith(": " + ", ".join(crowded.incomplete))
    assert results["incomplete"] == " ".join(crowded.incomplete)
    assert [line.split(": ")[1] for line in lines[-2:]] == crowded.unreadable
    assert all(
        line.startswith("not listed, its manifest cannot be used now: ") for line in lines[-2:]
    )
    assert results["unreadable"] == " ".join(crowded.unreadable)


def test_s3_client_lists_exactly_the_complete_backups(
    s3_server: SeaweedServer, crowded: Crowded
) -> None:
    """S3Client.list_backups: the same 1,200 manifests, parsed, newest first."""
    client = backup.S3Client(parameters_for(s3_server, crowded.bucket, path=f"/{PREFIX}/"))

    manifests = client.list_backups()

    assert [manifest.backup_id for manifest in manifests] == crowded.newest_first
    assert all(manifest.metadata["server-name"] == SERVER_NAME for manifest in manifests)
    assert all(manifest.file_count == 3 for manifest in manifests)
    # Each is a complete backup for get_manifest too.
    assert client.get_manifest(crowded.newest_first[0]) == manifests[0]
    assert client.get_manifest(crowded.newest_first[-1]) == manifests[-1]


@pytest.mark.parametrize(
    "kind", ["no-manifest", "no-object", "wrong-size", "not-json", "wrong-id", "bad-sha256"]
)
def test_debris_is_not_a_backup_for_get_manifest(
    s3_server: SeaweedServer, crowded: Crowded, kind: str
) -> None:
    """Each incomplete backup is refused by get_manifest, as restore would refuse it."""
    client = backup.S3Client(parameters_for(s3_server, crowded.bucket, path=PREFIX))
    backup_id = crowded.debris[kind]

    with pytest.raises((backup.S3Error, backup.BackupError)):
        client.get_manifest(backup_id)
    assert not client.exists_backup(backup_id)


def test_list_backups_of_an_empty_bucket(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """No backups: count 0 and a readable line instead of an empty table."""
    configure(harness, s3_server, bucket)

    results = harness.run_action("list-backups").results

    assert results["count"] == 0
    assert results["formatted"] == "no backups"
    assert results["backups"] == {}
