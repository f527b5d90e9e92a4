"""Type stubs of the C extension asyncgrpc._core (src/*.c)."""
from typing import Any, Awaitable, Callable, Dict, Iterable, Optional, Sequence, Tuple

REQUESTS_PER_METHOD: int
BUNDLED_CORE: Optional[str]
"""The grpcio release whose C core is linked in statically
(ASYNCGRPC_BUNDLED_CORE=1 builds), or None when a system libgrpc is."""
CORE_PATCHES: Tuple[str, ...]
"""The names of asyncgrpc's patches in a bundled core
(scripts/core_patches.py), or () for a system libgrpc."""

def stats() -> dict[str, int]:
    """Process-wide counters: events, events_inline, events_via_ring,
    eventfd_writes, wakeups, drains, baton_to_poller, rpcs_started,
    rpcs_finished, rpcs_rejected, live_servers."""

def grpc_version() -> str: ...

def core_version() -> str:
    """grpc_version_string() of the linked gRPC C core (the core's own
    version: '29.0.0' is gRPC 1.51, '58.0.0' is gRPC 1.85)."""

def configure(usage_error: type, eof: object) -> None:
    """Hand the C fast paths of Call.read()/write() their exception and EOF."""

def _inject_post_failures(n: int) -> None:
    """Test hook: the next n re-posts of a request slot fail as if the core
    refused them (they are reported and retried on the next drain)."""

class Ready:
    """An awaitable that is already done: ``await`` gives its value without
    suspending. read() and write() return one when nothing needs to wait
    (a message that has arrived; a write queue below its high-water mark)."""

    def __await__(self) -> Any: ...
    def __iter__(self) -> "Ready": ...
    def __next__(self) -> Any: ...

class Call:
    """One RPC on the server; base class of asyncgrpc.ServicerContext.
    Created only by the server."""

    def invocation_metadata(self) -> Tuple[Tuple[str, Any], ...]: ...
    def peer(self) -> str: ...
    def time_remaining(self) -> Optional[float]: ...
    def cancelled(self) -> bool: ...
    def done(self) -> bool: ...
    def read(self) -> Awaitable[Any]:
        """The next request message (a Ready if it has already arrived, else
        a future), or asyncgrpc.EOF after the client half-closed."""
    def write(self, message: Any) -> Awaitable[None]:
        """Queue a response message: a Ready while the call's write queue is
        at most 64 KiB, else a future done once it is down to 32 KiB;
        CancelledError if the RPC is gone."""
    def _anext(self) -> Awaitable[Any]:
        """read() for a request iterator: StopAsyncIteration at the end."""
    # used by the Python layer
    _code: int
    _code_obj: Any
    _details: Optional[str]
    _trailing_metadata: Optional[Tuple[Tuple[str, Any], ...]]
    _method: str
    _done_callbacks: Optional[list]
    _aborted: bool
    _initial_metadata_sent: bool
    _status_sent: bool
    def _auth(self) -> Tuple[dict[str, list[bytes]], Optional[str], Optional[list[bytes]]]: ...
    def _on_task_done(self, task: Any) -> None: ...
    def _run(self, behavior: Callable[..., Any],
             deserializer: Optional[Callable[[bytes], Any]],
             serializer: Optional[Callable[[Any], bytes]],
             request_streaming: bool, response_streaming: bool) -> bool: ...
    def _set_compression(self, name: Optional[str]) -> None: ...
    def _disable_next_compression(self) -> None: ...
    _request_streaming: bool
    _response_streaming: bool
    _deserializer: Optional[Callable[[bytes], Any]]
    _serializer: Optional[Callable[[Any], bytes]]
    def _send_initial_metadata(self, metadata: Sequence[Tuple[str, Any]]) -> Any: ...
    def _set_code(self, code: int, code_object: Any) -> None: ...
    def _set_trailing_metadata(self, metadata: Sequence[Tuple[str, Any]]) -> None: ...
    def _abort(self, code: int, code_object: Any, details: str,
               trailing_metadata: Optional[Sequence[Tuple[str, Any]]]) -> None: ...
    def _finish(self, code: int, details: str) -> bool: ...

class Server:
    """A gRPC core server whose completion queue is driven by an asyncio loop."""

    active_calls: int
    phase: str
    def __init__(self, options: Sequence[Tuple[str, Any]] = ...,
                 maximum_concurrent_rpcs: int = ...) -> None: ...
    def add_http2_port(self, address: str,
                       credentials: Optional[Tuple[Optional[bytes], Tuple[Tuple[bytes, bytes], ...], bool]] = ...) -> int: ...
    def register_method(self, path: str, behavior: Callable[..., Any],
                        deserializer: Optional[Callable[[bytes], Any]],
                        serializer: Optional[Callable[[Any], bytes]],
                        request_streaming: bool, response_streaming: bool) -> None: ...
    def start(self, loop: Any, context_class: type, hooks: Any,
              task_factory: Optional[Callable[..., Any]] = None) -> None:
        """Serve on ``loop``. Each handler runs in ``task_factory(coro,
        name=path)`` (default ``loop.create_task``); with a factory given, a
        task that is done when made is finished at once."""
    def shutdown(self) -> Any: ...
    def cancel_all_calls(self) -> None: ...
    def close(self) -> None: ...
    def _on_wakeup(self) -> None: ...
    def _drain(self) -> None: ...
    # metrics (src/metrics.c)
    def enable_metrics(self, known_paths: Iterable[str] = ...) -> None:
        """Count RPCs by method and status from now on (after every
        register_method(), before start()); the paths in known_paths get a
        row of their own when served through the generic path."""
    def metrics_snapshot(self) -> Optional[MetricsSnapshot]:
        """None while metrics are off, else {"started": int, "in_flight": int,
        "bounds": upper bounds in seconds, "rows": ((path or None for other,
        started, {status code: (bucket counts incl. +Inf, sum of seconds)}),
        ...)}."""

MetricsRow = Tuple[Optional[str], int, Dict[int, Tuple[Tuple[int, ...], float]]]
MetricsSnapshot = Dict[str, Any]
