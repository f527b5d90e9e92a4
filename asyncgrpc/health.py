"""gRPC health checking (``grpc.health.v1.Health``) served by asyncgrpc itself.

    servicer = asyncgrpc.enable_health(server)      # or asyncgrpc.server(health=True)
    servicer.set("my.pkg.MyService", "SERVING")

The protocol is the standard one (grpc/health/v1/health.proto), so grpcio's
``grpc_health.v1.health_pb2_grpc.HealthStub``, ``grpc_health_probe``, Envoy,
and Kubernetes' built-in gRPC liveness/readiness probes (which call
``Check``) all work. Neither grpcio nor grpcio-health-checking nor protobuf is
needed at run time: the two small messages are encoded by hand
(:mod:`asyncgrpc._pbwire`).

Behaviour follows grpcio-health-checking's ``HealthServicer``:

* the overall status (service ``""``) is SERVING from the start; other
  services have only the status you ``set()`` (registered services are not
  made SERVING automatically);
* ``Check`` of a service with no status ends with ``NOT_FOUND``;
* ``Watch`` sends the current status (``SERVICE_UNKNOWN`` for a service with
  none) and then each change (a status set again unchanged is not re-sent);
* when ``server.stop()`` begins, before the drain, every status becomes
  NOT_SERVING and later ``set()`` calls are ignored (grpcio's
  ``enter_graceful_shutdown``). Open ``Watch`` streams then get NOT_SERVING
  and end with ``UNAVAILABLE``, so they do not hold the drain for the grace
  period.

``List`` (newer health.proto: every service and its status) is answered too.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import threading
from typing import Any, AsyncIterator, Dict, Optional, Set, Tuple, Union

from . import _pbwire
from ._handlers import (
    RpcMethodHandler,
    unary_stream_rpc_method_handler,
    unary_unary_rpc_method_handler,
)
from ._status import StatusCode

__all__ = ["HealthServicer", "ServingStatus", "SERVICE_NAME", "OVERALL_HEALTH",
           "enable_health"]

_LOGGER = logging.getLogger("asyncgrpc")

SERVICE_NAME = "grpc.health.v1.Health"
"""The fully qualified name of the health checking service."""

OVERALL_HEALTH = ""
"""The service name that stands for the whole server."""


class ServingStatus(enum.IntEnum):
    """``grpc.health.v1.HealthCheckResponse.ServingStatus``; the numbers are
    those of grpcio's ``health_pb2.HealthCheckResponse.SERVING`` etc., so
    those values are accepted wherever a ServingStatus is."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3


StatusLike = Union[ServingStatus, int, str]


def _as_status(status: StatusLike) -> ServingStatus:
    """A ServingStatus from a member, its number or its name."""
    if isinstance(status, str):
        try:
            return ServingStatus[status.upper()]
        except KeyError:
            raise ValueError(f"unknown serving status {status!r}; one of "
                             f"{', '.join(s.name for s in ServingStatus)}") from None
    return ServingStatus(int(status))


# -- the messages -------------------------------------------------------

def decode_request(data: bytes) -> str:
    """``HealthCheckRequest{string service = 1}`` -> the service name."""
    service = ""
    for number, wire_type, value in _pbwire.iter_fields(data):
        if number == 1 and wire_type == _pbwire.LEN:
            assert isinstance(value, bytes)
            service = value.decode("utf-8")
    return service


def encode_request(service: str) -> bytes:
    """The ``HealthCheckRequest`` for ``service`` (for clients and tests)."""
    return _pbwire.string_field(1, service)


def encode_response(status: int) -> bytes:
    """``HealthCheckResponse{ServingStatus status = 1}``."""
    return _pbwire.varint_field(1, int(status))


def decode_response(data: bytes) -> ServingStatus:
    """The status of a ``HealthCheckResponse``."""
    status = 0
    for number, wire_type, value in _pbwire.iter_fields(data):
        if number == 1 and wire_type == _pbwire.VARINT:
            assert isinstance(value, int)
            status = value
    return ServingStatus(status) if status in ServingStatus._value2member_map_ \
        else ServingStatus.UNKNOWN


def _decode_list_request(data: bytes) -> None:
    """``HealthListRequest{}``: nothing to read, but it must be well formed."""
    for _ in _pbwire.iter_fields(data):
        pass


def _encode_list_response(statuses: Dict[str, ServingStatus]) -> bytes:
    """``HealthListResponse{map<string, HealthCheckResponse> statuses = 1}``."""
    out = []
    for service, status in sorted(statuses.items()):
        entry = (_pbwire.string_field(1, service)
                 + _pbwire.bytes_field(2, encode_response(status)))
        out.append(_pbwire.bytes_field(1, entry))
    return b"".join(out)


# -- the servicer -------------------------------------------------------

