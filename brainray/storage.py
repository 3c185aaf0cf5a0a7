"""The only module that knows about URIs, S3 endpoints and filesystems.

Everything else passes URIs (local paths, file://, s3://bucket/prefix) plus `StorageOptions` and
gets back bytes, JSON or a pyarrow filesystem. Credentials come from the standard AWS chain and are
never stored, logged or put into error messages.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from brainray.config import StorageOptions

DEFAULT_REGION = "us-east-1"
_S3_RETRY_ATTEMPTS = 10


class StorageError(RuntimeError):
    """A storage location could not be used; the message names the URI and what to do."""


def storage_options(s3_endpoint: str | None = None, s3_region: str | None = None) -> StorageOptions:
    """Options from explicit values, falling back to the standard AWS environment variables."""
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    region = s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return StorageOptions(s3_endpoint=endpoint or None, s3_region=region or None)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_local(uri: str) -> bool:
    return not is_s3(uri) and "://" not in uri.replace("file://", "", 1)


def redact(text: str) -> str:
    """Strip anything credential-like (userinfo, query strings) from URIs inside `text`."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1", text)
    return re.sub(r"(\w+://[^\s?]+)\?\S*", r"\1", text)


def _s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": options.s3_region or DEFAULT_REGION,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_RETRY_ATTEMPTS),
    }
    if options.s3_endpoint:
        parsed = urlparse(options.s3_endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(
                f"S3 endpoint {options.s3_endpoint!r} must look like http(s)://host:port")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs)


def _s3_path(uri: str) -> str:
    """bucket/key of an s3:// URI; refuses forms that would carry credentials or signatures."""
    path = uri[len("s3://"):].rstrip("/")
    bucket = path.split("/", 1)[0]
    if not bucket or path.startswith("/"):
        raise StorageError(f"{redact(uri)!r} is not a valid S3 URI; expected s3://bucket/prefix")
    if "@" in bucket or ":" in bucket:
        raise StorageError("S3 URIs must not contain credentials (s3://user:secret@...); use the "
                           "AWS credential chain instead")
    if "?" in path:
        raise StorageError(f"{redact(uri)!r}: S3 URIs with a query string (e.g. pre-signed URLs) "
                           "are not supported; give s3://bucket/key")
    return path


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Filesystem and filesystem-relative path for a URI (local paths become absolute)."""
    options = options or StorageOptions()
    if is_s3(uri):
        return _s3_filesystem(options), _s3_path(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {redact(uri)!r}: use a local path or s3://")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri.replace("file://", "", 1)).joinpath(*parts))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of `resolve`: a user-facing URI for a filesystem path."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def _wrap(uri: str, action: str, exc: Exception) -> StorageError:
    return StorageError(f"cannot {action} {redact(uri)}: {redact(str(exc))}")


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _wrap(uri, "check", exc) from exc


def is_dir(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError as exc:
        raise _wrap(uri, "check", exc) from exc


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{redact(uri)} does not exist") from exc
    except OSError as exc:
        raise _wrap(uri, "read", exc) from exc


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object. Local files are written beside and renamed, so never half-written."""
    fs, path = resolve(uri, options)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as stream:
                stream.write(data)
    except OSError as exc:
        raise _wrap(uri, "write", exc) from exc


def read_json(uri: str, options: StorageOptions | None = None):
    return json.loads(read_bytes(uri, options))


def write_json(uri: str, obj, options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode(), options)


def write_text(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes(uri, text.encode(), options)


def ensure_readable_dir(uri: str, options: StorageOptions | None = None) -> None:
    """Fail fast, naming the URI, when input data is missing or the bucket is unreachable."""
    fs, path = resolve(uri, options)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise _wrap(uri, "access", exc) from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{redact(uri)} does not exist; check the path or bucket name")


def ensure_writable(uri: str, options: StorageOptions | None = None) -> None:
    """Write and delete a probe object so an unwritable output fails before any work is done."""
    probe = join(uri, f".brainray-write-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"", options)
    fs, path = resolve(probe, options)
    try:
        fs.delete_file(path)
    except OSError as exc:
        raise _wrap(uri, "delete a probe file in", exc) from exc


def copy_file(src: str, dst: str, options: StorageOptions | None = None) -> None:
    write_bytes(dst, read_bytes(src, options), options)
