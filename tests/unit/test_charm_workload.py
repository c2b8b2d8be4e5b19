"""Setting up the workload: configuration generation, Pebble layer and replan."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any
from unittest import mock

import ops
import pytest
import yaml
from ops import testing

import backup
import synapse
from tests.unit.builders import SERVER_NAME, homeserver_yaml, make_state

CHOWN = ["chown", "991:991", "/data"]
GENERATE_PREFIX = ["python3", "-m", "synapse.app.homeserver"]


def _generate_argv(server_name: str) -> list[str]:
    return [
        "python3",
        "-m",
        "synapse.app.homeserver",
        "--server-name",
        server_name,
        "--config-path",
        "/data/homeserver.yaml",
        "--data-directory",
        "/data",
        "--generate-config",
        "--report-stats=no",
    ]


GENERATE_EXECS = (testing.Exec(CHOWN), testing.Exec(GENERATE_PREFIX))

Event = Callable[[testing.Context, testing.State], Any]


def _event(name: str) -> Event:
    def build(ctx: testing.Context, state: testing.State) -> Any:
        if name == "pebble_ready":
            return ctx.on.pebble_ready(state.get_container(synapse.CONTAINER_NAME))
        return getattr(ctx.on, name)()

    return build


RECONCILING_EVENTS = [
    pytest.param(_event("pebble_ready"), id="pebble-ready"),
    pytest.param(_event("config_changed"), id="config-changed"),
    pytest.param(_event("upgrade_charm"), id="upgrade-charm"),
    pytest.param(_event("update_status"), id="update-status"),
]


@pytest.fixture
def synapse_writes_config(monkeypatch: pytest.MonkeyPatch, data_dir: pathlib.Path) -> None:
    """Make the generate-config command write homeserver.yaml, as Synapse does.

    Scenario's Exec returns canned output only and cannot write files, so this
    wraps Container.exec: the command still goes through Scenario (and into
    ctx.exec_history); when it is the generate-config command, the file
    Synapse would have written appears in the mounted /data.
    """
    original = ops.Container.exec

    def exec_and_generate(self: ops.Container, command: list[str], **kwargs: Any) -> Any:
        process = original(self, command, **kwargs)
        if "--generate-config" in command:
            server_name = command[command.index("--server-name") + 1]
            (data_dir / "homeserver.yaml").write_text(homeserver_yaml(server_name))
        return process

    monkeypatch.setattr(ops.Container, "exec", exec_and_generate)


def _assert_synapse_planned(container: testing.Container) -> None:
    plan = container.plan
    service = plan.services[synapse.SERVICE_NAME]
    assert service.command == (
        "python3 -m synapse.app.homeserver --config-path /data/homeserver.yaml"
    )
    assert service.user_id == 991
    assert service.group_id == 991
    assert service.startup == "enabled"
    check = plan.checks[synapse.CHECK_NAME]
    assert check.level == ops.pebble.CheckLevel.READY
    assert check.http == {"url": "http://localhost:8008/health"}
    # replan started the service.
    assert container.service_statuses[synapse.SERVICE_NAME] == ops.pebble.ServiceStatus.ACTIVE


@pytest.mark.usefixtures("synapse_writes_config")
@pytest.mark.parametrize("event", RECONCILING_EVENTS)
def test_first_start_generates_config(ctx: testing.Context, data_dir: pathlib.Path, event: Event):
    """The first start generates homeserver.yaml, opens the listener and plans Synapse.

    Arrange: a server-name, an empty /data and canned chown and generate commands.
    Act: run an event that reconciles the workload.
    Assert: /data is chowned to the Synapse user, then Synapse generates its config for
        the server name as that user; the client listener binds all addresses; the layer
        with the service (user-id 991) and the ready check is planned; the unit is Active.
    """
    state = make_state(data_dir, {"server-name": SERVER_NAME}, planned=False, execs=GENERATE_EXECS)

    out = ctx.run(event(ctx, state), state)

    chown, generate = ctx.exec_history[synapse.CONTAINER_NAME]
    assert chown.command == CHOWN
    assert generate.command == _generate_argv(SERVER_NAME)
    assert (generate.user_id, generate.group_id) == (991, 991)
    assert generate.working_dir == "/data"
    config = yaml.safe_load((data_dir / "homeserver.yaml").read_text())
    assert config["server_name"] == SERVER_NAME
    client, metrics = config["listeners"]
    assert client["port"] == 8008
    assert client["bind_addresses"] == ["0.0.0.0"]
    assert client["resources"] == [{"names": ["client", "federation"], "compress": False}]
    assert metrics["bind_addresses"] == ["127.0.0.1"]
    assert (data_dir / "homeserver.yaml").stat().st_mode & 0o777 == 0o640
    container = out.get_container(synapse.CONTAINER_NAME)
    assert synapse.SERVICE_NAME in container.layers
    _assert_synapse_planned(container)
    assert out.unit_status == ops.ActiveStatus()


EXTRA_UNIT = "Synapse runs on synapse/0 only: juju scale-application synapse 1"
EXTRA_UNIT_WITH_DATA = (
    "Synapse runs on synapse/0 only; this unit's /data holds a homeserver of its own: "
    "keep what you need of it, then juju scale-application synapse 1"
)


def _assert_synapse_held(container: testing.Container) -> None:
    """A disabled stand-in is planned, nothing runs; the ready check fails at the first try."""
    service = container.plan.services[synapse.SERVICE_NAME]
    assert service.startup == "disabled"
    assert service.command == "sleep infinity"
    check = container.plan.checks[synapse.CHECK_NAME]
    assert check.level == ops.pebble.CheckLevel.READY
    assert check.http == {"url": "http://localhost:8008/health"}
    assert (check.threshold, check.period) == (1, "5s")
    assert container.service_statuses.get(synapse.SERVICE_NAME) in (
        None,
        ops.pebble.ServiceStatus.INACTIVE,
    )


@pytest.mark.usefixtures("synapse_writes_config")
@pytest.mark.parametrize("event", RECONCILING_EVENTS)
@pytest.mark.parametrize("leader", [True, False], ids=["leader", "not-leader"])
def test_unit_1_makes_no_second_homeserver(
    extra_ctx: testing.Context, data_dir: pathlib.Path, event: Event, leader: bool
):
    """A unit added by scaling out generates no configuration and runs no Synapse.

    Arrange: a server-name, an empty /data, unit 1 (leader or not), canned
        generate commands.
    Act: run an event that reconciles the workload.
    Assert: nothing ran (no configuration, no signing key of its own);
        Synapse is planned disabled with a ready check that fails at once,
        which keeps the pod out of the Service; Blocked with advice that never
        removes unit 0.
    """
    state = make_state(
        data_dir,
        {"server-name": SERVER_NAME},
        planned=False,
        execs=GENERATE_EXECS,
        leader=leader,
    )

    out = extra_ctx.run(event(extra_ctx, state), state)

    assert extra_ctx.exec_history == {}
    assert list(data_dir.iterdir()) == []
    _assert_synapse_held(out.get_container(synapse.CONTAINER_NAME))
    assert out.unit_status == ops.BlockedStatus(EXTRA_UNIT)


def test_unit_1_plans_its_layer_once(extra_ctx: testing.Context, data_dir: pathlib.Path):
    """Each update-status leaves the plan alone: no new layer that restarts the check."""
    state = make_state(data_dir, {"server-name": SERVER_NAME}, planned=False)
    first = extra_ctx.run(extra_ctx.on.update_status(), state)
    _assert_synapse_held(first.get_container(synapse.CONTAINER_NAME))

    with mock.patch.object(ops.Container, "add_layer") as add_layer:
        extra_ctx.run(extra_ctx.on.update_status(), first)

    add_layer.assert_not_called()


@pytest.mark.parametrize("event", RECONCILING_EVENTS)
def test_unit_1_stops_the_synapse_an_older_revision_ran(
    extra_ctx: testing.Context, configured_data_dir: pathlib.Path, event: Event
):
    """Where an older revision ran Synapse on every unit, unit 1's is stopped; its data stays.

    Arrange: unit 1 with a homeserver.yaml of its own, Synapse planned and running.
    Act: run an event that reconciles the workload.
    Assert: no command ran; Synapse is stopped and planned disabled; the data
        is untouched; Blocked, saying this unit holds a homeserver of its own.
    """
    before = (configured_data_dir / "homeserver.yaml").read_text()
    state = make_state(configured_data_dir, {"server-name": SERVER_NAME})

    out = extra_ctx.run(event(extra_ctx, state), state)

    assert extra_ctx.exec_history == {}
    _assert_synapse_held(out.get_container(synapse.CONTAINER_NAME))
    assert (configured_data_dir / "homeserver.yaml").read_text() == before
    assert out.unit_status == ops.BlockedStatus(EXTRA_UNIT_WITH_DATA)


@pytest.mark.parametrize("event", RECONCILING_EVENTS)
@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="no-server-name"),
        pytest.param({"server-name": "other.example.org"}, id="server-name-changed"),
    ],
)
def test_unit_1_is_held_whatever_else_is_wrong(
    extra_ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    event: Event,
    config: dict[str, str],
):
    """Unit 1 stops an older revision's Synapse even when server-name blocks everything else.

    Arrange: unit 1 with a homeserver.yaml and Synapse running; server-name
        unset, or other than the homeserver's.
    Act: run an event that reconciles the workload.
    Assert: Synapse is held (stopped, stand-in planned), no replan ran; the
        status says first that Synapse runs on unit 0 only.
    """
    state = make_state(configured_data_dir, config)

    with mock.patch.object(ops.Container, "replan") as replan:
        out = extra_ctx.run(event(extra_ctx, state), state)

    _assert_synapse_held(out.get_container(synapse.CONTAINER_NAME))
    replan.assert_not_called()
    assert out.unit_status == ops.BlockedStatus(EXTRA_UNIT_WITH_DATA)


@pytest.mark.usefixtures("synapse_writes_config")
def test_unit_0_sets_up_synapse_without_leadership(ctx: testing.Context, data_dir: pathlib.Path):
    """Unit 0 runs Synapse whether or not it is the leader.

    Arrange: a server-name, an empty /data, unit 0, not the leader.
    Act: config-changed.
    Assert: the configuration was generated, Synapse is planned and started, Active.
    """
    state = make_state(
        data_dir, {"server-name": SERVER_NAME}, planned=False, execs=GENERATE_EXECS, leader=False
    )

    out = ctx.run(ctx.on.config_changed(), state)

    _chown, generate = ctx.exec_history[synapse.CONTAINER_NAME]
    assert generate.command == _generate_argv(SERVER_NAME)
    _assert_synapse_planned(out.get_container(synapse.CONTAINER_NAME))
    assert out.unit_status == ops.ActiveStatus()


@pytest.mark.parametrize(
    ("unit_name", "runs_here"),
    [
        pytest.param("synapse/0", True, id="unit-0"),
        pytest.param("synapse/1", False, id="unit-1"),
        pytest.param("synapse/10", False, id="unit-10"),
        pytest.param("synapse-0/3", False, id="app-name-ends-in-0"),
    ],
)
def test_runs_here_only_on_unit_0(unit_name: str, runs_here: bool):
    """The unit's number decides, not the application's name."""
    assert synapse.runs_here(unit_name) is runs_here


@pytest.mark.parametrize("server_name", ["matrix.example.com:8448", "[2001:db8::1]"])
def test_generate_passes_server_name_as_one_word(
    ctx: testing.Context, data_dir: pathlib.Path, synapse_writes_config: None, server_name: str
):
    """The server name reaches Synapse as a single argv word.

    Arrange: a server-name with a port or an IPv6 literal.
    Act: run config-changed.
    Assert: the generate command carries it verbatim after --server-name.
    """
    state = make_state(data_dir, {"server-name": server_name}, planned=False, execs=GENERATE_EXECS)

    ctx.run(ctx.on.config_changed(), state)

    generate = ctx.exec_history[synapse.CONTAINER_NAME][-1]
    assert generate.command == _generate_argv(server_name)


def test_generated_config_missing_fails_the_hook(ctx: testing.Context, data_dir: pathlib.Path):
    """The generate command succeeding without writing homeserver.yaml fails the hook.

    Arrange: canned chown and generate commands (a Scenario Exec writes no file).
    Act: run pebble-ready.
    Assert: both commands ran; the charm raises a SynapseError (Juju retries the hook).
    """
    state = make_state(data_dir, {"server-name": SERVER_NAME}, planned=False, execs=GENERATE_EXECS)

    with pytest.raises(testing.errors.UncaughtCharmError) as exc_info:
        ctx.run(ctx.on.pebble_ready(state.get_container(synapse.CONTAINER_NAME)), state)

    assert isinstance(exc_info.value.__cause__, synapse.SynapseError)
    assert "homeserver.yaml" in str(exc_info.value.__cause__)
    commands = [args.command for args in ctx.exec_history[synapse.CONTAINER_NAME]]
    assert commands == [CHOWN, _generate_argv(SERVER_NAME)]


@pytest.mark.parametrize(
    ("execs", "commands_run", "in_error"),
    [
        pytest.param(
            (
                testing.Exec(CHOWN),
                testing.Exec(GENERATE_PREFIX, return_code=1, stderr="Bad server name"),
            ),
            2,
            "Bad server name",
            id="generate-fails",
        ),
        pytest.param(
            (testing.Exec(CHOWN, return_code=1, stderr="Operation not permitted"),),
            1,
            "Operation not permitted",
            id="chown-fails",
        ),
    ],
)
def test_generation_failure_fails_the_hook(
    ctx: testing.Context,
    data_dir: pathlib.Path,
    *,
    execs: tuple[testing.Exec, ...],
    commands_run: int,
    in_error: str,
):
    """A failing setup command stops the reconcile with its error output.

    Arrange: a chown or generate command that exits 1.
    Act: run config-changed.
    Assert: the hook fails with a SynapseError carrying the command's stderr; no layer.
    """
    state = make_state(data_dir, {"server-name": SERVER_NAME}, planned=False, execs=execs)

    with pytest.raises(testing.errors.UncaughtCharmError) as exc_info:
        ctx.run(ctx.on.config_changed(), state)

    assert isinstance(exc_info.value.__cause__, synapse.SynapseError)
    assert in_error in str(exc_info.value.__cause__)
    assert len(ctx.exec_history[synapse.CONTAINER_NAME]) == commands_run
    assert not (data_dir / "homeserver.yaml").exists()


@pytest.mark.parametrize("event", RECONCILING_EVENTS)
def test_existing_config_is_kept(
    ctx: testing.Context, configured_data_dir: pathlib.Path, event: Event
):
    """A homeserver.yaml for the same server name is not generated again.

    Arrange: /data already holds homeserver.yaml for server-name; nothing planned yet.
    Act: run an event that reconciles the workload.
    Assert: no command runs, the file is untouched, the layer is planned and started.
    """
    before = (configured_data_dir / "homeserver.yaml").read_text()
    state = make_state(configured_data_dir, {"server-name": SERVER_NAME}, planned=False)

    out = ctx.run(event(ctx, state), state)

    assert ctx.exec_history == {}
    assert (configured_data_dir / "homeserver.yaml").read_text() == before
    _assert_synapse_planned(out.get_container(synapse.CONTAINER_NAME))
    assert out.unit_status == ops.ActiveStatus()


@pytest.mark.parametrize(
    ("config", "homeserver", "container_options"),
    [
        pytest.param({}, None, {}, id="no-server-name"),
        pytest.param({"server-name": "bad name"}, None, {}, id="invalid-server-name"),
        pytest.param(
            {"server-name": SERVER_NAME},
            homeserver_yaml("other.example.org"),
            {},
            id="server-name-changed",
        ),
        pytest.param(
            {"server-name": SERVER_NAME},
            "{not: [valid",
            {},
            id="homeserver-yaml-unreadable",
        ),
        pytest.param(
            {"server-name": SERVER_NAME}, None, {"can_connect": False}, id="not-connectable"
        ),
    ],
)
def test_nothing_done_while_blocked_or_unreachable(
    ctx: testing.Context,
    data_dir: pathlib.Path,
    *,
    config: dict[str, str],
    homeserver: str | None,
    container_options: dict[str, Any],
):
    """The charm neither generates nor plans anything it should not.

    Arrange: no or an unusable server-name, or a container that does not answer.
    Act: run config-changed.
    Assert: no command ran and nothing was planned.
    """
    if homeserver is not None:
        (data_dir / "homeserver.yaml").write_text(homeserver)
    state = make_state(data_dir, config, planned=False, execs=GENERATE_EXECS, **container_options)

    out = ctx.run(ctx.on.config_changed(), state)

    assert ctx.exec_history == {}
    assert out.get_container(synapse.CONTAINER_NAME).layers == {}
    assert not isinstance(out.unit_status, ops.ActiveStatus)


@pytest.mark.parametrize("event", RECONCILING_EVENTS)
def test_interrupted_restore_not_rolled_back_blocks_and_touches_nothing(
    ctx: testing.Context, configured_data_dir: pathlib.Path, event: Event
):
    """Half-restored data is never started on nor regenerated: the unit is Blocked.

    Arrange: a restore journal is left and its roll-back (patched) fails.
    Act: run an event that reconciles the workload.
    Assert: the roll-back was tried; nothing ran, nothing was planned; Blocked,
        pointing at the journal.
    """
    journal = configured_data_dir / backup.RESTORE_JOURNAL.removeprefix("/data/")
    journal.write_text("{}")
    state = make_state(
        configured_data_dir, {"server-name": SERVER_NAME}, planned=False, execs=GENERATE_EXECS
    )

    with mock.patch.object(
        backup, "recover_interrupted_restore", return_value="could not be rolled back"
    ) as recover:
        out = ctx.run(event(ctx, state), state)

    recover.assert_called()
    assert ctx.exec_history == {}
    assert out.get_container(synapse.CONTAINER_NAME).layers == {}
    assert out.unit_status == ops.BlockedStatus(
        f"an interrupted restore could not be rolled back: see {backup.RESTORE_JOURNAL}"
    )


@pytest.mark.parametrize("event", RECONCILING_EVENTS)
def test_interrupted_restore_rolled_back_then_reconciled(
    ctx: testing.Context, configured_data_dir: pathlib.Path, event: Event
):
    """A roll-back that succeeds lets the reconcile go on: Synapse is planned and started."""
    state = make_state(configured_data_dir, {"server-name": SERVER_NAME}, planned=False)

    with mock.patch.object(backup, "recover_interrupted_restore", return_value=None) as recover:
        out = ctx.run(event(ctx, state), state)

    recover.assert_called()
    _assert_synapse_planned(out.get_container(synapse.CONTAINER_NAME))
    assert out.unit_status == ops.ActiveStatus()
