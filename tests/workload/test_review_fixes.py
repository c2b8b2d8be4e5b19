"""Failure modes found in review, each reproduced for real (see conftest.py for the set-up)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ops import testing

import backup
import backup_chain
import backup_restore
from charm import SynapseCharm
from tests.helpers.sandbox import ExecArgs, ExecResult, Sandbox, default_path
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import SYNAPSE_GID, SYNAPSE_UID, tree_snapshot
from tests.workload.test_restore_faults import (  # noqa: F401 - fixtures
    Scene,
    scene,
)


class CharmDied(BaseException):
    """Stands for the charm process being killed: nothing in the charm catches it."""


def test_restore_interrupted_mid_swap_is_rolled_back_at_the_next_hook(
    scene: Scene,  # noqa: F811 - the fixture
) -> None:
    """The charm dies after some renames; the next hook puts the previous data back."""
    before = tree_snapshot(scene.data)
    sandbox = Sandbox(scene.root)
    moves = []

    def dying(args: ExecArgs) -> ExecResult:
        if any(re.search(r"(^|\n)mv ", word) for word in args.command):
            moves.append(args.command)
            if len(moves) == 5:
                raise CharmDied
        return sandbox.handle(args)

    scene.harness.handle_exec("synapse", [], handler=dying)
    with pytest.raises(CharmDied):
        scene.restore()
    assert (scene.root / backup.RESTORE_JOURNAL.lstrip("/")).exists()
    assert tree_snapshot(scene.data) != before  # really half swapped

    scene.harness.handle_exec("synapse", [], handler=sandbox.handle)
    scene.harness.charm.on.update_status.emit()

    after = tree_snapshot(scene.data)
    leftovers = [name for name in after if name.startswith((".synapse-restore", ".synapse-prev"))]
    assert {k: v for k, v in after.items() if k not in leftovers} == before
    assert not (scene.root / backup.RESTORE_JOURNAL.lstrip("/")).exists()
    scene.harness.evaluate_status()
    assert "interrupted restore" not in scene.harness.model.unit.status.message
    # The next action sweeps what the dead run left in staging.
    scene.harness.run_action("list-backups")
    scene.harness.run_action("verify-backup", {"backup-id": scene.backup_id})
    assert not list(scene.data.glob(f"{backup_restore.RESTORE_STAGING_PREFIX}*"))


def test_tar_exit_1_is_a_warning_and_2_an_error(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """A busy server makes tar exit 1 (a file changed while read): the backup still counts."""
    from tests.workload.test_charm_action import configure

    root = harness.get_filesystem_root("synapse")
    bin_dir = root / "test-bin"
    bin_dir.mkdir()
    real_tar = shutil.which("tar", path=":".join(default_path()))
    wrapper = bin_dir / "tar"
    wrapper.write_text(f'#!/bin/bash\n{real_tar} "$@" || exit\nexit "$TAR_EXIT"\n')
    wrapper.chmod(0o755)
    configure(harness, s3_server, bucket)
    for code, succeeds in (("1", True), ("2", False)):
        sandbox = Sandbox(root, path_dirs=["/test-bin", *default_path()])

        def handle(args: ExecArgs, sandbox: Sandbox = sandbox, code: str = code) -> ExecResult:
            environment = {**args.environment, "TAR_EXIT": code}
            return sandbox.handle(dataclasses.replace(args, environment=environment))

        harness.handle_exec("synapse", [], handler=handle)
        if succeeds:
            assert harness.run_action("create-backup", {"type": "full"}).results["backup-id"]
        else:
            with pytest.raises(testing.ActionFailed, match="exit code 2"):
                harness.run_action("create-backup", {"type": "full"})


def test_backslash_in_a_name_is_literal(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    r"""Tar must not read `a\1b.yaml` as an escape for byte 1."""
    from tests.workload.conftest import PASSPHRASE, decrypt_and_extract
    from tests.workload.test_charm_action import configure

    data = harness.get_filesystem_root("synapse") / "data"
    odd = data / "bridge\\1b.yaml"
    odd.write_text("id: odd\n")
    configure(harness, s3_server, bucket)
    backup_id = harness.run_action("create-backup").results["backup-id"]
    body = s3_server.client().get_object(Bucket=bucket, Key=f"homeserver/backups/{backup_id}")
    decrypt_and_extract(body["Body"].read(), PASSPHRASE, tmp_path / "out")
    assert (tmp_path / "out/data/bridge\\1b.yaml").read_text() == "id: odd\n"


def test_media_outside_data_is_refused_at_backup_time(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """A backup a restore could not put back is not made."""
    from tests.workload.test_charm_action import configure

    root = harness.get_filesystem_root("synapse")
    media = root / "srv/media_store/local_content"
    media.mkdir(parents=True)
    config = yaml.safe_load((root / "data/homeserver.yaml").read_text())
    config["media_store_path"] = "/srv/media_store"
    (root / "data/homeserver.yaml").write_text(yaml.safe_dump(config))
    for path in (root / "srv", root / "srv/media_store", media):
        shutil.chown(path, SYNAPSE_UID, SYNAPSE_GID)
    configure(harness, s3_server, bucket)
    with pytest.raises(testing.ActionFailed, match="outside /data"):
        harness.run_action("create-backup")
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_another_deployment_never_builds_on_our_chain(
    harness: testing.Harness[SynapseCharm], s3_server: SeaweedServer, bucket: str
) -> None:
    """Two deployments on one bucket path: each one's first backup is full."""
    from tests.workload.test_charm_action import configure

    configure(harness, s3_server, bucket)
    first = harness.run_action("create-backup").results
    other = testing.Harness(SynapseCharm)  # another model, another UUID
    try:
        root = harness.get_filesystem_root("synapse")
        other.set_can_connect("synapse", True)
        other.set_leader(True)
        other.begin()
        other_root = other.get_filesystem_root("synapse")
        subprocess.run(["cp", "-a", str(root / "data"), str(other_root)], check=True)
        shutil.rmtree(other_root / "data" / backup_chain.STATE_DIR.rsplit("/", 1)[1])
        (other_root / "tmp").mkdir()
        (other_root / "tmp").chmod(0o1777)
        other.handle_exec("synapse", [], handler=Sandbox(other_root).handle)
        configure(other, s3_server, bucket)
        import time

        time.sleep(1.05)
        second = other.run_action("create-backup").results
    finally:
        other.cleanup()
    assert first["type"] == "full"
    assert (second["type"], second["parent"]) == ("full", "none")
