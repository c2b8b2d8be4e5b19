"""Backup actions and S3 configuration status.

The one place where backup errors become action failures (event.fail) and
configuration problems become a Blocked status.
"""

from __future__ import annotations

import functools
import logging

import ops

import backup
import synapse
from charm_state import BackupConfig, CharmConfig, InvalidConfigError, load_backup_config

logger = logging.getLogger(__name__)

NOT_CONFIGURED = (
    "backups are not configured: set s3-bucket, s3-endpoint (or s3-region), "
    "s3-credentials and backup-passphrase"
)


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
        framework.observe(charm.on.collect_unit_status, self._on_collect_unit_status)

    @functools.cached_property
    def _config(self) -> CharmConfig:
        """The charm configuration, loaded once per event."""
        return self._charm.load_config(CharmConfig)

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

    def _on_create_backup(self, event: ops.ActionEvent) -> None:
        """Create an encrypted backup in S3.

        Args:
            event: the action event.
        """
        try:
            config = self._backup_config()
        except InvalidConfigError as exc:
            event.fail(f"cannot back up: {exc}")
            return
        if config is None:
            event.fail(NOT_CONFIGURED)
            return
        container = self._charm.unit.get_container(synapse.CONTAINER_NAME)
        if not container.can_connect():
            event.fail("cannot back up: the synapse container is not reachable yet")
            return
        if not container.exists(backup.SYNAPSE_CONFIG_PATH):
            event.fail("cannot back up: Synapse has not been configured yet (set server-name)")
            return
        backup_id = backup.new_backup_id()
        event.log(f"creating backup {backup_id}")
        try:
            manifest = backup.run_backup(
                container,
                config.s3,
                backup_id,
                config.passphrase,
                metadata={
                    "server-name": self._config.server_name or "",
                    "synapse-version": synapse.version(container),
                    "charm-version": synapse.charm_version(self._charm.charm_dir),
                },
                log=event.log,
            )
        except backup.BackupError as exc:
            logger.error("backup %s failed: %s", backup_id, exc)
            event.fail(f"backup {backup_id} failed: {exc}")
            return
        event.log(f"backup {backup_id} committed")
        event.set_results(
            {
                "backup-id": manifest.backup_id,
                "size": manifest.size,
                "duration": manifest.duration,
                "file-count": manifest.file_count,
            }
        )
