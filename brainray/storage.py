"""The only module that knows about URIs, S3 endpoints and filesystems.

Everything else passes URIs (local paths, file://, s3://bucket/prefix) plus `StorageOptions` and
gets back bytes, JSON or a pyarrow filesystem. Credentials come from the standard AWS chain and are
never stored, logged or put into error messages.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pyarrow.fs as pafs
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from brainray.config import StorageOptions, to_dict

DEFAULT_REGION = "us-east-1"
# Every S3 request is retried by the AWS SDK's standard strategy (exponential backoff with full
# jitter: the n-th retry waits up to 2^(n-1) s) on connection errors, 500/503 and throttling. Four
# attempts ride out transient faults (tested through a fault-injecting proxy) while an endpoint
# that is down fails in seconds: 10 attempts took ~90 s per request before giving up.
_S3_RETRY_ATTEMPTS = 4
_S3_CONNECT_TIMEOUT_S = 2.0  # per connection attempt (AWS SDK default: 1 s)
_S3_REQUEST_TIMEOUT_S = 3.0  # Linux: a request moving < 1 byte/s for this long is aborted
# Errors the SDK already retried: what is left after the last attempt is a storage outage, not a
# property of the object (matched against Arrow's error text, as Ray Data does).
_TRANSIENT = re.compile(r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|"
                        r"INTERNAL_FAILURE|THROTTLING|REQUEST_TIMEOUT)|HTTP status 5\d\d|curlCode")


class StorageError(RuntimeError):
    """A storage location could not be used; the message names the URI and what to do."""


class TransientStorageError(StorageError):
    """Object storage failed in a way that may pass (network, 5xx, throttling) even after the
    SDK's retries; the object itself may be fine, so callers should fail the job, not the file."""


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


