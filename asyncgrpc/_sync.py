"""What plain ``def`` handlers receive: grpc's synchronous ServicerContext
and a blocking request iterator.

Sync handlers run on the server's migration thread pool, never on the event
loop; the C call object behind the context is not thread-safe, so every
method here does its work on the loop thread and waits for the result.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple, TypeVar

from ._context import EOF, Metadata, Metadatum, ServicerContext, abort_error_class

__all__ = ["SyncServicerContext", "BlockingRequestIterator"]

T = TypeVar("T")

_LOGGER = logging.getLogger("asyncgrpc")

# add_callback() callbacks run on a thread of their own: not on the loop
# (a callback that takes a lock held by a handler thread waiting for the
# loop would deadlock it) and not on the migration pool (its threads may all
# be blocked until such callbacks run, as grpcio-health-checking's Watch is).
_callback_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_callback_pool_lock = threading.Lock()


def _run_callback(callback: Callable[[], Any]) -> None:
    """Call ``callback()`` on the callback thread; its errors are logged."""
    global _callback_pool
    with _callback_pool_lock:
        if _callback_pool is None:
            _callback_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="asyncgrpc-callbacks")
    _callback_pool.submit(_guarded, callback)


def _guarded(callback: Callable[[], Any]) -> None:
    try:
        callback()
    except Exception:
        _LOGGER.exception("RPC callback %r failed", callback)


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on ``loop``'s thread and return its result (or
    raise its exception) in the calling thread."""
    if asyncio._get_running_loop() is loop:
        return fn(*args)      # already on the loop thread
    done: "concurrent.futures.Future[T]" = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as exc:
            done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
    loop.call_soon_threadsafe(run)
    return done.result()


def _await_on_loop(loop: asyncio.AbstractEventLoop, make: Callable[..., Any], *args: Any) -> Any:
    """Await ``make(*args)`` on ``loop`` and return its result in the
    calling thread (which must not be the loop's)."""
    if asyncio._get_running_loop() is loop:
        raise RuntimeError("a blocking context call was made on the event loop thread")

    async def run() -> Any:
        return await make(*args)
    return asyncio.run_coroutine_threadsafe(run(), loop).result()


class SyncServicerContext:
    """The ``context`` of a plain ``def`` handler: grpc's synchronous
    ``grpc.ServicerContext`` API over the RPC's asyncio context.

    ``abort()`` raises (the RPC ends with its status at once),
    ``send_initial_metadata()`` returns once the headers are sent, and
    ``add_callback(fn)`` calls ``fn()`` when the RPC terminates (on a thread
    reserved for such callbacks). Each method does its work on the loop
    thread and waits for it.
    """

    __slots__ = ("_context", "_loop")

    def __init__(self, context: ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop

    # -- status ---------------------------------------------------------
    def abort(self, code: Any, details: str = "",
              trailing_metadata: Metadata = ()) -> NoReturn:
        """End the RPC now with ``code`` and ``details`` and raise AbortError
        (a ``grpc.aio.AbortError`` too when grpcio is installed)."""
        _on_loop(self._loop, self._context._abort_now, code, details, trailing_metadata)
        raise abort_error_class()("Locally aborted.")

    def abort_with_status(self, status: Any) -> NoReturn:
        """``abort(status.code, status.details, status.trailing_metadata)``
        for a ``grpc.Status`` (e.g. grpcio-status's ``rpc_status.to_status``)."""
        self.abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: Any) -> None:
        """Set the status code sent when the handler returns."""
        _on_loop(self._loop, self._context.set_code, code)

    def set_details(self, details: str) -> None:
        """Set the status message sent when the handler returns."""
        _on_loop(self._loop, self._context.set_details, details)

    def code(self) -> Any:
        """The code set so far, or None."""
        return _on_loop(self._loop, self._context.code)

    def details(self) -> Optional[str]:
        """The status message set so far, or None."""
        return _on_loop(self._loop, self._context.details)

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        """Set the metadata sent with the status (validated now)."""
        _on_loop(self._loop, self._context.set_trailing_metadata, trailing_metadata)

    def trailing_metadata(self) -> Tuple[Tuple[str, Any], ...]:
        """The trailing metadata set so far."""
        return _on_loop(self._loop, self._context.trailing_metadata)

    def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        """Send the response headers now; returns once they are sent."""
        _await_on_loop(self._loop, self._context.send_initial_metadata, initial_metadata)

    def set_compression(self, compression: Any) -> None:
        """Compress this RPC's responses (before the headers are sent)."""
        _on_loop(self._loop, self._context.set_compression, compression)

    def disable_next_message_compression(self) -> None:
        """Send the next response message uncompressed."""
        _on_loop(self._loop, self._context.disable_next_message_compression)

    # -- facts ------------------------------------------------------------
    def invocation_metadata(self) -> Tuple[Metadatum, ...]:
        """The request metadata, as ``Metadatum(key, value)`` items."""
        return _on_loop(self._loop, self._context.invocation_metadata)

    def peer(self) -> str:
        """The client's address, e.g. ``ipv4:127.0.0.1:50000``."""
        return _on_loop(self._loop, self._context.peer)

    def peer_identities(self) -> Optional[Sequence[bytes]]:
        """The peer's authenticated identities, or None."""
        return _on_loop(self._loop, self._context.peer_identities)

    def peer_identity_key(self) -> Optional[str]:
        """The auth property naming the peer, or None."""
        return _on_loop(self._loop, self._context.peer_identity_key)

    def auth_context(self) -> Dict[str, List[bytes]]:
        """The auth properties of the call's transport."""
        return _on_loop(self._loop, self._context.auth_context)

    def time_remaining(self) -> Optional[float]:
        """Seconds left until the deadline, or None if there is none."""
        return _on_loop(self._loop, self._context.time_remaining)

    def cancel(self) -> None:
        """End the RPC now with CANCELLED (``grpc.RpcContext.cancel``); the
        handler goes on, and what it returns is dropped."""
        _on_loop(self._loop, self._context._finish, 1, "Cancelled")

    def is_active(self) -> bool:
        """True while the RPC has not terminated."""
        return not _on_loop(self._loop, self._context.done)

    def cancelled(self) -> bool:
        """True if the client cancelled the RPC or its deadline passed."""
        return _on_loop(self._loop, self._context.cancelled)

    def done(self) -> bool:
        """True once the RPC has terminated."""
        return _on_loop(self._loop, self._context.done)

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        """Call ``callback()`` (no arguments) when the RPC terminates, on a
        thread reserved for these callbacks. Returns False, without
        registering it, if the RPC has already terminated."""
        context = self._context

        def register() -> bool:
            if context.done():
                return False
            context.add_done_callback(lambda _context: _run_callback(callback))
            return True
        return _on_loop(self._loop, register)


class BlockingRequestIterator:
    """The request iterator of a plain ``def`` request-streaming handler:
    ``for request in request_iterator`` blocks the handler's thread until
    the next message arrives."""

    __slots__ = ("_context", "_loop", "_ended")

    def __init__(self, context: ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self._ended = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        message = _await_on_loop(self._loop, self._context.read)
        if message is EOF:
            self._ended = True
            raise StopIteration
        return message
