"""Tests for brainray.storage: URI resolution, redaction, local and S3 (moto) reads and writes."""

from __future__ import annotations

import io
import os
import tracemalloc
import zipfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from brainray import storage
from brainray.config import StorageOptions
from brainray.storage import StorageError
from tests.conftest import FAKE_KEY_ID, FAKE_SECRET
from tests.faultproxy import Fault, FaultProxy

# An endpoint that is never contacted: resolve() only builds the filesystem object.
OFFLINE_S3 = StorageOptions(s3_endpoint="http://127.0.0.1:9", s3_region="us-east-1")


# --- resolve, join, redact --------------------------------------------------------------------


def test_resolve_local_path_becomes_absolute(tmp_path, monkeypatch):
    # Given a relative path, run from tmp_path
    monkeypatch.chdir(tmp_path)
    # When resolved
    fs, path = storage.resolve("data/train")
    # Then it is an absolute path on the local filesystem
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path.resolve() / "data" / "train")


def test_resolve_file_uri_strips_scheme(tmp_path):
    fs, path = storage.resolve(f"file://{tmp_path}/x.json")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path.resolve() / "x.json")


def test_resolve_s3_uri_gives_bucket_relative_path():
    # Given an S3 prefix with a trailing slash / When resolved
    fs, path = storage.resolve("s3://my-bucket/runs/exp1/", OFFLINE_S3)
    # Then the path is bucket/key without scheme or trailing slash, on an S3 filesystem
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "my-bucket/runs/exp1"
    assert storage.to_uri(fs, path) == "s3://my-bucket/runs/exp1"


def test_resolve_s3_bucket_only():
    fs, path = storage.resolve("s3://my-bucket", OFFLINE_S3)
    assert isinstance(fs, pafs.S3FileSystem) and path == "my-bucket"


@pytest.mark.parametrize("uri", ["s3://", "s3:///", "s3:///key/only"])
def test_resolve_s3_without_bucket_raises(uri):
    with pytest.raises(StorageError, match="not a valid S3 URI"):
        storage.resolve(uri, OFFLINE_S3)


@pytest.mark.parametrize("uri", ["http://example.com/data", "gs://bucket/data",
                                 "hdfs://namenode/data", "file://http://x"])
def test_resolve_unsupported_scheme_raises(uri):
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve(uri)


def test_resolve_rejects_endpoint_without_scheme():
    with pytest.raises(StorageError, match=r"must look like http\(s\)://host:port"):
        storage.resolve("s3://bucket/x", StorageOptions(s3_endpoint="127.0.0.1:9000"))


def test_is_s3_and_is_local():
    assert storage.is_s3("s3://b/k") and not storage.is_local("s3://b/k")
    assert storage.is_local("/tmp/x") and storage.is_local("file:///tmp/x")
    assert storage.is_local("relative/path")
    assert not storage.is_local("http://host/x")


def test_join_for_s3_and_local():
    assert storage.join("s3://b/runs/", "exp", "model.pt") == "s3://b/runs/exp/model.pt"
    assert storage.join("/tmp/runs", "exp", "model.pt") == "/tmp/runs/exp/model.pt"
    assert storage.join("file:///tmp/runs", "m.pt") == "/tmp/runs/m.pt"


@pytest.mark.parametrize("text, expected", [
    ("s3://AKIA123:s3cr3t@bucket/key", "s3://bucket/key"),
    ("https://user:pass@minio:9000/bucket", "https://minio:9000/bucket"),
    ("https://bucket.s3.amazonaws.com/k.png?X-Amz-Signature=abc&X-Amz-Credential=AKIA",
     "https://bucket.s3.amazonaws.com/k.png"),
    ("cannot read s3://u:p@b/k?token=t: boom", "cannot read s3://b/k boom"),
    ("two: s3://a:b@x/1 and http://c:d@y/2?q=1 end", "two: s3://x/1 and http://y/2 end"),
    ("/local/path/with@sign.png", "/local/path/with@sign.png"),
    ("s3://bucket/folder/user@example.com/scan.png", "s3://bucket/folder/user@example.com/scan.png"),
    ("no uri here", "no uri here"),
])
def test_redact_strips_userinfo_and_query(text, expected):
    assert storage.redact(text) == expected


