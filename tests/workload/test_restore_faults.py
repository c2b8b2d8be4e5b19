"""Restore and verify through the charm's actions when things go wrong.

Every case runs the real pipeline (aws CLI, gpg, tar in the bubblewrap
stand-in for the container) against a real SeaweedFS, and checks what the
restore-backup action promises: a clear failure, the live /data exactly as
it was (database included), no staging or previous-data directory left,
an empty /tmp, Synapse started again if it was stopped, and no secret in
the failure message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ops import testing
from ops.testing import ExecArgs, ExecResult

import backup
import backup_restore
import backup_store
from charm import SynapseCharm
from tests.helpers.sandbox import Sandbox, mount_small_fs
from tests.helpers.seaweed import SeaweedServer, killed_when
from tests.helpers.synapse_data import SYNAPSE_GID, SYNAPSE_UID, make_synapse_data, tree_snapshot
from tests.workload.conftest import PASSPHRASE, SERVER_NAME, ServiceCalls
from tests.workload.test_charm_action import configure

START = ("start_services", ("synapse",))
STOP = ("stop_services", ("synapse",))
S3_PATH = "homeserver/backups"  # what configure() sets, normalised
# What a restore replaces in the sample data (relative to /data).
SWAPPED = (
    "appservices/bridge.yaml",
    f"{SERVER_NAME}.log.config",
    f"{SERVER_NAME}.signing.key",
    "homeserver.db",
    "homeserver.yaml",
    "media_store/local_content",
    "media_store/local_thumbnails",
)
LEFTOVER_PATTERNS = (
    f"{backup_restore.RESTORE_STAGING_PREFIX}*",
    f"{backup_restore.PREVIOUS_DATA_PREFIX}*",
)


@dataclasses.dataclass
class Scene:
    """A configured charm with one backup in S3 and live data changed since.

    Attributes:
        harness: the charm.
        server: the S3 server.
        bucket: the bucket.
        backup_id: the backup.
        backed_up: the data directory as it was backed up.
        service_calls: the recorded service starts and stops.
    """

    harness: testing.Harness[SynapseCharm]
    server: SeaweedServer
    bucket: str
    backup_id: str
    backed_up: dict[str, Any]
    service_calls: ServiceCalls

    @property
    def root(self) -> Path:
        """The container's filesystem root."""
        return self.harness.get_filesystem_root("synapse")

    @property
    def data(self) -> Path:
        """The live data directory."""
        return self.root / "data"

    @property
    def key(self) -> str:
        """The backup's object key."""
        return f"{S3_PATH}/{self.backup_id}"

    def objects(self) -> dict[str, tuple[int, str]]:
        """The bucket's objects with their sizes and ETags."""
        listing = self.server.client().list_objects_v2(Bucket=self.bucket)
        return {item["Key"]: (item["Size"], item["ETag"]) for item in listing.get("Contents", [])}

    def restore(self, **params: Any) -> testing.ActionOutput:
        """Run restore-backup of the scene's backup.

        Args:
            **params: more action parameters.

        Returns:
            The action's output.
        """
        return self.harness.run_action("restore-backup", {"backup-id": self.backup_id, **params})

    def fail_restore(self, match: str, **params: Any) -> testing.ActionFailed:
        """Run restore-backup, expecting it to fail with a message matching ``match``.

        Args:
            match: a regular expression the failure message must contain.
            **params: more action parameters.

        Returns:
            The failure.
        """
        with pytest.raises(testing.ActionFailed, match=match) as failure:
            self.restore(**params)
        return failure.value


def _own(path: Path) -> None:
    """Give a path to the Synapse user."""
    os.lchown(path, SYNAPSE_UID, SYNAPSE_GID)


def change_live_data(data: Path) -> None:
    """Change the live data after a backup, so that a restore would show."""
    with (data / "homeserver.yaml").open("a") as config:
        config.write("# changed after the backup\n")
    media = data / "media_store/local_content"
    victim = sorted(path for path in media.rglob("*") if path.is_file())[0]
    victim.write_bytes(b"changed after the backup")
    new_dir = media / "zz" / "new"
    new_dir.mkdir(parents=True)
    (new_dir / "upload").write_bytes(b"uploaded after the backup")
    for path in (media / "zz", new_dir, new_dir / "upload"):
        _own(path)
    connection = sqlite3.connect(data / "homeserver.db")
    with connection:
        connection.executemany(
            "INSERT INTO events (event_id, body) VALUES (?, ?)",
            [(f"$after{n}", "written after the backup") for n in range(50)],
        )
    connection.close()


