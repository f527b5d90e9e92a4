"""ServicerContext: what a handler receives as ``context``.

The per-RPC state lives in the C base class ``_core.Call`` (one object per
RPC, no Python-level wrapper); this subclass adds grpc.aio's methods.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, List, NamedTuple, NoReturn, Optional, Sequence, Tuple

from . import _core
from ._compression import compression_name
from ._status import StatusCode, code_to_int

__all__ = ["ServicerContext", "AbortError", "UsageError", "BaseError", "EOF", "Metadatum"]

_LOGGER = logging.getLogger("asyncgrpc")

Metadata = Sequence[Tuple[str, Any]]
DoneCallback = Callable[["ServicerContext"], None]


class BaseError(Exception):
    """Base of asyncgrpc's own exceptions."""


class AbortError(BaseError):
    """Raised by ``context.abort()`` to end the handler; the RPC ends with
    the code and details given to ``abort``. Handlers need not catch it.

    When grpcio is installed, what ``abort()`` raises is a subclass of both
    this class and ``grpc.aio.AbortError``, so ``except grpc.aio.AbortError``
    written for grpc.aio catches it too."""


class UsageError(BaseError):
    """The API was used in a way the RPC's state does not allow."""


class _EOFType:
    """The end-of-stream sentinel returned by ``context.read()``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<asyncgrpc.EOF>"

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        # grpc.aio.EOF is another object; code written against it compares
        # with ==, so treat grpc's sentinel as equal to ours.
        return other is self or repr(other) == "<grpc.aio.EOF>"

    def __hash__(self) -> int:
        return hash("asyncgrpc.EOF")


EOF = _EOFType()


class Metadatum(NamedTuple):
    """One item of ``invocation_metadata()``: ``.key`` and ``.value``, and
    still a ``(key, value)`` tuple (grpc.aio's items are the same)."""

    key: str
    value: Any


# What abort() raises: AbortError, or (once a server was created with grpcio
# importable) a subclass of AbortError and grpc.aio.AbortError; see _compat.
_abort_error_class: type = AbortError


def abort_error_class() -> type:
    """The exception class ``context.abort()`` raises."""
    return _abort_error_class


def set_abort_error_class(cls: type) -> None:
    """Make ``abort()`` raise ``cls`` (a subclass of AbortError)."""
    global _abort_error_class
    assert issubclass(cls, AbortError)
    _abort_error_class = cls

# The C fast paths of read() and write() raise UsageError and return EOF.
_core.configure(UsageError, EOF)


class ServicerContext(_core.Call):
    """The context of one RPC, with grpc.aio's ``ServicerContext`` methods.

    Created by the server for each RPC; handlers receive it as ``context``
    (plain ``def`` handlers get an ``asyncgrpc.SyncServicerContext`` around
    it). With grpcio installed, ``isinstance(context,
    grpc.aio.ServicerContext)`` is True. ``peer()``, ``time_remaining()``,
    ``cancelled()``, ``done()``, and the streaming ``read()`` (awaitable of
    the next request, or ``asyncgrpc.EOF`` after the client half-closed) and
    ``write(message)`` (awaitable: done at once while the call's write
    queue holds at most 64 KiB, else once the transport has taken it down to
    32 KiB: back-pressure) are implemented in C by the base class.
    """

    # _md: invocation_metadata() as Metadatum items, made on first use.
    __slots__ = ("_md",)

    def invocation_metadata(self) -> Tuple[Metadatum, ...]:
        """The request metadata: ``Metadatum(key, value)`` items, which
        compare equal to ``(key, value)`` tuples. Keys are str; values are
        bytes for keys ending in ``-bin``, str otherwise."""
        try:
            return self._md
        except AttributeError:
            md = tuple(map(_make_metadatum, _core.Call.invocation_metadata(self)))
            self._md = md
            return md

    def set_compression(self, compression: Any) -> None:
        """Compress this RPC's responses with ``compression``
        (``asyncgrpc.Compression`` or ``grpc.Compression``); call it before
        the initial metadata is sent."""
        if self._initial_metadata_sent:
            raise UsageError("set_compression() must come before the initial "
                             "metadata is sent")
        self._set_compression(compression_name(compression))

    def disable_next_message_compression(self) -> None:
        """Send the next response message uncompressed."""
        self._disable_next_compression()

    async def abort(self, code: Any, details: str = "",
                    trailing_metadata: Metadata = ()) -> NoReturn:
        """End the RPC now with ``code`` and ``details`` and raise AbortError.

        ``code`` is an ``asyncgrpc.StatusCode`` or ``grpc.StatusCode``.
        ``trailing_metadata``, if given, replaces what was set before.
        """
        self._abort_now(code, details, trailing_metadata)
        raise _abort_error_class("Locally aborted.")

    async def abort_with_status(self, status: Any) -> NoReturn:
        """End the RPC with a ``grpc.Status`` (anything with ``.code``,
        ``.details`` and ``.trailing_metadata``, e.g. from grpcio-status's
        ``rpc_status.to_status``) and raise AbortError."""
        await self.abort(status.code, status.details, status.trailing_metadata)

    def _abort_now(self, code: Any, details: str,
                   trailing_metadata: Optional[Metadata]) -> None:
        """abort() without the raise: send the status now (loop thread)."""
        if self._aborted:
            raise UsageError("abort() was already called")
        number = code_to_int(code)
        if number == 0:
            _LOGGER.error("abort() called with StatusCode.OK; returning UNKNOWN")
            number, code = 2, StatusCode.UNKNOWN
        if not isinstance(details, str):
            raise TypeError(f"details must be str, not {type(details).__name__}")
        self._abort(number, code, details,
                    trailing_metadata if trailing_metadata else None)

    def set_code(self, code: Any) -> None:
        """Set the status code sent when the handler returns."""
        self._set_code(code_to_int(code), code)

    def code(self) -> Any:
        """The code set with ``set_code``/``abort``, or None."""
        return self._code_obj

    def set_details(self, details: str) -> None:
        """Set the status message sent when the handler returns."""
        self._details = details

    def details(self) -> Optional[str]:
        """The status message set so far, or None."""
        return self._details

    async def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        """Send the response headers now (at most once per RPC).

        Keys are str; keys ending in ``-bin`` take bytes values, the others
        str. Invalid metadata raises TypeError/ValueError here.
        """
        if self._initial_metadata_sent:
            raise UsageError("initial metadata was already sent")
        await self._send_initial_metadata(initial_metadata)

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        """Set the metadata sent with the status (validated now)."""
        self._set_trailing_metadata(trailing_metadata)

    def trailing_metadata(self) -> Tuple[Tuple[str, Any], ...]:
        """The trailing metadata set so far."""
        md = self._trailing_metadata
        return md if md is not None else ()

    def add_done_callback(self, callback: DoneCallback) -> None:
        """Call ``callback(context)`` once, when the RPC terminates."""
        if self.done():
            asyncio.get_running_loop().call_soon(self._run_one_callback, callback)
            return
        callbacks = self._done_callbacks
        if callbacks is None:
            self._done_callbacks = [callback]
        else:
            callbacks.append(callback)

    def _run_one_callback(self, callback: DoneCallback) -> None:
        try:
            callback(self)
        except Exception:  # a callback's error must not break the server
            _LOGGER.exception("done callback %r of %s failed", callback, self._method)

    def _run_done_callbacks(self) -> None:
        callbacks = self._done_callbacks
        self._done_callbacks = None
        for callback in callbacks or ():
            self._run_one_callback(callback)

    def peer_identities(self) -> Optional[Sequence[bytes]]:
        """The authenticated identities of the peer, or None if the peer is
        not authenticated (always None on insecure ports)."""
        return self._auth()[2]

    def peer_identity_key(self) -> Optional[str]:
        """The auth property that names the peer, or None if unauthenticated."""
        return self._auth()[1]

    def auth_context(self) -> Dict[str, List[bytes]]:
        """The auth properties of the call's transport, read from the core
        (e.g. ``{"transport_security_type": [b"insecure"]}``)."""
        return self._auth()[0]


_make_metadatum = Metadatum._make
