"""Protocol-buffer wire bytes written by hand, where rows already held as bytes are put
together into a message (a sync batch, a telemetry segment) without parsing each one."""

from __future__ import annotations

LEN = 2  # wire type: length-delimited
VARINT = 0


def varint(value: int) -> bytes:
    if value < 0x80:  # the common case first: most lengths and numbers are small
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field(number: int, data: bytes) -> bytes:
    """A length-delimited field: a string, bytes or an embedded message's bytes."""
    return tag(number, LEN) + varint(len(data)) + data
