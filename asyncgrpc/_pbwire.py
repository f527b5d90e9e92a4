"""A tiny protobuf wire-format codec for the few small messages asyncgrpc
serves itself (health checking, reflection), so they need neither grpcio nor
protobuf at run time.

Only what those messages use: varints (int32/enum/bool), length-delimited
fields (string, bytes, embedded messages, packed repeated varints); fixed32
and fixed64 fields are skipped when reading, as unknown fields are.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Tuple, Union

__all__ = [
    "DecodeError",
    "decode_varint",
    "encode_varint",
    "iter_fields",
    "bytes_field",
    "string_field",
    "varint_field",
    "packed_varints_field",
    "unpack_varints",
    "as_int32",
]

VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5

_MASK64 = (1 << 64) - 1


class DecodeError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def encode_varint(value: int) -> bytes:
    """``value`` as a base-128 varint (negative numbers take 10 bytes, as
    protobuf encodes a negative int32/int64)."""
    value &= _MASK64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes, pos: int) -> Tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it."""
    result = shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint too long")


def as_int32(value: int) -> int:
    """A decoded varint read as a signed int32 (protobuf's int32 semantics)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def iter_fields(data: bytes) -> Iterator[Tuple[int, int, Union[int, bytes]]]:
    """(field number, wire type, value) of each field of the message
    ``data``, in order: an int for varints and fixed fields, bytes for
    length-delimited ones. Groups (wire types 3 and 4) are refused."""
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = decode_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        value: Union[int, bytes]
        if wire_type == VARINT:
            value, pos = decode_varint(data, pos)
        elif wire_type == LEN:
            length, pos = decode_varint(data, pos)
            if pos + length > end:
                raise DecodeError("truncated length-delimited field")
            value = bytes(data[pos:pos + length])
            pos += length
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise DecodeError("truncated fixed64 field")
            value = int.from_bytes(data[pos:pos + 8], "little")
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise DecodeError("truncated fixed32 field")
            value = int.from_bytes(data[pos:pos + 4], "little")
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        yield number, wire_type, value


def _key(number: int, wire_type: int) -> bytes:
    return encode_varint((number << 3) | wire_type)


def varint_field(number: int, value: int) -> bytes:
    """A varint field (int32, enum, bool); proto3 omits zero, so do we."""
    if not value:
        return b""
    return _key(number, VARINT) + encode_varint(value)


def bytes_field(number: int, value: bytes) -> bytes:
    """A length-delimited field, always written (for oneof members and
    repeated items, where presence matters)."""
    return _key(number, LEN) + encode_varint(len(value)) + value


def string_field(number: int, value: str) -> bytes:
    """A string field; proto3 omits the empty string, so do we."""
    if not value:
        return b""
    return bytes_field(number, value.encode("utf-8"))


def packed_varints_field(number: int, values: Iterable[int]) -> bytes:
    """A packed repeated varint field (proto3's default for repeated int32)."""
    payload = b"".join(encode_varint(v) for v in values)
    if not payload:
        return b""
    return bytes_field(number, payload)


def unpack_varints(data: bytes) -> List[int]:
    """The varints of a packed repeated field's payload."""
    out: List[int] = []
    pos = 0
    while pos < len(data):
        value, pos = decode_varint(data, pos)
        out.append(value)
    return out
