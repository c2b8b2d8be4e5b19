"""Unit status for every configuration case (collect-status runs after every event)."""

from __future__ import annotations

import pathlib
from typing import Any
from unittest import mock

import ops
import pytest
from ops import testing

import backup
from tests.unit.builders import (
    ALL_SECRETS,
    CREDENTIALS,
    CREDENTIALS_WITHOUT_ACCESS_KEY,
    CREDENTIALS_WITHOUT_SECRET_KEY,
    PASSPHRASE,
    PASSPHRASE_SECRET_WRONG_KEY,
    SECRET_VALUES,
    SERVER_NAME,
    UNKNOWN_SECRET_ID,
    VALID_S3_CONFIG,
    homeserver_yaml,
    make_state,
)

# Events after which the status is checked: one that reconciles the workload
# and one that does not.
EVENTS = [
    pytest.param("config_changed", id="config-changed"),
    pytest.param("update_status", id="update-status"),
]


def _run(ctx: testing.Context, event: str, state: testing.State) -> testing.State:
    return ctx.run(getattr(ctx.on, event)(), state)


def _without(config: dict[str, str], *options: str) -> dict[str, str]:
    return {key: value for key, value in config.items() if key not in options}


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(
    ("config", "homeserver", "in_message"),
    [
        pytest.param({}, None, "server-name", id="no-server-name"),
        pytest.param({"server-name": ""}, None, "server-name", id="empty-server-name"),
        pytest.param(
            {"server-name": "not a host!"}, None, "server-name", id="server-name-with-spaces"
        ),
        pytest.param(
            {"server-name": "example.com/path"}, None, "server-name", id="server-name-with-path"
        ),
        pytest.param(
            {"server-name": "example.com:port"}, None, "server-name", id="server-name-bad-port"
        ),
        pytest.param(
            {"server-name": SERVER_NAME},
            homeserver_yaml("other.example.org"),
            "server-name: Synapse was set up as 'other.example.org'; it cannot change",
            id="server-name-differs-from-homeserver-yaml",
        ),
        pytest.param(
            {"server-name": SERVER_NAME},
            "server_name: [unclosed\n",
            "unreadable",
            id="homeserver-yaml-invalid",
        ),
        pytest.param(
            {"server-name": SERVER_NAME},
            "- a list, not a mapping\n",
            "unreadable",
            id="homeserver-yaml-not-a-mapping",
        ),
        pytest.param(
            {"server-name": SERVER_NAME},
            'form_secret: "status-secret-9f3e\n',
            "is not valid YAML (line 2, column 1)",
            id="homeserver-yaml-secret-never-quoted",
        ),
    ],
)
def test_server_name_blocks(
    ctx: testing.Context,
    data_dir: pathlib.Path,
    *,
    event: str,
    config: dict[str, str],
    homeserver: str | None,
    in_message: str,
):
    """A missing, malformed or changed server-name blocks the unit.

    Arrange: a server-name that is missing, malformed or not the one Synapse was set up with.
    Act: run an event.
    Assert: the unit is Blocked with a message naming the problem; nothing was planned.
    """
    if homeserver is not None:
        (data_dir / "homeserver.yaml").write_text(homeserver)

    out = _run(ctx, event, make_state(data_dir, config, planned=False))

    assert isinstance(out.unit_status, ops.BlockedStatus)
    assert in_message in out.unit_status.message
    assert "status-secret-9f3e" not in out.unit_status.message  # PyYAML would quote it
    assert out.get_container("synapse").plan.services == {}
    assert ctx.exec_history == {}


