"""A moto S3 server whose ranged GETs read only the bytes asked for, for benchmarks at GiB sizes.

    python -m bench.ranged_moto -H 127.0.0.1 -p PORT

moto (pinned in [test]) answers a ranged GET by reading the whole object and slicing it: at 3 GiB
one 8 MiB read costs seconds and 3 GiB of moto's memory, which brainray's S3 client rightly
treats as a stalled server. Real S3 serves a range in proportion to its length. This entry point
runs moto's own server with one change: while a GET with a single `bytes=a-b` range is answered,
the object's body is a view that reads its slices from moto's stored file, so moto's range
handling (headers, 206, the Content-Range arithmetic) still runs unchanged on top of it. Only the
benchmarks use it; the tests use plain moto.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from moto import server
from moto.s3.models import FakeKey
from moto.s3.responses import S3Response

_ranged = threading.local()  # set while a ranged GET is answered on this server thread
_plain_value = FakeKey.value


class _StoredBody:
    """An object's body as moto's range handler uses it: its length, and slices read on demand."""

    def __init__(self, key: FakeKey):
        self.key = key

    def __len__(self) -> int:
        return self.key.contentsize

    def __getitem__(self, span: slice) -> bytes:
        start, stop, _ = span.indices(len(self))
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return self.key._value_buffer.read(max(0, stop - start))


def _value(key: FakeKey):
    return _StoredBody(key) if getattr(_ranged, "on", False) else _plain_value.fget(key)


def _get_object(response: S3Response, _plain=S3Response.get_object):
    # moto falls back to the whole body for a multi-range or malformed header: read it whole
    rng = response.headers.get("range", "")
    _ranged.on = bool(re.fullmatch(r"bytes=(\d+-\d*|-\d+)", rng.strip()))
    try:
        return _plain(response)
    finally:
        _ranged.on = False


def install() -> Callable[[], None]:
    """Patch moto in this process; returns the function that puts it back."""
    plain_get = S3Response.get_object
    FakeKey.value = property(_value, _plain_value.fset)
    S3Response.get_object = _get_object

    def restore() -> None:
        FakeKey.value = _plain_value
        S3Response.get_object = plain_get

    return restore


def main() -> None:
    install()
    server.main()


if __name__ == "__main__":
    main()