# --- local filesystem -------------------------------------------------------------------------


def test_local_bytes_and_json_round_trip(tmp_path):
    # Given a URI in a folder that does not exist yet
    uri = str(tmp_path / "new" / "deeper" / "blob.bin")
    # When bytes are written and read back / Then they are identical and parents were created
    storage.write_bytes(uri, b"\x00\x01binary\xff")
    assert storage.read_bytes(uri) == b"\x00\x01binary\xff"
    # And JSON with nesting and unicode round-trips
    obj = {"classes": ["glioma", "notumor"], "acc": 0.93, "nested": {"n": 3, "s": "é"}}
    storage.write_json(f"file://{tmp_path}/m.json", obj)
    assert storage.read_json(str(tmp_path / "m.json")) == obj
    storage.write_text(str(tmp_path / "t.txt"), "hello\n")
    assert (tmp_path / "t.txt").read_text() == "hello\n"


def test_local_write_overwrites_and_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "out.json")
    storage.write_json(uri, {"v": 1})
    storage.write_json(uri, {"v": 2})
    assert storage.read_json(uri) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_local_exists_and_is_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f.txt").write_text("x")
    assert storage.exists(str(tmp_path / "d")) and storage.is_dir(str(tmp_path / "d"))
    assert storage.exists(str(tmp_path / "f.txt")) and not storage.is_dir(str(tmp_path / "f.txt"))
    assert not storage.exists(str(tmp_path / "missing"))
    assert not storage.is_dir(str(tmp_path / "missing"))


def test_local_read_missing_file_names_the_uri(tmp_path):
    uri = str(tmp_path / "nope.json")
    with pytest.raises(StorageError, match=f"{uri} does not exist"):
        storage.read_bytes(uri)


def test_copy_file_local(tmp_path):
    src, dst = str(tmp_path / "a.bin"), str(tmp_path / "sub" / "b.bin")
    storage.write_bytes(src, b"payload")
    storage.copy_file(src, dst)
    assert Path(dst).read_bytes() == b"payload"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["b.bin"]  # no temporary left


def test_copy_file_does_not_hold_the_file_in_memory(tmp_path):
    # Given a 48 MiB file
    src, dst = tmp_path / "big.bin", tmp_path / "copy.bin"
    src.write_bytes(os.urandom(48 * 1024**2))
    # When it is copied under tracemalloc (which sees every Python bytes object)
    tracemalloc.start()
    try:
        storage.copy_file(str(src), str(dst))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then the copy is exact and no Python buffer near the file's size was made
    assert dst.read_bytes() == src.read_bytes()
    assert peak < 4 * 1024**2, f"peak {peak / 2**20:.1f} MiB"


def test_copy_file_of_a_missing_source_names_it(tmp_path):
    with pytest.raises(StorageError, match="nope.bin does not exist"):
        storage.copy_file(str(tmp_path / "nope.bin"), str(tmp_path / "x.bin"))


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_open_seekable_and_open_stream_read_a_local_file(tmp_path):
    # Given a zip on disk
    path = tmp_path / "a.zip"
    path.write_bytes(_zip_bytes({"x.txt": b"hello", "y.txt": b"world"}))
    # When opened for random access / as a stream
    with storage.open_seekable(str(path)) as source, zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with storage.open_stream(str(path)) as stream:
        streamed = stream.read()
    # Then zipfile can read it in place, and the stream gives every byte
    assert members == {"x.txt": b"hello", "y.txt": b"world"}
    assert streamed == path.read_bytes()


def test_read_head_reads_at_most_the_first_bytes(tmp_path):
    (tmp_path / "f").write_bytes(b"0123456789")
    assert storage.read_head(str(tmp_path / "f"), 4) == b"0123"
    assert storage.read_head(str(tmp_path / "f"), 132) == b"0123456789"  # shorter: all of it
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_head(str(tmp_path / "missing"), 4)


def test_ensure_readable_dir_local(tmp_path):
    storage.ensure_readable_dir(str(tmp_path))  # exists: no error
    missing = str(tmp_path / "no-such-data")
    with pytest.raises(StorageError, match="no-such-data does not exist"):
        storage.ensure_readable_dir(missing)