@pytest.mark.parametrize(
    ("server_name", "container_options", "expected"),
    [
        pytest.param(
            SERVER_NAME,
            {"can_connect": False},
            ops.WaitingStatus("waiting for the synapse container"),
            id="container-not-connectable",
        ),
        pytest.param(
            SERVER_NAME,
            {"check": ops.pebble.CheckStatus.DOWN},
            ops.WaitingStatus("waiting for Synapse to answer its health check"),
            id="service-running-check-down",
        ),
        pytest.param(
            SERVER_NAME,
            {"check": None},
            ops.WaitingStatus("waiting for Synapse to answer its health check"),
            id="service-running-no-check-yet",
        ),
        pytest.param(
            SERVER_NAME,
            {"running": False},
            ops.WaitingStatus("waiting for Synapse to answer its health check"),
            id="service-stopped-check-up",
        ),
        pytest.param(
            SERVER_NAME,
            {"planned": False},
            ops.WaitingStatus("waiting for Synapse to answer its health check"),
            id="nothing-planned-yet",
        ),
        pytest.param(SERVER_NAME, {}, ops.ActiveStatus(), id="check-up"),
        pytest.param("matrix.example.com:8448", {}, ops.ActiveStatus(), id="name-with-port"),
        pytest.param("[2001:db8::1]:8448", {}, ops.ActiveStatus(), id="ipv6-literal"),
    ],
)
def test_workload_status(
    ctx: testing.Context,
    data_dir: pathlib.Path,
    server_name: str,
    container_options: dict[str, Any],
    expected: ops.StatusBase,
):
    """Waiting until the container answers and the check is up; then Active.

    Arrange: a valid server-name, no S3 options and a workload in a given state.
    Act: run start (which the charm does not reconcile on: update-status would plan
        and start Synapse, see test_charm_workload.py).
    Assert: Waiting until the container answers and the ready check is up; then Active.
    """
    (data_dir / "homeserver.yaml").write_text(homeserver_yaml(server_name))
    state = make_state(data_dir, {"server-name": server_name}, **container_options)

    out = ctx.run(ctx.on.start(), state)

    assert out.unit_status == expected


def test_not_connectable_server_name_still_checked(ctx: testing.Context, data_dir: pathlib.Path):
    """A missing server-name blocks even before the container answers.

    Arrange: no server-name, and a container that cannot be reached.
    Act: run update-status.
    Assert: Blocked on server-name wins over Waiting for the container.
    """
    out = ctx.run(ctx.on.update_status(), make_state(data_dir, {}, can_connect=False))

    assert isinstance(out.unit_status, ops.BlockedStatus)
    assert "server-name" in out.unit_status.message


@pytest.mark.parametrize("event", EVENTS)
def test_no_s3_options_is_active(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    check_bucket: mock.MagicMock,
    event: str,
):
    """Backups are optional: no S3 option at all leaves the unit Active.

    Arrange: a healthy workload and no backup option at all.
    Act: run an event.
    Assert: Active; S3 is not contacted.
    """
    state = make_state(configured_data_dir, {"server-name": SERVER_NAME}, secrets=())

    out = _run(ctx, event, state)

    assert out.unit_status == ops.ActiveStatus()
    check_bucket.assert_not_called()


def _config(**changes: str | None) -> dict[str, str]:
    """Return server-name plus the valid S3 options, changed (None removes an option)."""
    config = {"server-name": SERVER_NAME, **VALID_S3_CONFIG}
    for name, value in changes.items():
        option = name.replace("_", "-")
        if value is None:
            config.pop(option, None)
        else:
            config[option] = value
    return config