class _Watcher:
    """One open Watch stream: the loop it runs on and the event that wakes
    it when its service's status may have changed."""

    __slots__ = ("loop", "event")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()

    def wake(self) -> None:
        """Wake the stream; callable from any thread."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.event.set()
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.event.set)


class HealthServicer:
    """The statuses served by ``grpc.health.v1.Health`` on one server.

    Made by :func:`enable_health`. ``set()``, ``get()`` and
    ``enter_graceful_shutdown()`` may be called from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: Dict[str, ServingStatus] = {OVERALL_HEALTH: ServingStatus.SERVING}
        self._watchers: Dict[str, Set[_Watcher]] = {}
        self._shutting_down = False

    # -- the status API --------------------------------------------------
    def set(self, service: str, status: StatusLike) -> None:
        """Set the status of ``service`` (``""`` is the whole server).

        ``status`` is a :class:`ServingStatus`, its number (grpcio's
        ``health_pb2.HealthCheckResponse.SERVING`` works) or its name
        (``"SERVING"``). Ignored once the server is stopping."""
        if not isinstance(service, str):
            raise TypeError(f"service must be str, not {type(service).__name__}")
        value = _as_status(status)
        with self._lock:
            if self._shutting_down:
                return
            self._statuses[service] = value
            watchers = tuple(self._watchers.get(service, ()))
        for watcher in watchers:
            watcher.wake()

    def get(self, service: str = OVERALL_HEALTH) -> Optional[ServingStatus]:
        """The status of ``service``, or None if it has none."""
        with self._lock:
            return self._statuses.get(service)

    def clear(self, service: str) -> None:
        """Forget ``service``: Check answers NOT_FOUND again and watchers
        get SERVICE_UNKNOWN."""
        with self._lock:
            if self._shutting_down:
                return
            self._statuses.pop(service, None)
            watchers = tuple(self._watchers.get(service, ()))
        for watcher in watchers:
            watcher.wake()

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`enter_graceful_shutdown` ran (the server stops)."""
        return self._shutting_down

    def enter_graceful_shutdown(self) -> None:
        """Set every status to NOT_SERVING for good (later ``set()`` calls
        are ignored) and end the open Watch streams once they have sent it.
        The server calls this at the very start of ``stop()``."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            for service in self._statuses:
                self._statuses[service] = ServingStatus.NOT_SERVING
            watchers = [w for group in self._watchers.values() for w in group]
        for watcher in watchers:
            watcher.wake()

    def _snapshot(self, service: str) -> Tuple[ServingStatus, bool]:
        with self._lock:
            return (self._statuses.get(service, ServingStatus.SERVICE_UNKNOWN),
                    self._shutting_down)

    # -- the RPCs ------------------------------------------------------------
    async def Check(self, service: str, context: Any) -> ServingStatus:
        """The status of ``service``; NOT_FOUND if it has none."""
        status = self.get(service)
        if status is None:
            await context.abort(StatusCode.NOT_FOUND, "unknown service")
        return status

    async def Watch(self, service: str, context: Any) -> AsyncIterator[ServingStatus]:
        """The status of ``service`` now, then each change, until the client
        goes away or the server stops (then the stream ends with
        UNAVAILABLE after NOT_SERVING was sent)."""
        watcher = _Watcher(asyncio.get_running_loop())
        with self._lock:
            self._watchers.setdefault(service, set()).add(watcher)
        last: Optional[ServingStatus] = None
        try:
            while True:
                watcher.event.clear()
                status, ending = self._snapshot(service)
                if status != last:
                    yield status
                    last = status
                if ending:
                    break
                await watcher.event.wait()
        finally:
            with self._lock:
                group = self._watchers.get(service)
                if group is not None:
                    group.discard(watcher)
                    if not group:
                        del self._watchers[service]
        context.set_code(StatusCode.UNAVAILABLE)
        context.set_details("the server is shutting down")

    async def List(self, request: None, context: Any) -> Dict[str, ServingStatus]:
        """Every service with a status, and its status."""
        with self._lock:
            return dict(self._statuses)

    def method_handlers(self) -> Dict[str, RpcMethodHandler]:
        """The handlers of ``grpc.health.v1.Health`` (method name -> handler)."""
        return {
            "Check": unary_unary_rpc_method_handler(
                self.Check, request_deserializer=decode_request,
                response_serializer=encode_response),
            "Watch": unary_stream_rpc_method_handler(
                self.Watch, request_deserializer=decode_request,
                response_serializer=encode_response),
            "List": unary_unary_rpc_method_handler(
                self.List, request_deserializer=_decode_list_request,
                response_serializer=_encode_list_response),
        }


def enable_health(server: Any) -> HealthServicer:
    """Serve ``grpc.health.v1.Health`` on ``server`` (before ``start()``)
    and return its :class:`HealthServicer`.

    The overall status ``""`` is SERVING while the server runs and becomes
    NOT_SERVING the moment ``stop()`` begins. Calling this again (or after
    ``asyncgrpc.server(health=True)``) returns the same servicer.
    """
    existing = getattr(server, "_health_servicer", None)
    if existing is not None:
        return existing
    add_stop_callback = getattr(server, "add_stop_callback", None)
    if add_stop_callback is None:
        raise TypeError(f"enable_health() needs an asyncgrpc server, not {server!r}")
    servicer = HealthServicer()
    server.add_registered_method_handlers(SERVICE_NAME, servicer.method_handlers())
    add_stop_callback(servicer.enter_graceful_shutdown)
    server._health_servicer = servicer
    return servicer
