"""Time and peak memory of the check that runs after tar, on many directories.

A large homeserver has a directory per thumbnailed media file, so the check
that tar met every directory under its own name (``check_tar_read`` in the
backup script, ``backup._TAR_READ_CHECK_PROGRAM``) may read a state and an
index of millions of directories. This makes a tree of that many
directories (each with a file, two levels as Synapse's media store),
archives it with GNU tar as the backup script does, to nowhere, and runs the
check on what tar wrote, as the script runs it.

Run with ``tox -e bench-check`` (``-- --directories 1000000`` for a large
server: about four minutes here, most of it making the directories).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import backup
from tests.helpers.tar_state import tar_state

FANOUT = 256  # directories per first-level directory


def make_tree(top: Path, directories: int) -> None:
    """Make ``directories`` leaf directories under top, each with a file.

    Args:
        top: where.
        directories: how many.
    """
    for number in range(directories):
        leaf = top / f"{number // FANOUT:05x}" / f"{number % FANOUT:02x}"
        leaf.mkdir(parents=True)
        (leaf / "thumbnail").write_bytes(b"")


def run_check(workdir: Path, member: str) -> dict[str, float | int | str]:
    """Run the check once, as the backup script does after tar exited 0.

    Args:
        workdir: where tar wrote its state, index and messages.
        member: the archived path.

    Returns:
        Its exit status, seconds, peak RSS in MiB and what it printed.
    """
    argv = [sys.executable, "-c", backup._TAR_READ_CHECK_PROGRAM, str(workdir / "tar-errors"),
            str(workdir / "index"), str(workdir / "state"), "", "", "0", member]  # fmt: skip
    start = time.monotonic()
    process = subprocess.Popen(argv, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "status": process.returncode,
        "seconds": round(time.monotonic() - start, 2),
        "peak-rss-mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "stderr": stderr.decode(errors="replace"),
    }


def main(argv: list[str] | None = None) -> int:
    """Make the tree, archive it, run the check, print and write the results.

    Args:
        argv: the arguments (default: the command line's).

    Returns:
        0 when the check passed, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directories", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default="/var/tmp", help="scratch space (a real disk)")
    parser.add_argument("--out", default="bench-results", help="where check-tar-read.json goes")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-check-", dir=options.workdir) as scratch:
        workdir = Path(scratch)
        top = workdir / "data" / "media_store" / "local_thumbnails"
        print(f"making {options.directories} directories ...", flush=True)
        make_tree(top, options.directories)
        time.sleep(1.1)  # every file older than tar's start, as on a live server
        member = str(top).lstrip("/")
        status = tar_state(workdir, member, workdir / "state", timeout=None)
        if status != 0:
            raise RuntimeError(f"tar exited with {status}: {(workdir / 'tar-errors').read_text()}")
        with (workdir / "index").open("rb") as index:
            index_lines = sum(1 for _ in index)
        runs = [run_check(workdir, member) for _ in range(options.rounds)]
    for number, run in enumerate(runs, 1):
        print(f"round {number}: check exited {run['status']} in {run['seconds']} s, "
              f"peak RSS {run['peak-rss-mib']} MiB {run['stderr']}".rstrip())  # fmt: skip
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"directories": options.directories, "index-lines": index_lines, "runs": runs}
    (out / "check-tar-read.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'check-tar-read.json'}")
    return 0 if all(run["status"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