INVALID_S3_CONFIGS = [
    pytest.param(
        {"server-name": SERVER_NAME, "s3-region": "eu-west-1"},
        "s3-bucket",
        id="only-region-set",
    ),
    pytest.param(
        {"server-name": SERVER_NAME, "s3-path": "synapse/prod"},
        "s3-bucket",
        id="only-path-set",
    ),
    pytest.param(
        {"server-name": SERVER_NAME, "s3-credentials": CREDENTIALS.id},
        "s3-bucket",
        id="only-credentials-set",
    ),
    pytest.param(_config(s3_bucket=None), "s3-bucket", id="missing-bucket"),
    pytest.param(_config(s3_credentials=None), "s3-credentials", id="missing-credentials"),
    pytest.param(_config(backup_passphrase=None), "backup-passphrase", id="missing-passphrase"),
    pytest.param(
        _config(s3_credentials=UNKNOWN_SECRET_ID),
        "s3-credentials",
        id="credentials-secret-not-granted",
    ),
    pytest.param(
        _config(backup_passphrase=UNKNOWN_SECRET_ID),
        "backup-passphrase",
        id="passphrase-secret-not-granted",
    ),
    pytest.param(
        _config(s3_credentials=CREDENTIALS_WITHOUT_SECRET_KEY.id),
        "s3-credentials",
        id="credentials-lack-secret-key",
    ),
    pytest.param(
        _config(s3_credentials=CREDENTIALS_WITHOUT_ACCESS_KEY.id),
        "s3-credentials",
        id="credentials-lack-access-key",
    ),
    pytest.param(
        _config(backup_passphrase=PASSPHRASE_SECRET_WRONG_KEY.id),
        "backup-passphrase",
        id="passphrase-secret-lacks-passphrase",
    ),
    pytest.param(
        _config(backup_passphrase=CREDENTIALS.id),
        "backup-passphrase",
        id="credentials-given-as-passphrase",
    ),
    pytest.param(_config(s3_endpoint=None), "s3-endpoint", id="neither-endpoint-nor-region"),
    pytest.param(_config(s3_endpoint=""), "s3-endpoint", id="empty-endpoint-no-region"),
    pytest.param(
        _config(s3_endpoint="s3.example.com"), "s3-endpoint", id="endpoint-without-scheme"
    ),
    pytest.param(
        _config(s3_endpoint="ftp://s3.example.com"), "s3-endpoint", id="endpoint-ftp-scheme"
    ),
    pytest.param(_config(s3_endpoint="https://"), "s3-endpoint", id="endpoint-without-host"),
    pytest.param(_config(s3_uri_style="virtual"), "s3-uri-style", id="bad-uri-style"),
    pytest.param(_config(s3_bucket="Synapse_Backups"), "s3-bucket", id="bucket-bad-characters"),
    pytest.param(_config(s3_bucket="ab"), "s3-bucket", id="bucket-too-short"),
    pytest.param(_config(s3_bucket="b" * 64), "s3-bucket", id="bucket-too-long"),
    pytest.param(_config(s3_bucket="-backups"), "s3-bucket", id="bucket-leading-dash"),
    pytest.param(_config(s3_path="synapse/../other"), "s3-path", id="path-dot-dot"),
    pytest.param(_config(s3_path="./synapse"), "s3-path", id="path-dot"),
]


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(("config", "option"), INVALID_S3_CONFIGS)
def test_invalid_s3_config_blocks(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    check_bucket: mock.MagicMock,
    *,
    event: str,
    config: dict[str, str],
    option: str,
):
    """Partial or invalid S3 options block, naming the option and no secret.

    Arrange: a healthy workload and S3 options that are partial or invalid.
    Act: run an event.
    Assert: Blocked with a message that starts with the option to fix and shows no
        secret value; S3 is not contacted.
    """
    out = _run(ctx, event, make_state(configured_data_dir, config))

    assert isinstance(out.unit_status, ops.BlockedStatus)
    message = out.unit_status.message
    assert message.startswith(f"{option}: "), message
    for value in SECRET_VALUES:
        assert value not in message
    check_bucket.assert_not_called()


@pytest.mark.parametrize(
    ("config", "missing_key"),
    [
        pytest.param(
            _config(s3_credentials=CREDENTIALS_WITHOUT_SECRET_KEY.id),
            "secret-key",
            id="secret-key",
        ),
        pytest.param(
            _config(s3_credentials=CREDENTIALS_WITHOUT_ACCESS_KEY.id),
            "access-key",
            id="access-key",
        ),
        pytest.param(
            _config(backup_passphrase=PASSPHRASE_SECRET_WRONG_KEY.id),
            "passphrase",
            id="passphrase",
        ),
    ],
)
def test_secret_lacking_key_names_the_key(
    ctx: testing.Context, configured_data_dir: pathlib.Path, config: dict[str, str], missing_key
):
    """A secret without a key the charm needs names that key.

    Arrange: a secret without one of the keys the charm needs.
    Act: run update-status.
    Assert: the Blocked message names the missing key.
    """
    out = ctx.run(ctx.on.update_status(), make_state(configured_data_dir, config))

    assert isinstance(out.unit_status, ops.BlockedStatus)
    assert f"lacks the key {missing_key}" in out.unit_status.message


def test_unreadable_secret_blocks(
    ctx: testing.Context, configured_data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
):
    """A secret that cannot be read blocks on its option.

    Arrange: reading the credentials secret fails with a ModelError (e.g. permission denied).
    Act: run update-status.
    Assert: Blocked naming s3-credentials.
    """

    def get_content(self: ops.Secret, *, refresh: bool = False) -> dict[str, str]:
        raise ops.ModelError("ERROR permission denied")

    monkeypatch.setattr(ops.Secret, "get_content", get_content)

    out = ctx.run(ctx.on.update_status(), make_state(configured_data_dir, _config()))

    assert out.unit_status == ops.BlockedStatus(
        "s3-credentials: secret cannot be read (is it granted?)"
    )


