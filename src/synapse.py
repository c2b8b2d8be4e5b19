"""The Synapse workload: paths, Pebble layer and configuration generation."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import ops
import yaml

import synapse_layout
from backup_store import BackupError
from synapse_layout import DATA_DIR, SYNAPSE_CONFIG_PATH, SYNAPSE_GROUP_ID, SYNAPSE_USER_ID

logger = logging.getLogger(__name__)

CONTAINER_NAME = "synapse"
SERVICE_NAME = "synapse"
CHECK_NAME = "synapse-ready"
SYNAPSE_PORT = 8008
HEALTH_URL = f"http://localhost:{SYNAPSE_PORT}/health"
# One GET of the health endpoint, run in the container (python3 is in the image).
HEALTH_PROBE = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)"
GENERATE_TIMEOUT = 300.0


class SynapseError(Exception):
    """The workload could not be set up."""


def pebble_layer() -> ops.pebble.LayerDict:
    """Return the Pebble layer that runs Synapse.

    Returns:
        The layer: the Synapse service, as the Synapse user, and a readiness
        check on its /health endpoint.
    """
    return {
        "summary": "Synapse homeserver",
        "services": {
            SERVICE_NAME: {
                "override": "replace",
                "summary": "Matrix Synapse",
                "command": " ".join(
                    [
                        "python3",
                        "-m",
                        "synapse.app.homeserver",
                        "--config-path",
                        SYNAPSE_CONFIG_PATH,
                    ]
                ),
                "startup": "enabled",
                "user-id": SYNAPSE_USER_ID,
                "group-id": SYNAPSE_GROUP_ID,
                "working-dir": DATA_DIR,
                "environment": {"SYNAPSE_CONFIG_PATH": SYNAPSE_CONFIG_PATH},
            }
        },
        "checks": {
            CHECK_NAME: {
                "override": "replace",
                "level": "ready",
                "period": "10s",
                "threshold": 3,
                "http": {"url": HEALTH_URL},
            }
        },
    }


def runs_here(unit_name: str) -> bool:
    """Tell whether Synapse runs on this unit: unit 0, the one in pod 0.

    Synapse runs as one process (the charm has no workers), so one unit runs
    it. Juju runs the units of a Kubernetes charm as the pods of a
    StatefulSet and names each unit after its pod's ordinal: unit 0 is pod
    0, which scaling down (to one unit or more) never removes, with the
    volume that has held the data from the start. Leadership would not do:
    it can move to a unit with an empty volume.

    Args:
        unit_name: this unit's name, ``<app>/<number>``.

    Returns:
        True on unit 0.
    """
    return unit_name.rsplit("/", 1)[-1] == "0"


# What the service runs on a unit that must not run Synapse, should anything
# start it (a replan, by hand): nothing that listens.
STAND_IN_COMMAND = "sleep infinity"


def extra_unit_layer() -> ops.pebble.LayerDict:
    """Return the layer of a unit that must not run Synapse.

    The service is planned disabled, over the Synapse an older revision may
    have planned, and runs a stand-in that listens to nothing (Pebble's
    replan would start a disabled service whose plan changed). Synapse's
    ready check fails at its first try, as nothing answers: Juju's readiness
    probe of the workload container asks Pebble for the ready-level checks,
    so the pod is not ready and its Service sends it no traffic.

    Returns:
        The layer: the service disabled, the ready check failing after one try.
    """
    layer = pebble_layer()
    layer["summary"] = "Synapse does not run on this unit (only on unit 0)"
    service = layer["services"][SERVICE_NAME]
    service["summary"] = "stand-in: Synapse runs on unit 0 only"
    service["command"] = STAND_IN_COMMAND
    service["startup"] = "disabled"
    check = layer["checks"][CHECK_NAME]
    check["period"] = "5s"
    check["threshold"] = 1
    return layer


def holds_no_synapse(plan: ops.pebble.Plan) -> bool:
    """Tell whether a plan has the service and check of extra_unit_layer, as they are now.

    Args:
        plan: the container's plan.

    Returns:
        True when both are planned as extra_unit_layer has them.
    """
    wanted = ops.pebble.Layer(extra_unit_layer())
    service = plan.services.get(SERVICE_NAME)
    check = plan.checks.get(CHECK_NAME)
    return (
        service is not None
        and check is not None
        and service.to_dict() == wanted.services[SERVICE_NAME].to_dict()
        and check.to_dict() == wanted.checks[CHECK_NAME].to_dict()
    )


def configured_server_name(container: ops.Container) -> str | None:
    """Return the server name of the generated configuration, if any.

    Args:
        container: Synapse Container.

    Returns:
        homeserver.yaml's server_name, or None before the first start.

    Raises:
        SynapseError: if homeserver.yaml is unreadable.
    """
    if not container.exists(SYNAPSE_CONFIG_PATH):
        return None
    config = _load(container)
    name = config.get("server_name")
    return str(name) if name else None


def _load(container: ops.Container) -> dict[str, Any]:
    """Read homeserver.yaml.

    Args:
        container: Synapse Container.

    Returns:
        Its content.

    Raises:
        SynapseError: if it cannot be read or parsed.
    """
    try:
        return synapse_layout.read_synapse_config(container)  # never quotes the file's text
    except BackupError as exc:
        raise SynapseError(str(exc)) from exc


def generate_config(container: ops.Container, server_name: str) -> None:
    """Generate Synapse's configuration and signing key on first start.

    Synapse writes homeserver.yaml (SQLite database and media under /data),
    the log configuration and the signing key; the charm then makes the
    listener reachable from outside the pod.

    Args:
        container: Synapse Container.
        server_name: the homeserver's public name.

    Raises:
        SynapseError: if generation fails.
    """
    try:
        container.exec(
            ["chown", f"{SYNAPSE_USER_ID}:{SYNAPSE_GROUP_ID}", DATA_DIR], timeout=60
        ).wait_output()
        container.exec(
            [
                "python3",
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                server_name,
                "--config-path",
                SYNAPSE_CONFIG_PATH,
                "--data-directory",
                DATA_DIR,
                "--generate-config",
                "--report-stats=no",
            ],
            user_id=SYNAPSE_USER_ID,
            group_id=SYNAPSE_GROUP_ID,
            working_dir=DATA_DIR,
            timeout=GENERATE_TIMEOUT,
        ).wait_output()
    except ops.pebble.ExecError as exc:
        raise SynapseError(f"generating the Synapse configuration failed: {exc.stderr}") from exc
    except (ops.pebble.APIError, ops.pebble.ChangeError, ops.pebble.TimeoutError) as exc:
        raise SynapseError(f"generating the Synapse configuration failed: {exc}") from exc
    config = _load(container)
    for listener in config.get("listeners") or []:
        if listener.get("port") == SYNAPSE_PORT:
            listener["bind_addresses"] = ["0.0.0.0"]  # noqa: S104 - served in its pod
    container.push(
        SYNAPSE_CONFIG_PATH,
        yaml.safe_dump(config, sort_keys=False),
        permissions=0o640,
        user_id=SYNAPSE_USER_ID,
        group_id=SYNAPSE_GROUP_ID,
    )


def is_ready(container: ops.Container) -> bool:
    """Tell whether Synapse runs and answers its health check.

    Args:
        container: Synapse Container.

    Returns:
        True when the service is running and its ready check is up.
    """
    try:
        service = container.get_services(SERVICE_NAME).get(SERVICE_NAME)
        checks = container.get_checks(CHECK_NAME)
    except (ops.pebble.APIError, ops.pebble.ConnectionError):
        return False
    check = checks.get(CHECK_NAME)
    return bool(
        service
        and service.is_running()
        and check is not None
        and check.status == ops.pebble.CheckStatus.UP
    )


def answers_health(container: ops.Container) -> bool:
    """Ask Synapse's /health endpoint once, from inside the container.

    Unlike the Pebble check (up until it failed three times, 30 s apart),
    this says whether Synapse answers now.

    Args:
        container: Synapse Container.

    Returns:
        True when it answered with success.
    """
    try:
        container.exec(["python3", "-c", HEALTH_PROBE, HEALTH_URL], timeout=15).wait_output()
    except ops.pebble.Error as exc:  # the probe failed or Pebble did: not an answer
        logger.debug("Synapse does not answer its health check: %s", exc)
        return False
    return True


def version(container: ops.Container) -> str:
    """Return the Synapse version installed in the container.

    Args:
        container: Synapse Container.

    Returns:
        The version, or "unknown" when it cannot be read.
    """
    try:
        stdout, _ = container.exec(
            ["python3", "-c", "import synapse; print(synapse.__version__)"], timeout=60
        ).wait_output()
    except (
        ops.pebble.APIError,
        ops.pebble.ChangeError,
        ops.pebble.ExecError,
        ops.pebble.TimeoutError,
    ) as exc:
        logger.warning("cannot read the Synapse version: %s", exc)
        return "unknown"
    return stdout.strip() or "unknown"


def charm_version(charm_dir: pathlib.Path) -> str:
    """Return the charm's version, as charmcraft records it when packing.

    Args:
        charm_dir: the charm's directory.

    Returns:
        The content of its version file, or "unknown".
    """
    try:
        return (charm_dir / "version").read_text().strip() or "unknown"
    except OSError:
        return "unknown"
