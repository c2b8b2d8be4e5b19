"""Incremental backup chains: which backup a new one builds on, and the state it keeps.

GNU tar's listed-incremental state of the newest backup is kept in /data (and
stored, encrypted, with each backup, so that another unit can continue a
chain). A chain grows only from the data it was made of: /data carries a
random data id, recorded in each manifest, and after a restore the one
backup the next may build on.
"""

from __future__ import annotations

import logging
import posixpath
import re
import secrets
import shlex
from collections.abc import Callable, Sequence

import ops

from backup_container import (
    AWS_COMMAND,
    AWS_DOWNLOAD_CONFIG_FILE,
    BASH_COMMAND,
    PASSPHRASE_FILE,
    _check_passphrase,
    _gpg_command,
    _remove_quietly,
    _script,
    _script_preamble,
    get_environment,
    run_in_container,
)
from backup_store import (
    BACKUP_ID_PATTERN,
    DATABASE_STATE_SUFFIX,
    SNAPSHOT_STATE_SUFFIX,
    BackupError,
    BackupManifest,
    S3Client,
    S3Error,
    S3Parameters,
)
from synapse_layout import (
    DATA_DIR,
    SYNAPSE_GROUP_ID,
    SYNAPSE_USER_ID,
)

logger = logging.getLogger(__name__)

STATE_DIR = f"{DATA_DIR}/.synapse-backup-state"
SNAPSHOT_STATE_FILE = "snapshot.snar"
DATABASE_STATE_FILE = "database.state"  # the database's fingerprint, see backup._SNAPSHOT_PROGRAM
# Which data this unit's /data holds: a random id made at its first backup and
# anew by each restore, recorded in each manifest as "data-id"; and the backup
# the last restore brought in, which the next backup may build on. A chain
# grows only from the data it was made of (see _choose_parent).
DATA_ID_FILE = f"{STATE_DIR}/data-id"
RESTORED_FROM_FILE = f"{STATE_DIR}/restored-from"
_DATA_ID_PATTERN = re.compile(r"^[0-9a-f]{8,64}$")


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
