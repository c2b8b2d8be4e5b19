"""GNU tar's snapshot state and index of a tree, made as the backup script makes them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def tar_state(workdir: Path, member: str, state: Path, *, timeout: float | None = 60) -> int:
    """Archive a member (relative to /) as an incremental backup does, to nowhere.

    Args:
        workdir: where tar's index and messages go (``index``, ``tar-errors``).
        member: the path to archive.
        state: tar's snapshot state (--listed-incremental).
        timeout: seconds tar may take (None: no limit).

    Returns:
        tar's exit status.
    """
    with (workdir / "tar-errors").open("wb") as errors:
        return subprocess.run(
            [
                "tar", "--create", "--file=-", "--format=posix", "--verbose",
                f"--index-file={workdir / 'index'}", "--quoting-style=escape",
                "--directory=/", f"--listed-incremental={state}", "--no-check-device",
                "--warning=no-new-dir", "--no-unquote", f"--add-file={member}",
            ],
            stdout=subprocess.DEVNULL, stderr=errors, check=False, timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
        ).returncode  # fmt: skip
