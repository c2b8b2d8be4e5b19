"""Restoring and verifying backups.

A restore downloads, decrypts and checks the whole chain of a backup into a
staging directory beside the live data first. Only then is Synapse stopped
and the paths swapped, with a journal that a later hook uses to roll back a
swap a dying charm left half done. The previous data is kept until the
restored Synapse answers its health check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import ops

from backup_chain import (
    _renew_data_id,
)
from backup_container import (
    _COUNT_MEMBERS,
    _DIGEST_PROGRAM,
    AWS_COMMAND,
    AWS_DOWNLOAD_CONFIG_FILE,
    BASH_COMMAND,
    PASSPHRASE_FILE,
    SNAPSHOT_DIR_PREFIX,
    WORK_DIR_PREFIX,
    _check_passphrase,
    _gpg_command,
    _parse_digest,
    _relative,
    _remove_quietly,
    _script,
    _script_preamble,
    _tail,
    check_tools,
    get_environment,
    prepared_container,
    run_in_container,
)
from backup_store import (
    BackupError,
    BackupManifest,
    S3Client,
    S3Error,
    S3Parameters,
    validate_backup_key,
)
from synapse_layout import (
    DATA_DIR,
    SYNAPSE_USER_ID,
    SynapseConfigError,
    _database_in,
    _paths_in_layout,
    read_synapse_config,
)

logger = logging.getLogger(__name__)

RESTORE_STAGING_PREFIX = ".synapse-restore-"
PREVIOUS_DATA_PREFIX = ".synapse-previous-"
# Written before a swap and removed after it: a later hook rolls back what
# a dying charm left half swapped.
RESTORE_JOURNAL = f"{DATA_DIR}/.synapse-restore-journal.json"
# How long a restored Synapse has to answer its health check before the
# previous data is removed (Pebble's start only waits one second).
RESTORE_HEALTH_TIMEOUT = 600.0
RESTORE_HEALTH_INTERVAL = 5.0
DISK_BLOCK = 4096  # what a file's last block may waste, counted per member when staging
# Room the staging area needs beyond the archive's size.
STAGING_HEADROOM = 64 * 1024 * 1024
TAR_READ_RECORD = 1 << 20  # bytes tar reads at a time when it restores
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
    # Whole records of 1 MiB (a pipe gives what gpg wrote so far, hence
    # --read-full-records): with its own 10 KiB records tar reads and writes
    # in 10 KiB pieces, and spent about 12% more CPU time extracting 1 GiB
    # (see docs/explanation/performance.md).
    tar += [f"--record-size={TAR_READ_RECORD}", "--read-full-records"]
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
    extract = _script([tar])
    if staging_dir is not None:
        # Replaying a rename cycle, GNU tar (1.34) makes a temporary directory
        # relative to its working directory, not to --directory: in staging,
        # never in the live data.
        extract = "{ " + _script([["cd", "--", staging_dir]]) + " && " + extract + "; }"
    lines = _script_preamble(work_dir)
    lines += [
        " | ".join(
            [
                (downloads[0] if len(downloads) == 1 else "{ " + " && ".join(downloads) + "; }")
                + " 3>&1 >/dev/null",
                *(_script([words]) for words in (digest, gpg)),
                extract,
            ]
        ),
        "read -r sha256 size < " + shlex.quote(digest_file),
        _COUNT_MEMBERS + shlex.quote(index_file) + " || true)",
        'printf "%s %s %s\\n" "$sha256" "$size" "$members"',
    ]
    return [BASH_COMMAND, "-c", _script(lines)]


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
    container: ops.Container,
    paths: Sequence[str],
    staging_dir: str,
    previous_dir: str,
    held: Collection[str],
) -> None:
    """Move the live paths aside and the staged ones in; roll back on failure.

    A journal written first lets a later hook roll back a swap that a dying
    charm left half done (recover_interrupted_restore).

    Args:
        container: Synapse Container.
        paths: the live paths to replace.
        staging_dir: where the backup was extracted.
        previous_dir: where the live data goes.
        held: the paths the restored backup holds (its manifest's). Only
            those are moved in: extracting a chain leaves in staging what an
            older backup of it held, and a path deleted before the restored
            backup was made must stay deleted.

    Raises:
        BackupError: if a move fails; the message says whether the previous
            data is back or where it is.
    """
    held = set(held)
    staged = [path for path in paths if path in held and container.exists(staging_dir + path)]
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
        _swap_in(container, paths, staging_dir, previous_dir, manifest.paths)
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