def test_ensure_writable_local_creates_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "run" / "out"
    storage.ensure_writable(str(target))
    assert target.is_dir()
    assert list(target.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_ensure_writable_local_read_only_dir_raises(tmp_path):
    # Given a directory without write permission
    target = tmp_path / "readonly"
    target.mkdir()
    target.chmod(0o500)
    try:
        # When probed / Then a StorageError names the location
        with pytest.raises(StorageError, match="readonly"):
            storage.ensure_writable(str(target))
    finally:
        target.chmod(0o700)


# --- storage_options --------------------------------------------------------------------------


@pytest.fixture
def clean_aws_env(monkeypatch):
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_storage_options_default_to_none(clean_aws_env):
    assert storage.storage_options() == StorageOptions(s3_endpoint=None, s3_region=None)


def test_storage_options_from_environment(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    clean_aws_env.setenv("AWS_REGION", "eu-west-1")
    clean_aws_env.setenv("AWS_DEFAULT_REGION", "us-west-2")
    options = storage.storage_options()
    assert options.s3_endpoint == "http://minio:9000"
    assert options.s3_region == "eu-west-1"  # AWS_REGION wins over AWS_DEFAULT_REGION


def test_storage_options_s3_specific_endpoint_wins(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    clean_aws_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    clean_aws_env.setenv("AWS_DEFAULT_REGION", "us-west-2")
    options = storage.storage_options()
    assert options.s3_endpoint == "http://s3-only:9000"
    assert options.s3_region == "us-west-2"


def test_storage_options_explicit_arguments_win(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    clean_aws_env.setenv("AWS_REGION", "eu-west-1")
    options = storage.storage_options("http://explicit:9000", "ap-south-1")
    assert options == StorageOptions(s3_endpoint="http://explicit:9000", s3_region="ap-south-1")


def test_storage_options_empty_env_values_mean_unset(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "")
    clean_aws_env.setenv("AWS_REGION", "")
    assert storage.storage_options() == StorageOptions()


# --- S3 (moto server) -------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_bytes_and_json_round_trip(s3_bucket, s3_options):
    # Given an empty bucket
    client, bucket = s3_bucket
    # When bytes and JSON are written under a prefix
    storage.write_bytes(f"s3://{bucket}/run/blob.bin", b"\x00abc\xff", s3_options)
    storage.write_json(f"s3://{bucket}/run/metrics.json", {"acc": 0.9, "c": ["a"]}, s3_options)
    # Then they read back identically, and really are objects in the bucket
    assert storage.read_bytes(f"s3://{bucket}/run/blob.bin", s3_options) == b"\x00abc\xff"
    assert storage.read_json(f"s3://{bucket}/run/metrics.json", s3_options) == {
        "acc": 0.9, "c": ["a"]}
    body = client.get_object(Bucket=bucket, Key="run/blob.bin")["Body"].read()
    assert body == b"\x00abc\xff"


@pytest.mark.s3
def test_s3_exists_and_is_dir(s3_bucket, s3_options):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="data/glioma/a.png", Body=b"x")
    assert storage.exists(f"s3://{bucket}/data/glioma/a.png", s3_options)
    assert not storage.is_dir(f"s3://{bucket}/data/glioma/a.png", s3_options)
    assert storage.is_dir(f"s3://{bucket}/data", s3_options)
    assert storage.is_dir(f"s3://{bucket}/data/", s3_options)
    assert not storage.exists(f"s3://{bucket}/data/missing.png", s3_options)
    assert not storage.exists(f"s3://{bucket}/other", s3_options)


@pytest.mark.s3
def test_s3_read_missing_key_names_the_uri(s3_bucket, s3_options):
    _, bucket = s3_bucket
    uri = f"s3://{bucket}/runs/none/model.pt"
    with pytest.raises(StorageError, match=f"{uri} does not exist"):
        storage.read_bytes(uri, s3_options)


@pytest.mark.s3
def test_s3_copy_file_from_local(tmp_path, s3_bucket, s3_options):
    client, bucket = s3_bucket
    (tmp_path / "m.pt").write_bytes(b"weights")
    storage.copy_file(str(tmp_path / "m.pt"), f"s3://{bucket}/m.pt", s3_options)
    assert client.get_object(Bucket=bucket, Key="m.pt")["Body"].read() == b"weights"


@pytest.mark.s3
def test_s3_copy_file_within_s3_and_back_to_local(tmp_path, s3_bucket, s3_options):
    # Given an object / When copied to another key (server-side) and down to a local file
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="a/part.parquet", Body=b"rows" * 1000)
    storage.copy_file(f"s3://{bucket}/a/part.parquet", f"s3://{bucket}/b/part.parquet",
                      s3_options)
    storage.copy_file(f"s3://{bucket}/b/part.parquet", str(tmp_path / "part.parquet"),
                      s3_options)
    # Then both copies hold the bytes
    assert client.get_object(Bucket=bucket, Key="b/part.parquet")["Body"].read() == b"rows" * 1000
    assert (tmp_path / "part.parquet").read_bytes() == b"rows" * 1000


@pytest.mark.s3
def test_s3_open_seekable_reads_a_zip_in_place_and_read_head_its_start(s3_bucket, s3_options):
    # Given a zip object
    client, bucket = s3_bucket
    data = _zip_bytes({f"m{i}.bin": bytes([i]) * 50_000 for i in range(20)})
    client.put_object(Bucket=bucket, Key="in/batch.zip", Body=data)
    uri = f"s3://{bucket}/in/batch.zip"
    # When zipfile reads one member through a seekable file over ranged GETs
    with storage.open_seekable(uri, s3_options) as source, zipfile.ZipFile(source) as archive:
        member = archive.read("m7.bin")
    # Then it gets that member, and read_head the object's first bytes
    assert member == bytes([7]) * 50_000
    assert storage.read_head(uri, 4, s3_options) == data[:4]
    with pytest.raises(StorageError, match="does not exist"):
        storage.open_stream(f"s3://{bucket}/in/none.tar", s3_options)


@pytest.mark.s3
def test_s3_stream_whose_reads_keep_failing_raises_a_transient_error(s3_endpoint, s3_bucket):
    # Given an object, and a proxy that throttles every GET (opening it only needs a HEAD)
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="in/a.tar", Body=b"x" * 100_000)
    with FaultProxy(s3_endpoint, [Fault("503", first=10**6, method="GET")]) as proxy:
        options = StorageOptions(s3_endpoint=proxy.url, s3_region="us-east-1")
        # When the stream is read
        with storage.open_stream(f"s3://{bucket}/in/a.tar", options) as stream:
            with pytest.raises(storage.TransientStorageError) as info:
                stream.read(10)
    # Then the failure is a storage outage naming the object, not bad content
    assert f"s3://{bucket}/in/a.tar" in str(info.value)


@pytest.mark.s3
def test_s3_ensure_writable_ok_leaves_no_probe(s3_bucket, s3_options):
    client, bucket = s3_bucket
    storage.ensure_writable(f"s3://{bucket}/runs/exp", s3_options)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    # pyarrow may leave an empty "runs/exp/" directory marker behind; never the probe itself
    assert not [k for k in keys if "brainray-write-probe" in k]
    assert all(k.endswith("/") for k in keys)


@pytest.mark.s3
def test_s3_ensure_writable_missing_bucket_names_bucket(s3_options):
    with pytest.raises(StorageError) as info:
        storage.ensure_writable("s3://brainray-no-such-bucket/runs/exp", s3_options)
    assert "brainray-no-such-bucket" in str(info.value)


@pytest.mark.s3
def test_s3_ensure_readable_dir(s3_bucket, s3_options):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="data/notumor/x.png", Body=b"x")
    storage.ensure_readable_dir(f"s3://{bucket}/data", s3_options)
    with pytest.raises(StorageError, match=f"s3://{bucket}/nodata does not exist"):
        storage.ensure_readable_dir(f"s3://{bucket}/nodata", s3_options)
    with pytest.raises(StorageError, match="brainray-no-such-bucket"):
        storage.ensure_readable_dir("s3://brainray-no-such-bucket/data", s3_options)


