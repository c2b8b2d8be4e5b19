"""The private work directory in the workload container, and running scripts there.

Everything a backup or restore script needs is put in a private work
directory (mode 0700, under /tmp) first: the aws configuration, the gpg
passphrase (mode 0600) and an empty GNUPGHOME. The S3 credentials reach the
container only in the exec's environment, and are redacted from anything an
error quotes. Scripts are built from shell words quoted one by one.
"""

from __future__ import annotations

import logging
import posixpath
import re
import secrets
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import ops

from backup_store import (
    EXEC_TIMEOUT,
    BackupError,
    S3Client,
    S3Parameters,
)
from synapse_layout import (
    SYNAPSE_GROUP_ID,
    SYNAPSE_USER_ID,
)

logger = logging.getLogger(__name__)

AWS_COMMAND = "aws"
BASH_COMMAND = "bash"
# The aws CLI keeps about one multipart chunk in memory per request in
# flight (and, downloading to a pipe, the parts waiting for their turn):
# these bound the pipeline's memory whatever the size of the data. Measured
# by `tox -e bench` (docs/explanation/performance.md).
S3_MAX_CONCURRENT_REQUESTS = 4
S3_MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
S3_DOWNLOAD_CONCURRENT_REQUESTS = 1
S3_DOWNLOAD_CHUNKSIZE = 16 * 1024 * 1024
# Name of the passphrase file inside the private work directory.
PASSPHRASE_FILE = "passphrase"  # noqa: S105 - a file name, not a secret
AWS_CONFIG_FILE = "aws-config"
AWS_DOWNLOAD_CONFIG_FILE = "aws-config-download"
GNUPG_DIR = "gnupg"
DEFAULT_WORK_DIR = "/tmp/synapse-backup"  # noqa: S108 - private 0700, removed after use
WORK_DIR_PREFIX = "/tmp/synapse-backup-"  # noqa: S108 - a private 0700 dir in the container
SNAPSHOT_DIR_PREFIX = ".synapse-backup-snapshot-"
# Every command the backup and restore scripts run in the workload.
REQUIRED_TOOLS = (
    BASH_COMMAND,
    "tar",
    "gpg",
    "gpgconf",
    "python3",
    AWS_COMMAND,
    "env",
    "grep",
    "du",
    "df",
    "chmod",
    "touch",
    "cp",
    "mv",
    "rm",
    "mkdir",
)
GPG_S2K_COUNT = 65011712  # the most passphrase hashing OpenPGP can encode


# The start of the stream programs (below, and the upload program in backup.py):
# 1 MiB pipes, fewer wake-ups for every stage.
_BIGGER_PIPE = """
import fcntl
def bigger_pipe(stream):
    try:
        fcntl.fcntl(stream, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
"""
# Passes the encrypted stream from stdin to stdout and writes its SHA-256 and
# size to a file, so that a restore hashes the archive while it downloads it.
_DIGEST_PROGRAM = (
    _BIGGER_PIPE
    + """
import hashlib, os, sys
bigger_pipe(0)
bigger_pipe(1)
digest, size = hashlib.sha256(), 0
source, buffer = sys.stdin.buffer.raw, memoryview(bytearray(1 << 20))
while count := source.readinto(buffer):  # one buffer, as the upload program
    view = buffer[:count]
    digest.update(view)
    size += count
    while view:
        view = view[os.write(1, view):]
with open(sys.argv[1], "w") as out:
    out.write(f"{digest.hexdigest()} {size}\\n")
"""
)
# Counts the members in tar's verbose index: one line each (names are
# escaped, so a newline in a name cannot add one), except the "tar: Deleting"
# notes of an incremental extraction. Members all start with "data/".
_COUNT_MEMBERS = "members=$(grep --count --invert-match --regexp='^tar: ' -- "


