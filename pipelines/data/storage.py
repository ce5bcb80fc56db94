"""Object-storage helpers: one place that knows local paths, file:// and s3:// URIs.

S3 goes through boto3 (any endpoint: AWS_ENDPOINT_URL is honoured by botocore itself) with botocore's
"standard" retry mode, so connection resets and 500/503 answers are retried there and not by hand.
pyarrow's S3FileSystem ignores AWS_ENDPOINT_URL, so `pyarrow_filesystem` passes it explicitly.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions


class StorageError(RuntimeError):
    """A storage location cannot be used; the message says which and what to check."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str) -> Path:
    uri = str(uri)
    return Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)


def absolute(uri: str) -> str:
    """A local path made absolute (s3:// and "" unchanged): Ray workers do not run in the caller's directory."""
    if not uri or is_s3(uri):
        return uri
    return os.path.abspath(local_path(uri))


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(local_path(base).joinpath(*parts))


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=4)
def _client(endpoint: str | None, max_attempts: int):
    config = botocore.config.Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def s3_client(max_attempts: int = 8):
    return _client(endpoint_url(), max_attempts)


def _describe_endpoint() -> str:
    return endpoint_url() or "the default AWS endpoint"


def check_reachable(uri: str, *, create_bucket: bool = False) -> None:
    """Fail fast, with a message a user can act on, when `uri` cannot be written to."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    client = _client(endpoint_url(), 2)
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.EndpointConnectionError as exc:
        raise StorageError(
            f"cannot reach the S3 endpoint {_describe_endpoint()} for {uri}: {exc}. "
            "Check AWS_ENDPOINT_URL and that the server is running (`mvit stack status`)."
        ) from None
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile)"
        ) from None
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket") and create_bucket:
            client.create_bucket(Bucket=bucket)
            return
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"bucket '{bucket}' of {uri} does not exist at {_describe_endpoint()}; create it first") from None
        raise StorageError(f"S3 refused access to bucket '{bucket}' of {uri}: {exc}") from None


def _is_missing(exc: botocore.exceptions.ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return False
            raise
    return local_path(uri).exists()


def _head(uri: str) -> dict:
    """HeadObject; a missing key raises FileNotFoundError like a missing local file does."""
    bucket, key = split_s3(uri)
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if _is_missing(exc):
            raise FileNotFoundError(f"{uri} does not exist") from None
        raise


def size(uri: str) -> int:
    """Bytes of a file or object; a missing one raises FileNotFoundError (local or S3 alike)."""
    if is_s3(uri):
        return int(_head(uri)["ContentLength"])
    return local_path(uri).stat().st_size


def _get_object(uri: str):
    """GetObject; a missing key raises FileNotFoundError like a missing local file does."""
    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except botocore.exceptions.ClientError as exc:
        if _is_missing(exc):
            raise FileNotFoundError(f"{uri} does not exist") from None
        raise


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        return _get_object(uri).read()
    return local_path(uri).read_bytes()


def open_read(uri: str) -> IO[bytes]:
    """A streaming reader (S3 bodies are not buffered whole in memory)."""
    if is_s3(uri):
        return _get_object(uri)
    return open(local_path(uri), "rb")


class _CountingFile(io.FileIO):
    """A local file that counts the bytes read from it."""

    bytes_read = 0

    def readinto(self, buffer) -> int | None:
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n


class StorageReadError(OSError):
    """An object could not be read as it was when the read began (it changed, or the answer was short)."""


# A connection lost while a response body streams (botocore's retries end once the response has begun).
_BODY_ERRORS = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError,
                botocore.exceptions.ReadTimeoutError)


class _S3Range(io.RawIOBase):
    """A seekable S3 object: each read is one ranged GetObject of the version seen at open (If-Match on
    its ETag, so an object replaced mid-read fails instead of mixing versions).

    Wrapped in an io.BufferedReader by `open_seekable`, so a reader's small reads become a few large
    ranged requests and seeks within the buffer cost nothing.
    """

    BODY_ATTEMPTS = 3  # ranged GETs per block when the body is cut off (_BODY_ERRORS); then the error stands

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._bucket, self._key = split_s3(uri)
        head = _head(uri)
        self._size = int(head["ContentLength"])
        self._etag = head.get("ETag")
        self._pos = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            raise ValueError(f"invalid whence {whence!r}")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset} in {self.uri}")
        self._pos = base + offset
        return self._pos

    def _get(self, first: int, last: int) -> bytes:
        request = {"Bucket": self._bucket, "Key": self._key, "Range": f"bytes={first}-{last}"}
        if self._etag:
            request["IfMatch"] = self._etag
        for _ in range(self.BODY_ATTEMPTS - 1):
            try:
                return s3_client().get_object(**request)["Body"].read()
            except _BODY_ERRORS:
                continue
        return s3_client().get_object(**request)["Body"].read()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self._size - self._pos)
        if count <= 0:
            return 0
        data = self._get(self._pos, self._pos + count - 1)
        if len(data) != count:
            raise StorageReadError(f"{self.uri}: asked for {count} bytes at {self._pos}, got {len(data)}")
        view[:count] = data
        self._pos += count
        self.bytes_read += count
        return count


SEEK_BUFFER_BYTES = 8 << 20  # bytes per ranged request of open_seekable (and skipped without a request)


def open_seekable(uri: str, buffer_size: int | None = None) -> io.BufferedReader:
    """A buffered, seekable reader that fetches only the blocks read: a demuxer seeking to a time range
    reads the container's header and index and that range, not the whole file (a container without an
    index is read from its start, which is still no worse than a download). `reader.raw.bytes_read`:
    bytes fetched so far."""
    buffer_size = buffer_size or SEEK_BUFFER_BYTES
    if is_s3(uri):
        return io.BufferedReader(_S3Range(uri), buffer_size=buffer_size)
    return io.BufferedReader(_CountingFile(local_path(uri), "r"), buffer_size=buffer_size)


# What a failed read raises once the retries are spent: a storage failure, not bad data.
READ_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, StorageReadError)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see either nothing or the whole object under its final name."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)  # PUT is atomic on S3
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a finished local file to its final name atomically (multipart uploads appear on completion)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().upload_file(str(local), bucket, key)
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.copyfile(local, tmp)
    os.replace(tmp, path)


def download_file(uri: str, local: str | Path) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().download_file(bucket, key, str(local))
    else:
        shutil.copyfile(local_path(uri), local)


def list_files(prefix: str) -> Iterator[tuple[str, int]]:
    """(uri, size) of every object under `prefix`, recursively, in a stable order."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}", int(obj["Size"])
        return
    root = local_path(prefix)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            yield str(full), full.stat().st_size


def delete_prefix(prefix: str) -> None:
    if is_s3(prefix):
        bucket, _ = split_s3(prefix)
        keys = [split_s3(uri)[1] for uri, _ in list_files(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch})
    else:
        shutil.rmtree(local_path(prefix), ignore_errors=True)


def pyarrow_filesystem(uri: str):
    """(filesystem, path) for Ray APIs that take a pyarrow filesystem (e.g. Ray Train storage)."""
    import pyarrow.fs

    if not is_s3(uri):
        return None, str(local_path(uri).absolute())
    endpoint = endpoint_url()
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    fs = pyarrow.fs.S3FileSystem(**kwargs)
    bucket, key = split_s3(uri)
    return fs, f"{bucket}/{key}".rstrip("/")
