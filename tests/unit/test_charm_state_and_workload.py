"""charm_state and synapse helpers, on their own (no Scenario event needed)."""

from __future__ import annotations

import pathlib
from unittest import mock

import ops
import pytest

import synapse
from charm_state import BACKUP_OPTIONS, BackupConfig, CharmConfig, load_backup_config

ACCESS_KEY = "AKIASTATETEST"
SECRET_KEY = "state-secret-key-c4d2"
PASSPHRASE = "state-passphrase-9e1f"


def _secret(content: dict[str, str]) -> ops.Secret:
    secret = mock.create_autospec(ops.Secret, instance=True)
    secret.get_content.return_value = content
    return secret


def _config(**values: object) -> CharmConfig:
    defaults: dict[str, object] = {
        "server_name": "example.com",
        "s3_credentials": _secret({"access-key": ACCESS_KEY, "secret-key": SECRET_KEY}),
        "s3_bucket": "synapse-backups",
        "s3_endpoint": "https://s3.example.com",
        "backup_passphrase": _secret({"passphrase": PASSPHRASE}),
    }
    defaults.update(values)
    return CharmConfig.model_validate(defaults)


@pytest.mark.parametrize("option", BACKUP_OPTIONS)
def test_any_backup_option_requests_backups(option: str):
    """Setting any one backup option asks for backups to be configured."""
    value: object = _secret({}) if option in ("s3-credentials", "backup-passphrase") else "x"

    config = CharmConfig.model_validate({option.replace("-", "_"): value})

    assert config.backups_requested()


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"server_name": "example.com", "s3_uri_style": "host"}, id="uri-style-only"),
        pytest.param({"s3_bucket": "", "s3_path": ""}, id="empty-strings"),
    ],
)
def test_no_backup_option_means_no_backup_config(values: dict[str, object]):
    """Without backup options there is nothing to configure, and no error."""
    config = CharmConfig.model_validate(values)

    assert not config.backups_requested()
    assert load_backup_config(config) is None


def test_load_backup_config():
    """The backup config carries the S3 parameters and passphrase, read with refresh."""
    credentials = _secret({"access-key": ACCESS_KEY, "secret-key": SECRET_KEY})
    config = _config(s3_credentials=credentials, s3_path="/a//b/", s3_uri_style="host")

    backup_config = load_backup_config(config)

    assert backup_config is not None
    assert backup_config.passphrase == PASSPHRASE
    s3 = backup_config.s3
    assert (s3.access_key, s3.secret_key) == (ACCESS_KEY, SECRET_KEY)
    assert (s3.bucket, s3.endpoint, s3.region, s3.path) == (
        "synapse-backups",
        "https://s3.example.com",
        None,
        "a/b",
    )
    assert s3.addressing_style == "virtual"
    credentials.get_content.assert_called_once_with(refresh=True)


def test_backup_config_repr_hides_secrets():
    """Neither the passphrase nor the keys show in the backup config's repr."""
    backup_config = load_backup_config(_config())

    assert isinstance(backup_config, BackupConfig)
    for value in (ACCESS_KEY, SECRET_KEY, PASSPHRASE):
        assert value not in repr(backup_config)


# --- synapse helpers ------------------------------------------------------------------------


@pytest.fixture
def container() -> mock.MagicMock:
    """A mock ops.Container."""
    return mock.create_autospec(ops.Container, instance=True)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ops.pebble.APIError({}, 500, "Internal", "boom"), id="api-error"),
        pytest.param(ops.pebble.TimeoutError("timed out"), id="timeout"),
    ],
)
def test_generate_config_pebble_errors(container: mock.MagicMock, error: Exception):
    """A Pebble error while generating becomes a SynapseError."""
    container.exec.side_effect = error

    with pytest.raises(synapse.SynapseError, match="generating the Synapse configuration"):
        synapse.generate_config(container, "example.com")


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ops.pebble.APIError({}, 500, "Internal", "boom"), id="api-error"),
        pytest.param(ops.pebble.ConnectionError("gone"), id="connection-error"),
    ],
)
def test_is_ready_pebble_errors(container: mock.MagicMock, error: Exception):
    """Synapse is not ready when Pebble cannot say."""
    container.get_services.side_effect = error

    assert synapse.is_ready(container) is False


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        pytest.param("1.120.2\n", "1.120.2", id="version"),
        pytest.param("\n", "unknown", id="empty"),
    ],
)
def test_version(container: mock.MagicMock, stdout: str, expected: str):
    """The Synapse version is what the workload's python prints, or unknown."""
    container.exec.return_value.wait_output.return_value = (stdout, "")

    assert synapse.version(container) == expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(None, True, id="answers"),
        pytest.param(ops.pebble.ExecError(["python3"], 1, "", "refused"), False, id="refused"),
        pytest.param(ops.pebble.TimeoutError("timed out"), False, id="timeout"),
        pytest.param(ops.pebble.APIError({}, 500, "error", "boom"), False, id="pebble-error"),
        pytest.param(ops.pebble.ConnectionError("gone"), False, id="pebble-gone"),
    ],
)
def test_answers_health(container: mock.MagicMock, error: Exception | None, expected: bool):
    """Synapse answers when one GET of /health, run in the container, succeeds."""
    container.exec.return_value.wait_output.side_effect = error
    container.exec.return_value.wait_output.return_value = ("", "")

    assert synapse.answers_health(container) is expected

    (command,), options = container.exec.call_args
    assert command == ["python3", "-c", synapse.HEALTH_PROBE, synapse.HEALTH_URL]
    assert options == {"timeout": 15}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("1.2.3-abcdef\n", "1.2.3-abcdef", id="version-file"),
        pytest.param("", "unknown", id="empty-file"),
        pytest.param(None, "unknown", id="no-file"),
    ],
)
def test_charm_version(tmp_path: pathlib.Path, content: str | None, expected: str):
    """The charm version is charmcraft's version file, or unknown."""
    if content is not None:
        (tmp_path / "version").write_text(content)

    assert synapse.charm_version(tmp_path) == expected