def calculate_size(container: ops.Container, paths: Iterable[str]) -> int:
    """Return the combined size of all the paths given.

    Args:
        container: Container where to check the size of the paths.
        paths: Paths to check.

    Returns:
        Total size in bytes.

    Raises:
        BackupError: if the size cannot be measured.
    """
    paths = list(paths)
    if not paths:
        return 0
    # du gets the paths as argv words: no shell is involved.
    command = ["du", "--summarize", "--bytes", "--total", "--", *paths]
    try:
        stdout, _ = container.exec(
            command, user_id=SYNAPSE_USER_ID, group_id=SYNAPSE_GROUP_ID, timeout=600
        ).wait_output()
    except ops.pebble.ExecError as exc:
        raise BackupError(f"cannot measure the backup size: {_tail(exc.stderr)}") from exc
    except (ops.pebble.APIError, ops.pebble.ChangeError, ops.pebble.TimeoutError) as exc:
        raise BackupError(f"cannot measure the backup size: {exc}") from exc
    try:
        return int(stdout.strip().splitlines()[-1].split()[0])
    except (IndexError, ValueError) as exc:
        raise BackupError("cannot measure the backup size: unexpected du output") from exc


def get_environment(s3_parameters: S3Parameters, *, work_dir: str | None = None) -> dict[str, str]:
    """Get the environment variables for backup that configure aws S3 cli.

    Args:
        s3_parameters: S3 parameters.
        work_dir: the private work directory prepared by prepare_container;
            when given, HOME, GNUPGHOME and AWS_CONFIG_FILE point into it so
            that nothing depends on the Synapse user's home directory.

    Returns:
        A dictionary with aws s3 configuration variables.
    """
    environment = {
        "AWS_ACCESS_KEY_ID": s3_parameters.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_parameters.secret_key,
        "AWS_EC2_METADATA_DISABLED": "true",
        "LC_ALL": "C",
    }
    if s3_parameters.region:
        environment["AWS_DEFAULT_REGION"] = s3_parameters.region
    if s3_parameters.endpoint:
        environment["AWS_ENDPOINT_URL"] = s3_parameters.endpoint
    if work_dir:
        environment["HOME"] = work_dir
        environment["GNUPGHOME"] = posixpath.join(work_dir, GNUPG_DIR)
        environment["AWS_CONFIG_FILE"] = posixpath.join(work_dir, AWS_CONFIG_FILE)
        environment["AWS_SHARED_CREDENTIALS_FILE"] = posixpath.join(work_dir, "no-credentials")
    return environment


def build_aws_config(s3_parameters: S3Parameters, *, download: bool = False) -> str:
    """Return the aws CLI configuration file for the backup transfers.

    It holds no secret: credentials come from the environment. Payloads are
    not hashed for signing nor checksummed by the client: the archive is
    authenticated by gpg and its SHA-256 is recorded in the manifest, and
    the CPU is better spent on the pipeline.

    Args:
        s3_parameters: S3 parameters.
        download: tune for downloads to a pipe (restore) instead of uploads.

    Returns:
        The content of the aws configuration file.
    """
    concurrency = S3_DOWNLOAD_CONCURRENT_REQUESTS if download else S3_MAX_CONCURRENT_REQUESTS
    chunksize = S3_DOWNLOAD_CHUNKSIZE if download else S3_MULTIPART_CHUNKSIZE
    lines = ["[default]"]
    if s3_parameters.region:
        lines.append(f"region = {s3_parameters.region}")
    lines += [
        "request_checksum_calculation = when_required",
        "response_checksum_validation = when_required",
        "s3 =",
        f"  addressing_style = {s3_parameters.addressing_style}",
        f"  max_concurrent_requests = {concurrency}",
        f"  multipart_chunksize = {chunksize}",
        "  payload_signing_enabled = false",
        "",
    ]
    return "\n".join(lines)


