"""Make asyncgrpc's objects pass grpcio's type checks when grpcio is
installed, without making grpcio a run-time dependency.

- ``isinstance(server, grpc.aio.Server)``, ``isinstance(context,
  grpc.aio.ServicerContext)``, ``isinstance(sync_context,
  grpc.ServicerContext)`` and ``isinstance(interceptor,
  grpc.aio.ServerInterceptor)`` for an ``asyncgrpc.ServerInterceptor`` are
  True (virtual subclasses of grpc's ABCs).
- ``context.abort()`` raises a subclass of both ``asyncgrpc.AbortError`` and
  ``grpc.aio.AbortError`` (exceptions need a real subclass).
- Something that wrapped ``grpc.aio.server`` to add interceptors (e.g.
  OpenTelemetry's ``GrpcAioInstrumentorServer().instrument()``) adds them to
  ``asyncgrpc.server()`` too.

Done once per process, the first time a server is created.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from typing import Any, List, Optional, Sequence

from . import _context
from ._context import AbortError, ServicerContext
from ._interceptors import ServerInterceptor
from ._sync import SyncServicerContext

__all__ = ["register_with_grpc", "interceptors_from_grpc_aio_wrappers"]

_LOGGER = logging.getLogger("asyncgrpc")
_registered = False
_swap_lock = threading.Lock()


def register_with_grpc(server_class: type) -> None:
    """Register asyncgrpc's classes with grpcio's ABCs, if grpcio can be
    imported (imports ``grpc.aio`` then; a no-op after the first call)."""
    global _registered
    if _registered:
        return
    _registered = True
    if "grpc" not in sys.modules and importlib.util.find_spec("grpc") is None:
        return
    try:
        import grpc
        import grpc.aio
    except Exception:  # a broken grpcio install must not break the server
        _LOGGER.debug("grpc is installed but cannot be imported", exc_info=True)
        return
    for abc_class, cls in ((getattr(grpc.aio, "Server", None), server_class),
                           (getattr(grpc.aio, "ServicerContext", None), ServicerContext),
                           (getattr(grpc, "ServicerContext", None), SyncServicerContext),
                           (getattr(grpc.aio, "ServerInterceptor", None), ServerInterceptor)):
        register = getattr(abc_class, "register", None)
        if register is not None:
            register(cls)
    grpc_abort_error = getattr(grpc.aio, "AbortError", None)
    if isinstance(grpc_abort_error, type) and issubclass(grpc_abort_error, BaseException):
        dual = type("AbortError", (AbortError, grpc_abort_error), {
            "__module__": "asyncgrpc",
            "__doc__": AbortError.__doc__,
        })
        _context.set_abort_error_class(dual)


class _Captured(Exception):
    """Raised by the stand-in of grpc.aio's Server class to hand back the
    arguments a grpc.aio.server wrapper passed on."""

    def __init__(self, interceptors: Sequence[Any]) -> None:
        super().__init__("captured")
        self.interceptors = interceptors


def interceptors_from_grpc_aio_wrappers(interceptors: Optional[Sequence[Any]]) -> Optional[List[Any]]:
    """The interceptors ``grpc.aio.server(interceptors=interceptors)`` would
    use, if a library has wrapped ``grpc.aio.server`` (as OpenTelemetry's
    ``GrpcAioInstrumentorServer().instrument()`` does to put its tracing
    interceptor first); None when ``grpc.aio.server`` is grpc's own.

    The wrapper is called with grpc.aio's Server class stood in by one that
    records its interceptors (for this thread only, so a grpc.aio server
    made elsewhere at the same moment is unaffected); no grpc.aio server is
    created. A wrapper that does anything else is ignored with a warning.
    """
    aio = sys.modules.get("grpc.aio")
    server_module = sys.modules.get("grpc.aio._server")
    if aio is None or server_module is None:
        return None
    current = getattr(aio, "server", None)
    original = getattr(server_module, "server", None)
    real_server_class = getattr(server_module, "Server", None)
    if current is None or original is None or real_server_class is None or current is original:
        return None
    me = threading.get_ident()

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != me:
            return real_server_class(*args, **kwargs)
        # grpc.aio._server.server() passes (pool, handlers, interceptors, ...)
        found = kwargs["interceptors"] if "interceptors" in kwargs else args[2]
        raise _Captured(list(found or ()))

    with _swap_lock:
        server_module.Server = stand_in
        try:
            current(interceptors=list(interceptors or ()))
        except _Captured as captured:
            return captured.interceptors
        except Exception:
            _LOGGER.warning("grpc.aio.server is wrapped by %r, which could not be "
                            "applied to asyncgrpc.server(); its interceptors are not used",
                            current, exc_info=True)
            return None
        finally:
            server_module.Server = real_server_class
    _LOGGER.warning("grpc.aio.server is wrapped by %r, which did not call grpc.aio's "
                    "server(); it is not applied to asyncgrpc.server()", current)
    return None
