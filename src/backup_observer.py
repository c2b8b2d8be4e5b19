"""Backup actions and S3 configuration status.

The one place where backup errors become action failures (event.fail) and
configuration problems become a Blocked status.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection

import ops
from pydantic import ValidationError

import backup
import retention
import synapse
from charm_state import BackupConfig, CharmConfig, InvalidConfigError, load_backup_config

logger = logging.getLogger(__name__)

# Juju passes each result as one argument: keep the table well under 128 KiB.
FORMATTED_ROWS = 100
FORMATTED_INCOMPLETE = 20  # ids of incomplete backups named in the table
# ... and all the results together well under the 2 MiB of one command line
# (about 330 bytes a backup): the newest this many backups and ids are in results.
RESULT_BACKUPS = 1000
NOT_CONFIGURED = (
    "backups are not configured: set s3-bucket, s3-endpoint (or s3-region), "
    "s3-credentials and backup-passphrase"
)
# Actions that use the workload container run on the unit that runs Synapse
# (see synapse.runs_here): it has the data, and one unit writes the backups
# under s3-path (two would interleave chains of two /data volumes, race on
# backup ids, and run retention against each other).
NOT_SYNAPSE_UNIT = "cannot {what}: Synapse runs on {app}/0 only; run the action there"


@dataclasses.dataclass(frozen=True)
class BackupIdParams:
    """Parameters of the actions that take a backup id.

    Attributes:
        backup_id: the backup, as list-backups shows it.
    """

    backup_id: str

    def __post_init__(self) -> None:
        """Check the id, so that no other string reaches a shell or an S3 key.

        Raises:
            ValueError: if it is not a backup id.
        """
        if not backup.BACKUP_ID_PATTERN.fullmatch(self.backup_id):
            raise ValueError("backup-id must be a backup id such as 20261126T120000Z")


@dataclasses.dataclass(frozen=True)
class CreateParams:
    """Parameters of create-backup.

    Attributes:
        type: "full", "incremental", or "auto" when not given.
    """

    type: str = "auto"

    def __post_init__(self) -> None:
        """Check the type.

        Raises:
            ValueError: if it is not full or incremental.
        """
        if self.type not in ("auto", "full", "incremental"):
            raise ValueError("type must be full or incremental")


@dataclasses.dataclass(frozen=True)
class DeleteParams(BackupIdParams):
    """Parameters of delete-backup.

    Attributes:
        chain: also delete the backups that depend on this one.
        force: remove what a backup without a manifest left, even if it
            started so recently that it may still be running.
    """

    chain: bool = False
    force: bool = False


@dataclasses.dataclass(frozen=True)
class RestoreParams(BackupIdParams):
    """Parameters of restore-backup.

    Attributes:
        force: restore a backup of another server name, or one made by a newer Synapse.
        keep_previous: keep the replaced data.
    """

    force: bool = False
    keep_previous: bool = False


def format_backups(manifests: list[backup.BackupManifest], expiring: Collection[str] = ()) -> str:
    """Render backups as a table.

    Args:
        manifests: the backups, newest first.
        expiring: the backups retention removes after the next full backup.

    Returns:
        The table.
    """
    rows = [("backup-id", "created-at", "size", "files", "server-name", "type", "parent", "")]
    rows += [
        (
            manifest.backup_id,
            manifest.created_at,
            str(manifest.size),
            str(manifest.file_count),
            manifest.metadata.get("server-name", ""),
            manifest.backup_type,
            manifest.parent or "-",
            "expires after the next full backup" if manifest.backup_id in expiring else "",
        )
        for manifest in manifests
    ]
    hidden = len(rows) - 1 - FORMATTED_ROWS
    rows = rows[: FORMATTED_ROWS + 1]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    if hidden > 0:
        listed = "all" if len(manifests) <= RESULT_BACKUPS else f"the newest {RESULT_BACKUPS}"
        lines.append(f"... and {hidden} older backups ({listed} are in the backups result)")
    return "\n".join(lines) if manifests else "no backups"


def _some(ids: list[str], most: int) -> str:
    """Join at most some ids, saying how many more there are.

    Args:
        ids: the ids.
        most: how many to name.

    Returns:
        The ids named, and "and N more" when some were left out.
    """
    shown = ", ".join(ids[:most])
    if len(ids) > most:
        shown += f" and {len(ids) - most} more"
    return shown


class BackupObserver(ops.Object):
    """Handles the backup actions and reports the backup configuration's status."""

    def __init__(self, charm: ops.CharmBase):
        """Observe the backup events.

        Args:
            charm: the charm.
        """
        super().__init__(charm, "backup")
        self._charm = charm
        framework = charm.framework
        framework.observe(charm.on.create_backup_action, self._on_create_backup)
        framework.observe(charm.on.list_backups_action, self._on_list_backups)
        framework.observe(charm.on.restore_backup_action, self._on_restore_backup)
        framework.observe(charm.on.delete_backup_action, self._on_delete_backup)
        framework.observe(charm.on.verify_backup_action, self._on_verify_backup)
        framework.observe(charm.on.collect_unit_status, self._on_collect_unit_status)

    @property
    def _config(self) -> CharmConfig:
        """The charm configuration as it is now.

        Not cached: a charm object can outlive a configuration change.

        Raises:
            InvalidConfigError: naming the option Juju gave a value we refuse.
        """
        try:
            return self._charm.load_config(CharmConfig)
        except ValidationError as exc:
            error = exc.errors()[0]
            option = str(error["loc"][0]).replace("_", "-") if error["loc"] else "config"
            raise InvalidConfigError(option, error["msg"]) from None

    def _backup_config(self) -> BackupConfig | None:
        """Return the backup configuration.

        Returns:
            The configuration, or None when no backup option is set.

        Raises:
            InvalidConfigError: naming the option to fix.
        """
        return load_backup_config(self._config)

    def _on_collect_unit_status(self, event: ops.CollectStatusEvent) -> None:
        """Block on backup settings the operator must fix.

        Args:
            event: the collect-status event.
        """
        try:
            config = self._backup_config()
        except InvalidConfigError as exc:
            event.add_status(ops.BlockedStatus(str(exc)))
            return
        if config is None:
            return
        try:
            backup.S3Client(config.s3).check_bucket()
        except backup.S3Error as exc:
            event.add_status(ops.BlockedStatus(f"{exc.option or 's3-bucket'}: {exc}"))

    def _ready_config(self, event: ops.ActionEvent, what: str) -> BackupConfig | None:
        """Return the backup configuration, or fail the action saying what is missing.

        Args:
            event: the action event.
            what: the action's verb, for messages.

        Returns:
            The configuration, or None when the action was failed.
        """
        try:
            config = self._backup_config()
        except InvalidConfigError as exc:
            event.fail(f"cannot {what}: {exc}")
            return None
        if config is None:
            event.fail(NOT_CONFIGURED)
        return config

    def _ready_container(self, event: ops.ActionEvent, what: str) -> ops.Container | None:
        """Return the workload container, or fail the action if it cannot be used.

        Args:
            event: the action event.
            what: the action's verb, for messages.

        Returns:
            The container, or None when the action was failed.
        """
        container = self._charm.unit.get_container(synapse.CONTAINER_NAME)
        if not container.can_connect():
            event.fail(f"cannot {what}: the synapse container is not reachable yet")
            return None
        interrupted = container.exists(backup.RESTORE_JOURNAL)
        problem = backup.recover_interrupted_restore(container)
        if problem:
            event.fail(f"cannot {what}: {problem}")
            return None
        if interrupted:  # the previous data is back: Synapse runs on it again, now
            event.log("rolled back an interrupted restore; starting Synapse again")
            try:
                container.replan()
            except ops.pebble.Error as exc:  # the action goes on: a restore may be the cure
                logger.warning("Synapse did not start after the roll-back: %s", exc)
                event.log(f"Synapse did not start again: {exc}")
        backup.sweep_leftovers(container)
        if not container.exists(backup.SYNAPSE_CONFIG_PATH):
            event.fail(f"cannot {what}: Synapse has not been configured yet (set server-name)")
            return None
        return container

    def _ready(
        self, event: ops.ActionEvent, what: str
    ) -> tuple[BackupConfig, ops.Container] | None:
        """Return the backup configuration and the container, or fail the action.

        Only the unit that runs Synapse gets them (see NOT_SYNAPSE_UNIT).

        Args:
            event: the action event.
            what: the action's verb, for messages.

        Returns:
            Both, or None when the action was failed.
        """
        if not synapse.runs_here(self._charm.unit.name):
            event.fail(NOT_SYNAPSE_UNIT.format(what=what, app=self._charm.app.name))
            return None
        config = self._ready_config(event, what)
        container = self._ready_container(event, what) if config else None
        if config is None or container is None:
            return None
        return config, container

    def _on_create_backup(self, event: ops.ActionEvent) -> None:
        """Create an encrypted backup in S3, then apply retention.

        Args:
            event: the action event.
        """
        params = event.load_params(CreateParams, errors="fail")
        ready = self._ready(event, "back up")
        if ready is None:
            return
        config, container = ready
        backup_id = backup.new_backup_id()
        event.log(f"creating backup {backup_id}")
        try:
            manifest = backup.run_backup(
                container,
                config.s3,
                backup_id,
                config.passphrase,
                backup_type=params.type,
                metadata={
                    "server-name": self._config.server_name or "",
                    "synapse-version": synapse.version(container),
                    "charm-version": synapse.charm_version(self._charm.charm_dir),
                    "deployment": self._deployment,
                },
                log=event.log,
            )
        except backup.BackupError as exc:
            logger.error("backup %s failed: %s", backup_id, exc)
            event.fail(f"backup {backup_id} failed: {exc}")
            return
        event.log(f"backup {backup_id} committed")
        results: dict[str, object] = {
            "backup-id": manifest.backup_id,
            "type": manifest.backup_type,
            "parent": manifest.parent or "none",
            "size": manifest.size,
            "duration": manifest.duration,
            "file-count": manifest.file_count,
        }
        results.update(self._apply_retention(config, event, manifest))
        event.set_results(results)

    def _apply_retention(
        self, config: BackupConfig, event: ops.ActionEvent, manifest: backup.BackupManifest
    ) -> dict[str, str]:
        """Delete this deployment's chains that backup-retention-count no longer keeps.

        A failure here does not undo the backup: it is reported in the results.
        The new backup's own chain is never deleted, and nothing is deleted
        after a backup that lacks the database Synapse's configuration names:
        the older backups may be the only ones that have it.

        Args:
            config: the backup configuration.
            event: the action event, for progress messages.
            manifest: the backup just made.

        Returns:
            Results to add: what retention removed, or why it did not.
        """
        keep = self._config.backup_retention_count
        if not keep:
            return {}
        if manifest.metadata.get("database-missing"):
            event.log("retention: skipped, this backup holds no database")
            return {"retention-skipped": "this backup holds no database"}
        new_backup = manifest.backup_id
        client = backup.S3Client(config.s3)
        deployment = self._deployment
        try:
            listing = client.listing(strict=True)
            own = [
                manifest
                for manifest in listing.backups
                if manifest.metadata.get("deployment", deployment) == deployment
            ]
            roots = retention.chain_roots(own)
            doomed = [
                backup_id
                for backup_id in retention.expired(own, keep, links=listing.links)
                if roots[backup_id] != roots.get(new_backup)
            ]
            for backup_id in doomed:
                event.log(f"retention: deleting {backup_id}")
                client.delete_backup_objects(backup_id)
        except backup.S3Error as exc:
            logger.error("retention failed: %s", exc)
            return {"retention-error": str(exc)}
        return {"retention-removed": " ".join(doomed) or "none"}

    @property
    def _deployment(self) -> str:
        """This deployment's id in manifests: the model's UUID and the application."""
        return f"{self.model.uuid}/{self.model.app.name}"

    def _on_list_backups(self, event: ops.ActionEvent) -> None:
        """List the complete backups, newest first.

        Args:
            event: the action event.
        """
        config = self._ready_config(event, "list backups")
        if config is None:
            return
        event.log(f"listing {config.s3.object_url('')}")
        try:
            client = backup.S3Client(config.s3)
            listing = client.listing()
            manifests = listing.backups
            unlisted = client.unlisted_backups([m.backup_id for m in manifests])
        except backup.S3Error as exc:
            event.fail(f"cannot list backups: {exc}")
            return
        deployment = self._deployment
        own = [m for m in manifests if m.metadata.get("deployment", deployment) == deployment]
        keep = self._config.backup_retention_count
        next_id = backup.new_backup_id()  # ranked as the next backup will be, clock and all
        expiring = set(retention.expire_after_next_full(own, keep, next_id, links=listing.links))
        formatted = format_backups(manifests, expiring)
        incomplete, unreadable = unlisted.incomplete, unlisted.unreadable
        if incomplete:
            formatted += (
                "\nincomplete, not backups (a failed backup, objects changed behind the "
                "charm's back, or a backup still running; delete-backup removes them): "
                + _some(incomplete, FORMATTED_INCOMPLETE)
            )
        for backup_id, problem in list(unreadable.items())[:FORMATTED_INCOMPLETE]:
            formatted += f"\nnot listed, its manifest cannot be used now: {backup_id}: {problem}"
        if len(unreadable) > FORMATTED_INCOMPLETE:
            formatted += f"\n... and {len(unreadable) - FORMATTED_INCOMPLETE} more not listed"
        event.set_results(
            {
                "formatted": formatted,
                "count": len(manifests),
                "incomplete": " ".join(incomplete[:RESULT_BACKUPS]) or "none",
                "incomplete-count": len(incomplete),
                "unreadable": " ".join(list(unreadable)[:RESULT_BACKUPS]) or "none",
                "unreadable-count": len(unreadable),
                "backups": {
                    str(index): {
                        "id": manifest.backup_id,
                        "created-at": manifest.created_at,
                        "size": manifest.size,
                        "server-name": manifest.metadata.get("server-name", ""),
                        "type": manifest.backup_type,
                        "parent": manifest.parent or "none",
                        "expires-after-next-full": manifest.backup_id in expiring,
                    }
                    for index, manifest in enumerate(manifests[:RESULT_BACKUPS], start=1)
                },
            }
        )

    def _on_delete_backup(self, event: ops.ActionEvent) -> None:
        """Delete a backup.

        Args:
            event: the action event.
        """
        params = event.load_params(DeleteParams, errors="fail")
        config = self._ready_config(event, "delete the backup")
        if config is None:
            return
        try:
            deleted = backup.S3Client(config.s3).delete_backup(
                params.backup_id, chain=params.chain, force=params.force
            )
        except backup.S3Error as exc:
            event.fail(f"cannot delete backup {params.backup_id}: {exc}")
            return
        event.set_results({"deleted": " ".join(deleted)})

    def _on_verify_backup(self, event: ops.ActionEvent) -> None:
        """Download, check, decrypt and list a backup without touching live data.

        Args:
            event: the action event.
        """
        params = event.load_params(BackupIdParams, errors="fail")
        ready = self._ready(event, "verify the backup")
        if ready is None:
            return
        config, container = ready
        try:
            check = backup.verify_backup(
                container, config.s3, params.backup_id, config.passphrase, log=event.log
            )
        except backup.BackupError as exc:
            event.fail(f"cannot verify backup {params.backup_id}: {exc}")
            return
        event.set_results(
            {
                "backup-id": params.backup_id,
                "file-count": check.file_count,
                "size": check.size,
                "sha256": check.sha256,
                "matches-manifest": check.matches,
                "mismatch": check.mismatch() or "none",
            }
        )

    def _on_restore_backup(self, event: ops.ActionEvent) -> None:
        """Restore a backup; Synapse is started again in every outcome.

        Args:
            event: the action event.
        """
        params = event.load_params(RestoreParams, errors="fail")
        ready = self._ready(event, "restore")
        if ready is None:
            return
        config, container = ready
        event.log(f"restoring backup {params.backup_id}")
        try:
            server_name = self._config.server_name or synapse.configured_server_name(container)
        except synapse.SynapseError as exc:
            event.fail(f"cannot restore: {exc}")
            return
        try:
            result = backup.run_restore(
                container,
                config.s3,
                params.backup_id,
                config.passphrase,
                server_name=server_name,
                force=params.force,
                keep_previous=params.keep_previous,
                service=synapse.SERVICE_NAME,
                log=event.log,
                synapse_version=synapse.version(container),
                healthy=lambda: synapse.answers_health(container),
            )
        except backup.BackupError as exc:
            logger.error("restore of %s failed: %s", params.backup_id, exc)
            event.fail(f"restore of {params.backup_id} failed: {exc}")
            return
        event.set_results(
            {
                "backup-id": result.backup_id,
                "file-count": result.file_count,
                "size": result.size,
                "previous-data": result.previous_dir or "removed",
            }
        )