@pytest.mark.s3
@pytest.mark.parametrize("make_uri", [
    lambda b: f"s3://{b}/missing.json",
    lambda b: f"s3://{b}/missing.json?X-Amz-Signature={FAKE_SECRET}",
    lambda b: f"http://{FAKE_KEY_ID}:{FAKE_SECRET}@{b}.s3.local/k?sig={FAKE_SECRET}",
    lambda b: "s3://brainray-no-such-bucket/x.json",
], ids=["missing-key", "presigned-query", "http-userinfo", "missing-bucket"])
def test_storage_error_never_contains_the_secret(s3_bucket, s3_options, make_uri):
    # Given credentials in the environment (conftest) and sometimes inside the URI itself
    _, bucket = s3_bucket
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET
    # When a read fails / Then the StorageError does not contain the secret
    with pytest.raises(StorageError) as info:
        storage.read_bytes(make_uri(bucket), s3_options)
    assert FAKE_SECRET not in str(info.value)
    assert FAKE_KEY_ID not in str(info.value)


@pytest.mark.s3
def test_storage_error_from_missing_bucket_write_never_contains_the_secret(s3_options):
    with pytest.raises(StorageError) as info:
        storage.write_json(f"s3://brainray-no-such-bucket/x.json?sig={FAKE_SECRET}", {},
                           s3_options)
    assert FAKE_SECRET not in str(info.value)


