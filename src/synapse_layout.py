"""Where Synapse keeps its data, as its homeserver.yaml says.

Reads the configuration through Pebble and names what a backup holds: the
configuration, signing keys and log configuration, the SQLite database, and
the media that exists nowhere else. Values are type-checked and never quoted
in an error (database arguments may hold a password).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ops
import yaml

from backup_store import (
    BackupError,
)

DATA_DIR = "/data"
SYNAPSE_CONFIG_PATH = f"{DATA_DIR}/homeserver.yaml"
# Files in the data directory that Synapse's backup documentation asks for:
# configuration, signing keys and log configuration.
BACKUP_FILE_PATTERNS = ["*.yaml", "*.signing.key", "*.log.config"]
# Media directories with content that exists nowhere else (remote_* and
# url_cache* are caches that Synapse fetches again).
LOCAL_DIR_PATTERN = "local_*"
MEDIA_DIR = f"{DATA_DIR}/media_store"
SQLITE_ENGINES = ("sqlite3", "sqlite")  # homeserver.yaml's database name
POSTGRES_ENGINES = ("psycopg2", "psycopg")
SYNAPSE_USER_ID = 991
SYNAPSE_GROUP_ID = 991


class SynapseConfigError(BackupError):
    """homeserver.yaml is missing, not YAML, or not shaped as Synapse's configuration."""


def read_synapse_config(container: ops.Container) -> dict[str, Any]:
    """Read Synapse's configuration from the container.

    Args:
        container: Synapse Container.

    Returns:
        The parsed homeserver.yaml.

    Raises:
        SynapseConfigError: if it is missing, not YAML or not a YAML mapping.
        BackupError: if Pebble cannot be asked for it.
    """
    try:
        config = yaml.safe_load(container.pull(SYNAPSE_CONFIG_PATH).read())
    except ops.pebble.PathError as exc:
        if exc.kind == "not-found":
            raise SynapseConfigError(f"cannot read {SYNAPSE_CONFIG_PATH}: {exc}") from exc
        raise BackupError(f"cannot read {SYNAPSE_CONFIG_PATH}: {exc}") from exc
    except ops.pebble.APIError as exc:
        raise BackupError(f"cannot read {SYNAPSE_CONFIG_PATH}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SynapseConfigError(
            f"{SYNAPSE_CONFIG_PATH} is not UTF-8 (byte {exc.start} is not)"
        ) from exc
    except yaml.YAMLError as exc:
        # Never the text: PyYAML quotes the offending line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SynapseConfigError(f"{SYNAPSE_CONFIG_PATH} is not valid YAML{where}") from exc
    if not isinstance(config, dict):
        raise SynapseConfigError(f"{SYNAPSE_CONFIG_PATH} is not a YAML mapping")
    return config


_YAML_KINDS: dict[type, str] = {str: "a string", dict: "a mapping", list: "a list"}


def _config_value(config: Mapping[str, Any], key: str, kind: type) -> Any:
    """Return one setting of homeserver.yaml (None when unset), refusing a wrong type.

    Args:
        config: a YAML mapping (homeserver.yaml or one of its sections).
        key: the setting.
        kind: the type it must have when set: str, dict or list.

    Returns:
        Its value, or None.

    Raises:
        SynapseConfigError: if it is set to something of another type.
    """
    value = config.get(key)
    if value is not None and not isinstance(value, kind):
        # Not the value: database args may hold a password.
        raise SynapseConfigError(
            f"{SYNAPSE_CONFIG_PATH}: {key} must be {_YAML_KINDS[kind]}, not {type(value).__name__}"
        )
    return value


def _data_path(name: object) -> str:
    """Return a path of homeserver.yaml as an absolute, normalised path (relative to DATA_DIR).

    Args:
        name: the configured path.

    Returns:
        The absolute path.
    """
    return posixpath.normpath(posixpath.join(DATA_DIR, str(name)))


