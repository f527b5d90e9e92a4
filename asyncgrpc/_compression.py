"""Compression algorithms, with grpc.Compression's names and numbers."""
from __future__ import annotations

import enum
from typing import Any

__all__ = ["Compression", "compression_number", "compression_name"]


class Compression(enum.IntEnum):
    """Message compression, numbered as ``grpc.Compression`` (which is
    accepted too wherever asyncgrpc takes a compression)."""

    NoCompression = 0
    Deflate = 1
    Gzip = 2


_NAMES = {0: "identity", 1: "deflate", 2: "gzip"}


def compression_number(compression: Any) -> int:
    """The number of an asyncgrpc or grpc Compression value."""
    value = getattr(compression, "value", compression)
    if isinstance(value, bool) or not isinstance(value, int) or value not in _NAMES:
        raise ValueError(f"unknown compression {compression!r}; use "
                         "asyncgrpc.Compression.Gzip, .Deflate or .NoCompression")
    return value


def compression_name(compression: Any) -> str:
    """The wire name ("gzip", "deflate", "identity") of a compression value."""
    return _NAMES[compression_number(compression)]
