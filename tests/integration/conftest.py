"""Fixtures for the integration tests: a real Juju controller, the packed charm, S3.

Nothing here is faked. When something the tests need is missing, every
test in this directory is skipped with a reason that names it:

- a Juju controller: the ``juju`` CLI on PATH, a current controller in
  ``juju controllers`` and ``juju show-controller`` answering for it;
- an S3 store the cluster can reach, given by the environment variables
  ``SYNAPSE_IT_S3_ENDPOINT``, ``SYNAPSE_IT_S3_BUCKET`` (an existing bucket),
  ``SYNAPSE_IT_S3_ACCESS_KEY`` and ``SYNAPSE_IT_S3_SECRET_KEY``, and
  optionally ``SYNAPSE_IT_S3_REGION``;
- the packed charm: ``--charm-file`` (or ``SYNAPSE_IT_CHARM_FILE``), else the
  single ``*.charm`` in the current directory or the repository root;
- the workload image built from ``synapse_rock/``: ``--synapse-image`` (or
  ``SYNAPSE_IT_IMAGE``), a reference the cluster can pull.

The command-line options are registered here, so pytest knows them when this
directory is on its command line (``pytest tests/integration --charm-file=...``,
as ``tox -e integration`` does); the environment variables work either way.
The tests run in a temporary model that is destroyed afterwards, unless
``--keep-models`` is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import jubilant
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
JUJU_CLI_TIMEOUT = 60
DEPLOY_TIMEOUT = 20 * 60

CHARM_FILE_ENV = "SYNAPSE_IT_CHARM_FILE"
IMAGE_ENV = "SYNAPSE_IT_IMAGE"
# The S3 store: endpoint, bucket, access key and secret key (all required), region.
REQUIRED_S3_ENV = (
    "SYNAPSE_IT_S3_ENDPOINT",
    "SYNAPSE_IT_S3_BUCKET",
    "SYNAPSE_IT_S3_ACCESS_KEY",
    "SYNAPSE_IT_S3_SECRET_KEY",
)
S3_REGION_ENV = "SYNAPSE_IT_S3_REGION"


@dataclasses.dataclass(frozen=True)
class S3Target:
    """The S3 store the charm backs up to during the tests.

    Attributes:
        endpoint: URL of the S3 endpoint, reachable from the Kubernetes cluster.
        bucket: an existing bucket.
        access_key: access key of the store.
        secret_key: secret key of the store.
        region: region, or None to leave it to the charm's default.
    """

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str | None

    def client(self, secret_key: str | None = None) -> Any:
        """Create a boto3 S3 client for this store (path-style addressing).

        Args:
            secret_key: a secret key to use instead of the right one.

        Returns:
            The boto3 S3 client.
        """
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region or "us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": 3}
            ),
        )


@dataclasses.dataclass(frozen=True)
class IntegrationSettings:
    """Everything the integration tests need, checked to be there.

    Attributes:
        controller: name of the reachable Juju controller the tests use.
        charm_file: absolute path of the packed charm.
        image: the Synapse OCI image for the ``synapse-image`` resource.
        s3: the S3 store for the backups.
        keep_models: keep the temporary model after the tests.
    """

    controller: str
    charm_file: Path
    image: str
    s3: S3Target
    keep_models: bool


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the integration tests' command-line options.

    Args:
        parser: pytest's option parser.
    """
    group = parser.getgroup("synapse integration tests")
    group.addoption(
        "--charm-file",
        default=None,
        help=f"packed synapse charm to deploy (default: ${CHARM_FILE_ENV}, else ./*.charm)",
    )
    group.addoption(
        "--synapse-image",
        default=None,
        help=f"OCI image for the synapse-image resource (default: ${IMAGE_ENV})",
    )
    group.addoption(
        "--keep-models",
        action="store_true",
        default=False,
        help="keep the temporary Juju model after the tests",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``integration`` marker.

    Args:
        config: the pytest configuration.
    """
    config.addinivalue_line(
        "markers",
        "integration: needs a Juju controller (skips with the reason when none is reachable)",
    )


def _run_juju(juju_cli: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Juju CLI command that only reads, with a timeout.

    Args:
        juju_cli: path of the juju binary.
        args: the command's arguments.

    Returns:
        The finished process (check its return code).
    """
    return subprocess.run(
        [juju_cli, *args],
        capture_output=True,
        text=True,
        timeout=JUJU_CLI_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _last_line(text: str) -> str:
    """Return the last non-empty line of a command's output, for a skip reason.

    Args:
        text: the output.

    Returns:
        The line, or "(no output)".
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def find_controller() -> str:
    """Return the current Juju controller, or skip saying what is missing.

    Returns:
        The name of a controller that answered ``juju show-controller``.
    """
    juju_cli = shutil.which("juju")
    if juju_cli is None:
        pytest.skip(
            "no Juju controller: the `juju` CLI is not on PATH "
            "(install Juju and bootstrap a Kubernetes controller, e.g. on microk8s)"
        )
    try:
        listed = _run_juju(juju_cli, "controllers", "--format", "json")
    except subprocess.TimeoutExpired:
        pytest.skip(
            f"no Juju controller: `juju controllers` did not answer in {JUJU_CLI_TIMEOUT}s"
        )
    if listed.returncode != 0:
        pytest.skip(f"no Juju controller: `juju controllers` failed: {_last_line(listed.stderr)}")
    try:
        controllers = json.loads(listed.stdout or "{}")
    except json.JSONDecodeError:
        pytest.skip("no Juju controller: `juju controllers` printed no JSON")
    current = controllers.get("current-controller")
    if not controllers.get("controllers"):
        pytest.skip("no Juju controller: `juju controllers` lists none (bootstrap one)")
    if not current:
        pytest.skip("no current Juju controller: choose one with `juju switch`")
    try:
        shown = _run_juju(juju_cli, "show-controller", current, "--format", "json")
    except subprocess.TimeoutExpired:
        pytest.skip(
            f"Juju controller {current!r} is not reachable: "
            f"`juju show-controller` did not answer in {JUJU_CLI_TIMEOUT}s"
        )
    if shown.returncode != 0:
        pytest.skip(
            f"Juju controller {current!r} is not reachable: "
            f"`juju show-controller` failed: {_last_line(shown.stderr)}"
        )
    return str(current)


def find_s3_target() -> S3Target:
    """Read the S3 store from the environment, or skip naming what is missing.

    Returns:
        The S3 store.
    """
    missing = [name for name in REQUIRED_S3_ENV if not os.environ.get(name)]
    if missing:
        pytest.skip(
            "a Juju controller is reachable, but no S3 store is given for the backups: "
            f"set {', '.join(missing)} (an endpoint the cluster can reach, an existing "
            "bucket and its keys)"
        )
    endpoint, bucket, access_key, secret_key = (os.environ[name] for name in REQUIRED_S3_ENV)
    return S3Target(
        endpoint=endpoint,
        bucket=bucket,
        access_key=access_key,
        secret_key=secret_key,
        region=os.environ.get(S3_REGION_ENV) or None,
    )


def find_charm_file(config: pytest.Config) -> Path:
    """Find the packed charm, or skip saying how to provide it.

    Args:
        config: the pytest configuration (for ``--charm-file``).

    Returns:
        The absolute path of the charm file.
    """
    given = config.getoption("--charm-file", default=None) or os.environ.get(CHARM_FILE_ENV)
    if given:
        path = Path(given).resolve()
        if not path.is_file():
            pytest.fail(f"--charm-file {given}: no such file")
        return path
    search_dirs = dict.fromkeys([Path.cwd().resolve(), REPO_ROOT])
    found = sorted({path.resolve() for d in search_dirs for path in d.glob("*.charm")})
    if not found:
        pytest.skip(
            "no packed charm: run `charmcraft pack`, or pass --charm-file "
            f"(or set {CHARM_FILE_ENV}); no *.charm in " + ", ".join(str(d) for d in search_dirs)
        )
    if len(found) > 1:
        pytest.fail(
            "several packed charms found, choose one with --charm-file: "
            + ", ".join(str(path) for path in found)
        )
    return found[0]


def find_image(config: pytest.Config) -> str:
    """Return the Synapse image for the resource, or skip saying how to provide it.

    Args:
        config: the pytest configuration (for ``--synapse-image``).

    Returns:
        The image reference.
    """
    image = config.getoption("--synapse-image", default=None) or os.environ.get(IMAGE_ENV)
    if not image:
        pytest.skip(
            "no Synapse image: pass --synapse-image (or set "
            f"{IMAGE_ENV}) with an image built from synapse_rock/ "
            "(see synapse_rock/README.md)"
        )
    return str(image)


@pytest.fixture(scope="session")
def settings(pytestconfig: pytest.Config) -> IntegrationSettings:
    """Check that everything the tests need is there; skip naming what is not.

    Args:
        pytestconfig: the pytest configuration.

    Returns:
        The checked settings.
    """
    controller = find_controller()
    s3 = find_s3_target()
    charm_file = find_charm_file(pytestconfig)
    image = find_image(pytestconfig)
    return IntegrationSettings(
        controller=controller,
        charm_file=charm_file,
        image=image,
        s3=s3,
        keep_models=bool(pytestconfig.getoption("--keep-models", default=False)),
    )


@pytest.fixture(scope="module")
def juju(settings: IntegrationSettings, request: pytest.FixtureRequest) -> Iterator[jubilant.Juju]:
    """Create a temporary Kubernetes model on the controller, destroyed afterwards.

    Args:
        settings: the checked settings.
        request: the pytest request (to print the debug log after a failure).

    Yields:
        A jubilant.Juju bound to the temporary model.
    """
    with jubilant.temp_model(keep=settings.keep_models, controller=settings.controller) as juju:
        juju.wait_timeout = DEPLOY_TIMEOUT
        model = juju.show_model()
        if (model.type or model.model_type) not in ("caas", "kubernetes"):
            pytest.skip(
                f"controller {settings.controller!r} made a {model.type or model.model_type!r} "
                "model; the synapse charm needs a Kubernetes cloud"
            )
        yield juju
        if request.session.testsfailed:
            print(juju.debug_log(limit=1000), end="")


@pytest.fixture(scope="module")
def s3_prefix(juju: jubilant.Juju, settings: IntegrationSettings) -> Iterator[str]:
    """Give the tests their own prefix in the bucket; empty it afterwards.

    Args:
        juju: the temporary model (its name makes the prefix unique).
        settings: the checked settings.

    Yields:
        The prefix (the charm's s3-path), without leading or trailing slash.
    """
    model = (juju.model or "model").rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    prefix = f"synapse-integration/{model}"
    yield prefix
    if settings.keep_models:
        return
    client = settings.s3.client()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=settings.s3.bucket, Prefix=prefix + "/"):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=settings.s3.bucket, Delete={"Objects": keys})
