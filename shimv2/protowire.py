"""A minimal protobuf wire-format reader for the ``start`` path.

``start`` must answer containerd in milliseconds and so cannot import
protobuf, yet it has to look into the options on its stdin (the shim cgroup).
Only what that needs: varints and length-delimited fields.
"""

from __future__ import annotations

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5


class WireError(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> dict[int, list[int | bytes]]:
    """Every field of a message: number -> values in order (ints or raw bytes)."""
    out: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == VARINT:
            value, pos = _varint(data, pos)
        elif wire_type == LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise WireError("truncated field")
            value, pos = data[pos : pos + length], pos + length
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if pos + size > len(data):
                raise WireError("truncated field")
            value, pos = int.from_bytes(data[pos : pos + size], "little"), pos + size
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if number == 0:
            raise WireError("field number 0")
        out.setdefault(number, []).append(value)
    return out


def last_bytes(msg: dict[int, list[int | bytes]], number: int) -> bytes:
    """The last length-delimited value of a field (proto3: last one wins), or b""."""
    values = [v for v in msg.get(number, []) if isinstance(v, bytes)]
    return values[-1] if values else b""


def last_string(msg: dict[int, list[int | bytes]], number: int) -> str:
    return last_bytes(msg, number).decode(errors="replace")


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints: two's complement, 10 bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(items: list[tuple[int, int | bytes | str]]) -> bytes:
    """A message from (field number, value) pairs in order: ints as varints,
    bytes and str length-delimited. Zero/empty values are written as given."""
    out = bytearray()
    for number, value in items:
        if isinstance(value, int):
            out += _encode_varint(number << 3 | VARINT) + _encode_varint(value)
        else:
            data = value.encode() if isinstance(value, str) else value
            out += _encode_varint(number << 3 | LENGTH_DELIMITED) + _encode_varint(len(data))
            out += data
    return bytes(out)


def signed32(value: int) -> int:
    """A varint-decoded enum/int32 back to its signed value (-4 arrives as 2**64 - 4)."""
    value &= (1 << 64) - 1
    if value >= 1 << 63:
        value -= 1 << 64
    return value


def type_name(type_url: str) -> str:
    """Compare type URLs on the part after the last '/' (tolerates a googleapis prefix)."""
    return type_url.rsplit("/", 1)[-1]