def prepare_container(
    container: ops.Container,
    s3_parameters: S3Parameters,
    passphrase: str,
    *,
    work_dir: str | None = None,
) -> None:
    """Prepare container for create or restore backup.

    This means preparing the required aws configuration and gpg passphrase file.
    They go in a private work directory (mode 0700, owned by the Synapse user)
    that must not exist yet; the passphrase file is mode 0600.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters for the backup.
        passphrase: Passphrase for the backup (used for gpg).
        work_dir: the work directory to create (default: DEFAULT_WORK_DIR).

    Raises:
        BackupError: if there was an error preparing the configuration.
    """
    work_dir = work_dir or DEFAULT_WORK_DIR
    try:
        if container.exists(work_dir):
            raise BackupError(f"work directory {work_dir} exists already")
        container.make_dir(
            work_dir, permissions=0o700, user_id=SYNAPSE_USER_ID, group_id=SYNAPSE_GROUP_ID
        )
        container.make_dir(
            posixpath.join(work_dir, GNUPG_DIR),
            permissions=0o700,
            user_id=SYNAPSE_USER_ID,
            group_id=SYNAPSE_GROUP_ID,
        )
        files = {
            AWS_CONFIG_FILE: build_aws_config(s3_parameters),
            AWS_DOWNLOAD_CONFIG_FILE: build_aws_config(s3_parameters, download=True),
            PASSPHRASE_FILE: passphrase,
        }
        for name, content in files.items():
            container.push(
                posixpath.join(work_dir, name),
                content,
                permissions=0o600,
                user_id=SYNAPSE_USER_ID,
                group_id=SYNAPSE_GROUP_ID,
            )
    except (ops.pebble.PathError, ops.pebble.APIError) as exc:
        raise BackupError(f"cannot prepare the backup work directory: {exc}") from exc


def new_work_dir() -> str:
    """Return the path of a new private work directory in the container.

    Returns:
        A path under /tmp with a random name.
    """
    return f"{WORK_DIR_PREFIX}{secrets.token_hex(8)}"


@contextmanager
def prepared_container(
    container: ops.Container, s3_parameters: S3Parameters, passphrase: str
) -> Iterator[str]:
    """Prepare a private work directory and remove it afterwards, whatever happens.

    Args:
        container: Synapse Container.
        s3_parameters: S3 parameters for the backup.
        passphrase: Passphrase for the backup.

    Yields:
        The work directory.
    """
    work_dir = new_work_dir()
    try:
        prepare_container(container, s3_parameters, passphrase, work_dir=work_dir)
        yield work_dir
    finally:
        _remove_quietly(container, work_dir)


def _remove_quietly(container: ops.Container, path: str) -> None:
    """Remove a path in the container, logging (not raising) on failure.

    Args:
        container: the container.
        path: what to remove.
    """
    try:
        container.remove_path(path, recursive=True)
    except (ops.pebble.PathError, ops.pebble.APIError) as exc:
        logger.error("could not remove %s from the container: %s", path, exc)


def _relative(path: str) -> str:
    """Return a container path as a tar member name (no leading slash).

    Args:
        path: an absolute container path.

    Returns:
        The path without its leading slashes.

    Raises:
        BackupError: if the path is not absolute or not normalised.
    """
    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise BackupError(f"not an absolute normalised path: {path!r}")
    return path.lstrip("/")


def _script(lines: Sequence[Sequence[str] | str]) -> str:
    """Join shell lines; each line given as a list is quoted word by word.

    Args:
        lines: raw shell syntax (str) or commands (lists of words).

    Returns:
        The script.
    """
    return "\n".join(
        line if isinstance(line, str) else " ".join(shlex.quote(word) for word in line)
        for line in lines
    )


def _gpg_command(passphrase_file: str, *operation: str) -> list[str]:
    """Return a gpg command that reads its passphrase from a file.

    Args:
        passphrase_file: the passphrase file.
        operation: the operation and its options.

    Returns:
        The command's words.
    """
    return [
        "gpg",
        "--no-permission-warning",  # restore runs as root in the Synapse user's work dir
        "--batch",
        "--no-tty",
        "--quiet",
        "--yes",
        "--no-symkey-cache",
        "--pinentry-mode",
        "loopback",
        "--passphrase-file",
        passphrase_file,
        *operation,
    ]


