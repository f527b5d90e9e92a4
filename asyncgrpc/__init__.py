"""asyncgrpc: a fast asyncio gRPC server with grpc.aio's programming model.

Switching from grpc.aio is one line::

    server = asyncgrpc.server()          # was: grpc.aio.server()
    helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    server.add_insecure_port("[::]:50051")
    await server.start()
    await server.wait_for_termination()
"""
from __future__ import annotations

from typing import Dict

from . import _core
from ._compression import Compression
from ._credentials import ServerCredentials, ssl_server_credentials
from ._descriptor import add_servicer
from ._context import EOF, AbortError, BaseError, Metadatum, ServicerContext, UsageError
from ._handlers import (
    GenericRpcHandler,
    HandlerCallDetails,
    RpcMethodHandler,
    method_handlers_generic_handler,
    stream_stream_rpc_method_handler,
    stream_unary_rpc_method_handler,
    unary_stream_rpc_method_handler,
    unary_unary_rpc_method_handler,
)
from ._interceptors import ServerInterceptor
from .metrics import enable_metrics
from ._server import Server, server
from .health import enable_health
from .reflection import enable_reflection
from ._sync import SyncServicerContext
from .executor import (
    Lanes,
    LanesClosedError,
    RemoteTraceback,
    WorkerCrashedError,
    cpu_bound,
    run_in_process,
    run_in_thread,
)
from ._status import StatusCode

__version__ = "0.1.0"

__all__ = [
    "AbortError",
    "BaseError",
    "Compression",
    "EOF",
    "GenericRpcHandler",
    "Lanes",
    "LanesClosedError",
    "RemoteTraceback",
    "WorkerCrashedError",
    "cpu_bound",
    "enable_metrics",
    "run_in_process",
    "run_in_thread",
    "HandlerCallDetails",
    "Metadatum",
    "RpcMethodHandler",
    "Server",
    "ServerCredentials",
    "ServerInterceptor",
    "ServicerContext",
    "SyncServicerContext",
    "StatusCode",
    "UsageError",
    "add_servicer",
    "core_version",
    "enable_health",
    "enable_reflection",
    "method_handlers_generic_handler",
    "server",
    "ssl_server_credentials",
    "stats",
    "stream_stream_rpc_method_handler",
    "stream_unary_rpc_method_handler",
    "unary_stream_rpc_method_handler",
    "unary_unary_rpc_method_handler",
]


def core_version() -> str:
    """The version of the gRPC C core asyncgrpc runs on, as the core reports
    it (``grpc_version_string()``). This is the core's own version number,
    not gRPC's release number: ``"29.0.0"`` is gRPC 1.51 (Debian 12's
    libgrpc, linked by a default build), ``"58.0.0"`` is gRPC 1.85 (the
    core an ``ASYNCGRPC_BUNDLED_CORE=1`` build compiles in; the grpcio
    release it came from is ``asyncgrpc._core.BUNDLED_CORE``). See README,
    "Which gRPC core"."""
    return _core.core_version()


def stats() -> Dict[str, int]:
    """Process-wide counters of the C core: completion events (handled
    inline by the loop or handed over by the poller), eventfd writes, loop
    wake-ups, drain passes, baton hand-backs and RPCs started/finished."""
    return _core.stats()
