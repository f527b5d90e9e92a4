"""The asyncio gRPC server: grpc.aio's Server API over asyncgrpc._core."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _compat, _core, _watchdog, executor
from ._context import ServicerContext
from ._compression import compression_number
from ._credentials import ServerCredentials
from ._handlers import HandlerCallDetails, method_paths
from ._interceptors import build_chain, check_interceptors
from ._status import StatusCode
from ._streaming import driver_for

__all__ = ["Server", "server"]

_LOGGER = logging.getLogger("asyncgrpc")

ChannelOptions = Sequence[Tuple[str, Any]]


def _kind(handler: Any) -> str:
    return {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[
        (bool(handler.request_streaming), bool(handler.response_streaming))]


class Server:
    """An asyncio gRPC server with ``grpc.aio.Server``'s methods.

    Create it with :func:`asyncgrpc.server`. Handlers are coroutine
    functions ``async def Method(self, request, context)`` as with grpc.aio;
    plain functions run on the migration thread pool. With grpcio installed,
    ``isinstance(server, grpc.aio.Server)`` is True.
    """

    def __init__(
        self,
        migration_thread_pool: Optional[concurrent.futures.Executor] = None,
        handlers: Optional[Sequence[Any]] = None,
        interceptors: Optional[Sequence[Any]] = None,
        options: Optional[ChannelOptions] = None,
        maximum_concurrent_rpcs: Optional[int] = None,
        compression: Optional[Any] = None,
        *,
        process_workers: Optional[int] = None,
        thread_workers: Optional[int] = None,
        blocked_loop_threshold: Optional[float] = 0.1,
        health: bool = False,
        reflection: bool = False,
    ) -> None:
        _compat.register_with_grpc(Server)
        self._interceptors = check_interceptors(interceptors or ())
        self._chain = build_chain(self._interceptors, self._find_for_interceptors)
        if maximum_concurrent_rpcs is not None and maximum_concurrent_rpcs < 1:
            raise ValueError("maximum_concurrent_rpcs must be None or >= 1")
        self._thread_pool = migration_thread_pool
        # The three lanes: this server's process pool and thread pool (found
        # by asyncgrpc.run_in_process / run_in_thread while it runs), and the
        # watchdog that reports a blocked loop.
        self._lanes = executor.Lanes(process_workers, thread_workers)
        self._blocked_loop_threshold = blocked_loop_threshold
        self._watchdog: Optional[_watchdog.Watchdog] = None
        channel_args = list(options or ())
        if compression is not None:
            channel_args.append(("grpc.default_compression_algorithm",
                                 compression_number(compression)))
        self._core = _core.Server(tuple(channel_args), maximum_concurrent_rpcs or 0)
        self._generic_handlers: list = []
        # path -> handler, from add_registered_method_handlers (these win,
        # as with grpc.aio) and from the generic handlers whose table we can
        # read, as long as no generic handler before them is opaque (it is
        # asked first, per call).
        self._registered: Dict[str, Any] = {}
        self._explicit: Dict[str, Any] = {}
        self._opaque_generic = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._started = False
        self._stop_task: Optional[asyncio.Task] = None
        self._stop_deadline = 0.0
        self._stop_cut_short: Optional[asyncio.Event] = None
        self._pid = os.getpid()
        self._terminated: Optional[asyncio.Event] = None
        self._metrics: Any = None     # asyncgrpc.metrics.Metrics once enabled
        # Run synchronously at the very start of stop(), before GOAWAY and
        # the drain (health turns NOT_SERVING here).
        self._stop_callbacks: List[Callable[[], None]] = []
        if handlers:
            self.add_generic_rpc_handlers(handlers)
        if health:
            from .health import enable_health
            enable_health(self)
        if reflection:
            from .reflection import enable_reflection
            enable_reflection(self)

    # -- configuration -------------------------------------------------
    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[Any]) -> None:
        """Add generic handlers (objects with ``service(details)``)."""
        self._check_not_started()
        for handler in generic_rpc_handlers:
            if not callable(getattr(handler, "service", None)):
                raise TypeError(f"{handler!r} is not a generic RPC handler "
                                "(it has no service() method)")
            self._generic_handlers.append(handler)
            paths = method_paths(handler)
            if not paths:
                self._opaque_generic = True
            if self._opaque_generic:
                continue
            for path, method_handler in paths:
                self._registered.setdefault(path, method_handler)

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: Dict[str, Any]) -> None:
        """Register the methods of one service (method name -> handler)."""
        self._check_not_started()
        for method, handler in method_handlers.items():
            path = f"/{service_name}/{method}"
            if path not in self._explicit:
                self._explicit[path] = handler
                self._registered[path] = handler

    def add_insecure_port(self, address: str) -> int:
        """Listen on ``address`` without TLS; returns the port (0 picks one)."""
        self._check_not_started()
        return self._core.add_http2_port(address)

    def add_secure_port(self, address: str, server_credentials: ServerCredentials) -> int:
        """Listen on ``address`` with TLS; returns the port (0 picks one).

        ``server_credentials`` comes from :func:`asyncgrpc.ssl_server_credentials`
        (grpcio's credentials objects are opaque and cannot be used).
        """
        self._check_not_started()
        if not isinstance(server_credentials, ServerCredentials):
            kind = type(server_credentials)
            if kind.__module__.split(".")[0] == "grpc":
                raise TypeError(
                    f"add_secure_port() got grpcio's {kind.__name__}, which asyncgrpc "
                    "cannot read: pass asyncgrpc.ssl_server_credentials(...) with the "
                    "same arguments you gave grpc.ssl_server_credentials(...)")
            raise TypeError("add_secure_port() needs asyncgrpc.ssl_server_credentials(...), "
                            f"not {kind.__name__}")
        return self._core.add_http2_port(address, server_credentials._spec)

    def add_stop_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` synchronously at the very start of the first
        ``stop()``, before GOAWAY is sent and the drain begins (e.g. to turn
        health checks NOT_SERVING). Exceptions are logged."""
        self._stop_callbacks.append(callback)

    def _run_stop_callbacks(self) -> None:
        callbacks, self._stop_callbacks = self._stop_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _LOGGER.exception("stop callback %r failed", callback)

    def _check_not_started(self) -> None:
        if self._started:
            raise RuntimeError("the server is already started")

    # -- life cycle ----------------------------------------------------
    async def start(self) -> None:
        """Start serving on the running event loop."""
        self._check_not_started()
        loop = asyncio.get_running_loop()
        for path, registration in self._registrations():
            self._core.register_method(path, *registration)
        if self._metrics is not None:
            # After every register_method: rows for the registered methods,
            # then for the other paths served through the generic path.
            self._core.enable_metrics(tuple(self._registered))
        self._loop = loop
        self._terminated = asyncio.Event()
        self._core.start(loop, ServicerContext, self, _eager_task_factory(loop))
        self._pid = os.getpid()
        self._started = True
        self._lanes.start()
        executor._install(self._lanes)
        self._watchdog = _watchdog.Watchdog(loop, self._blocked_loop_threshold)
        self._watchdog.start()

    async def stop(self, grace: Optional[float]) -> None:
        """Stop: run the stop callbacks (health turns NOT_SERVING), send
        GOAWAY at once (clients start no new RPCs here and
        move to other backends; the listening sockets close), let the RPCs in
        flight finish within ``grace`` seconds, then cancel the rest.
        ``stop(None)`` cancels at once; a later call with a shorter grace
        cuts a running one short."""
        self._run_stop_callbacks()
        if not self._started:
            self._core.close()
            self._lanes.shutdown()
            return
        assert self._loop is not None
        if os.getpid() != self._pid:
            self._stop_inert()
            return
        deadline = self._loop.time() + (grace or 0.0)
        if self._stop_task is None:
            self._stop_deadline = deadline
            self._stop_cut_short = asyncio.Event()
            self._stop_task = asyncio.ensure_future(self._stop())
        elif deadline < self._stop_deadline:
            # A later stop() with a shorter grace (or None) wins.
            assert self._stop_cut_short is not None
            self._stop_deadline = deadline
            self._stop_cut_short.set()
        await asyncio.shield(self._stop_task)

    def _stop_inert(self) -> None:
        """stop() in a process forked from the one that started the server:
        the server, its pools and its watchdog belong to the parent, which
        goes on serving. Release this copy without waiting for anything."""
        if self._core.phase != "closed":
            self._core.shutdown()
        self._core.close()
        assert self._terminated is not None
        self._terminated.set()

    async def _stop(self) -> None:
        assert self._loop is not None
        # GOAWAY at once: clients start no new calls on these connections
        # (they move to other backends) and the listeners close, while the
        # calls in flight go on until they end or the grace runs out.
        done = self._core.shutdown()
        assert self._stop_cut_short is not None
        while not done.done():
            remaining = self._stop_deadline - self._loop.time()
            if remaining <= 0:
                break
            self._stop_cut_short.clear()
            cut_short = asyncio.ensure_future(self._stop_cut_short.wait())
            await asyncio.wait({done, cut_short}, timeout=remaining,
                               return_when=asyncio.FIRST_COMPLETED)
            cut_short.cancel()
        if not done.done():
            self._core.cancel_all_calls()
            await done
        self._core.close()
        if self._watchdog is not None:
            self._watchdog.stop()
        executor._uninstall(self._lanes)
        await self._lanes.stop()
        assert self._terminated is not None
        self._terminated.set()

    def stats(self) -> Dict[str, Any]:
        """Counters of this server's lanes and watchdog, and the process-wide
        counters of the C core (see :func:`asyncgrpc.stats`)."""
        out: Dict[str, Any] = dict(_core.stats())
        out["active_calls"] = self._core.active_calls
        out.update(self._lanes.stats())
        if self._watchdog is not None:
            out.update(self._watchdog.stats())
        return out

    async def wait_for_termination(self, timeout: Optional[float] = None) -> bool:
        """Wait until the server stopped; True if ``timeout`` ran out first."""
        if not self._started:
            raise RuntimeError("the server is not started")
        assert self._terminated is not None
        try:
            await asyncio.wait_for(self._terminated.wait(), timeout)
        except asyncio.TimeoutError:
            return True
        return False

    # -- called by the C core --------------------------------------------
    def _behavior(self, handler: Any) -> Any:
        """The coroutine function the C core calls for ``handler``."""
        kind = _kind(handler)
        behavior = getattr(handler, kind)
        if behavior is None:
            raise TypeError(f"{handler!r} has request_streaming="
                            f"{handler.request_streaming} and response_streaming="
                            f"{handler.response_streaming} but no {kind} behavior")
        return driver_for(kind, behavior, self._thread_pool)

    def _registrations(self) -> Iterable[Tuple[str, Tuple[Any, ...]]]:
        """(path, register_method arguments) of the methods the C core
        learns ahead of time.

        Without interceptors: every known method with its handler. With
        interceptors the final handler (and its serializers) is only known
        once they ran, so unary-unary methods are registered raw (bytes in,
        bytes out) with ``_intercepted_unary`` as behavior, and streaming
        methods are left to the generic path (``_intercept``), which runs
        the chain and then the handler with its own serializers.
        """
        for path, handler in self._registered.items():
            if not self._interceptors:
                yield path, (self._behavior(handler), handler.request_deserializer,
                             handler.response_serializer, handler.request_streaming,
                             handler.response_streaming)
            elif not handler.request_streaming and not handler.response_streaming:
                yield path, (self._intercepted_unary, None, None, False, False)

    async def _intercepted_unary(self, payload: bytes, context: ServicerContext) -> Any:
        """The behavior of a registered unary-unary method when there are
        interceptors: run them, then the final handler, deserializing the
        request and serializing the response with that handler's functions
        (errors end the RPC with INTERNAL, as on the C path)."""
        handler = await self._chain(
            HandlerCallDetails(context._method, context.invocation_metadata()))
        if handler is None:
            context._finish(StatusCode.UNIMPLEMENTED.value[0], "Method not found!")
            return None
        if handler.request_streaming or handler.response_streaming:
            raise TypeError(f"an interceptor returned a {_kind(handler)} handler for the "
                            f"unary_unary method {context._method}; asyncgrpc needs a "
                            "handler of the method's own kind")
        deserializer = handler.request_deserializer
        request = payload
        if deserializer is not None:
            try:
                request = deserializer(payload)
            except Exception as exc:
                self._report("deserialize", context, exc)
                context._finish(StatusCode.INTERNAL.value[0], "Exception deserializing request!")
                return None
        response = await self._behavior(handler)(request, context)
        serializer = handler.response_serializer
        if serializer is None or context._code or context._status_sent:
            return response     # the core sends it as is, or drops it
        try:
            return serializer(response)
        except Exception as exc:
            self._report("serialize", context, exc)
            context._finish(StatusCode.INTERNAL.value[0], "Failed to serialize response!")
            return None

    def _find_handler(self, method: str, call: ServicerContext) -> Optional[Any]:
        handler = self._explicit.get(method)
        if handler is not None:
            return handler
        if not self._generic_handlers:
            return None
        return self._query_generic(HandlerCallDetails(method, call.invocation_metadata()))

    def _query_generic(self, details: HandlerCallDetails) -> Optional[Any]:
        """The first handler a generic handler returns for ``details``."""
        for generic in self._generic_handlers:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def _find_for_interceptors(self, details: HandlerCallDetails) -> Optional[Any]:
        """The continuation of the last interceptor: registered methods
        first, then the generic handlers in order."""
        handler = self._explicit.get(details.method)
        if handler is not None:
            return handler
        return self._query_generic(details)

    async def _intercept(self, call: ServicerContext) -> None:
        """Run the interceptor chain for ``call``, then its final handler
        (through the C core's generic path, with that handler's
        serializers)."""
        try:
            start = contextvars.copy_context()
            details = HandlerCallDetails(call._method, call.invocation_metadata())
            handler = await self._chain(details)
            if call.done():
                return
            if handler is None:
                call._finish(StatusCode.UNIMPLEMENTED.value[0], "Method not found!")
                return
            behavior = self._behavior(handler)
            if not handler.request_streaming:
                # The core starts the handler's task only once the request
                # has arrived, outside this task: if the interceptors set
                # context variables, run the handler in their context, as
                # grpc.aio does (it runs both in one task).
                now = contextvars.copy_context()
                if now != start:
                    behavior = _in_context(behavior, now)
        except asyncio.CancelledError:
            if not call.done():
                call._finish(StatusCode.CANCELLED.value[0], "Cancelled")
            raise
        except Exception as exc:
            # As grpc.aio: an interceptor's exception is reported like a
            # handler's.
            asked = self._report("handler", call, exc)
            call._finish(asked or StatusCode.UNKNOWN.value[0],
                         f"Unexpected {type(exc)!r}: {exc}")
            return
        call._run(behavior, handler.request_deserializer, handler.response_serializer,
                  handler.request_streaming, handler.response_streaming)

    def _dispatch_generic(self, call: ServicerContext) -> None:
        method = call._method
        if self._interceptors:
            task = self._loop.create_task(self._intercept(call), name=method)
            # The chain is cancelled with the RPC, as its handler would be
            # (the callback is task.cancel(msg=call): no closure per call).
            call.add_done_callback(task.cancel)
            return
        try:
            handler = self._find_handler(method, call)
        except Exception as exc:
            _LOGGER.exception("generic handler failed for %s", method)
            call._finish(StatusCode.UNKNOWN.value[0], f"Unexpected {type(exc)!r}: {exc}")
            return
        if handler is None:
            call._finish(StatusCode.UNIMPLEMENTED.value[0], "Method not found!")
            return
        call._run(self._behavior(handler), handler.request_deserializer,
                  handler.response_serializer, handler.request_streaming,
                  handler.response_streaming)

    def _report(self, kind: str, call: ServicerContext,
                exc: Optional[BaseException]) -> Optional[int]:
        """Log an error of ``call``; for a handler's exception, return the
        status code to send if it is not UNKNOWN."""
        method = call._method
        if kind == "handler" and isinstance(exc, executor.WorkerCrashedError):
            _LOGGER.error("the worker process running %s died: %s", method, exc)
            return StatusCode.INTERNAL.value[0]
        if kind == "handler":
            _LOGGER.error("Unexpected %s raised by servicer method %s",
                          type(exc).__name__, method, exc_info=exc)
        elif kind in ("deserialize", "read"):
            _LOGGER.error("Exception deserializing request for %s", method, exc_info=exc)
        elif kind in ("serialize", "write"):
            _LOGGER.error("Exception serializing response for %s", method, exc_info=exc)
        else:
            _LOGGER.error("%s error in %s", kind, method, exc_info=exc)
        return None


def _eager_task_factory(loop: asyncio.AbstractEventLoop) -> Optional[Any]:
    """On Python 3.12+, the factory of the handlers' tasks: a task starts
    eagerly (its first step runs at once), so a handler that finishes
    without suspending costs no scheduled step and no done callback, and
    ``asyncio.current_task()`` inside it is still its task. None (the
    loop's create_task) on 3.11, or if the loop has a task factory of its
    own, which is then respected."""
    if sys.version_info < (3, 12) or loop.get_task_factory() is not None:
        return None
    return functools.partial(asyncio.Task, loop=loop, eager_start=True)


def _in_context(behavior: Any, context: contextvars.Context) -> Any:
    """``behavior`` run in a task of its own in ``context``."""
    async def run(request: Any, servicer_context: ServicerContext) -> Any:
        return await asyncio.get_running_loop().create_task(
            behavior(request, servicer_context), context=context)
    return run


def server(
    migration_thread_pool: Optional[concurrent.futures.Executor] = None,
    handlers: Optional[Sequence[Any]] = None,
    interceptors: Optional[Sequence[Any]] = None,
    options: Optional[ChannelOptions] = None,
    maximum_concurrent_rpcs: Optional[int] = None,
    compression: Optional[Any] = None,
    *,
    process_workers: Optional[int] = None,
    thread_workers: Optional[int] = None,
    blocked_loop_threshold: Optional[float] = 0.1,
    health: bool = False,
    reflection: bool = False,
) -> Server:
    """Create a server; the drop-in replacement of ``grpc.aio.server()``.

    Args:
        migration_thread_pool: executor for handlers that are plain functions
            (the loop's default executor if None).
        handlers: generic RPC handlers to add now.
        interceptors: server interceptors (``asyncgrpc.ServerInterceptor`` or
            ``grpc.aio.ServerInterceptor`` objects), given control in this
            order before each RPC's handler, as with grpc.aio. If a library
            has wrapped ``grpc.aio.server`` to add interceptors (OpenTelemetry's
            ``GrpcAioInstrumentorServer().instrument()``), they are added here
            too, the way that wrapper adds them.
        options: channel arguments, ``(key, int | str)`` pairs, passed to the
            gRPC core (e.g. ``("grpc.max_receive_message_length", 1 << 20)``).
        maximum_concurrent_rpcs: RPCs beyond this many in flight get
            RESOURCE_EXHAUSTED.
        compression: default compression of responses
            (``asyncgrpc.Compression`` or ``grpc.Compression``).
        process_workers: size of the server's process pool, used by
            ``asyncgrpc.run_in_process`` and ``@asyncgrpc.cpu_bound``
            (default ``os.cpu_count()``; workers start on first use).
        thread_workers: size of the server's thread pool, used by
            ``asyncgrpc.run_in_thread`` (default ``min(32, cpus + 4)``).
        blocked_loop_threshold: seconds the event loop may go without
            turning before a warning names the running handler; None or 0
            turns the watchdog off.
        health: serve ``grpc.health.v1.Health`` (see
            :func:`asyncgrpc.enable_health`; call it to get the servicer).
        reflection: serve gRPC server reflection for the registered services
            (see :func:`asyncgrpc.enable_reflection`).
    """
    wrapped = _compat.interceptors_from_grpc_aio_wrappers(interceptors)
    if wrapped is not None:
        interceptors = wrapped
    return Server(migration_thread_pool, handlers, interceptors, options,
                  maximum_concurrent_rpcs, compression,
                  process_workers=process_workers, thread_workers=thread_workers,
                  blocked_loop_threshold=blocked_loop_threshold,
                  health=health, reflection=reflection)
