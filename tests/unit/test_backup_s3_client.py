"""S3Client's error mapping, with botocore's Stubber standing for S3.

The Stubber answers boto3 calls with canned responses and errors, without a
network; the real client is exercised against SeaweedFS in tests/workload.
Note: the autouse ``check_bucket`` fixture patches S3Client.check_bucket, so
tests of check_bucket itself call the original, saved when this module is imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from unittest import mock

import pytest
from botocore.exceptions import EndpointConnectionError
from botocore.stub import ANY, Stubber

import backup

# Saved at import, before the autouse fixture patches it.
REAL_CHECK_BUCKET = backup.S3Client.check_bucket
SECRET_KEY = "s3-client-secret-key-3a9b"
BUCKET = "synapse-backups"


def _params(**changes: str) -> backup.S3Parameters:
    return backup.S3Parameters.model_validate(
        {
            "access-key": "AKIACLIENTTEST",
            "secret-key": SECRET_KEY,
            "bucket": BUCKET,
            "endpoint": "https://s3.example.com",
            "path": "prod",
            **changes,
        }
    )


@pytest.fixture
def client() -> backup.S3Client:
    """An S3Client for the test parameters."""
    return backup.S3Client(_params())


@pytest.fixture
def stubber(client: backup.S3Client) -> Iterator[Stubber]:
    """A Stubber on the client's boto3 client; every queued response must be used."""
    with Stubber(client._client) as stub:
        yield stub
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "status", "option", "message"),
    [
        pytest.param("404", 404, "s3-bucket", "does not exist", id="404"),
        pytest.param("NoSuchBucket", 404, "s3-bucket", "does not exist", id="no-such-bucket"),
        pytest.param("403", 403, "s3-credentials", "denied", id="403"),
        pytest.param("AccessDenied", 403, "s3-credentials", "denied", id="access-denied"),
        pytest.param("InvalidAccessKeyId", 403, "s3-credentials", "denied", id="bad-key-id"),
        pytest.param("SignatureDoesNotMatch", 403, "s3-credentials", "denied", id="wrong-secret"),
        pytest.param("SlowDown", 503, "s3-bucket", "cannot use bucket", id="other"),
    ],
)
def test_check_bucket_errors(
    client: backup.S3Client,
    stubber: Stubber,
    *,
    code: str,
    status: int,
    option: str,
    message: str,
):
    """A refused head_bucket becomes an S3Error naming the option to fix, and no secret."""
    stubber.add_client_error(
        "head_bucket",
        service_error_code=code,
        http_status_code=status,
        expected_params={"Bucket": BUCKET},
    )

    with pytest.raises(backup.S3Error) as exc_info:
        REAL_CHECK_BUCKET(client)

    assert exc_info.value.option == option
    assert message in str(exc_info.value)
    assert BUCKET in str(exc_info.value)
    assert SECRET_KEY not in str(exc_info.value)


def test_check_bucket_unreachable(client: backup.S3Client):
    """An endpoint that cannot be reached points at s3-endpoint."""
    error = EndpointConnectionError(endpoint_url="https://s3.example.com")
    with (
        mock.patch.object(client._client, "head_bucket", side_effect=error),
        pytest.raises(backup.S3Error) as exc_info,
    ):
        REAL_CHECK_BUCKET(client)

    assert exc_info.value.option == "s3-endpoint"
    assert "cannot reach" in str(exc_info.value)


def test_check_bucket_ok(client: backup.S3Client, stubber: Stubber):
    """A bucket that answers head_bucket passes."""
    stubber.add_response("head_bucket", {}, {"Bucket": BUCKET})

    REAL_CHECK_BUCKET(client)


def test_can_use_bucket(client: backup.S3Client, stubber: Stubber, check_bucket: mock.MagicMock):
    """can_use_bucket turns check_bucket's verdict into a boolean."""
    check_bucket.side_effect = [None, backup.S3Error("denied", option="s3-credentials")]

    assert client.can_use_bucket() is True
    assert client.can_use_bucket() is False


@pytest.mark.parametrize(
    "endpoint",
    [
        pytest.param("https://bad_host.example.com", id="underscore"),
        pytest.param("https://exa mple.com", id="space"),
    ],
)
def test_client_bad_endpoint(endpoint: str):
    """An endpoint boto3 rejects raises S3Error when the client is created."""
    with pytest.raises(backup.S3Error, match="cannot create an S3 client"):
        backup.S3Client(_params(endpoint=endpoint))


def test_object_size(client: backup.S3Client, stubber: Stubber):
    """object_size gives the size, or None for a missing object, under the configured path."""
    stubber.add_response("head_object", {"ContentLength": 42}, {"Bucket": BUCKET, "Key": "prod/a"})
    stubber.add_client_error("head_object", "404", http_status_code=404)
    stubber.add_client_error("head_object", "NoSuchKey", http_status_code=404)

    assert client.object_size("a") == 42
    assert client.object_size("b") is None
    assert client.object_size("c") is None


def test_object_size_error(client: backup.S3Client, stubber: Stubber):
    """Any other error reading an object raises S3Error."""
    stubber.add_client_error("head_object", "AccessDenied", "no", http_status_code=403)

    with pytest.raises(backup.S3Error, match="cannot read object a: AccessDenied: no"):
        client.object_size("a")


def test_object_size_unreachable(client: backup.S3Client):
    """A connection error reading an object raises S3Error."""
    error = EndpointConnectionError(endpoint_url="https://s3.example.com")
    with (
        mock.patch.object(client._client, "head_object", side_effect=error),
        pytest.raises(backup.S3Error, match="cannot read object a"),
    ):
        client.object_size("a")


def test_put_text(client: backup.S3Client, stubber: Stubber):
    """put_text writes a JSON object under the configured path."""
    stubber.add_response(
        "put_object",
        {},
        {
            "Bucket": BUCKET,
            "Key": "prod/x.manifest.json",
            "Body": b"{}",
            "ContentType": "application/json",
        },
    )
    stubber.add_client_error("put_object", "AccessDenied", "no", http_status_code=403)

    client.put_text("x.manifest.json", "{}")
    with pytest.raises(backup.S3Error, match="cannot write object y"):
        client.put_text("y", "{}")


def test_delete_objects(client: backup.S3Client, stubber: Stubber):
    """delete_objects aborts the object's own unfinished uploads, then deletes it."""
    stubber.add_response(
        "list_multipart_uploads",
        {
            "Uploads": [
                {"Key": "prod/a", "UploadId": "u1"},
                {"Key": "prod/ab", "UploadId": "u2"},
            ]
        },
        {"Bucket": BUCKET, "Prefix": "prod/a"},
    )
    stubber.add_response(
        "abort_multipart_upload", {}, {"Bucket": BUCKET, "Key": "prod/a", "UploadId": "u1"}
    )
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": "prod/a"})
    stubber.add_response("list_multipart_uploads", {}, {"Bucket": BUCKET, "Prefix": "prod/b"})
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": "prod/b"})

    client.delete_objects(["a", "b"])


def test_delete_objects_error(client: backup.S3Client, stubber: Stubber):
    """An object that cannot be deleted raises S3Error."""
    stubber.add_response("list_multipart_uploads", {}, {"Bucket": BUCKET, "Prefix": ANY})
    stubber.add_client_error("delete_object", "AccessDenied", http_status_code=403)

    with pytest.raises(backup.S3Error, match="cannot delete object a"):
        client.delete_objects(["a"])