VALID_S3_CONFIGS = [
    pytest.param(_config(), id="endpoint"),
    pytest.param(_config(s3_endpoint=None, s3_region="eu-west-1"), id="region-only"),
    pytest.param(
        _config(s3_endpoint="http://10.1.2.3:8333", s3_uri_style="host"),
        id="http-endpoint-host-style",
    ),
    pytest.param(_config(s3_path="/synapse//prod/"), id="path-normalised"),
]


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("count", [0, 1, 30])
def test_retention_count_is_active(
    ctx: testing.Context, configured_data_dir: pathlib.Path, event: str, count: int
):
    """Any backup-retention-count of 0 or more is a valid setting."""
    config = {**_config(), "backup-retention-count": count}

    out = _run(ctx, event, make_state(configured_data_dir, config))

    assert out.unit_status == ops.ActiveStatus()


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(
    "config",
    [
        pytest.param({**_config(), "backup-retention-count": -1}, id="with-backups"),
        pytest.param(
            {"server-name": SERVER_NAME, "backup-retention-count": -1}, id="without-backups"
        ),
    ],
)
def test_negative_retention_count_blocks(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    check_bucket: mock.MagicMock,
    event: str,
    config: dict[str, Any],
):
    """A negative backup-retention-count blocks, naming the option; the charm does not crash.

    pydantic refuses the value (Field(ge=0)); the status says which option and why.
    """
    out = _run(ctx, event, make_state(configured_data_dir, config))

    assert out.unit_status == ops.BlockedStatus(
        "backup-retention-count: Input should be greater than or equal to 0"
    )
    check_bucket.assert_not_called()


def _passphrase_config(passphrase: str) -> tuple[dict[str, str], testing.Secret]:
    """Valid backup options whose passphrase secret holds ``passphrase``."""
    secret = testing.Secret(tracked_content={"passphrase": passphrase})
    return _config(backup_passphrase=secret.id), secret


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(
    "passphrase",
    [
        pytest.param(f"{PASSPHRASE}\nsecond line", id="two-lines"),
        pytest.param(f"{PASSPHRASE}\n\n", id="blank-second-line"),
        pytest.param(f"{PASSPHRASE}\r\nsecond line", id="crlf"),
        pytest.param(f"{PASSPHRASE}\r", id="trailing-carriage-return"),
        pytest.param(f"\n{PASSPHRASE}", id="leading-newline"),
    ],
)
def test_multi_line_passphrase_blocks(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    check_bucket: mock.MagicMock,
    event: str,
    passphrase: str,
):
    """A passphrase of more than one line blocks: gpg would read only its first line.

    The message names the option and shows no part of the passphrase.
    """
    config, secret = _passphrase_config(passphrase)

    out = _run(ctx, event, make_state(configured_data_dir, config, secrets=[*ALL_SECRETS, secret]))

    assert out.unit_status == ops.BlockedStatus(
        "backup-passphrase: the passphrase must be a single line"
    )
    check_bucket.assert_not_called()


@pytest.mark.parametrize("event", EVENTS)
def test_passphrase_with_a_final_newline_is_one_line(
    ctx: testing.Context, configured_data_dir: pathlib.Path, event: str
):
    """A final newline (juju add-secret passphrase#file=...) does not make a second line."""
    config, secret = _passphrase_config(f"{PASSPHRASE}\n")

    out = _run(ctx, event, make_state(configured_data_dir, config, secrets=[*ALL_SECRETS, secret]))

    assert out.unit_status == ops.ActiveStatus()


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("config", VALID_S3_CONFIGS)
def test_valid_s3_config_bucket_usable_is_active(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    check_bucket: mock.MagicMock,
    event: str,
    config: dict[str, str],
):
    """Valid S3 options and a usable bucket leave the unit Active.

    Arrange: valid S3 options; check_bucket (standing for S3) accepts the bucket.
    Act: run an event.
    Assert: Active, after the bucket was checked once with the configured parameters.
    """
    out = _run(ctx, event, make_state(configured_data_dir, config))

    assert out.unit_status == ops.ActiveStatus()
    check_bucket.assert_called_once()
    (client,) = check_bucket.call_args.args
    assert isinstance(client, backup.S3Client)


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(
            backup.S3Error("access to bucket synapse-backups denied", option="s3-credentials"),
            "s3-credentials: access to bucket synapse-backups denied",
            id="credentials-rejected",
        ),
        pytest.param(
            backup.S3Error("bucket synapse-backups does not exist", option="s3-bucket"),
            "s3-bucket: bucket synapse-backups does not exist",
            id="bucket-missing",
        ),
        pytest.param(
            backup.S3Error("cannot reach the S3 endpoint: timeout", option="s3-endpoint"),
            "s3-endpoint: cannot reach the S3 endpoint: timeout",
            id="endpoint-unreachable",
        ),
        pytest.param(
            backup.S3Error("cannot use bucket synapse-backups: SlowDown"),
            "s3-bucket: cannot use bucket synapse-backups: SlowDown",
            id="no-option-defaults-to-bucket",
        ),
    ],
)
def test_bucket_check_failure_blocks(
    ctx: testing.Context,
    configured_data_dir: pathlib.Path,
    check_bucket: mock.MagicMock,
    *,
    event: str,
    error: backup.S3Error,
    expected: str,
):
    """A bucket S3 refuses blocks, naming the option the S3Error points at.

    Arrange: valid S3 options; check_bucket (standing for S3) raises an S3Error.
    Act: run an event.
    Assert: Blocked, naming the option the error points at.
    """
    check_bucket.side_effect = error

    out = _run(ctx, event, make_state(configured_data_dir, _config()))

    assert out.unit_status == ops.BlockedStatus(expected)


