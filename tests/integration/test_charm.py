"""Deploy the synapse charm on a real Juju controller, back it up to S3 and restore it.

The flow is the operator's: deploy with the image and a server name, add the
S3 credentials and the passphrase as Juju user secrets, grant them, point the
config at them, run ``create-backup``, then look at the bucket from outside
with boto3 and gpg. The backup is then listed and verified, and restored into
a fresh deployment with the same server name in a second temporary model, as
an operator would after losing a cluster; a deployment with another server
name must refuse it. Deleting is tried on a backup of its own. See
conftest.py for what must be provided; without it, every test here is
skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import secrets
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import botocore.exceptions
import jubilant
import pytest
import yaml

if TYPE_CHECKING:
    from conftest import IntegrationSettings

pytestmark = pytest.mark.integration

APP_NAME = "synapse"
UNIT_NAME = f"{APP_NAME}/0"
SERVER_NAME = "integration.synapse.test"
CONTAINER_NAME = "synapse"
# In the restore model: a deployment with another server name.
OTHER_APP_NAME = "synapse-other"
OTHER_SERVER_NAME = "other.synapse.test"
DATA_DIR = "/data"
HOMESERVER_CONFIG = f"{DATA_DIR}/homeserver.yaml"
# What a restore puts in the data directory while it runs (backup.py).
RESTORE_LEFTOVER_PREFIXES = (".synapse-restore-", ".synapse-previous-")
BACKUP_ACTION_TIMEOUT = 15 * 60
DEPLOY_TIMEOUT = 20 * 60
# After a restore Synapse is started again; it may take a while to answer.
HEALTH_TIMEOUT = 5 * 60
# create-backup names a backup after its UTC start time (backup_store.BACKUP_ID_FORMAT).
BACKUP_ID_PATTERN = re.compile(r"\d{8}T\d{6}Z")
BACKUP_ID_FORMAT = "%Y%m%dT%H%M%SZ"
# Tolerated difference between this machine's clock and the cluster's: far less
# than any time zone offset, so a backup id in local time would still be caught.
CLOCK_SKEW = datetime.timedelta(minutes=10)
MANIFEST_SUFFIX = ".manifest.json"
CONFIG_MEMBER = "data/homeserver.yaml"
OPENPGP_SKESK_TAG = 3  # Symmetric-Key Encrypted Session Key packet
OPENPGP_AES256 = 9


@dataclasses.dataclass(frozen=True)
class BackupRun:
    """One run of the create-backup action and where its object landed.

    Attributes:
        results: the action's results.
        started: UTC time just before the action was run.
        finished: UTC time just after it returned.
        key: the object key of the encrypted archive.
        local_copy: the encrypted archive, downloaded.
    """

    results: dict[str, str]
    started: datetime.datetime
    finished: datetime.datetime
    key: str
    local_copy: Path


def first_openpgp_packet(data: bytes) -> tuple[int, int]:
    """Read the header of the first OpenPGP packet (RFC 4880, section 4.2).

    Args:
        data: the start of an OpenPGP message.

    Returns:
        The packet's tag and the offset at which its body starts.
    """
    header = data[0]
    assert header & 0x80, f"first byte {header:#04x} is not an OpenPGP packet header"
    if header & 0x40:  # new format: tag in the low six bits, then a 1, 2 or 5-byte length
        length_size = 1 if data[1] < 192 else 5 if data[1] == 255 else 2
        return header & 0x3F, 1 + length_size
    # Old format: tag in bits 5-2, length type in bits 1-0 (3: indeterminate, no length).
    length_size = {0: 1, 1: 2, 2: 4, 3: 0}[header & 0x03]
    return (header >> 2) & 0x0F, 1 + length_size


def _app_active(status: jubilant.Status) -> bool:
    return jubilant.all_active(status, APP_NAME)


def _app_error(status: jubilant.Status) -> bool:
    return jubilant.any_error(status, APP_NAME)


def synapse_health(juju: jubilant.Juju, unit: str) -> str:
    """Ask Synapse's /health endpoint, from the unit's charm container.

    The charm container shares the pod's network with the workload container.

    Args:
        juju: the model of the unit.
        unit: the unit.

    Returns:
        The endpoint's answer ("OK" when Synapse is healthy).
    """
    probe = (
        "import urllib.request; "
        "print(urllib.request.urlopen('http://localhost:8008/health', timeout=10).read().decode())"
    )
    task = juju.exec(f"python3 -c {shlex.quote(probe)}", unit=unit)
    return task.stdout.strip()


def wait_for_health(juju: jubilant.Juju, unit: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """Wait until Synapse answers OK on /health, failing after a timeout.

    Args:
        juju: the model of the unit.
        unit: the unit.
        timeout: seconds to wait.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            last = synapse_health(juju, unit)
        except (jubilant.CLIError, jubilant.TaskError) as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        if last == "OK":
            return
        time.sleep(5)
    pytest.fail(f"Synapse on {unit} did not answer /health in {timeout}s: {last}")