def backup_now(harness: testing.Harness[SynapseCharm]) -> str:
    """Create a backup through the charm and return its id (one per second at most)."""
    backup_id = harness.run_action("create-backup").results["backup-id"]
    # Ids have a one-second resolution: the next backup must get another one.
    while backup.new_backup_id() == backup_id:
        time.sleep(0.05)
    return str(backup_id)


def make_scene(
    harness: testing.Harness[SynapseCharm],
    server: SeaweedServer,
    bucket: str,
    service_calls: ServiceCalls,
) -> Scene:
    """Configure the charm, start Synapse, back up, then change the live data."""
    configure(harness, server, bucket)
    harness.container_pebble_ready("synapse")
    data = harness.get_filesystem_root("synapse") / "data"
    backed_up = tree_snapshot(data)
    backup_id = backup_now(harness)
    change_live_data(data)
    service_calls.clear()
    return Scene(harness, server, bucket, backup_id, backed_up, service_calls)


@pytest.fixture
def scene(
    harness: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    service_calls: ServiceCalls,
) -> Scene:
    """The charm with a backup in the session's S3 server and changed live data."""
    return make_scene(harness, s3_server, bucket, service_calls)


def assert_nothing_changed(
    scene: Scene,
    live_before: dict[str, Any],
    failure: testing.ActionFailed,
    *,
    stopped: bool | None = False,
    secrets: tuple[str, ...] = (),
    empty_leftovers_ok: bool = False,
) -> None:
    """Check what a failed restore promises.

    Args:
        scene: the scene.
        live_before: tree_snapshot of /data before the action.
        failure: the action's failure.
        stopped: whether Synapse must have been stopped (and started again);
            None when either is acceptable.
        secrets: more strings that must not be shown.
        empty_leftovers_ok: tolerate leftover directories holding only
            directories (see test_swap_failure_leaves_no_previous_dir).
    """
    after = tree_snapshot(scene.data)
    prefixes = (backup_restore.RESTORE_STAGING_PREFIX, backup_restore.PREVIOUS_DATA_PREFIX)
    leftovers = {name: entry[0] for name, entry in after.items() if name.startswith(prefixes)}
    live_after = {name: entry for name, entry in after.items() if name not in leftovers}
    changed = sorted(
        name
        for name in live_before.keys() | live_after.keys()
        if live_before.get(name) != live_after.get(name)
    )
    assert changed == [], f"live data changed: {changed[:10]}"
    if empty_leftovers_ok:
        leftovers = {name: kind for name, kind in leftovers.items() if kind != "dir"}
    assert leftovers == {}, f"restore left in /data: {leftovers}"
    assert not list((scene.root / "tmp").iterdir())
    calls = scene.service_calls
    if stopped is None:
        assert STOP not in calls or calls[-1] == START
    elif stopped:
        assert STOP in calls
        assert calls[-1] == START
    else:
        assert STOP not in calls, "Synapse was stopped before the data was ready"
    shown = failure.message + "\n".join(failure.output.logs)
    for secret in (scene.server.secret_key, PASSPHRASE, *secrets):
        assert secret not in shown


def flip_middle_byte(scene: Scene) -> None:
    """Flip one bit in the middle of the encrypted object, keeping its size."""
    client = scene.server.client()
    body = bytearray(client.get_object(Bucket=scene.bucket, Key=scene.key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=scene.bucket, Key=scene.key, Body=bytes(body))
    assert client.head_object(Bucket=scene.bucket, Key=scene.key)["ContentLength"] == len(body)


# ------------------------------------------------------------- pre-flight


def test_wrong_passphrase_fails_before_touching_anything(scene: Scene) -> None:
    """The passphrase secret changed since the backup: refused at the passphrase check."""
    passphrase_secret = str(scene.harness.model.config["backup-passphrase"])
    wrong = "not the passphrase of that backup"
    scene.harness.set_secret_content(passphrase_secret, {"passphrase": wrong})
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"passphrase does not decrypt backup")

    assert scene.backup_id in failure.message
    assert_nothing_changed(scene, before, failure, secrets=(wrong,))


def test_wrong_passphrase_in_a_new_secret_fails(scene: Scene) -> None:
    """The operator points backup-passphrase at another secret: same refusal."""
    wrong = "another secret's passphrase"
    secret = scene.harness.add_user_secret({"passphrase": wrong})
    scene.harness.grant_secret(secret, "synapse")
    scene.harness.update_config({"backup-passphrase": secret})
    # Juju runs each action in a new charm process; Harness keeps one charm
    # object, whose observer caches the config of its first event.
    vars(scene.harness.charm.backup).pop("_config", None)
    scene.service_calls.clear()
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"passphrase does not decrypt")

    assert_nothing_changed(scene, before, failure, secrets=(wrong,))