def _script_preamble(work_dir: str) -> list[Sequence[str] | str]:
    """Return the lines every pipeline starts with.

    Strict error handling, a private umask, and a trap that stops the
    gpg-agent of the private GNUPGHOME and removes temporary files.

    Args:
        work_dir: the private work directory.

    Returns:
        The script lines.
    """
    gnupg_home = posixpath.join(work_dir, GNUPG_DIR)
    return [
        "set -o errexit -o nounset -o pipefail",
        "umask 077",
        "cleanup() {",
        _script([["gpgconf", "--homedir", gnupg_home, "--kill", "gpg-agent"]])
        + " >/dev/null 2>&1 || true",
        '  if [ -n "${SNAPSHOT_DIR:-}" ]; then rm -rf -- "$SNAPSHOT_DIR"; fi',
        "}",
        "trap cleanup EXIT",
    ]


def check_tools(container: ops.Container, tools: Sequence[str] = REQUIRED_TOOLS) -> None:
    """Check that the workload has the tools a backup needs.

    Args:
        container: Synapse Container.
        tools: the commands that must be on PATH.

    Raises:
        BackupError: naming the missing tools.
    """
    script = _script(
        [
            "missing=''",
            "for tool in " + " ".join(shlex.quote(tool) for tool in tools) + "; do",
            '  command -v -- "$tool" >/dev/null 2>&1 || missing="$missing $tool"',
            "done",
            'printf "%s\\n" "$missing"',
        ]
    )
    try:
        stdout, _ = container.exec([BASH_COMMAND, "-c", script], timeout=60).wait_output()
    except ops.pebble.APIError as exc:
        # Pebble cannot start a command that does not exist.
        raise BackupError(
            f"the workload container lacks {BASH_COMMAND} ({exc.message}); "
            "use the synapse rock from synapse_rock/"
        ) from exc
    except ops.pebble.ExecError as exc:
        if exc.exit_code == 127:  # the shell itself could not be found
            raise BackupError(
                f"the workload container lacks {BASH_COMMAND}; "
                "use the synapse rock from synapse_rock/"
            ) from exc
        raise BackupError(f"cannot check the workload's tools: {_tail(exc.stderr)}") from exc
    except (ops.pebble.ChangeError, ops.pebble.TimeoutError) as exc:
        raise BackupError(f"cannot check the workload's tools: {exc}") from exc
    missing = stdout.split()
    if missing:
        raise BackupError(
            "the workload container lacks "
            + ", ".join(missing)
            + "; use the synapse rock from synapse_rock/"
        )


def run_in_container(
    container: ops.Container,
    command: list[str],
    environment: Mapping[str, str],
    *,
    secrets_to_hide: Iterable[str] = (),
    what: str,
    user_id: int = SYNAPSE_USER_ID,
) -> str:
    """Run a pipeline in the container as the Synapse user.

    Args:
        container: Synapse Container.
        command: the command.
        environment: the exec's environment (may hold credentials).
        secrets_to_hide: strings that must never appear in an error message.
        what: what the command does, for error messages.
        user_id: the user to run it as (default: the Synapse user).

    Returns:
        The command's standard output.

    Raises:
        BackupError: if the command fails, with the end of its error output.
    """
    hidden = [value for value in secrets_to_hide if value]
    try:
        process = container.exec(
            command,
            environment=dict(environment),
            user_id=user_id,
            group_id=SYNAPSE_GROUP_ID if user_id == SYNAPSE_USER_ID else user_id,
            working_dir="/",
            timeout=EXEC_TIMEOUT,
        )
        stdout, _ = process.wait_output()
    except ops.pebble.ExecError as exc:
        raise BackupError(
            f"{what} failed (exit code {exc.exit_code}): {redact(_tail(exc.stderr), hidden)}"
        ) from exc
    except ops.pebble.TimeoutError as exc:
        raise BackupError(f"{what} timed out") from exc
    except (ops.pebble.APIError, ops.pebble.ChangeError) as exc:
        raise BackupError(f"{what} could not run: {redact(str(exc), hidden)}") from exc
    return stdout