def test_invalid_s3_uri_error_is_redacted():
    with pytest.raises(StorageError) as info:
        storage.resolve(f"s3:///bucket/k?X-Amz-Signature={FAKE_SECRET}", OFFLINE_S3)
    assert FAKE_SECRET not in str(info.value)


@pytest.mark.s3
def test_s3_uri_with_userinfo_raises_storage_error_without_secret(s3_bucket, s3_options):
    _, bucket = s3_bucket
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@{bucket}/k.json", s3_options)
    assert FAKE_SECRET not in str(info.value)


# --- listing ----------------------------------------------------------------------------------


def test_list_files_walks_a_folder_sorted_with_sizes(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.png").write_bytes(b"22")
    (tmp_path / "a.jpg").write_bytes(b"1")
    entries = storage.list_files(str(tmp_path))
    assert [e.uri for e in entries] == [str(tmp_path / "a.jpg"), str(tmp_path / "b" / "two.png")]
    assert [e.size for e in entries] == [1, 2] and all(e.mtime_ns > 0 for e in entries)


def test_list_files_of_a_single_file_is_that_file(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"123")
    (entry,) = storage.list_files(str(tmp_path / "x.dcm"))
    assert entry.uri == str(tmp_path / "x.dcm") and entry.size == 3


def test_list_files_survives_a_symlink_loop(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "loop")
    assert [e.uri for e in storage.list_files(str(tmp_path))] == [str(tmp_path / "scan.png")]


def test_list_files_of_a_missing_folder_names_it(tmp_path):
    with pytest.raises(StorageError, match="nowhere does not exist"):
        storage.list_files(str(tmp_path / "nowhere"))


def test_list_children_and_delete_dir(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "file.json").write_text("{}")
    assert storage.list_children(str(tmp_path)) == ["file.json"]
    assert storage.list_children(str(tmp_path), folders=True) == ["run1"]
    assert storage.list_children(str(tmp_path / "absent")) == []
    storage.delete_dir(str(tmp_path / "run1"))
    storage.delete_dir(str(tmp_path / "run1"))  # gone already: nothing to do
    assert storage.list_children(str(tmp_path), folders=True) == []


@pytest.mark.s3
def test_s3_list_files_lists_a_prefix_recursively(s3_bucket, s3_options):
    client, bucket = s3_bucket
    for key in ("in/a.png", "in/sub/b.png", "other/c.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"abc")
    entries = storage.list_files(f"s3://{bucket}/in", s3_options)
    assert [e.uri for e in entries] == [f"s3://{bucket}/in/a.png", f"s3://{bucket}/in/sub/b.png"]
    assert entries[0].path == f"{bucket}/in/a.png" and entries[0].size == 3
