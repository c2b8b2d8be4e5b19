"""Sample Synapse data, laid out as Synapse lays out /data, for tests and the demo."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import yaml

SYNAPSE_UID = 991
SYNAPSE_GID = 991


def homeserver_config(server_name: str) -> dict[str, object]:
    """Return a homeserver.yaml like the one Synapse generates under /data.

    Args:
        server_name: the homeserver's name.

    Returns:
        The configuration.
    """
    return {
        "server_name": server_name,
        "pid_file": "/data/homeserver.pid",
        "listeners": [
            {
                "port": 8008,
                "tls": False,
                "type": "http",
                "x_forwarded": True,
                "bind_addresses": ["0.0.0.0"],
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": "/data/homeserver.db"}},
        "log_config": f"/data/{server_name}.log.config",
        "media_store_path": "/data/media_store",
        "report_stats": False,
        "signing_key_path": f"/data/{server_name}.signing.key",
        "app_service_config_files": ["/data/appservices/bridge.yaml"],
        "trusted_key_servers": [{"server_name": "matrix.org"}],
    }


def create_database(path: Path, rows: int = 200) -> None:
    """Create a SQLite database with a few Synapse tables, in WAL mode as Synapse uses it.

    Args:
        path: the database file.
        rows: how many events to insert.
    """
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(
            "CREATE TABLE events (stream_ordering INTEGER PRIMARY KEY, event_id TEXT, body TEXT)"
        )
        connection.execute(
            "CREATE TABLE e2e_one_time_keys_json (user_id TEXT, device_id TEXT, key_id TEXT,"
            " key_json TEXT)"
        )
        connection.executemany(
            "INSERT INTO events (event_id, body) VALUES (?, ?)",
            [(f"$event{n}", f"message number {n}") for n in range(rows)],
        )
        connection.execute(
            "INSERT INTO e2e_one_time_keys_json VALUES ('@alice:x', 'DEV', 'k1', '{}')"
        )
        connection.commit()
    finally:
        connection.close()


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file owned by the Synapse user.

    Args:
        path: the file.
        data: its content.
        mode: its permission bits.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def make_synapse_data(
    root: Path,
    server_name: str = "demo.example",
    *,
    media_files: int = 40,
    media_bytes: int = 64 * 1024,
    seed: int = 7,
) -> Path:
    """Lay out Synapse's data directory under ``root/data``.

    Configuration, signing key, log configuration, an appservice
    registration, a SQLite database, local media and thumbnails, and the
    caches a backup leaves out (remote media, URL previews), all owned by
    the Synapse user (uid 991) when running as root.

    Args:
        root: the container's filesystem root.
        server_name: the homeserver's name.
        media_files: how many local media files.
        media_bytes: the mean size of a media file.
        seed: the random seed for file names and content.

    Returns:
        The data directory.
    """
    rng = random.Random(seed)  # noqa: S311 - sample data, not cryptography
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = homeserver_config(server_name)
    _write(data / "homeserver.yaml", yaml.safe_dump(config, sort_keys=False).encode(), 0o640)
    _write(data / f"{server_name}.signing.key", b"ed25519 a_demo " + os.urandom(32).hex().encode())
    _write(data / f"{server_name}.log.config", b"version: 1\nroot:\n  level: INFO\n", 0o644)
    _write(data / "appservices" / "bridge.yaml", b"id: bridge\nurl: http://bridge:9000\n")
    create_database(data / "homeserver.db")
    media = data / "media_store"
    for index in range(media_files):
        name = f"{rng.getrandbits(64):016x}{index:04d}"
        size = max(1, int(rng.lognormvariate(0, 1) * media_bytes))
        _write(media / "local_content" / name[:2] / name[2:4] / name[4:], rng.randbytes(size))
        thumbnail = media / "local_thumbnails" / name[:2] / name[2:4] / name[4:]
        _write(thumbnail / "32-32-image-png-crop", rng.randbytes(max(1, size // 20)))
    _write(media / "remote_content" / "matrix.org" / "aa" / "bb" / "cached", b"remote")
    _write(media / "url_cache" / "2026-11-26" / "preview", b"preview")
    _write(data / "homeserver.pid", b"1\n")
    if os.geteuid() == 0:
        for path in [data, *data.rglob("*")]:
            os.lchown(path, SYNAPSE_UID, SYNAPSE_GID)
    return data


def tree_snapshot(top: Path) -> dict[str, tuple[str, int, int, int, bytes | str]]:
    """Describe a tree for byte-for-byte comparison.

    Args:
        top: the directory.

    Returns:
        For each path relative to ``top``: its type, mode, uid, gid and
        content (file bytes, or symlink target; empty for directories).
    """
    result: dict[str, tuple[str, int, int, int, bytes | str]] = {}
    for path in sorted(top.rglob("*")):
        stat = path.lstat()
        relative = os.fsdecode(path.relative_to(top))
        if path.is_symlink():
            entry: tuple[str, int, int, int, bytes | str] = (
                "link",
                0,
                stat.st_uid,
                stat.st_gid,
                os.readlink(path),
            )
        elif path.is_dir():
            entry = ("dir", stat.st_mode & 0o7777, stat.st_uid, stat.st_gid, b"")
        else:
            entry = ("file", stat.st_mode & 0o7777, stat.st_uid, stat.st_gid, path.read_bytes())
        result[relative] = entry
    return result
