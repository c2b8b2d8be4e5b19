"""What an operator does with juju to set up backups, done on a Harness."""

from __future__ import annotations

from typing import Any

from ops import testing

from tests.helpers.seaweed import SeaweedServer


def configure_backups(
    harness: testing.Harness[Any],
    server: SeaweedServer,
    bucket: str,
    *,
    passphrase: str,
    server_name: str,
    path: str,
    secret_key: str | None = None,
) -> None:
    """Add and grant the two user secrets and set the charm's config, like `juju config`.

    Args:
        harness: the charm.
        server: the S3 server.
        bucket: the bucket.
        passphrase: the backup passphrase.
        server_name: the homeserver's name.
        path: the s3-path.
        secret_key: the secret key to store (default: the right one).
    """
    credentials = harness.add_user_secret(
        {"access-key": server.access_key, "secret-key": secret_key or server.secret_key}
    )
    harness.grant_secret(credentials, "synapse")
    passphrase_secret = harness.add_user_secret({"passphrase": passphrase})
    harness.grant_secret(passphrase_secret, "synapse")
    harness.update_config(
        {
            "server-name": server_name,
            "s3-credentials": credentials,
            "backup-passphrase": passphrase_secret,
            "s3-bucket": bucket,
            "s3-endpoint": server.endpoint,
            "s3-region": "us-east-1",
            "s3-path": path,
        }
    )