def test_corrupted_object_fails_the_restore(scene: Scene) -> None:
    """One flipped bit in the middle of the archive: gpg's MDC or the checksum refuses it."""
    flip_middle_byte(scene)
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(
        r"restore of \S+ failed: (downloading and decrypting the backup failed|"
        r"backup \S+ does not match its manifest)"
    )

    assert_nothing_changed(scene, before, failure)


def test_corrupted_object_is_not_restored_even_at_the_last_byte(scene: Scene) -> None:
    """A flipped last byte (the end of gpg's integrity packet) is caught too."""
    client = scene.server.client()
    body = bytearray(client.get_object(Bucket=scene.bucket, Key=scene.key)["Body"].read())
    body[-1] ^= 0x80
    client.put_object(Bucket=scene.bucket, Key=scene.key, Body=bytes(body))
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"restore of \S+ failed")

    assert_nothing_changed(scene, before, failure)


def _set_manifest_server_name(scene: Scene, server_name: str) -> None:
    """Make the backup look like another server's (the manifest is plain JSON)."""
    client = scene.server.client()
    manifest_key = scene.key + backup_store.MANIFEST_SUFFIX
    manifest = json.loads(client.get_object(Bucket=scene.bucket, Key=manifest_key)["Body"].read())
    manifest["server-name"] = server_name
    client.put_object(Bucket=scene.bucket, Key=manifest_key, Body=json.dumps(manifest).encode())


def test_server_name_mismatch_needs_force(scene: Scene) -> None:
    """A backup of another server is refused without force and restored with it."""
    _set_manifest_server_name(scene, "other.example")
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"of server 'other\.example', not 'demo\.example'.*force=true")
    assert_nothing_changed(scene, before, failure)

    output = scene.restore(force=True)

    assert output.results["backup-id"] == scene.backup_id
    assert output.results["previous-data"] == "removed"
    assert (scene.data / "homeserver.yaml").read_bytes() == scene.backed_up["homeserver.yaml"][4]
    assert not (scene.data / "media_store/local_content/zz").exists()
    database = sqlite3.connect(scene.data / "homeserver.db")
    assert database.execute("SELECT count(*) FROM events").fetchone() == (200,)
    database.close()
    assert scene.service_calls == [STOP, START]
    assert not [path for pattern in LEFTOVER_PATTERNS for path in scene.data.glob(pattern)]
    assert not list((scene.root / "tmp").iterdir())


def test_unset_server_name_does_not_skip_the_server_name_check(scene: Scene) -> None:
    """Without server-name in the config, another server's backup still needs force."""
    _set_manifest_server_name(scene, "other.example")
    scene.harness.update_config(unset=["server-name"])
    vars(scene.harness.charm.backup).pop("_config", None)  # see the passphrase test
    scene.service_calls.clear()
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"other\.example")

    assert_nothing_changed(scene, before, failure)


def test_missing_backup_fails_clearly(scene: Scene) -> None:
    """A well-formed id with no backup: refused, nothing touched."""
    before = tree_snapshot(scene.data)
    objects = scene.objects()

    with pytest.raises(testing.ActionFailed, match="there is no backup 20200101T000000Z"):
        scene.harness.run_action("restore-backup", {"backup-id": "20200101T000000Z"})

    assert scene.objects() == objects
    assert tree_snapshot(scene.data) == before
    assert scene.service_calls == []


BAD_IDS = {
    "quote": "20261126T120000Z'",
    "double-quotes": '"20261126T120000Z"',
    "parent-slash": "../20261126T120000Z",
    "dot-dot": "..",
    "slash": "a/b",
    "command-substitution": "$(touch pwned)",
    "backticks": "`touch pwned`",
    "empty": "",
    "space": " ",
    "manifest-name": "20261126T120000Z.manifest.json",
}


def test_bad_backup_ids_are_refused_by_every_action(
    scene: Scene, subtests: pytest.Subtests
) -> None:
    """Ids that could escape a shell word or the S3 prefix fail on the parameter.

    One backup serves all the cases (subtests): each id goes to restore,
    verify and delete, and nothing in S3 or /data may change.
    """
    cases = {**BAD_IDS, "real-id-with-newline": scene.backup_id + "\n"}
    for case, backup_id in cases.items():
        with subtests.test(case):
            _refuse_bad_id(scene, backup_id)


