"""Typed charm configuration, with secrets resolved once."""

from __future__ import annotations

import dataclasses

import ops
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backup import S3Parameters

# Options that, when any is set, ask for backups to be configured.
BACKUP_OPTIONS = (
    "s3-credentials",
    "s3-bucket",
    "s3-endpoint",
    "s3-region",
    "s3-path",
    "backup-passphrase",
)
# S3Parameters fields (and aliases) to the option an operator must fix.
_FIELD_OPTIONS = {
    "access_key": "s3-credentials",
    "access-key": "s3-credentials",
    "secret_key": "s3-credentials",
    "secret-key": "s3-credentials",
    "bucket": "s3-bucket",
    "endpoint": "s3-endpoint",
    "region": "s3-region",
    "path": "s3-path",
    "s3_uri_style": "s3-uri-style",
    "s3-uri-style": "s3-uri-style",
}


class InvalidConfigError(Exception):
    """A configuration option has a value the charm cannot use.

    Attributes:
        option: the option to fix.
        message: what is wrong with it.
    """

    def __init__(self, option: str, message: str):
        """Build the error.

        Args:
            option: the option to fix.
            message: what is wrong with it.
        """
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class CharmConfig(BaseModel):
    """The charm's configuration as Juju gives it (see config.yaml).

    Attributes:
        server_name: the homeserver's public name.
        s3_credentials: the secret with access-key and secret-key.
        s3_bucket: the backup bucket.
        s3_endpoint: the S3 endpoint URL.
        s3_region: the S3 region.
        s3_path: the prefix of the backups in the bucket.
        s3_uri_style: path or host addressing.
        backup_passphrase: the secret with the backup passphrase.
        backup_retention_count: how many complete backup chains to keep (0: all).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    server_name: str | None = None
    s3_credentials: ops.Secret | None = None
    s3_bucket: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_path: str = ""
    s3_uri_style: str = "path"
    backup_passphrase: ops.Secret | None = None
    backup_retention_count: int = Field(default=0, ge=0)

    def backups_requested(self) -> bool:
        """Tell whether any backup option is set.

        Returns:
            False when the operator configured nothing for backups.
        """
        return any(
            getattr(self, option.replace("-", "_")) not in (None, "") for option in BACKUP_OPTIONS
        )


@dataclasses.dataclass(frozen=True)
class BackupConfig:
    """Everything a backup needs, secrets resolved.

    Attributes:
        s3: the S3 parameters, with credentials.
        passphrase: the backup passphrase.
    """

    s3: S3Parameters
    passphrase: str = dataclasses.field(repr=False)


def _secret_content(
    secret: ops.Secret | None, option: str, keys: tuple[str, ...]
) -> dict[str, str]:
    """Read a user secret given as an option and check its keys.

    Args:
        secret: the secret, or None when the option is unset.
        option: the option's name, for error messages.
        keys: the keys the secret must have.

    Returns:
        The secret's content.

    Raises:
        InvalidConfigError: if unset, not granted or lacking a key.
    """
    if secret is None:
        raise InvalidConfigError(option, "required for backups (a Juju user secret)")
    try:
        content = secret.get_content(refresh=True)
    except ops.SecretNotFoundError as exc:
        raise InvalidConfigError(
            option, "secret not found or not granted to this application"
        ) from exc
    except ops.ModelError as exc:
        raise InvalidConfigError(option, "secret cannot be read (is it granted?)") from exc
    missing = [key for key in keys if not content.get(key)]
    if missing:
        raise InvalidConfigError(option, "secret lacks the key " + ", ".join(missing))
    return content


def load_backup_config(config: CharmConfig) -> BackupConfig | None:
    """Build the backup configuration from the charm's.

    Args:
        config: the charm configuration.

    Returns:
        The backup configuration, or None when no backup option is set.

    Raises:
        InvalidConfigError: naming the option to fix.
    """
    if not config.backups_requested():
        return None
    if not config.s3_bucket:
        raise InvalidConfigError("s3-bucket", "required for backups")
    credentials = _secret_content(
        config.s3_credentials, "s3-credentials", ("access-key", "secret-key")
    )
    passphrase = _secret_content(config.backup_passphrase, "backup-passphrase", ("passphrase",))
    try:
        s3 = S3Parameters.model_validate(
            {
                "access-key": credentials["access-key"],
                "secret-key": credentials["secret-key"],
                "bucket": config.s3_bucket,
                "endpoint": config.s3_endpoint or None,
                "region": config.s3_region or None,
                "path": config.s3_path,
                "s3-uri-style": config.s3_uri_style,
            }
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "endpoint"
        message = error["msg"].removeprefix("Value error, ")
        # Never echo input values: they may be credentials.
        raise InvalidConfigError(_FIELD_OPTIONS.get(field, field), message) from None
    # gpg reads the first line of a passphrase file: a second line would be ignored.
    one_line = passphrase["passphrase"].removesuffix("\n")
    if "\n" in one_line or "\r" in one_line:
        raise InvalidConfigError("backup-passphrase", "the passphrase must be a single line")
    return BackupConfig(s3=s3, passphrase=one_line)
