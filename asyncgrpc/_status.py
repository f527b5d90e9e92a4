"""Status codes: grpc's names and numbers, without needing grpcio."""
from __future__ import annotations

import enum
from typing import Any

__all__ = ["StatusCode", "code_to_int"]


class StatusCode(enum.Enum):
    """gRPC status codes, with the same names and values as ``grpc.StatusCode``.

    Each value is ``(number, name)`` as in grpcio, so code written against
    ``grpc.StatusCode`` (for example ``code.value[0]``) works unchanged.
    Wherever asyncgrpc takes a code it also accepts ``grpc.StatusCode``.
    """

    OK = (0, "ok")
    CANCELLED = (1, "cancelled")
    UNKNOWN = (2, "unknown")
    INVALID_ARGUMENT = (3, "invalid argument")
    DEADLINE_EXCEEDED = (4, "deadline exceeded")
    NOT_FOUND = (5, "not found")
    ALREADY_EXISTS = (6, "already exists")
    PERMISSION_DENIED = (7, "permission denied")
    RESOURCE_EXHAUSTED = (8, "resource exhausted")
    FAILED_PRECONDITION = (9, "failed precondition")
    ABORTED = (10, "aborted")
    OUT_OF_RANGE = (11, "out of range")
    UNIMPLEMENTED = (12, "unimplemented")
    INTERNAL = (13, "internal")
    UNAVAILABLE = (14, "unavailable")
    DATA_LOSS = (15, "data loss")
    UNAUTHENTICATED = (16, "unauthenticated")

    @classmethod
    def from_int(cls, number: int) -> "StatusCode":
        """The code with this number (``ValueError`` if there is none)."""
        try:
            return _BY_NUMBER[number]
        except KeyError:
            raise ValueError(f"{number} is not a gRPC status code") from None


_BY_NUMBER = {code.value[0]: code for code in StatusCode}


def code_to_int(code: Any) -> int:
    """The number of a status code given as asyncgrpc or grpc StatusCode, or int."""
    value = getattr(code, "value", None)
    if isinstance(value, tuple) and value and isinstance(value[0], int):
        number = value[0]
    elif isinstance(code, int) and not isinstance(code, bool):
        number = code
    else:
        raise TypeError(
            f"a status code must be asyncgrpc.StatusCode or grpc.StatusCode, not {code!r}")
    if number not in _BY_NUMBER:
        raise ValueError(f"{number} is not a gRPC status code")
    return number