def redact(text: str, hidden: Iterable[str]) -> str:
    """Replace every secret in a text.

    Args:
        text: the text.
        hidden: the secrets.

    Returns:
        The text with each secret replaced by ``***``.
    """
    for value in hidden:
        if value:
            text = text.replace(value, "***")
    return text


def _tail(output: str | bytes | None, lines: int = 8) -> str:
    """Summarise a pipeline's error output on one line.

    The first lines usually name the stage that failed (an S3 error, say),
    the last ones what that did to the next stages; both are kept.

    Args:
        output: the output.
        lines: how many lines to keep at most.

    Returns:
        The lines joined with "; ".
    """
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    kept = [line.strip() for line in (output or "").splitlines() if line.strip()]
    if len(kept) > lines:
        kept = [*kept[: lines // 2], "...", *kept[-(lines - lines // 2) :]]
    return "; ".join(kept) or "no error output"


def _parse_digest(stdout: str) -> tuple[str, int, int]:
    """Parse the last line of the backup pipeline's output.

    Args:
        stdout: the pipeline's output.

    Returns:
        The SHA-256, size and member count of the archive.

    Raises:
        BackupError: if the line is missing or malformed.
    """
    lines = stdout.strip().splitlines()
    match = re.fullmatch(r"([0-9a-f]{64}) ([0-9]+) ([0-9]+)", lines[-1].strip()) if lines else None
    if not match:
        raise BackupError("the backup pipeline did not report the archive's digest")
    return match.group(1), int(match.group(2)), int(match.group(3))


PASSPHRASE_PROBE_BYTES = 64 * 1024


def _check_passphrase(
    container: ops.Container, client: S3Client, backup_key: str, work_dir: str
) -> None:
    """Check that the passphrase decrypts a backup, reading only its start.

    Args:
        container: Synapse Container.
        client: the S3 client.
        backup_key: the backup.
        work_dir: the prepared work directory (with the passphrase file).

    Raises:
        BackupError: if the passphrase is wrong.
    """
    probe = posixpath.join(work_dir, "probe.gpg")
    head = client.read_object(backup_key, first_bytes=PASSPHRASE_PROBE_BYTES)
    container.push(
        probe, head, permissions=0o600, user_id=SYNAPSE_USER_ID, group_id=SYNAPSE_GROUP_ID
    )
    gpg = _gpg_command(posixpath.join(work_dir, PASSPHRASE_FILE), "--decrypt")
    command = _script([*_script_preamble(work_dir), [*gpg, "--output", "/dev/null", probe]])
    try:
        container.exec(
            [BASH_COMMAND, "-c", command],
            environment={
                "GNUPGHOME": posixpath.join(work_dir, GNUPG_DIR),
                "HOME": work_dir,
                "LC_ALL": "C",  # the message below is matched in English
            },
            timeout=120,
            user_id=SYNAPSE_USER_ID,
            group_id=SYNAPSE_GROUP_ID,
        ).wait_output()
    except ops.pebble.ExecError as exc:
        # A cut-off stream fails too, later; only a bad key means a wrong passphrase.
        if "Bad session key" in str(exc.stderr):
            raise BackupError(
                f"the backup passphrase does not decrypt backup {backup_key}"
            ) from exc
    except (ops.pebble.APIError, ops.pebble.ChangeError, ops.pebble.TimeoutError) as exc:
        raise BackupError(f"cannot check the passphrase: {exc}") from exc
