"""The drivers that run each handler kind, and the request iterator.

Streaming messages travel through the C call (``read``/``write``): a write
joins the call's write queue and returns at once below its high-water mark
(64 KiB), so a slow client slows the handler instead of growing memory; a
read returns a message that has already arrived without suspending. Handlers that are
plain functions or generators run on the migration thread pool with a
synchronous context (``_sync``)."""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, Optional

from ._context import ServicerContext
from ._sync import BlockingRequestIterator, SyncServicerContext

__all__ = ["RequestIterator", "driver_for", "is_async_handler"]


def is_async_handler(behavior: Any) -> bool:
    """True if ``behavior`` runs on the event loop (the test grpc.aio
    applies); anything else runs on the migration thread pool."""
    return (inspect.iscoroutinefunction(behavior)
            or inspect.isasyncgenfunction(behavior)
            or inspect.isawaitable(behavior)
            or inspect.iscoroutinefunction(getattr(behavior, "__call__", None)))


class RequestIterator:
    """``async for request in request_iterator`` over the client's stream."""

    __slots__ = ("_context",)

    def __init__(self, context: ServicerContext) -> None:
        self._context = context

    def __aiter__(self) -> "RequestIterator":
        return self

    def __anext__(self) -> Any:
        # No coroutine of its own: the C call gives the awaitable (a Ready
        # for a message that has arrived), and StopAsyncIteration at the end.
        return self._context._anext()


async def _write_all(responses: Any, context: ServicerContext,
                     pool: Optional[Any]) -> None:
    if hasattr(responses, "__aiter__"):
        async for response in responses:
            await context.write(response)
    elif hasattr(responses, "__iter__"):
        # A plain generator may block: pull each item on the thread pool.
        if not hasattr(responses, "__next__"):
            responses = iter(responses)
        loop = asyncio.get_running_loop()
        done = object()
        while True:
            response = await loop.run_in_executor(pool, next, responses, done)
            if response is done:
                return
            await context.write(response)
    elif responses is not None:
        raise TypeError("a response-streaming handler must be an async generator "
                        "or a coroutine that uses context.write(), got "
                        f"{type(responses).__name__}")


def _sync_driver(kind: str, behavior: Callable[..., Any],
                 pool: Optional[Any]) -> Callable[..., Any]:
    """The driver of a plain function or generator handler: it runs on
    ``pool`` with a SyncServicerContext (and a blocking request iterator);
    a returned iterator is pulled on ``pool`` too, one item at a time."""
    request_streaming = kind.startswith("stream_")
    response_streaming = kind.endswith("_stream")

    async def run_on_thread(request: Any, context: ServicerContext) -> Any:
        loop = asyncio.get_running_loop()
        if request_streaming:
            request = BlockingRequestIterator(context, loop)
        result = await loop.run_in_executor(
            pool, behavior, request, SyncServicerContext(context, loop))
        if not response_streaming:
            return result
        await _write_all(result, context, pool)
        return None
    return run_on_thread


def driver_for(kind: str, behavior: Callable[..., Any],
               pool: Optional[Any]) -> Callable[..., Any]:
    """A coroutine function ``(request_or_None, context)`` running one
    handler of ``kind`` ("unary_unary", "unary_stream", "stream_unary",
    "stream_stream"). A coroutine (or async generator) function runs on the
    loop, unary_unary ones as they are; anything else on ``pool``."""
    if not is_async_handler(behavior):
        return _sync_driver(kind, behavior, pool)
    if kind == "unary_unary":
        return behavior
    if kind == "unary_stream":
        async def unary_stream(request: Any, context: ServicerContext) -> None:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            await _write_all(result, context, pool)
        return unary_stream
    if kind == "stream_unary":
        async def stream_unary(_: Any, context: ServicerContext) -> Any:
            result = behavior(RequestIterator(context), context)
            if inspect.isawaitable(result):
                return await result
            return result
        return stream_unary
    if kind == "stream_stream":
        async def stream_stream(_: Any, context: ServicerContext) -> None:
            result = behavior(RequestIterator(context), context)
            if inspect.isawaitable(result):
                result = await result
            await _write_all(result, context, pool)
        return stream_stream
    raise ValueError(f"unknown handler kind {kind!r}")
