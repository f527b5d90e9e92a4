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

__all__ = ["ServerInterceptor", "check_interceptors", "run_chain"]

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


async def run_chain(interceptors: Tuple[Any, ...], details: HandlerCallDetails,
                    find: Callable[[HandlerCallDetails], Optional[Any]]) -> Optional[Any]:
    """Run ``interceptors`` in order around ``find(details)``; the handler
    the first interceptor returns (None if there is none)."""

    def continuation_at(index: int) -> Continuation:
        async def continuation(handler_call_details: HandlerCallDetails) -> Optional[Any]:
            if index == len(interceptors):
                return find(handler_call_details)
            return await interceptors[index].intercept_service(
                continuation_at(index + 1), handler_call_details)
        return continuation

    return await continuation_at(0)(details)