def get_database_path(container: ops.Container) -> str | None:
    """Return the SQLite database file of Synapse, if it uses SQLite.

    Args:
        container: Synapse Container.

    Returns:
        The absolute path of the database, or None when the database is not
        SQLite or its file does not exist yet.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    path = _configured_database_path(container)
    return path if path and container.exists(path) else None


def _database_to_copy(
    container: ops.Container, log: Callable[[str], None]
) -> tuple[str | None, dict[str, str]]:
    """Return the SQLite database a backup copies; say so when the configured one is missing.

    Args:
        container: Synapse Container.
        log: receives progress messages.

    Returns:
        The database's path (or None), and what the manifest records about it:
        ``database-path``, and ``database-missing`` when the configured file
        does not exist (retention then deletes nothing).

    Raises:
        BackupError: if the configuration cannot be read.
    """
    database_path = get_database_path(container)
    facts = {"database-path": database_path or ""}
    missing = None if database_path else _configured_database_path(container)
    if missing:  # Synapse creates it when it first starts; or it was lost
        log(f"Synapse's database {missing} does not exist (has Synapse ever started?): "
            "this backup holds no database")  # fmt: skip
        facts["database-missing"] = missing
    return database_path, facts


def _configured_database_path(container: ops.Container) -> str | None:
    """Return the SQLite database file Synapse's configuration names, existing or not.

    Args:
        container: Synapse Container.

    Returns:
        The absolute path, or None when Synapse does not use an SQLite file.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    return _database_in(read_synapse_config(container))


def _database_in(config: Mapping[str, Any]) -> str | None:
    """Return the SQLite database file a Synapse configuration names.

    Args:
        config: the parsed homeserver.yaml.

    Returns:
        The absolute path, or None when Synapse does not use an SQLite file.

    Raises:
        SynapseConfigError: if the database section is not shaped as Synapse's.
    """
    database = _config_value(config, "database", dict) or {}
    name = _config_value(database, "name", str) or "sqlite3"
    if name not in SQLITE_ENGINES + POSTGRES_ENGINES:
        # Guessing "not SQLite" would make backups without the database, and
        # retention would then delete the older backups that hold it.
        raise SynapseConfigError(
            f"{SYNAPSE_CONFIG_PATH}: database name must be one of "
            f"{', '.join(SQLITE_ENGINES + POSTGRES_ENGINES)}"
        )
    if name not in SQLITE_ENGINES:
        return None
    path = (_config_value(database, "args", dict) or {}).get("database")
    if not path or path == ":memory:":
        return None
    return _data_path(path)


def get_media_dir(container: ops.Container) -> str:
    """Return Synapse's media store directory.

    Args:
        container: Synapse Container.

    Returns:
        The absolute ``media_store_path`` of homeserver.yaml, or MEDIA_DIR.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    return _media_dir_in(read_synapse_config(container))


def _media_dir_in(config: Mapping[str, Any]) -> str:
    """Return the media store directory a Synapse configuration names.

    Args:
        config: the parsed homeserver.yaml.

    Returns:
        The absolute ``media_store_path``, or MEDIA_DIR.

    Raises:
        SynapseConfigError: if media_store_path is not a string.
    """
    return _data_path(_config_value(config, "media_store_path", str) or MEDIA_DIR)


def get_paths_to_backup(container: ops.Container) -> Iterable[str]:
    """Get the list of paths that should be in a backup for Synapse.

    These are the configuration, signing keys, log configuration, appservice
    registrations and the local media directories. The SQLite database is
    not among them: it is copied consistently (get_database_path) instead of
    being read while Synapse writes it.

    Args:
        container: Synapse Container.

    Returns:
        Iterable with the list of paths to backup.

    Raises:
        BackupError: if the configuration cannot be read.
    """
    return _paths_in_layout(container, read_synapse_config(container))


def _paths_in_layout(container: ops.Container, config: Mapping[str, Any]) -> list[str]:
    """Return the paths get_paths_to_backup names, for a given configuration.

    Args:
        container: Synapse Container.
        config: the parsed homeserver.yaml; an empty mapping gives Synapse's
            standard layout (the files matching BACKUP_FILE_PATTERNS and the
            local media directories of MEDIA_DIR).

    Returns:
        The existing paths, sorted.

    Raises:
        SynapseConfigError: if a setting that names paths has a wrong type.
    """
    paths: list[str] = []
    for pattern in BACKUP_FILE_PATTERNS:
        paths.extend(
            info.path
            for info in container.list_files(DATA_DIR, pattern=pattern)
            if info.type == ops.pebble.FileType.FILE
        )
    named = [
        _config_value(config, "signing_key_path", str),
        _config_value(config, "log_config", str),
        *(_config_value(config, "app_service_config_files", list) or []),
    ]
    for name in named:
        if name:
            path = _data_path(name)
            if container.exists(path):
                paths.append(path)
    media_dir = _media_dir_in(config)
    if container.isdir(media_dir):
        paths.extend(
            info.path
            for info in container.list_files(media_dir, pattern=LOCAL_DIR_PATTERN)
            if info.type == ops.pebble.FileType.DIRECTORY
        )
    return sorted(set(paths))
