"""Server interceptors with grpc.aio's semantics.

Each interceptor's ``async intercept_service(continuation, handler_call_details)``
is given control in the order the interceptors were passed to the server;
``await continuation(details)`` runs the next interceptor (the last one's
continuation finds the method's handler). An interceptor may return the
handler it got, a wrapped one, another one, or None (the RPC then ends with
UNIMPLEMENTED "Method not found!", as with grpc.aio).
"""
from __future__ import annotations

import abc
from typing import Any, Awaitable, Callable, Optional, Sequence, Tuple

from ._handlers import HandlerCallDetails, RpcMethodHandler

__all__ = ["ServerInterceptor", "build_chain", "check_interceptors"]

Continuation = Callable[[HandlerCallDetails], Awaitable[Optional[RpcMethodHandler]]]


class ServerInterceptor(abc.ABC):
    """Base class of server interceptors, the same shape as
    ``grpc.aio.ServerInterceptor`` (whose instances are accepted too)."""

    @abc.abstractmethod
    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: HandlerCallDetails,
    ) -> Optional[RpcMethodHandler]:
        """Return the handler for this call (usually
        ``await continuation(handler_call_details)``, maybe wrapped), or
        None to refuse it with UNIMPLEMENTED."""


def check_interceptors(interceptors: Sequence[Any]) -> Tuple[Any, ...]:
    """The interceptors as a tuple; ValueError (grpc.aio's error) if one has
    no ``intercept_service`` method."""
    invalid = [i for i in interceptors
               if not callable(getattr(i, "intercept_service", None))]
    if invalid:
        raise ValueError("Interceptor must be ServerInterceptor, the following "
                         f"are invalid: {invalid}")
    return tuple(interceptors)


def build_chain(interceptors: Tuple[Any, ...],
                find: Callable[[HandlerCallDetails], Optional[Any]]) -> Continuation:
    """The continuation that runs ``interceptors`` in order around
    ``find(details)`` (the lookup of the method's handler): awaiting it with
    a call's details gives the handler the first interceptor returns. Built
    once per server, so a call allocates nothing but its coroutines."""

    async def last(handler_call_details: HandlerCallDetails) -> Optional[Any]:
        return find(handler_call_details)

    chain: Continuation = last
    for interceptor in reversed(interceptors):
        chain = _link(interceptor.intercept_service, chain)
    return chain


def _link(intercept_service: Callable[..., Awaitable[Optional[Any]]],
          next_continuation: Continuation) -> Continuation:
    async def continuation(handler_call_details: HandlerCallDetails) -> Optional[Any]:
        return await intercept_service(next_continuation, handler_call_details)
    return continuation
