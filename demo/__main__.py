"""Demo: back up sample Synapse data through the charm's create-backup, for real.

Starts an embedded SeaweedFS S3 server on 127.0.0.1, lays out a Synapse data
directory (configuration, signing key, SQLite database, media), runs the
charm's create-backup action with real bash, tar, gpg and aws CLI in a
bubblewrap stand-in for the workload container, then shows the encrypted
object and checks that it decrypts to the same files.

Run it with ``tox -e demo`` (as root: the stand-in container runs the
pipeline as the Synapse user, uid 991).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ops import testing

from charm import SynapseCharm
from tests.helpers.operator import configure_backups
from tests.helpers.sandbox import Sandbox, SynapseHealth, honor_pebble_ownership
from tests.helpers.seaweed import SeaweedServer
from tests.helpers.synapse_data import make_synapse_data

BUCKET = "synapse-backups"
SERVER_NAME = "demo.example"
PASSPHRASE = "demo passphrase: keep the real one somewhere safe"


def say(text: str) -> None:
    """Print a step of the demo.

    Args:
        text: what to print.
    """
    print(f"\n== {text}", flush=True)


def decrypt(encrypted: bytes, passphrase: str, workdir: Path) -> bytes:
    """Decrypt a backup with gpg, as an operator would by hand.

    Args:
        encrypted: the object.
        passphrase: the passphrase.
        workdir: a scratch directory.

    Returns:
        The tar archive.
    """
    gnupg = workdir / "gnupg"
    gnupg.mkdir(mode=0o700)
    passphrase_file = gnupg / "passphrase"
    passphrase_file.write_text(passphrase)
    passphrase_file.chmod(0o600)
    env = {**os.environ, "GNUPGHOME": str(gnupg)}
    try:
        return subprocess.run(
            ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback",
             "--passphrase-file", str(passphrase_file), "--decrypt"],
            input=encrypted, capture_output=True, env=env, check=True,
        ).stdout  # fmt: skip
    finally:
        subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "gpg-agent"], check=False)
        shutil.rmtree(gnupg, ignore_errors=True)


def verify(archive: bytes, root: Path) -> int:
    """Check every regular file of the archive against the source data.

    Args:
        archive: the decrypted tar.
        root: the container root the backup was made from.

    Returns:
        How many files matched.

    Raises:
        SystemExit: if a file differs.
    """
    matched = 0
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or member.name == "data/homeserver.db":
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            source = (root / member.name).read_bytes()
            if hashlib.sha256(extracted.read()).digest() != hashlib.sha256(source).digest():
                raise SystemExit(f"MISMATCH: {member.name}")
            matched += 1
    return matched


def configure(harness: testing.Harness[SynapseCharm], server: SeaweedServer) -> None:
    """Configure the charm as an operator would: user secrets and juju config.

    Args:
        harness: the charm.
        server: the S3 server.
    """
    say("juju add-secret / grant-secret / config (S3 credentials and passphrase)")
    configure_backups(
        harness, server, BUCKET, passphrase=PASSPHRASE, server_name=SERVER_NAME, path="demo"
    )
    harness.evaluate_status()
    print(f"unit status: {harness.model.unit.status}")


def show_and_verify(server: SeaweedServer, root: Path, backup_id: str, workdir: Path) -> None:
    """Show what the backup put in S3, then decrypt it and compare with the source.

    Args:
        server: the S3 server.
        root: the container root the backup was made from.
        backup_id: the backup.
        workdir: a scratch directory.

    Raises:
        SystemExit: if the object is not encrypted.
    """
    say(f"Objects in s3://{BUCKET}")
    client = server.client()
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        print(f"  {item['Key']:<45} {item['Size']:>12} bytes")
    key = f"demo/{backup_id}"
    manifest = client.get_object(Bucket=BUCKET, Key=key + ".manifest.json")["Body"].read()
    print("manifest (written last: only backups with one count):")
    print(manifest.decode())
    encrypted = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    print(f"first bytes: {encrypted[:16].hex(' ')} (OpenPGP, not a tar)")
    if b"homeserver.yaml" in encrypted or encrypted[257:262] == b"ustar":
        raise SystemExit("the object is not encrypted")

    say("Decrypting with the passphrase and comparing with the source")
    archive = decrypt(encrypted, PASSPHRASE, workdir)
    matched = verify(archive, root)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = tar.getnames()
    print(f"{len(names)} archive members; {matched} files identical to the source")
    print("database included:", "data/homeserver.db" in names)


def restorable_view(data: Path) -> dict[str, tuple[int, int, bytes]]:
    """Describe what a backup covers: every file but caches, runtime files and the database.

    Args:
        data: the data directory.

    Returns:
        Each file's mode, owner and content, by relative path.
    """
    skipped = ("media_store/remote_content", "media_store/url_cache", "homeserver.",
               ".synapse-backup-state")  # fmt: skip
    view = {}
    for path in sorted(data.rglob("*")):
        name = str(path.relative_to(data))
        if path.is_file() and not name.startswith(skipped):
            stat = path.stat()
            view[name] = (stat.st_mode, stat.st_uid, path.read_bytes())
    view["homeserver.yaml"] = (0, 0, (data / "homeserver.yaml").read_bytes())
    return view


def break_and_restore(harness: testing.Harness[SynapseCharm], data: Path, backup_id: str) -> None:
    """Break the live data, then restore it with the charm's actions.

    Args:
        harness: the charm.
        data: the data directory.
        backup_id: the backup to restore.

    Raises:
        SystemExit: if the restored data differs from what was backed up.
    """
    harness.container_pebble_ready("synapse")  # Synapse's service, for the restore to stop
    before = restorable_view(data)
    say("Breaking things: a media directory deleted, homeserver.yaml overwritten, rows gone")
    shutil.rmtree(data / "media_store/local_thumbnails")
    (data / "homeserver.yaml").write_text("broken: true\n")
    connection = sqlite3.connect(data / "homeserver.db")
    with connection:
        connection.execute("DELETE FROM events")
    connection.close()
    say("juju run synapse/0 list-backups")
    print(harness.run_action("list-backups").results["formatted"])
    say(f"juju run synapse/0 verify-backup backup-id={backup_id}")
    print(json.dumps(harness.run_action("verify-backup", {"backup-id": backup_id}).results))
    say(f"juju run synapse/0 restore-backup backup-id={backup_id}")
    output = harness.run_action("restore-backup", {"backup-id": backup_id})
    for line in output.logs:
        print(f"  log: {line}")
    print(json.dumps(output.results, indent=2))
    if restorable_view(data) != before:
        raise SystemExit("the restored data differs from the backed-up data")
    connection = sqlite3.connect(data / "homeserver.db")
    events = connection.execute("SELECT count(*) FROM events").fetchone()[0]
    connection.close()
    print(f"restored: every backed-up file identical; the database has its {events} events back")


def main() -> int:
    """Run the demo.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media-files", type=int, default=200, help="local media files")
    parser.add_argument("--keep", action="store_true", help="keep the demo's files")
    parser.add_argument("--no-restore", action="store_true", help="stop after the backup")
    options = parser.parse_args()
    if os.geteuid() != 0:
        print(
            "the demo runs the pipeline as uid 991 in a sandbox: run it as root", file=sys.stderr
        )
        return 2
    logging.basicConfig(level=logging.ERROR)  # the sample image has no Synapse to ask its version
    workdir = Path(tempfile.mkdtemp(prefix="synapse-demo-"))
    monkeypatch = __import__("pytest").MonkeyPatch()
    honor_pebble_ownership(monkeypatch)
    try:
        say(f"Starting SeaweedFS (S3) on 127.0.0.1 in {workdir}")
        with SeaweedServer(workdir / "s3") as server:
            server.create_bucket(BUCKET)
            print(f"endpoint {server.endpoint}, bucket {BUCKET}")

            harness = testing.Harness(SynapseCharm)
            harness.set_can_connect("synapse", True)
            harness.set_leader(True)  # a single unit is the leader
            harness.begin()
            root = harness.get_filesystem_root("synapse")
            (root / "tmp").mkdir(exist_ok=True)
            (root / "tmp").chmod(0o1777)
            say("Laying out sample Synapse data under the container's /data")
            data = make_synapse_data(root, SERVER_NAME, media_files=options.media_files)
            total = sum(path.stat().st_size for path in data.rglob("*") if path.is_file())
            print(f"{sum(1 for _ in data.rglob('*'))} entries, {total} bytes")
            harness.handle_exec("synapse", [], handler=Sandbox(root).handle)
            # No Synapse runs here (Harness stands in for Pebble): its /health answers.
            SynapseHealth().answer_in(harness)

            configure(harness, server)
            say("juju run synapse/0 create-backup")
            output = harness.run_action("create-backup")
            for line in output.logs:
                print(f"  log: {line}")
            print(json.dumps(output.results, indent=2))

            backup_id = str(output.results["backup-id"])
            show_and_verify(server, root, backup_id, workdir)
            if not options.no_restore:
                break_and_restore(harness, data, backup_id)
            harness.cleanup()
        say("Done: the backup is encrypted, complete and verified"
            + ("." if options.no_restore else ", and it restored the data."))  # fmt: skip
        return 0
    finally:
        monkeypatch.undo()
        if options.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