def read_workload_file(juju: jubilant.Juju, unit: str, path: str) -> str:
    """Read a file in the unit's synapse container (juju ssh --container synapse).

    Args:
        juju: the model of the unit.
        unit: the unit.
        path: the file's path in the container.

    Returns:
        The file's content.
    """
    return juju.ssh(unit, "cat", shlex.quote(path), container=CONTAINER_NAME)


def signing_key(juju: jubilant.Juju, unit: str) -> str:
    """Read the signing key file that the unit's homeserver.yaml names.

    Only its digest is returned, so that a failing comparison does not print
    the key into the test logs.

    Args:
        juju: the model of the unit.
        unit: the unit.

    Returns:
        The SHA-256 of the key file's content, stripped of surrounding whitespace.
    """
    config = yaml.safe_load(read_workload_file(juju, unit, HOMESERVER_CONFIG))
    path = str(config.get("signing_key_path") or "")
    assert path.startswith(f"{DATA_DIR}/"), f"signing_key_path {path!r} is not under {DATA_DIR}"
    key = read_workload_file(juju, unit, path).strip()
    assert key, f"{path} on {unit} is empty"
    return hashlib.sha256(key.encode()).hexdigest()


def restore_leftovers(juju: jubilant.Juju, unit: str) -> list[str]:
    """List what a restore left in the data directory (staging or previous data).

    Args:
        juju: the model of the unit.
        unit: the unit.

    Returns:
        The names of such entries in /data.
    """
    listing = juju.ssh(unit, "ls", "-A", DATA_DIR, container=CONTAINER_NAME)
    return [name for name in listing.split() if name.startswith(RESTORE_LEFTOVER_PREFIXES)]


def listed_backup_ids(juju: jubilant.Juju, unit: str) -> list[str]:
    """Run list-backups and return the ids it lists, checking its count.

    Args:
        juju: the model of the unit.
        unit: the unit.

    Returns:
        The listed backup ids, in the order listed.
    """
    task = juju.run(unit, "list-backups", wait=BACKUP_ACTION_TIMEOUT)
    backups = task.results.get("backups") or {}
    assert isinstance(backups, dict), task
    ids = [str(backups[index]["id"]) for index in sorted(backups, key=int)]
    assert int(task.results["count"]) == len(ids), task
    return ids


def run_failing_action(
    juju: jubilant.Juju, unit: str, action: str, params: dict[str, object]
) -> jubilant.Task:
    """Run an action that must fail; return its task.

    Args:
        juju: the model of the unit.
        unit: the unit.
        action: the action.
        params: its parameters.

    Returns:
        The failed task (its message is the charm's event.fail message).
    """
    with pytest.raises(jubilant.TaskError) as excinfo:
        juju.run(unit, action, params, wait=BACKUP_ACTION_TIMEOUT)
    task = excinfo.value.task
    assert task.status == "failed", task
    return task


@pytest.fixture(scope="module")
def synapse_app(juju: jubilant.Juju, settings: IntegrationSettings) -> str:
    """Deploy the packed charm with the image and a server name; wait for active.

    Args:
        juju: the temporary model.
        settings: the checked settings.

    Returns:
        The application name.
    """
    juju.deploy(
        settings.charm_file,
        APP_NAME,
        resources={"synapse-image": settings.image},
        config={"server-name": SERVER_NAME},
    )
    juju.wait(_app_active, error=_app_error)
    return APP_NAME


