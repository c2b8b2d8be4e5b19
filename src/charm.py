#!/usr/bin/env python3
"""Charm for the Matrix Synapse homeserver with encrypted S3 backups."""

from __future__ import annotations

import logging
import re

import ops

import backup
import synapse
from backup_observer import BackupObserver

logger = logging.getLogger(__name__)

# A DNS name or IP literal, with an optional port (Synapse's server_name).
SERVER_NAME_PATTERN = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")


class SynapseCharm(ops.CharmBase):
    """Runs Synapse and composes the backup observer."""

    def __init__(self, framework: ops.Framework):
        """Observe the workload's events and compose the observers.

        Args:
            framework: the ops framework.
        """
        super().__init__(framework)
        self.container = self.unit.get_container(synapse.CONTAINER_NAME)
        # Before the backup observer's: of two Blocked statuses the first
        # added is shown, and the workload's come first.
        framework.observe(self.on.collect_unit_status, self._on_collect_unit_status)
        self.backup = BackupObserver(self)
        framework.observe(self.on.synapse_pebble_ready, self._reconcile)
        framework.observe(self.on.config_changed, self._reconcile)
        framework.observe(self.on.upgrade_charm, self._reconcile)
        framework.observe(self.on.update_status, self._reconcile)

    def _server_name_problem(self) -> str | None:
        """Say what is wrong with server-name, if anything.

        Returns:
            The Blocked message, or None when server-name can be used.
        """
        server_name = str(self.config.get("server-name") or "")
        if not server_name:
            return "set server-name (the homeserver's public name)"
        if not SERVER_NAME_PATTERN.fullmatch(server_name):
            return f"server-name: {server_name!r} is not a host name"
        if self.container.can_connect():
            try:
                current = synapse.configured_server_name(self.container)
            except synapse.SynapseError as exc:
                return f"Synapse configuration unreadable: {exc}"
            if current and current != server_name:
                return f"server-name: Synapse was set up as {current!r}; it cannot change"
        return None

    def _extra_unit_problem(self) -> str | None:
        """Say why this unit should not be here, if it should not.

        Synapse runs on unit 0 only (see synapse.runs_here). Another unit
        would be a second homeserver with the same name behind the same
        Service, with a database that no backup holds. Scaling down removes
        the highest units first, never unit 0, so the advice is safe; but a
        unit where an older revision ran Synapse has data of its own.

        Returns:
            The Blocked message for a unit that does not run Synapse, or None.
        """
        app = self.app.name
        if synapse.runs_here(self.unit.name):
            return None
        if self.container.can_connect() and self.container.exists(backup.SYNAPSE_CONFIG_PATH):
            return (
                f"Synapse runs on {app}/0 only; this unit's /data holds a homeserver of "
                f"its own: keep what you need of it, then juju scale-application {app} 1"
            )
        return f"Synapse runs on {app}/0 only: juju scale-application {app} 1"

    def _reconcile(self, _: ops.EventBase) -> None:
        """Generate Synapse's configuration once and keep its service running.

        A restore that a dying charm left half swapped is rolled back first;
        if that fails nothing else happens (the unit is Blocked): generating
        a configuration or starting Synapse on half-restored data would harm it.
        Then what a killed action left is swept: a work directory holds the
        passphrase, and it should not wait in the container for the next
        action. (Juju runs one hook or action of a unit at a time.)

        Only unit 0 sets Synapse up: on another unit that would make a second
        homeserver, with a signing key of its own, under the same name.
        Another unit generates nothing, and its Synapse (which an older
        revision ran on every unit) is stopped first, whatever else is wrong:
        see _hold_extra_unit.
        """
        if not self.container.can_connect():
            return
        extra_unit = not synapse.runs_here(self.unit.name)
        if extra_unit:
            self._hold_extra_unit()
        if backup.recover_interrupted_restore(self.container):
            return
        backup.sweep_leftovers(self.container)
        if extra_unit or self._server_name_problem():
            return
        if synapse.configured_server_name(self.container) is None:
            logger.info("generating the Synapse configuration")
            synapse.generate_config(self.container, str(self.config["server-name"]))
        self.container.add_layer(synapse.SERVICE_NAME, synapse.pebble_layer(), combine=True)
        self.container.replan()

    def _hold_extra_unit(self) -> None:
        """Keep Synapse stopped on a unit that must not run it, and traffic away.

        Plans a disabled stand-in for Synapse with a ready check that fails
        at once (see synapse.extra_unit_layer), and stops a Synapse that runs
        or restarts (Pebble's backoff). The unit's data stays on its volume.
        """
        if not synapse.holds_no_synapse(self.container.get_plan()):
            logger.warning("Synapse runs on unit 0 only: planned disabled on this unit")
            self.container.add_layer(
                synapse.SERVICE_NAME, synapse.extra_unit_layer(), combine=True
            )
        service = self.container.get_services(synapse.SERVICE_NAME).get(synapse.SERVICE_NAME)
        stopped = (ops.pebble.ServiceStatus.INACTIVE, ops.pebble.ServiceStatus.ERROR)
        if service is not None and service.current not in stopped:
            logger.warning("stopping Synapse: it runs on unit 0 only")
            self.container.stop(synapse.SERVICE_NAME)

    def _on_collect_unit_status(self, event: ops.CollectStatusEvent) -> None:
        """Report the workload's status.

        Args:
            event: the collect-status event.
        """
        problem = self._extra_unit_problem() or self._server_name_problem()
        if self.container.can_connect() and self.container.exists(backup.RESTORE_JOURNAL):
            event.add_status(
                ops.BlockedStatus(
                    "an interrupted restore could not be rolled back: "
                    f"see {backup.RESTORE_JOURNAL}"
                )
            )
        if problem:
            event.add_status(ops.BlockedStatus(problem))
        elif not self.container.can_connect():
            event.add_status(ops.WaitingStatus("waiting for the synapse container"))
        elif not synapse.is_ready(self.container):
            event.add_status(ops.WaitingStatus("waiting for Synapse to answer its health check"))
        else:
            event.add_status(ops.ActiveStatus())


if __name__ == "__main__":  # pragma: no cover
    ops.main(SynapseCharm)
