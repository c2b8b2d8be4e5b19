"""Run a Pebble exec for real in bubblewrap, on a Harness container's filesystem.

`ops.testing.Harness` keeps a container's files in a real directory,
``harness.get_filesystem_root(container)``, which stands for the container's
``/``. `Sandbox` runs each exec in a bubblewrap sandbox where that directory's
entries appear at ``/<name>`` (read-write) on top of the host's ``/``
(read-only), so the charm's commands run for real::

    sandbox = Sandbox(harness.get_filesystem_root("synapse"))
    harness.handle_exec("synapse", [], handler=sandbox.handle)
    honor_pebble_ownership(monkeypatch)

Needs ``bwrap`` (bubblewrap) and util-linux ``setpriv``, and root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from ops import testing
from ops._private.harness import _TestingPebbleClient
from ops.testing import ExecArgs, ExecResult

import synapse

# Host top-level entries the sandbox never takes from the host.
_HOST_EXCLUDED = frozenset({"proc", "dev", "sys", "tmp", "run", "root"})
# Top-level directories that are an empty tmpfs unless the container root has them.
_TMPFS_DIRS = ("tmp", "run", "root")
_DEFAULT_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
_REPO_ROOT = Path(__file__).resolve().parents[2]
_DATA_SEED = "/.sandbox-data-seed"

BindSpec = str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]]


def _require(tool: str, package: str) -> str:
    """Return the absolute path of a host tool.

    Args:
        tool: The program name.
        package: The Debian package providing it, for the error message.

    Returns:
        Its absolute path.

    Raises:
        RuntimeError: If the tool is not installed.
    """
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        raise RuntimeError(f"`{tool}` not found: apt-get install {package}")
    return found


def _pick_id(given: int | None, name: str | None, kind: str) -> int | None:
    """Combine an id and a name; only the name "root" is supported.

    Args:
        given: The id, or None.
        name: The name, or None.
        kind: "user" or "group", for error messages.

    Returns:
        The id, or None if neither was given.

    Raises:
        ValueError: If the name is not "root" or disagrees with the id.
    """
    if name is None:
        return given
    if name != "root":
        raise ValueError(f"sandbox supports only the {kind} name 'root', not {name!r}; use an id")
    if given not in (None, 0):
        raise ValueError(f"{kind} name 'root' and id {given} disagree")
    return 0


def resolve_ids(
    user_id: int | None, user: str | None, group_id: int | None, group: str | None
) -> tuple[int | None, int | None]:
    """Resolve the user and group of a Pebble call as Pebble does.

    A user without a group gets the user's primary group from the host's
    ``/etc/passwd`` (which the sandbox shares); a group without a user is an error.

    Args:
        user_id: The user id, or None.
        user: The user name ("root" only), or None.
        group_id: The group id, or None.
        group: The group name ("root" only), or None.

    Returns:
        ``(uid, gid)``, both None when neither was given.

    Raises:
        ValueError: If a name is not "root", name and id disagree, only a group
            is given, or the user's primary group cannot be found.
    """
    uid = _pick_id(user_id, user, "user")
    gid = _pick_id(group_id, group, "group")
    if uid is None:
        if gid is not None:
            raise ValueError("must specify user, not just group")
        return None, None
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise ValueError(f"cannot find primary group of user {uid}; give group_id") from None
    return uid, gid


def exec_args(command: Sequence[str], **fields: Any) -> ExecArgs:
    """Build ExecArgs with the defaults of `ops.Container.exec`, for direct calls.

    Args:
        command: The command and its arguments.
        **fields: Any other ExecArgs field (environment, user_id, timeout, ...).

    Returns:
        The ExecArgs.
    """
    defaults: dict[str, Any] = {
        "environment": {},
        "working_dir": None,
        "timeout": None,
        "user_id": None,
        "user": None,
        "group_id": None,
        "group": None,
        "stdin": None,
        "encoding": "utf-8",
        "combine_stderr": False,
    }
    return ExecArgs(command=list(command), **{**defaults, **fields})


class Sandbox:
    """Executes Pebble exec calls for real in bubblewrap over a container root.

    Inside the sandbox:

    - each top-level entry of ``root`` is bound read-write at ``/<name>``;
    - every other host top-level entry is bound read-only (symlinks such as
      ``/bin -> usr/bin`` are recreated), except ``/proc``, ``/dev``, ``/sys``,
      ``/tmp``, ``/run`` and ``/root``;
    - ``/dev`` and ``/proc`` are fresh (new PID namespace); ``/tmp``, ``/run``
      and ``/root`` are empty tmpfs unless ``root`` has them, with the
      interpreter, the virtualenv, the repository and ``path_dirs`` bound
      read-only at their real paths when they live there (the host ``/root``
      is mode 0700, so a venv under it would be unusable for other users);
    - the network is the host's, so a server on 127.0.0.1 is reachable.

    The sandbox dies with the test process and kills all its processes when
    its command ends or times out.
    """

    def __init__(
        self,
        root: Path,
        *,
        path_dirs: list[str] | None = None,
        extra_ro_binds: Iterable[BindSpec] = (),
        data_tmpfs_size: int | None = None,
    ) -> None:
        """Prepare a sandbox over a container root.

        Args:
            root: The directory standing for the container's ``/``.
            path_dirs: PATH for commands whose environment has none; by default
                the venv's bin, the base interpreter's bin and
                /usr/local/bin:/usr/bin:/bin. Pass a directory of symlinks to
                hide a tool.
            extra_ro_binds: More read-only binds, each a path (bound at the same
                path) or a ``(source, destination)`` pair; applied last.
            data_tmpfs_size: If given, ``/data`` is a tmpfs of this many bytes,
                filled with a copy of ``root/data`` before each command; what the
                command writes there is discarded when it ends. For one-command
                disk-full tests; `mount_small_fs` keeps writes.
        """
        self.root = Path(root)
        self.path_dirs = list(path_dirs) if path_dirs is not None else default_path()
        self.extra_ro_binds = [
            (Path(b[0]), Path(b[1])) if isinstance(b, tuple) else (Path(b), Path(b))
            for b in extra_ro_binds
        ]
        self.data_tmpfs_size = data_tmpfs_size
        self._bwrap = _require("bwrap", "bubblewrap")
        self._setpriv = _require("setpriv", "util-linux")
        self._env = _require("env", "coreutils")

    def environment(self, args: ExecArgs) -> dict[str, str]:
        """Return the command's environment: ``args.environment`` plus a default PATH.

        Args:
            args: The exec arguments.

        Returns:
            The environment, with nothing taken from the host.
        """
        env = dict(args.environment)
        env.setdefault("PATH", os.pathsep.join(self.path_dirs))
        return env

    def argv(self, args: ExecArgs) -> list[str]:
        """Return the full bwrap command line for an exec.

        Args:
            args: The exec arguments.

        Returns:
            The argv, starting with the bwrap binary.
        """
        root_names = {entry.name for entry in self.root.iterdir()}
        _check_not_shadowed(root_names)
        tmpfs_dirs = [name for name in _TMPFS_DIRS if name not in root_names]
        argv = [self._bwrap, "--die-with-parent", "--unshare-pid"]
        argv += _host_binds(exclude=root_names)
        argv += ["--dev", "/dev", "--proc", "/proc"]
        for name in tmpfs_dirs:
            argv += ["--tmpfs", f"/{name}"]
        argv += self._root_binds()
        made: set[Path] = set()
        for path in self._hidden_host_paths(tmpfs_dirs):
            # bwrap would create the missing parents with mode 0700.
            for parent in reversed(path.parents[:-2]):
                if parent not in made:
                    argv += ["--perms", "0755", "--dir", str(parent)]
                    made.add(parent)
            argv += ["--ro-bind", str(path), str(path)]
        for source, destination in self.extra_ro_binds:
            argv += ["--ro-bind", str(source), str(destination)]
        # bwrap sets PWD; env(1) takes it out so the environment is exactly ours.
        argv += ["--chdir", args.working_dir or "/", "--", self._env, "-u", "PWD", "--"]
        if self._data_seed() is not None:
            argv += ["/bin/sh", "-c", f'cp -a {_DATA_SEED}/. /data/ && exec "$@"', "sh"]
        uid, gid = resolve_ids(args.user_id, args.user, args.group_id, args.group)
        if uid is not None:
            argv += [self._setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        return argv + list(args.command)

    def handle(self, args: ExecArgs) -> ExecResult:
        """Run an exec in the sandbox; usable as a ``Harness.handle_exec`` handler.

        Args:
            args: The exec arguments captured by the Harness.

        Returns:
            The exit code and output; str when ``args.encoding`` is set, else bytes.
            With ``combine_stderr`` stderr is merged into stdout.

        Raises:
            TimeoutError: If ``args.timeout`` passed; every process of the
                command was killed.
        """
        stdin = args.stdin
        if isinstance(stdin, str):
            stdin = stdin.encode(args.encoding or "utf-8")
        proc = subprocess.Popen(
            self.argv(args),
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if args.combine_stderr else subprocess.PIPE,
            env=self.environment(args),
            cwd="/",
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(stdin, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TimeoutError(f"{args.command!r} timed out after {args.timeout} s") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stderr = stderr or b""
        if args.encoding:
            return ExecResult(
                proc.returncode, stdout.decode(args.encoding), stderr.decode(args.encoding)
            )
        return ExecResult(proc.returncode, stdout, stderr)

    def _data_seed(self) -> Path | None:
        """The directory to copy into the ``/data`` tmpfs, if there is one and it is not empty.

        Returns:
            ``root/data``, or None.
        """
        data = self.root / "data"
        if self.data_tmpfs_size is None or not data.is_dir() or not any(data.iterdir()):
            return None
        return data

    def _root_binds(self) -> list[str]:
        """Bwrap arguments putting each entry of the container root at ``/<name>``.

        Returns:
            The arguments.
        """
        argv: list[str] = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink():
                argv += ["--symlink", os.readlink(entry), f"/{entry.name}"]
            elif entry.name != "data" or self.data_tmpfs_size is None:
                argv += ["--bind", str(entry), f"/{entry.name}"]
        if self.data_tmpfs_size is not None:
            argv += ["--size", str(self.data_tmpfs_size), "--tmpfs", "/data"]
            seed = self._data_seed()
            if seed is not None:
                argv += ["--ro-bind", str(seed), _DATA_SEED]
        return argv

    def _hidden_host_paths(self, tmpfs_dirs: list[str]) -> list[Path]:
        """Host paths the commands need that a tmpfs would hide.

        Args:
            tmpfs_dirs: The top-level names replaced by a tmpfs.

        Returns:
            The real paths to bind read-only, parents before children, no duplicates.
        """
        wanted: list[str | Path] = [sys.prefix, sys.base_prefix, _REPO_ROOT, *self.path_dirs]
        paths: list[Path] = []
        for item in sorted({Path(os.path.realpath(p)) for p in wanted if os.path.exists(p)}):
            hidden = len(item.parts) > 1 and item.parts[1] in tmpfs_dirs
            if hidden and not any(item.is_relative_to(kept) for kept in paths):
                paths.append(item)
        return paths


def _check_not_shadowed(root_names: set[str]) -> None:
    """Fail clearly when the Python running the tests sits where the container's dirs go.

    The container root's top-level directories (``/tmp``, ``/data``) replace
    the host's inside the sandbox, so a virtual environment under the host's
    ``/tmp`` would vanish and the aws CLI with it.

    Args:
        root_names: The top-level names the container root provides.

    Raises:
        RuntimeError: If the interpreter or its virtual environment is shadowed.
    """
    for prefix in (sys.prefix, sys.base_prefix):
        parts = Path(os.path.realpath(prefix)).parts
        if len(parts) > 1 and parts[1] in root_names:
            raise RuntimeError(
                f"the test environment {prefix} is under /{parts[1]}, which the stand-in "
                "container replaces: put it elsewhere, e.g. TOX_WORK_DIR=/var/tmp/synapse-tox tox"
            )


def _host_binds(exclude: set[str]) -> list[str]:
    """Bwrap arguments showing the host's top-level entries read-only.

    Args:
        exclude: Names the container root provides instead.

    Returns:
        The arguments; symlinks such as ``/bin -> usr/bin`` are recreated.
    """
    argv: list[str] = []
    for entry in sorted(Path("/").iterdir()):
        if entry.name in _HOST_EXCLUDED or entry.name in exclude:
            continue
        if entry.is_symlink():
            argv += ["--symlink", os.readlink(entry), str(entry)]
        else:
            argv += ["--ro-bind-try", str(entry), str(entry)]
    return argv


def default_path() -> list[str]:
    """The default PATH: venv bin, base interpreter bin, then the system dirs.

    Returns:
        The directories, without duplicates.
    """
    dirs = [
        str(Path(sys.executable).parent),
        str(Path(os.path.realpath(sys.executable)).parent),
        *_DEFAULT_PATH,
    ]
    return list(dict.fromkeys(dirs))


def honor_pebble_ownership(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make Harness push/make_dir apply user and group ownership, as Pebble does.

    This emulates Pebble, which cannot run here: the Harness's Pebble client
    accepts ``user_id``/``group_id`` (and "root" names) on ``push`` and
    ``make_dir`` but ignores them. After this call they are applied with
    `os.chown` to the file written and to each directory created. Needs root.

    Args:
        monkeypatch: The pytest fixture; the patch ends with the test.
    """
    push = _TestingPebbleClient.push
    make_dir = _TestingPebbleClient.make_dir

    def owned_push(self: _TestingPebbleClient, path: str, *args: Any, **kwargs: Any) -> None:
        push(self, path, *args, **kwargs)
        _chown(self, path, kwargs)

    def owned_make_dir(self: _TestingPebbleClient, path: str, *args: Any, **kwargs: Any) -> None:
        existed = _host_path(self, path).exists()
        make_dir(self, path, *args, **kwargs)
        if not existed:
            _chown(self, path, kwargs)

    monkeypatch.setattr(_TestingPebbleClient, "push", owned_push)
    monkeypatch.setattr(_TestingPebbleClient, "make_dir", owned_make_dir)