@pytest.fixture(scope="module")
def passphrase() -> str:
    """Return a random backup passphrase for this run.

    Returns:
        The passphrase.
    """
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def s3_credentials_secret(
    juju: jubilant.Juju, settings: IntegrationSettings, synapse_app: str
) -> jubilant.SecretURI:
    """Add the S3 credentials as a user secret granted to the application.

    Args:
        juju: the temporary model.
        settings: the checked settings.
        synapse_app: the deployed application.

    Returns:
        The secret's URI.
    """
    uri = juju.add_secret(
        "synapse-s3-credentials",
        {"access-key": settings.s3.access_key, "secret-key": settings.s3.secret_key},
        info="S3 credentials for the synapse integration tests",
    )
    juju.grant_secret(uri, synapse_app)
    return uri


@pytest.fixture(scope="module")
def backup_configured(
    juju: jubilant.Juju,
    settings: IntegrationSettings,
    s3_credentials_secret: jubilant.SecretURI,
    passphrase: str,
    s3_prefix: str,
) -> str:
    """Configure backups through secrets and config, as an operator would; wait for active.

    Args:
        juju: the temporary model.
        settings: the checked settings.
        s3_credentials_secret: the S3 credentials secret, granted to the deployed application.
        passphrase: the backup passphrase.
        s3_prefix: the test's prefix in the bucket.

    Returns:
        The application name.
    """
    passphrase_uri = juju.add_secret(
        "synapse-backup-passphrase",
        {"passphrase": passphrase},
        info="backup passphrase for the synapse integration tests",
    )
    juju.grant_secret(passphrase_uri, APP_NAME)
    config: dict[str, str] = {
        "s3-credentials": s3_credentials_secret,
        "backup-passphrase": passphrase_uri,
        "s3-bucket": settings.s3.bucket,
        "s3-endpoint": settings.s3.endpoint,
        "s3-path": s3_prefix,
        "s3-uri-style": "path",
    }
    if settings.s3.region:
        config["s3-region"] = settings.s3.region
    juju.config(APP_NAME, config)
    juju.wait(_app_active, error=_app_error)
    return APP_NAME