def test_s3_blocked_and_waiting_workload(
    ctx: testing.Context, configured_data_dir: pathlib.Path, check_bucket: mock.MagicMock
):
    """Blocked (what the operator must fix) wins over Waiting.

    Arrange: S3 refuses the credentials and Synapse is not ready yet.
    Act: run update-status.
    Assert: Blocked (what the operator must fix) wins over Waiting.
    """
    check_bucket.side_effect = backup.S3Error("denied", option="s3-credentials")
    state = make_state(configured_data_dir, _config(), check=ops.pebble.CheckStatus.DOWN)

    out = ctx.run(ctx.on.update_status(), state)

    assert out.unit_status == ops.BlockedStatus("s3-credentials: denied")


def test_workload_problem_shown_before_s3_problems(
    ctx: testing.Context, configured_data_dir: pathlib.Path, check_bucket: mock.MagicMock
):
    """The workload's own Blocked message comes first: Synapse cannot serve, backups aside.

    Arrange: unit 0 whose homeserver.yaml names another server than server-name,
        and S3 refusing the credentials.
    Act: run update-status.
    Assert: Blocked on the server name.
    """
    check_bucket.side_effect = backup.S3Error("denied", option="s3-credentials")
    state = make_state(configured_data_dir, _config(server_name="other.example.org"))

    out = ctx.run(ctx.on.update_status(), state)

    assert out.unit_status == ops.BlockedStatus(
        f"server-name: Synapse was set up as {SERVER_NAME!r}; it cannot change"
    )


@pytest.mark.parametrize(
    ("homeserver", "message"),
    [
        pytest.param(
            False, "Synapse runs on synapse/0 only: juju scale-application synapse 1", id="empty"
        ),
        pytest.param(
            True,
            "Synapse runs on synapse/0 only; this unit's /data holds a homeserver of its own: "
            "keep what you need of it, then juju scale-application synapse 1",
            id="own-homeserver",
        ),
    ],
)
def test_extra_unit_shown_before_s3_problems(
    extra_ctx: testing.Context,
    data_dir: pathlib.Path,
    check_bucket: mock.MagicMock,
    homeserver: bool,
    message: str,
):
    """On a unit that does not run Synapse, that comes first: it is why nothing works there.

    Arrange: unit 1, with or without a homeserver.yaml of its own (an older
        revision ran Synapse on every unit), and S3 refusing the credentials.
    Act: run update-status.
    Assert: Blocked, naming unit 0 and the safe way to scale back, and saying
        when this unit holds data of its own.
    """
    if homeserver:
        (data_dir / "homeserver.yaml").write_text(homeserver_yaml())
    check_bucket.side_effect = backup.S3Error("denied", option="s3-credentials")
    state = make_state(data_dir, _config(), planned=False)

    out = extra_ctx.run(extra_ctx.on.update_status(), state)

    assert out.unit_status == ops.BlockedStatus(message)


@pytest.mark.parametrize(
    ("config", "option"),
    [
        pytest.param(
            _config(s3_endpoint="https://bad_host.example.com"),
            "s3-endpoint",
            id="endpoint-boto-rejects",
        ),
        pytest.param(
            _config(s3_endpoint=None, s3_region="eu west 1"),
            "s3-region",
            id="region-only-boto-rejects",
        ),
        pytest.param(
            _config(s3_region="eu west 1"),
            "s3-region",
            id="region-with-endpoint-boto-rejects",
        ),
    ],
)
def test_s3_client_rejects_option(
    ctx: testing.Context, configured_data_dir: pathlib.Path, config: dict[str, str], option: str
):
    """An endpoint or region boto3 refuses blocks on that option.

    Arrange: an endpoint (underscore in the host) or region (spaces) that passes
        S3Parameters but that boto3 refuses when the client is created.
    Act: run update-status.
    Assert: Blocked, naming the option that holds the bad value.
    """
    out = ctx.run(ctx.on.update_status(), make_state(configured_data_dir, config))

    assert isinstance(out.unit_status, ops.BlockedStatus)
    assert out.unit_status.message.startswith(f"{option}: "), out.unit_status.message