def run_action(
    harness: testing.Harness[SynapseCharm], action: str, params: dict[str, Any]
) -> testing.ActionOutput:
    """Run an action as Juju would when the charm fails it from load_params.

    ``event.load_params(..., errors="fail")`` fails the action and raises ops'
    internal ``_Abort``, which ``ops.main`` turns into a clean exit but Harness
    lets escape from run_action. This reports it as the ActionFailed Juju shows.

    Args:
        harness: the harness.
        action: the action.
        params: its parameters.

    Returns:
        The action's output.

    Raises:
        ActionFailed: if the charm failed the action.
    """
    from ops._main import _Abort

    try:
        return harness.run_action(action, params)
    except _Abort:
        running = harness._backend._running_action
        harness._backend._running_action = None
        if running is None or running.failure_message is None:
            raise
        raise testing.ActionFailed(running.failure_message, running.output) from None


def _refuse_bad_id(scene: Scene, backup_id: str) -> None:
    """Check that restore, verify and delete refuse an id and change nothing."""
    before = tree_snapshot(scene.data)
    objects = scene.objects()
    for action in ("restore-backup", "verify-backup", "delete-backup"):
        with pytest.raises(testing.ActionFailed) as failure:
            run_action(scene.harness, action, {"backup-id": backup_id})
        assert failure.value.message == (
            "Error in action parameters: backup-id must be a backup id such as 20261126T120000Z"
        ), action
        assert scene.objects() == objects, action
        assert tree_snapshot(scene.data) == before, action
    assert scene.service_calls == []
    assert not list(scene.root.rglob("*pwned*"))
    assert not list((scene.root / "tmp").iterdir())


# --------------------------------------------------------- staging room


SMALL_DATA = {"media_files": 16, "media_bytes": 2 * 1024 * 1024, "seed": 3}