@pytest.fixture(scope="module")
def backup(
    juju: jubilant.Juju,
    settings: IntegrationSettings,
    backup_configured: str,
    s3_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> BackupRun:
    """Run create-backup once and download the encrypted object it reports.

    Args:
        juju: the temporary model.
        settings: the checked settings.
        backup_configured: the application, configured for backups.
        s3_prefix: the test's prefix in the bucket.
        tmp_path_factory: pytest's temporary directories.

    Returns:
        The action's results and the downloaded object.
    """
    started = datetime.datetime.now(datetime.timezone.utc)
    task = juju.run(f"{backup_configured}/0", "create-backup", wait=BACKUP_ACTION_TIMEOUT)
    finished = datetime.datetime.now(datetime.timezone.utc)
    assert task.status == "completed", task
    results = {key: str(value) for key, value in task.results.items()}
    assert "backup-id" in results, task
    key = f"{s3_prefix}/{results['backup-id']}"
    local_copy = tmp_path_factory.mktemp("backup") / "archive.gpg"
    settings.s3.client().download_file(settings.s3.bucket, key, str(local_copy))
    return BackupRun(results, started, finished, key, local_copy)


def test_deploy_serves_synapse(juju: jubilant.Juju, synapse_app: str) -> None:
    """Synapse answers its health endpoint once the unit is active."""
    status = juju.status()
    unit = status.apps[synapse_app].units[UNIT_NAME]
    assert unit.workload_status.current == "active", unit.workload_status
    assert synapse_health(juju, UNIT_NAME) == "OK"


def test_create_backup_results(backup: BackupRun) -> None:
    """create-backup returns a UTC timestamp id, the object's size and the duration."""
    backup_id = backup.results["backup-id"]
    assert BACKUP_ID_PATTERN.fullmatch(backup_id), backup_id
    created = datetime.datetime.strptime(backup_id, BACKUP_ID_FORMAT).replace(
        tzinfo=datetime.timezone.utc
    )
    assert backup.started - CLOCK_SKEW <= created <= backup.finished + CLOCK_SKEW, (
        f"backup id {backup_id} is not the UTC time of the run "
        f"({backup.started:%Y-%m-%dT%H:%M:%SZ} to {backup.finished:%Y-%m-%dT%H:%M:%SZ})"
    )
    assert int(backup.results["size"]) > 0
    assert float(backup.results["duration"]) >= 0


def test_backup_object_and_manifest_in_s3(
    backup: BackupRun, settings: IntegrationSettings
) -> None:
    """The encrypted object has the reported size and its manifest names it."""
    client = settings.s3.client()
    head = client.head_object(Bucket=settings.s3.bucket, Key=backup.key)
    assert head["ContentLength"] == int(backup.results["size"])
    assert backup.local_copy.stat().st_size == int(backup.results["size"])
    manifest_object = client.get_object(
        Bucket=settings.s3.bucket, Key=backup.key + MANIFEST_SUFFIX
    )
    manifest = json.loads(manifest_object["Body"].read())
    assert manifest.get("backup-id") == backup.results["backup-id"]


def test_backup_object_is_encrypted(backup: BackupRun) -> None:
    """The object is an OpenPGP symmetrically encrypted message (AES256), not a tar."""
    data = backup.local_copy.read_bytes()
    assert data[257:262] != b"ustar", "the object is a plain tar archive"
    assert not tarfile.is_tarfile(backup.local_copy), "the object is a readable tar archive"
    tag, body_start = first_openpgp_packet(data)
    assert tag == OPENPGP_SKESK_TAG, f"first packet has tag {tag}, not a symmetric session key"
    version, cipher = data[body_start], data[body_start + 1]
    assert version in (4, 5), f"unexpected symmetric-key packet version {version}"
    assert cipher == OPENPGP_AES256, f"cipher algorithm {cipher} is not AES256"


@pytest.fixture
def gnupg_home() -> Iterator[Path]:
    """Give gpg a private, short home directory; stop its agent afterwards.

    Yields:
        The home directory.
    """
    gpg = shutil.which("gpg")
    if gpg is None:
        pytest.skip("gpg is not on PATH on this machine: cannot decrypt the backup here")
    # Short, so that gpg-agent's socket path fits.
    home = Path(tempfile.mkdtemp(prefix="gpg-"))
    home.chmod(0o700)
    try:
        yield home
    finally:
        gpgconf = shutil.which("gpgconf")
        if gpgconf is not None:
            subprocess.run(
                [gpgconf, "--homedir", str(home), "--kill", "gpg-agent"],
                capture_output=True,
                check=False,
            )
        shutil.rmtree(home, ignore_errors=True)


def test_backup_decrypts_with_the_passphrase(
    backup: BackupRun, passphrase: str, gnupg_home: Path
) -> None:
    """The configured passphrase decrypts the object (gpg) into a tar with the config."""
    gpg = shutil.which("gpg")
    assert gpg is not None
    passphrase_file = gnupg_home / "passphrase"
    passphrase_file.touch(mode=0o600)
    passphrase_file.write_text(passphrase)
    common = [
        gpg,
        "--batch",
        "--homedir",
        str(gnupg_home),
        "--no-symkey-cache",
        "--pinentry-mode",
        "loopback",
        "--passphrase-file",
        str(passphrase_file),
    ]
    packets = subprocess.run(
        [*common, "--list-packets", str(backup.local_copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ":symkey enc packet:" in packets.stdout, packets.stderr
    plain = gnupg_home / "archive.tar"
    decrypted = subprocess.run(
        [*common, "--output", str(plain), "--decrypt", str(backup.local_copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert decrypted.returncode == 0, decrypted.stderr
    assert tarfile.is_tarfile(plain), "the decrypted backup is not a tar archive"
    with tarfile.open(plain) as archive:
        names = {name.lstrip("./") for name in archive.getnames()}
    assert CONFIG_MEMBER in names, sorted(names)[:20]


def test_wrong_secret_key_blocks_on_s3_credentials(
    juju: jubilant.Juju,
    settings: IntegrationSettings,
    backup_configured: str,
    s3_credentials_secret: jubilant.SecretURI,
) -> None:
    """A wrong secret key blocks the unit naming s3-credentials; the right one clears it."""
    wrong_key = settings.s3.secret_key[::-1] + "x"
    try:
        settings.s3.client(secret_key=wrong_key).head_bucket(Bucket=settings.s3.bucket)
    except botocore.exceptions.ClientError:
        pass
    else:
        pytest.skip("this S3 store accepts a wrong secret key, so the charm cannot notice one")
    wrong_uri = juju.add_secret(
        "synapse-s3-wrong-credentials",
        {"access-key": settings.s3.access_key, "secret-key": wrong_key},
    )
    juju.grant_secret(wrong_uri, backup_configured)
    juju.config(backup_configured, {"s3-credentials": wrong_uri})

    def blocked_on_credentials(status: jubilant.Status) -> bool:
        unit = status.apps[backup_configured].units.get(UNIT_NAME)
        return (
            unit is not None
            and unit.workload_status.current == "blocked"
            and "s3-credentials" in unit.workload_status.message
        )

    juju.wait(blocked_on_credentials, error=_app_error, timeout=10 * 60)
    juju.config(backup_configured, {"s3-credentials": s3_credentials_secret})
    juju.wait(_app_active, error=_app_error, timeout=10 * 60)


def test_list_backups_shows_the_backup(juju: jubilant.Juju, backup: BackupRun) -> None:
    """list-backups lists the backup with its size and server name; count matches the entries."""
    task = juju.run(UNIT_NAME, "list-backups", wait=BACKUP_ACTION_TIMEOUT)
    backup_id = backup.results["backup-id"]
    backups = task.results.get("backups") or {}
    entries = {str(entry["id"]): entry for entry in backups.values()}
    assert backup_id in entries, task
    assert int(task.results["count"]) == len(entries), task
    assert int(entries[backup_id]["size"]) == int(backup.results["size"])
    assert entries[backup_id]["server-name"] == SERVER_NAME
    assert backup_id in task.results["formatted"]
    ids = [str(backups[index]["id"]) for index in sorted(backups, key=int)]
    assert ids == sorted(ids, reverse=True), f"backups are not listed newest first: {ids}"


def test_verify_backup_matches_manifest(juju: jubilant.Juju, backup: BackupRun) -> None:
    """verify-backup reads the whole backup and finds what its manifest says."""
    backup_id = backup.results["backup-id"]
    task = juju.run(
        UNIT_NAME, "verify-backup", {"backup-id": backup_id}, wait=BACKUP_ACTION_TIMEOUT
    )
    assert str(task.results["matches-manifest"]).lower() == "true", task
    assert task.results["mismatch"] == "none", task
    assert task.results["backup-id"] == backup_id
    assert int(task.results["size"]) == int(backup.results["size"])
    assert int(task.results["file-count"]) == int(backup.results["file-count"])


def test_delete_backup(
    juju: jubilant.Juju, settings: IntegrationSettings, s3_prefix: str, backup_configured: str
) -> None:
    """delete-backup removes a backup of its own; it is no longer listed; a second delete fails."""
    unit = f"{backup_configured}/0"
    created = juju.run(unit, "create-backup", wait=BACKUP_ACTION_TIMEOUT)
    backup_id = str(created.results["backup-id"])
    assert backup_id in listed_backup_ids(juju, unit)

    deleted = juju.run(unit, "delete-backup", {"backup-id": backup_id}, wait=BACKUP_ACTION_TIMEOUT)
    assert deleted.results["deleted"] == backup_id, deleted
    assert backup_id not in listed_backup_ids(juju, unit)
    client = settings.s3.client()
    for key in (f"{s3_prefix}/{backup_id}", f"{s3_prefix}/{backup_id}{MANIFEST_SUFFIX}"):
        with pytest.raises(botocore.exceptions.ClientError):
            client.head_object(Bucket=settings.s3.bucket, Key=key)

    again = run_failing_action(juju, unit, "delete-backup", {"backup-id": backup_id})
    assert f"there is no backup {backup_id}" in again.message, again


def test_a_second_unit_runs_no_second_homeserver(
    juju: jubilant.Juju, backup: BackupRun, backup_configured: str
) -> None:
    """Scaled out, the new unit is Blocked with no Synapse; scaled back, all is active.

    Synapse runs on unit 0 (pod 0) only, whichever unit leads: unit 1 gets
    no homeserver.yaml (no second signing key under the same name) and
    refuses the actions that use the workload container, while unit 0 keeps
    serving. Scaling back to one removes unit 1, as its Blocked message says.
    """
    second = f"{backup_configured}/1"

    def second_blocked(status: jubilant.Status) -> bool:
        units = status.apps[backup_configured].units
        return (
            second in units
            and units[second].workload_status.current == "blocked"
            and units[UNIT_NAME].workload_status.current == "active"
        )

    juju.add_unit(backup_configured)
    try:
        status = juju.wait(second_blocked, error=_app_error, timeout=10 * 60)
        units = status.apps[backup_configured].units
        assert units[UNIT_NAME].provider_id == f"{backup_configured}-0", units[UNIT_NAME]
        assert f"Synapse runs on {UNIT_NAME} only" in units[second].workload_status.message
        listing = juju.ssh(second, "ls", "-A", DATA_DIR, container=CONTAINER_NAME).split()
        assert "homeserver.yaml" not in listing, listing
        assert synapse_health(juju, UNIT_NAME) == "OK"
        with pytest.raises(jubilant.TaskError):  # nothing listens on unit 1's port
            synapse_health(juju, second)
        backup_id = str(backup.results["backup-id"])
        for action, params in [
            ("create-backup", {}),
            ("verify-backup", {"backup-id": backup_id}),
            ("restore-backup", {"backup-id": backup_id}),
        ]:
            refused = run_failing_action(juju, second, action, params)
            assert f"Synapse runs on {UNIT_NAME} only" in refused.message, refused
    finally:
        juju.remove_unit(backup_configured, num_units=1)

    def one_unit_active(status: jubilant.Status) -> bool:
        return len(status.apps[backup_configured].units) == 1 and _app_active(status)

    status = juju.wait(one_unit_active, error=_app_error, timeout=10 * 60)
    assert list(status.apps[backup_configured].units) == [UNIT_NAME]
    wait_for_health(juju, UNIT_NAME)


# ------------------------------------------------ restore into a second model


@pytest.fixture(scope="module")
def restore_juju(
    settings: IntegrationSettings, juju: jubilant.Juju, request: pytest.FixtureRequest
) -> Iterator[jubilant.Juju]:
    """Create a second temporary model, as if the first cluster were lost.

    Args:
        settings: the checked settings.
        juju: the first model (on the same controller, already checked to be Kubernetes).
        request: the pytest request (to print the debug log after a failure).

    Yields:
        The second model.
    """
    with jubilant.temp_model(keep=settings.keep_models, controller=settings.controller) as other:
        other.wait_timeout = DEPLOY_TIMEOUT
        yield other
        if request.session.testsfailed:
            print(other.debug_log(limit=1000), end="")


@pytest.fixture(scope="module")
def restore_config(
    restore_juju: jubilant.Juju, settings: IntegrationSettings, passphrase: str, s3_prefix: str
) -> dict[str, str]:
    """Add the same S3 credentials and passphrase as secrets in the second model.

    Args:
        restore_juju: the second model.
        settings: the checked settings.
        passphrase: the passphrase of the first model's backups.
        s3_prefix: the first model's prefix in the bucket (its backups are there).

    Returns:
        The backup configuration, the same bucket and path as the first model's;
        the secrets are granted to no application yet.
    """
    credentials_uri = restore_juju.add_secret(
        "synapse-s3-credentials",
        {"access-key": settings.s3.access_key, "secret-key": settings.s3.secret_key},
    )
    passphrase_uri = restore_juju.add_secret(
        "synapse-backup-passphrase", {"passphrase": passphrase}
    )
    config = {
        "s3-credentials": str(credentials_uri),
        "backup-passphrase": str(passphrase_uri),
        "s3-bucket": settings.s3.bucket,
        "s3-endpoint": settings.s3.endpoint,
        "s3-path": s3_prefix,
        "s3-uri-style": "path",
    }
    if settings.s3.region:
        config["s3-region"] = settings.s3.region
    return config


def deploy_configured(
    juju: jubilant.Juju,
    settings: IntegrationSettings,
    config: dict[str, str],
    app: str,
    server_name: str,
) -> str:
    """Deploy the charm with a server name, grant the secrets, configure backups; wait active.

    Args:
        juju: the model.
        settings: the checked settings.
        config: the backup configuration (secrets already in the model).
        app: the application's name.
        server_name: its server name.

    Returns:
        The name of its unit.
    """
    juju.deploy(
        settings.charm_file,
        app,
        resources={"synapse-image": settings.image},
        config={"server-name": server_name},
    )
    juju.grant_secret(config["s3-credentials"], app)
    juju.grant_secret(config["backup-passphrase"], app)
    juju.config(app, config)
    juju.wait(
        lambda status: jubilant.all_active(status, app) and jubilant.all_agents_idle(status, app),
        error=lambda status: jubilant.any_error(status, app),
    )
    return f"{app}/0"


@pytest.fixture(scope="module")
def fresh_unit(
    restore_juju: jubilant.Juju, settings: IntegrationSettings, restore_config: dict[str, str]
) -> str:
    """Deploy a fresh Synapse with the first one's server name in the second model.

    Args:
        restore_juju: the second model.
        settings: the checked settings.
        restore_config: the same backup configuration as the first model's.

    Returns:
        Its unit.
    """
    return deploy_configured(restore_juju, settings, restore_config, APP_NAME, SERVER_NAME)


@pytest.fixture(scope="module")
def other_unit(
    restore_juju: jubilant.Juju, settings: IntegrationSettings, restore_config: dict[str, str]
) -> str:
    """Deploy a Synapse with another server name in the second model.

    Args:
        restore_juju: the second model.
        settings: the checked settings.
        restore_config: the same backup configuration as the first model's.

    Returns:
        Its unit.
    """
    return deploy_configured(
        restore_juju, settings, restore_config, OTHER_APP_NAME, OTHER_SERVER_NAME
    )


def test_restore_into_a_new_model(
    juju: jubilant.Juju, backup: BackupRun, restore_juju: jubilant.Juju, fresh_unit: str
) -> None:
    """A fresh deployment with the same server name comes back with the original's identity."""
    backup_id = backup.results["backup-id"]
    original_key = signing_key(juju, UNIT_NAME)
    fresh_key = signing_key(restore_juju, fresh_unit)
    assert fresh_key != original_key, "the fresh deployment already has the original's key"
    assert backup_id in listed_backup_ids(restore_juju, fresh_unit)

    task = restore_juju.run(
        fresh_unit, "restore-backup", {"backup-id": backup_id}, wait=BACKUP_ACTION_TIMEOUT
    )

    assert task.results["backup-id"] == backup_id, task
    assert int(task.results["file-count"]) == int(backup.results["file-count"]), task
    assert int(task.results["size"]) == int(backup.results["size"]), task
    assert task.results["previous-data"] == "removed", task
    restore_juju.wait(
        lambda status: jubilant.all_active(status, APP_NAME),
        error=lambda status: jubilant.any_error(status, APP_NAME),
    )
    wait_for_health(restore_juju, fresh_unit)
    assert signing_key(restore_juju, fresh_unit) == original_key
    assert restore_leftovers(restore_juju, fresh_unit) == []


def test_restore_refuses_another_server_name(
    backup: BackupRun, restore_juju: jubilant.Juju, other_unit: str
) -> None:
    """Without force, a backup of another server name is refused and the live data kept."""
    backup_id = backup.results["backup-id"]
    key_before = signing_key(restore_juju, other_unit)

    task = run_failing_action(restore_juju, other_unit, "restore-backup", {"backup-id": backup_id})

    assert SERVER_NAME in task.message, task
    assert OTHER_SERVER_NAME in task.message, task
    assert "force=true" in task.message, task
    assert signing_key(restore_juju, other_unit) == key_before
    assert restore_leftovers(restore_juju, other_unit) == []
    wait_for_health(restore_juju, other_unit)