def _host_path(client: _TestingPebbleClient, path: str | os.PathLike[str]) -> Path:
    """Return where a container path lives in the Harness filesystem root.

    Args:
        client: The Harness Pebble client.
        path: The absolute container path.

    Returns:
        The host path.
    """
    return client._root / str(path).lstrip("/")  # Harness internals


def _chown(client: _TestingPebbleClient, path: str, kwargs: dict[str, Any]) -> None:
    """Apply the ownership requested in a push/make_dir call, if any.

    Args:
        client: The Harness Pebble client.
        path: The container path written.
        kwargs: The call's keyword arguments.
    """
    uid, gid = resolve_ids(
        kwargs.get("user_id"), kwargs.get("user"), kwargs.get("group_id"), kwargs.get("group")
    )
    if uid is not None and gid is not None:
        os.chown(_host_path(client, path), uid, gid)


@contextlib.contextmanager
def mount_small_fs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of a given size on a directory, for disk-full tests. Needs root.

    What the directory held is hidden while the tmpfs is mounted and comes back
    after; the tmpfs starts empty with the directory's mode and owner.

    Args:
        path: The directory (created if missing).
        size_bytes: The size limit (rounded up to whole pages by the kernel).

    Yields:
        The path, with the tmpfs mounted on it.

    Raises:
        RuntimeError: If the mount fails.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stat = path.stat()
    mode = stat.st_mode & 0o7777
    options = f"size={size_bytes},mode={mode:o},uid={stat.st_uid},gid={stat.st_gid}"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(f"cannot mount a tmpfs on {path}: {result.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)


class SynapseHealth:
    """A stand-in for Synapse's /health endpoint (mocked: Harness runs no service).

    Every other exec runs for real in the sandbox; the health probe answers
    as ``answers`` says, and counts how often it was asked.
    """

    def __init__(self) -> None:
        """Answer until told otherwise."""
        self.answers = True
        self.asked = 0

    def handle(self, args: testing.ExecArgs) -> testing.ExecResult:
        """Answer one probe.

        Args:
            args: the probe's exec.

        Returns:
            Success when Synapse is to answer.
        """
        self.asked += 1
        return testing.ExecResult(exit_code=0 if self.answers else 1)

    def answer_in(self, harness: testing.Harness[Any]) -> None:
        """Answer the charm's health probes in a harness's synapse container.

        Args:
            harness: the harness.
        """
        probe = ["python3", "-c", synapse.HEALTH_PROBE]
        harness.handle_exec("synapse", probe, handler=self.handle)


__all__ = [
    "Sandbox",
    "SynapseHealth",
    "exec_args",
    "honor_pebble_ownership",
    "mount_small_fs",
    "resolve_ids",
]
