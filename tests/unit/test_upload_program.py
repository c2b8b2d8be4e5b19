"""The upload program of the backup pipeline, run for real with a stand-in aws.

The program (backup._UPLOAD_PROGRAM) hashes the encrypted stream and feeds it
to one ``aws s3 cp - URL`` per piece. Here aws is a small script that writes
what it reads to a file named after its URL, or misbehaves on request: the
real aws CLI and S3 are in tests/workload/test_archive_pieces.py.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import backup
import backup_store

URL = "s3://bucket/prod/20250101T000000Z"

# Writes stdin to <dir>/<last part of the URL>; AWS_FAIL=<suffix> exits 3 after
# reading, AWS_SHORT=<suffix> reads 10 bytes and exits 0, AWS_HANG=<suffix>
# writes its pid and sleeps.
STUB_AWS = f"""#!{sys.executable}
import os, sys, time
url = sys.argv[-1]
name = url.rsplit("/", 1)[-1]
out = os.path.join(os.environ["AWS_OUT"], name)
def matches(variable):
    suffix = os.environ.get(variable)
    return bool(suffix) and url.endswith(suffix)
if matches("AWS_SHORT"):
    sys.stdin.buffer.read(10)
    sys.exit(0)
if matches("AWS_HANG"):
    open(out + ".pid", "w").write(str(os.getpid()))
    time.sleep(60)
with open(out, "wb") as sink:
    while chunk := sys.stdin.buffer.read(1 << 16):
        sink.write(chunk)
sys.exit(3 if matches("AWS_FAIL") else 0)
"""


def _start(
    tmp_path: pathlib.Path, piece_size: int, **behaviour: str
) -> tuple[subprocess.Popen[bytes], pathlib.Path, pathlib.Path]:
    """Start the program with the stand-in aws; return it, the output dir and the record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    aws = bin_dir / "aws"
    aws.write_text(STUB_AWS)
    aws.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    record = tmp_path / "digest"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "AWS_OUT": str(out)}
    env.update(behaviour)
    program = subprocess.Popen(
        [
            sys.executable,
            "-c",
            backup._UPLOAD_PROGRAM,
            str(record),
            str(piece_size),
            backup_store.ARCHIVE_PIECE_INFIX,
            "aws",
            "s3",
            "cp",
            "-",
            URL,
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    return program, out, record


def _run(
    tmp_path: pathlib.Path, data: bytes, piece_size: int, **behaviour: str
) -> tuple[int, str, pathlib.Path, pathlib.Path]:
    program, out, record = _start(tmp_path, piece_size, **behaviour)
    try:
        _, stderr = program.communicate(data, timeout=60)
    except BrokenPipeError:  # the program stopped reading: it failed
        stderr = program.stderr.read() if program.stderr else b""
        program.wait(timeout=60)
    return program.returncode, stderr.decode(), out, record


@pytest.mark.parametrize(
    ("size", "pieces"),
    [
        pytest.param(0, [0], id="empty"),
        pytest.param(999, [999], id="under-a-piece"),
        pytest.param(1000, [1000], id="exactly-a-piece"),
        pytest.param(1001, [1000, 1], id="one-byte-over"),
        pytest.param(3000, [1000, 1000, 1000], id="exact-multiple"),
        pytest.param(2500, [1000, 1000, 500], id="two-and-a-half"),
    ],
)
def test_pieces_are_the_stream_cut_in_order(tmp_path: pathlib.Path, size: int, pieces: list[int]):
    """Each piece goes to its own upload; together they are the stream, hashed whole."""
    data = os.urandom(size)

    status, stderr, out, record = _run(tmp_path, data, 1000)

    assert status == 0, stderr
    expected = backup_store.archive_pieces("20250101T000000Z", size, 1000)
    assert sorted(path.name for path in out.iterdir()) == sorted(expected)
    assert [len((out / name).read_bytes()) for name in expected] == pieces
    assert b"".join((out / name).read_bytes() for name in expected) == data
    assert record.read_text() == f"{hashlib.sha256(data).hexdigest()} {size}\n"


def test_a_failed_piece_fails_the_program_and_stops_there(tmp_path: pathlib.Path):
    """Aws failing the second piece fails the program; no third piece, no record."""
    status, stderr, out, record = _run(tmp_path, os.urandom(3500), 1000, AWS_FAIL=".part-0001")

    assert status != 0
    assert "the upload of archive piece 1 failed" in stderr
    assert not (out / "20250101T000000Z.part-0002").exists()
    assert not record.exists()


def test_an_upload_that_stops_reading_fails_the_program(tmp_path: pathlib.Path):
    """Aws leaving its piece unread (and exiting 0) is a failure, not a short success."""
    piece_size = 8 * 1024 * 1024  # more than the pipes hold

    status, stderr, _, record = _run(
        tmp_path, os.urandom(piece_size + 1), piece_size, AWS_SHORT="20250101T000000Z"
    )

    assert status != 0
    assert "the upload of archive piece 0 stopped before its end" in stderr
    assert not record.exists()


def test_sigterm_kills_the_running_upload(tmp_path: pathlib.Path):
    """Terminated, the program kills its aws, which must not complete a cut-off piece."""
    program, out, record = _start(tmp_path, 1000, AWS_HANG="20250101T000000Z")
    pid_file = out / "20250101T000000Z.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    aws_pid = int(pid_file.read_text())

    program.send_signal(signal.SIGTERM)
    program.wait(timeout=30)

    assert program.returncode != 0
    assert program.stderr is not None
    assert "the upload was terminated" in program.stderr.read().decode()
    with pytest.raises(ProcessLookupError):
        os.kill(aws_pid, 0)  # killed and reaped by the program
    assert not record.exists()