def redact_values(value):
    """A copy of a JSON-like value (dicts, lists, strings) with `redact` applied to every string:
    for logging or saving configs whose URIs might carry credentials or signatures."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_values(item) for item in value]
    return value


def redacted_json(config) -> str:
    """A config dataclass as JSON for logs and run directories, with any credential stripped."""
    return json.dumps(redact_values(to_dict(config)), indent=2, sort_keys=True)


def _s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": options.s3_region or DEFAULT_REGION,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_RETRY_ATTEMPTS),
        "connect_timeout": _S3_CONNECT_TIMEOUT_S,
        "request_timeout": _S3_REQUEST_TIMEOUT_S,
    }
    if options.s3_endpoint:
        parsed = urlparse(options.s3_endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(
                f"S3 endpoint {redact(options.s3_endpoint)!r} must look like http(s)://host:port")
        if "@" in parsed.netloc or parsed.query:
            raise StorageError("the S3 endpoint must not contain credentials or a query string; "
                               "use the AWS credential chain instead")
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
    message = f"cannot {action} {redact(uri)}: {redact(str(exc))}"
    if is_s3(uri) and _TRANSIENT.search(str(exc)):
        return TransientStorageError(message)
    return StorageError(message)


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
        if isinstance(fs, pafs.LocalFileSystem):
            # Python's open() takes any file name, including ones that are not valid UTF-8
            # (surrogate-escaped str, as os.listdir returns them); pyarrow refuses those.
            with open(path, "rb") as f:
                return f.read()
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
    try:
        write_bytes(probe, b"", options)
    except StorageError as exc:  # name the output the user gave, not the probe object
        reason = redact(str(exc.__cause__ or exc))
        raise type(exc)(f"cannot write to {redact(uri)}: {reason}") from exc
    fs, path = resolve(probe, options)
    try:
        fs.delete_file(path)
    except OSError as exc:
        raise _wrap(uri, "delete a probe file in", exc) from exc


def copy_file(src: str, dst: str, options: StorageOptions | None = None) -> None:
    """Copy one file without holding it in memory: within S3 a server-side copy (the bytes never
    leave the store), otherwise streamed in chunks. A local target is written beside and
    renamed, so it is never half-written."""
    src_fs, src_path = resolve(src, options)
    dst_fs, dst_path = resolve(dst, options)
    try:
        if not isinstance(dst_fs, pafs.LocalFileSystem):
            _copy(src_fs, src_path, dst_fs, dst_path)
            return
        Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{dst_path}.tmp-{uuid.uuid4().hex}"
        _copy(src_fs, src_path, dst_fs, tmp)
        os.replace(tmp, dst_path)
    except FileNotFoundError as exc:
        raise StorageError(f"{redact(src)} does not exist") from exc
    except OSError as exc:
        raise _wrap(src, f"copy to {redact(dst)}", exc) from exc


def _copy(src_fs: pafs.FileSystem, src_path: str, dst_fs: pafs.FileSystem,
          dst_path: str) -> None:
    if type(src_fs) is type(dst_fs):  # both S3 (one endpoint: one options) or both local
        src_fs.copy_file(src_path, dst_path)
    else:
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs,
                        destination_filesystem=dst_fs, chunk_size=_COPY_CHUNK_BYTES)


# Reads of archives and large files go through a buffer: on S3 each refill is one ranged GET, so
# a stream is fetched in few requests and never held whole. Zip members are read at scattered
# offsets (a seek outside the buffer drops it), so its buffer is smaller.
_STREAM_BUFFER_BYTES = 8 * 1024**2
_SEEKABLE_BUFFER_BYTES = 1024**2
_COPY_CHUNK_BYTES = 8 * 1024**2


class _Reader(io.RawIOBase):
    """A local file or S3 object opened for reading, whose failures are StorageErrors naming the
    URI (TransientStorageError for outages): a reader can then tell the storage failing from
    the bytes being bad."""

    def __init__(self, raw, uri: str):
        super().__init__()
        self._raw, self._uri = raw, uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def readinto(self, buffer) -> int:
        try:
            return self._raw.readinto(buffer)
        except OSError as exc:
            raise _wrap(self._uri, "read", exc) from exc

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self._raw.seek(offset, whence)
        except OSError as exc:
            raise _wrap(self._uri, "read", exc) from exc

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def _open_raw(uri: str, options: StorageOptions | None, seekable: bool) -> _Reader:
    fs, path = resolve(uri, options)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            raw = open(path, "rb", buffering=0)  # closed with the _Reader
        elif seekable:
            raw = fs.open_input_file(path)
        else:
            raw = fs.open_input_stream(path, compression=None)  # never decompress on the way
    except FileNotFoundError as exc:
        raise StorageError(f"{redact(uri)} does not exist") from exc
    except OSError as exc:
        raise _wrap(uri, "read", exc) from exc
    return _Reader(raw, uri)


def open_stream(uri: str, options: StorageOptions | None = None) -> io.BufferedReader:
    """A file or object opened to be read front to back (a tar, a large image), in large
    buffered reads. Use as a context manager; read errors raise StorageError."""
    return io.BufferedReader(_open_raw(uri, options, seekable=False), _STREAM_BUFFER_BYTES)


def open_seekable(uri: str, options: StorageOptions | None = None) -> io.BufferedReader:
    """A file or object opened for random access (a zip: its directory is at the end), over
    ranged reads on S3. Use as a context manager; read errors raise StorageError."""
    return io.BufferedReader(_open_raw(uri, options, seekable=True), _SEEKABLE_BUFFER_BYTES)


def read_head(uri: str, nbytes: int, options: StorageOptions | None = None) -> bytes:
    """At most the first `nbytes` of a file or object, in one ranged read (to tell a file's type
    by its content without reading it)."""
    with _open_raw(uri, options, seekable=False) as raw:
        head = b""
        while len(head) < nbytes:  # a raw read may return less than asked
            chunk = raw.read(nbytes - len(head))
            if not chunk:
                break
            head += chunk
        return head


def move(src: str, dst: str, options: StorageOptions | None = None) -> None:
    """Rename a file (locally atomic; on S3 a copy, then the delete of the source)."""
    if is_local(src) and is_local(dst):
        _, source = resolve(src, options)
        _, target = resolve(dst, options)
        try:
            os.replace(source, target)
        except OSError as exc:
            raise _wrap(src, "rename", exc) from exc
        return
    copy_file(src, dst, options)
    delete(src, options)


@dataclass(frozen=True)
class FileEntry:
    """A listed file: its URI (as users write it), filesystem path, size and modification time."""

    uri: str
    path: str
    size: int
    mtime_ns: int


def _walk_local(root: str):
    """(path, stat) of every file under a local folder, or of the file itself.

    Follows symbolic links (as pyarrow's listing does) but enters each real directory once, so a
    link back up the tree cannot make the listing loop; pyarrow's recursive FileSelector never
    returns on one. Linked folders are entered after every folder reachable without links, so a
    folder inside the tree keeps its own path (a `latest -> 2026-11` link does not rename it).
    Names are str with surrogate escapes, so file names that are not valid UTF-8 are listed and
    can be read (pyarrow raises UnicodeDecodeError on them).
    """
    top = os.stat(root)  # FileNotFoundError when the input does not exist
    if not stat.S_ISDIR(top.st_mode):
        yield root, top
        return
    seen: set[tuple[int, int]] = set()
    folders, linked = [root], []
    while folders or linked:
        folder = folders.pop() if folders else linked.pop(0)
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                try:
                    if entry.is_dir():
                        (linked if entry.is_symlink() else folders).append(entry.path)
                    elif entry.is_file():
                        yield entry.path, entry.stat()
                except OSError:
                    continue  # a broken or looping link, or a file that vanished: not an input


def _list_remote(fs: pafs.FileSystem, path: str, recursive: bool):
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(
        pafs.FileSelector(path, recursive=recursive))
    for item in infos:
        if item.type == pafs.FileType.File:
            yield item.path, int(item.size or 0), int(item.mtime_ns or 0)


def list_files(uri: str, options: StorageOptions | None = None) -> list[FileEntry]:
    """Every file under a folder or prefix (recursively), or the file itself, sorted by URI.

    The one lister of inputs: training data, scoring and explain inputs all come through here.
    """
    fs, path = resolve(uri, options)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            found = [(p, info.st_size, info.st_mtime_ns) for p, info in _walk_local(path)]
        else:
            found = list(_list_remote(fs, path, recursive=True))
    except FileNotFoundError as exc:
        raise StorageError(f"{redact(uri)} does not exist; check the path or bucket name"
                           ) from exc
    except OSError as exc:
        raise _wrap(uri, "list", exc) from exc
    entries = [FileEntry(to_uri(fs, p), p, int(size), int(mtime)) for p, size, mtime in found]
    return sorted(entries, key=lambda e: e.uri)


def list_children(uri: str, options: StorageOptions | None = None, *,
                  folders: bool = False) -> list[str]:
    """Names of the files (or, with `folders`, sub-folders) directly inside a folder; none when
    it does not exist."""
    fs, path = resolve(uri, options)
    wanted = pafs.FileType.Directory if folders else pafs.FileType.File
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise _wrap(uri, "list", exc) from exc
    return sorted(posixpath.basename(i.path) for i in infos if i.type == wanted)


def _delete(uri: str, options: StorageOptions | None, method: str) -> None:
    fs, path = resolve(uri, options)
    try:
        getattr(fs, method)(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _wrap(uri, "delete", exc) from exc


def delete_dir(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a folder and everything in it; nothing when it does not exist."""
    _delete(uri, options, "delete_dir")


# --- conditional writes: the scoring output's lease and manifest --------------------------------
# A read-modify-write of a shared object is only safe when the write can say "only if nobody
# changed it since I read it". S3 does that with conditional PUTs (If-None-Match: * to create,
# If-Match: <etag> to replace), which pyarrow's filesystem cannot send, so these go through
# boto3 with the same endpoint, region, timeouts and retries; locally a lock file and an atomic
# rename (or link, to create) do the same.


class PreconditionFailed(StorageError):
    """Another writer created or changed the object first."""


def _s3_client(options: StorageOptions):
    config = Config(connect_timeout=_S3_CONNECT_TIMEOUT_S, read_timeout=_S3_REQUEST_TIMEOUT_S,
                    retries={"max_attempts": _S3_RETRY_ATTEMPTS, "mode": "standard"})
    return boto3.client("s3", endpoint_url=options.s3_endpoint,
                        region_name=options.s3_region or DEFAULT_REGION, config=config)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = _s3_path(uri).partition("/")
    return bucket, key


def _precondition_failed(exc) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in (
        "PreconditionFailed", "ConditionalRequestConflict", "412")


def read_versioned(uri: str, options: StorageOptions | None = None
                   ) -> tuple[bytes, str] | None:
    """(bytes, version tag) of an object, None when it does not exist."""
    options = options or StorageOptions()
    if not is_s3(uri):
        _, path = resolve(uri, options)
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _wrap(uri, "read", exc) from exc
        return data, hashlib.sha256(data).hexdigest()
    bucket, key = _bucket_key(uri)
    try:
        response = _s3_client(options).get_object(Bucket=bucket, Key=key)
        return response["Body"].read(), response["ETag"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _wrap(uri, "read", exc) from exc
    except BotoCoreError as exc:
        raise _wrap(uri, "read", exc) from exc


def write_versioned(uri: str, data: bytes, expected: str | None,
                    options: StorageOptions | None = None) -> str:
    """Write `data` only if the object is still at version `expected` (None: only if it does
    not exist yet); its new version tag. PreconditionFailed when another writer came first."""
    options = options or StorageOptions()
    if not is_s3(uri):
        return _write_versioned_local(uri, data, expected, options)
    bucket, key = _bucket_key(uri)
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
    try:
        return _s3_client(options).put_object(Bucket=bucket, Key=key, Body=data,
                                              **condition)["ETag"]
    except ClientError as exc:
        if _precondition_failed(exc):
            raise PreconditionFailed(f"{redact(uri)} was changed by another writer") from exc
        raise _wrap(uri, "write", exc) from exc
    except BotoCoreError as exc:
        raise _wrap(uri, "write", exc) from exc


def _write_versioned_local(uri: str, data: bytes, expected: str | None,
                           options: StorageOptions) -> str:
    _, path = resolve(uri, options)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        current = read_versioned(uri, options)
        if (current is None) != (expected is None) or (
                current is not None and current[1] != expected):
            raise PreconditionFailed(f"{redact(uri)} was changed by another writer")
        write_bytes(uri, data, options)
    return hashlib.sha256(data).hexdigest()


def delete(uri: str, options: StorageOptions | None = None) -> None:
    """Delete one object; nothing when it does not exist."""
    _delete(uri, options, "delete_file")