def _allocated(top: Path) -> int:
    """Bytes a tree takes on a tmpfs (whole pages per file)."""
    return sum(-(-path.stat().st_size // 4096) * 4096 for path in top.rglob("*") if path.is_file())


@pytest.fixture
def small_fs_scene(
    harness: testing.Harness[SynapseCharm],
    s3_server: SeaweedServer,
    bucket: str,
    service_calls: ServiceCalls,
    tmp_path: Path,
) -> Iterator[Scene]:
    """A scene whose /data is a tmpfs holding the live data but not a second copy."""
    live = _allocated(make_synapse_data(tmp_path / "probe", SERVER_NAME, **SMALL_DATA))
    root = harness.get_filesystem_root("synapse")
    with mount_small_fs(root / "data", live * 3 // 2):
        make_synapse_data(root, SERVER_NAME, **SMALL_DATA)
        scene = make_scene(harness, s3_server, bucket, service_calls)
        stat = os.statvfs(scene.data)
        free = stat.f_bavail * stat.f_frsize
        manifest = backup.BackupManifest.from_json(
            scene.server.client()
            .get_object(Bucket=bucket, Key=scene.key + backup_store.MANIFEST_SUFFIX)["Body"]
            .read()
        )
        assert free < manifest.size, (free, manifest.size)
        yield scene


def test_no_room_to_stage_is_refused_before_download(small_fs_scene: Scene) -> None:
    """The pre-flight room check refuses; nothing is downloaded or touched."""
    scene = small_fs_scene
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"not enough room in /data to stage the restore")

    assert_nothing_changed(scene, before, failure)


def test_staging_hitting_enospc_leaves_live_data(
    small_fs_scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pre-flight check bypassed, tar runs out of room mid-extraction."""
    scene = small_fs_scene
    monkeypatch.setattr(backup_restore, "STAGING_HEADROOM", -(10**15))
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"downloading and decrypting the backup failed")

    assert "No space left on device" in failure.message
    assert_nothing_changed(scene, before, failure)


# ------------------------------------------------------------- S3 outage


def _restore_while_s3_dies(
    harness: testing.Harness[SynapseCharm], service_calls: ServiceCalls, workdir: Path
) -> tuple[Scene, dict[str, Any], testing.ActionFailed]:
    """Back up ~200 MB of media, then kill S3 once extraction into staging has begun.

    Returns:
        The scene, /data before the restore, and the restore's failure.
    """
    root = harness.get_filesystem_root("synapse")
    big = root / "data/media_store/local_content/big"
    big.mkdir()
    _own(big)
    for index in range(8):
        path = big / f"blob{index}"
        path.write_bytes(os.urandom(25 * 1024 * 1024))
        _own(path)
    with SeaweedServer(workdir) as server:
        server.create_bucket("outage")
        scene = make_scene(harness, server, "outage", service_calls)
        before = tree_snapshot(scene.data)

        def extracting() -> bool:
            return any(
                path.is_file()
                for staging in scene.data.glob(f"{backup_restore.RESTORE_STAGING_PREFIX}*")
                for path in staging.rglob("*")
            )

        with killed_when(server, extracting, interval=0.005) as killed:
            failure = scene.fail_restore(r"restore of \S+ failed: downloading and decrypting")
        assert killed.is_set(), "the restore ended before the server could be killed"
    return scene, before, failure


def test_s3_killed_mid_download_leaves_live_data(
    harness: testing.Harness[SynapseCharm], service_calls: ServiceCalls, tmp_path: Path
) -> None:
    """The S3 server dies while the archive is downloaded and extracted."""
    scene, before, failure = _restore_while_s3_dies(harness, service_calls, tmp_path / "s3")

    assert_nothing_changed(scene, before, failure)


def test_s3_killed_mid_download_says_s3_failed(
    harness: testing.Harness[SynapseCharm], service_calls: ServiceCalls, tmp_path: Path
) -> None:
    """The failure names the S3 download as the cause, not only its consequences."""
    _, _, failure = _restore_while_s3_dies(harness, service_calls, tmp_path / "s3")

    assert re.search(r"IncompleteRead|Connection|S3|response stream", failure.message)


# ------------------------------------------------------------------- swap


def _fail_nth_mv(
    root: Path, failing: set[int]
) -> tuple[list[list[str]], Callable[[ExecArgs], ExecResult]]:
    """A sandbox handler whose ``mv`` commands fail at the given calls (1-based).

    Args:
        root: the container root.
        failing: which mv calls fail.

    Returns:
        The mv commands seen so far (a live list), and the handler.
    """
    sandbox = Sandbox(root)
    seen: list[list[str]] = []

    def handle(args: ExecArgs) -> ExecResult:
        if any(re.search(r"(^|\n)mv ", word) for word in args.command):
            seen.append(list(args.command))
            if len(seen) in failing:
                return ExecResult(exit_code=1, stderr="injected")
        return sandbox.handle(args)

    return seen, handle


# 7 live paths are swapped (2 renames each): the first rename, the first
# staged-in, a middle one, the database's and the very last.
@pytest.mark.parametrize("n", [1, 2, 3, 8, 14])
def test_swap_failure_puts_the_previous_data_back(scene: Scene, n: int) -> None:
    """The n-th rename of the swap fails: every rename done is undone, Synapse restarted."""
    seen, handle = _fail_nth_mv(scene.root, {n})
    scene.harness.handle_exec("synapse", [], handler=handle)
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"cannot move .*injected")

    assert len(seen) >= n, "the injected failure was not reached"
    assert_nothing_changed(scene, before, failure, stopped=True, empty_leftovers_ok=True)


def test_swap_failure_leaves_no_previous_dir(scene: Scene) -> None:
    """The 3rd rename fails after the first path was swapped: no previous-data dir stays."""
    _, handle = _fail_nth_mv(scene.root, {3})
    scene.harness.handle_exec("synapse", [], handler=handle)
    before = tree_snapshot(scene.data)

    failure = scene.fail_restore(r"cannot move .*injected")

    assert_nothing_changed(scene, before, failure, stopped=True)


def _files(top: Path) -> dict[bytes, int]:
    """Count the files of a tree by content (where they are does not matter)."""
    counts: dict[bytes, int] = {}
    for path in top.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            counts[content] = counts.get(content, 0) + 1
    return counts


def test_failed_undo_keeps_the_previous_data(scene: Scene) -> None:
    """The last rename fails and so does its undo: no previous file is lost."""
    before = _files(scene.data)
    # 14: staged local_thumbnails -> live; 15: undo of 13, previous local_thumbnails back.
    _, handle = _fail_nth_mv(scene.root, {14, 15})
    scene.harness.handle_exec("synapse", [], handler=handle)

    scene.fail_restore(r"cannot move .*injected")

    after = _files(scene.data)
    lost = {
        content[:40]: count for content, count in before.items() if after.get(content, 0) < count
    }
    assert lost == {}
    assert not (scene.data / "media_store/local_thumbnails").exists()
    kept = list(
        scene.data.glob(
            f"{backup_restore.PREVIOUS_DATA_PREFIX}*/data/media_store/local_thumbnails"
        )
    )
    assert len(kept) == 1
    # Synapse must not start on half-restored data: it stays stopped, the
    # restored data stays in staging and the journal blocks the unit.
    assert scene.service_calls[-1] != START
    assert list(scene.data.glob(f"{backup_restore.RESTORE_STAGING_PREFIX}*"))
    assert (scene.root / backup.RESTORE_JOURNAL.lstrip("/")).exists()
    scene.harness.evaluate_status()
    assert "interrupted restore" in scene.harness.model.unit.status.message


def test_failed_undo_says_where_the_previous_data_is(scene: Scene) -> None:
    """The operator must learn from the action where the data that is not back is."""
    _, handle = _fail_nth_mv(scene.root, {14, 15})
    scene.harness.handle_exec("synapse", [], handler=handle)

    failure = scene.fail_restore(r"cannot move .*injected")

    kept = next(scene.data.glob(f"{backup_restore.PREVIOUS_DATA_PREFIX}*"))
    assert f"/data/{kept.name}" in failure.message


def test_keep_previous_keeps_the_replaced_data(scene: Scene) -> None:
    """keep-previous=true: the old data is in the reported directory, the backup is live."""
    before = tree_snapshot(scene.data)

    output = scene.restore(**{"keep-previous": True})

    previous = output.results["previous-data"]
    assert re.fullmatch(
        rf"/data/{re.escape(backup_restore.PREVIOUS_DATA_PREFIX + scene.backup_id)}-[0-9a-f]+",
        previous,
    )
    # The replaced paths moved there; their parent directories there are new.
    parents = ("appservices", "media_store")
    kept = {
        name: entry
        for name, entry in tree_snapshot(scene.root / previous.lstrip("/") / "data").items()
        if name not in parents
    }
    replaced = {
        name: entry
        for name, entry in before.items()
        if any(name == path or name.startswith(path + "/") for path in SWAPPED)
    }
    assert kept == replaced
    assert (scene.data / "homeserver.yaml").read_bytes() == scene.backed_up["homeserver.yaml"][4]
    assert not (scene.data / "media_store/local_content/zz").exists()
    assert (scene.data / "media_store/remote_content").exists()
    assert scene.service_calls == [STOP, START]
    assert not list(scene.data.glob(f"{backup_restore.RESTORE_STAGING_PREFIX}*"))
    assert not list((scene.root / "tmp").iterdir())


# ----------------------------------------------------------------- verify


def test_verify_good_backup_matches_its_manifest(scene: Scene) -> None:
    """verify-backup on an intact backup: matches, with the manifest's file count."""
    client = scene.server.client()
    manifest = json.loads(
        client.get_object(Bucket=scene.bucket, Key=scene.key + backup_store.MANIFEST_SUFFIX)[
            "Body"
        ].read()
    )
    before = tree_snapshot(scene.data)

    results = scene.harness.run_action("verify-backup", {"backup-id": scene.backup_id}).results

    assert results["matches-manifest"] is True
    assert results["mismatch"] == "none"
    assert results["file-count"] == manifest["file-count"] > 0
    assert results["size"] == manifest["size"]
    assert results["sha256"] == manifest["sha256"]
    assert tree_snapshot(scene.data) == before
    assert not list((scene.root / "tmp").iterdir())
    assert scene.service_calls == []


def _verify(scene: Scene) -> tuple[dict[str, Any] | None, str | None]:
    """Run verify-backup: its results, or the failure message."""
    try:
        output = scene.harness.run_action("verify-backup", {"backup-id": scene.backup_id})
    except testing.ActionFailed as failure:
        return None, failure.message
    return output.results, None


def test_verify_corrupted_backup_fails_or_reports_a_mismatch(scene: Scene) -> None:
    """verify-backup on a flipped byte: never reports a match; live data untouched."""
    flip_middle_byte(scene)
    before = tree_snapshot(scene.data)

    results, message = _verify(scene)

    if message is not None:
        assert message.startswith(f"cannot verify backup {scene.backup_id}: "), message
        for secret in (scene.server.secret_key, PASSPHRASE):
            assert secret not in message
    else:
        assert results is not None
        assert results["matches-manifest"] is False
        assert "checksum differs" in results["mismatch"]
    assert tree_snapshot(scene.data) == before
    assert not list((scene.root / "tmp").iterdir())
    assert scene.service_calls == []
