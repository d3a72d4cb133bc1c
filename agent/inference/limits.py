"""How much memory inference requests may take: a size cap per model, derived from its input
shapes, checked on the request's raw bytes before they are parsed into a second copy; a limit
on large requests in flight; and memory given back to the system once they are done.

Without these, eight concurrent legal 62 MB requests took the agent from 154 MB to 1.5 GB
resident, and it stayed there: each request lived as raw bytes, a parsed message and
ONNX Runtime's buffers at once, and glibc kept the freed heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from agent.errors import RequestTooLarge
from edgefleet.core.versions import TensorSpec

log = logging.getLogger(__name__)

# A request over this many bytes is "large": at most `large_in_flight` of them run at once.
LARGE_REQUEST_BYTES = 1 << 20
# Room for the request's names, shapes, ids and framing beyond its tensor bytes.
REQUEST_OVERHEAD_BYTES = 64 << 10
# Typed contents carry integers as varints: a negative one takes ten bytes on the wire.
_VARINT_MAX = 10
# A BYTES element is a 4-byte length and its bytes; each may be this long at most in the cap.
_BYTES_ELEMENT = 4 + 4096


def element_bytes(datatype: str, itemsize: int) -> int:
    """The most bytes one element of `datatype` can take in a request, raw or typed."""
    if datatype == "BYTES":
        return _BYTES_ELEMENT
    if datatype.startswith(("INT", "UINT")):
        return max(itemsize, _VARINT_MAX)
    return max(itemsize, 1)


def request_limit(
    inputs: Sequence[TensorSpec],
    itemsizes: Sequence[int],
    *,
    max_rows: int,
    max_dynamic: int,
    ceiling: int,
) -> int:
    """The largest request a model can legally get, in bytes: each input at its full shape,
    a dynamic first dimension counted as `max_rows` rows and any other dynamic dimension as
    `max_dynamic`; never more than `ceiling`."""
    total = REQUEST_OVERHEAD_BYTES
    for spec, itemsize in zip(inputs, itemsizes, strict=True):
        dims = [
            d if d >= 0 else (max_rows if i == 0 else max_dynamic) for i, d in enumerate(spec.shape)
        ]
        total += math.prod(dims) * element_bytes(spec.datatype, itemsize)
        if total >= ceiling:
            return ceiling
    return min(total, ceiling)


def peek_model(raw: bytes) -> tuple[str, str]:
    """ModelInferRequest's model_name (field 1) and model_version (field 2), read from the
    wire format without parsing the tensors: ("", "") when the bytes are not a message (the
    full parse then says why)."""
    name = version = ""
    view = memoryview(raw)
    pos, end = 0, len(raw)
    try:
        while pos < end and not (name and version):
            key, pos = _varint(view, pos)
            number, kind = key >> 3, key & 7
            if kind == 0:
                _, pos = _varint(view, pos)
            elif kind == 1:
                pos += 8
            elif kind == 5:
                pos += 4
            elif kind == 2:
                length, pos = _varint(view, pos)
                if number in (1, 2):
                    text = bytes(view[pos : pos + min(length, 1024)]).decode("utf-8", "replace")
                    name, version = (text, version) if number == 1 else (name, text)
                pos += length
            else:
                return "", ""
    except IndexError:
        return "", ""
    return name, version


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


@dataclass
class MemoryStats:
    large_requests: int = 0
    refused_over_limit: int = 0
    trims: int = 0


class LargeRequests:
    """Admission of large requests: at most `in_flight` run at once (the others wait their
    turn), and when the last one finishes the freed heap is handed back to the system."""

    def __init__(self, in_flight: int, *, give_back: bool = True) -> None:
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        self._give_back = give_back
        self._trim_pending = False
        self._slots = threading.BoundedSemaphore(in_flight)
        self._lock = threading.Lock()
        self._running = 0
        self.stats = MemoryStats()

    @contextlib.contextmanager
    def admit(self, size: int) -> Iterator[None]:
        if size <= LARGE_REQUEST_BYTES:
            yield
            return
        with self._slots:
            with self._lock:
                self._running += 1
                self.stats.large_requests += 1
            try:
                yield
            finally:
                with self._lock:
                    self._running -= 1
                    last = self._running == 0
                if last:
                    self.give_back_soon()

    def refused(self, size: int) -> None:
        """A request refused before it was parsed: its bytes go once gRPC drops them."""
        self.stats.refused_over_limit += 1
        if size > LARGE_REQUEST_BYTES:
            self.give_back_soon()

    def give_back_soon(self, delay_s: float = 0.2) -> None:
        """Trim the heap shortly (once for many requests ending together): the request's
        buffers are freed when gRPC finishes the call, just after the handler returns."""
        if not self._give_back:
            return
        with self._lock:
            if self._trim_pending:
                return
            self._trim_pending = True
        timer = threading.Timer(delay_s, self._trim)
        timer.daemon = True
        timer.start()

    def _trim(self) -> None:
        with self._lock:
            self._trim_pending = False
            busy = self._running > 0
        if not busy and trim_heap():
            self.stats.trims += 1


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = LARGE_REQUEST_BYTES) -> bool:
    """Have glibc serve allocations over `mmap_threshold` with mmap, so a large request's
    buffers go back to the system when freed (glibc otherwise raises the threshold after the
    first large free and keeps later ones in its heap). False where glibc is not the libc."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def trim_heap() -> bool:
    """Give free heap pages back to the system (glibc's malloc_trim); False where missing."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


def over_limit(model: str, size: int, limit: int, detail: str) -> RequestTooLarge:
    return RequestTooLarge(
        f"the request to {model[:64]!r} is {size} bytes; its limit is {limit} bytes ({detail}). "
        "Send fewer rows per request, or raise the agent's inference_max_rows / "
        "inference_max_dynamic"
    )
