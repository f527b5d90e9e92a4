"""Chaos: clients that go away at random points, clients killed with SIGKILL,
handlers that fail at every point of every stream kind, and stop(grace)
under load. After each storm the server must still serve, count no active
call, and every handler it entered must have exited. Two more tests pin
defects found this way (fixed since): a server stream that wrote without
pausing starved the server's sockets, and calls beyond the requests posted
for a method got each other's metadata.

Sizes scale down under AddressSanitizer (detected from LD_PRELOAD);
ASYNCGRPC_CHAOS_CANCELS and ASYNCGRPC_CHAOS_STOP_ROUNDS override them.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import grpc
import grpc.aio
import pytest

import asyncgrpc

from conftest import Recorder, ServerThread

SERVICE = "test.Chaos"
ASAN = "asan" in os.environ.get("LD_PRELOAD", "")


def _scaled(name: str, normal: int, sanitized: int) -> int:
    """An environment override, else ``normal`` (``sanitized`` under ASan)."""
    return int(os.environ.get(name, sanitized if ASAN else normal))


# Mid-stream cancels over the whole file (split between the two loops).
CANCELS = _scaled("ASYNCGRPC_CHAOS_CANCELS", 10_000, 1_000)
STOP_ROUNDS = _scaled("ASYNCGRPC_CHAOS_STOP_ROUNDS", 20, 6)


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` (state of another thread) until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Tally:
    """Thread-safe counts of handler entries and exits, by handler name.

    ``with tally.track(name):`` wraps a handler's body (a try/finally): an
    exit is counted however the body ends; CancelledError and GeneratorExit
    (an async generator closed after its driver was cancelled) count as
    cancellations, any other exception is kept in ``errors``.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entered: collections.Counter = collections.Counter()
        self.exited: collections.Counter = collections.Counter()
        self.cancelled: collections.Counter = collections.Counter()
        self.errors: List[Tuple[str, str]] = []

    def track(self, name: str) -> "_Tracked":
        return _Tracked(self, name)

    def balanced(self) -> bool:
        with self.lock:
            return self.entered == self.exited

    def snapshot(self) -> Dict[str, Any]:
        with self.lock:
            return {"entered": dict(self.entered), "exited": dict(self.exited),
                    "cancelled": dict(self.cancelled), "errors": list(self.errors[:5])}


class _Tracked:
    """The context manager of :meth:`Tally.track`."""

    def __init__(self, tally: Tally, name: str) -> None:
        self.tally, self.name = tally, name

    def __enter__(self) -> None:
        with self.tally.lock:
            self.tally.entered[self.name] += 1

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        with self.tally.lock:
            self.tally.exited[self.name] += 1
            if typ is not None:
                if issubclass(typ, (asyncio.CancelledError, GeneratorExit)):
                    self.tally.cancelled[self.name] += 1
                else:
                    self.tally.errors.append((self.name, repr(exc)))
        return False


def run_client(coro: Any) -> Any:
    """Run the grpcio client side. Its loop runs without asyncio debug mode
    (which ``-X dev`` turns on) to make the load; the server loop keeps it."""
    return asyncio.run(coro, debug=False)


def active_calls(st: ServerThread) -> int:
    """The server's count of calls in flight, read on its loop."""
    return st.call(lambda: st.server._core.active_calls)


async def value_handler(request: bytes, context: Any) -> bytes:
    return b"value:" + request


def assert_serves(st: ServerThread) -> None:
    """A fresh client gets a unary reply carrying its own value."""
    own = f"probe-{random.random()}".encode()
    with grpc.insecure_channel(st.target) as channel:
        assert channel.unary_unary(path("Value"))(own, timeout=10) == b"value:" + own


# ====================================================================== 1
# Mid-stream cancels from aio clients, in batches with bounded concurrency.

TICK_LIMIT = 100_000       # a server stream only ends by the client's cancel


def _cancel_handlers(tally: Tally) -> Dict[str, Any]:
    async def echo_iter(request_iterator: Any, context: Any) -> Any:
        with tally.track("EchoIter"):
            async for message in request_iterator:
                yield message

    async def echo_rw(request_iterator: Any, context: Any) -> None:
        with tally.track("EchoRW"):
            while True:
                message = await context.read()
                if message is asyncgrpc.EOF:
                    return
                await context.write(message)

    # The server streams pause 1 ms between messages: a writer that never
    # waits starves the server (see test_fast_writer_does_not_starve_the_server).
    async def tick_iter(request: bytes, context: Any) -> Any:
        with tally.track("TickIter"):
            for i in range(TICK_LIMIT):
                yield request + b":%d" % i
                await asyncio.sleep(0.001)

    async def tick_rw(request: bytes, context: Any) -> None:
        with tally.track("TickRW"):
            for i in range(TICK_LIMIT):
                await context.write(request + b":%d" % i)
                await asyncio.sleep(0.001)

    return {
        "EchoIter": asyncgrpc.stream_stream_rpc_method_handler(echo_iter),
        "EchoRW": asyncgrpc.stream_stream_rpc_method_handler(echo_rw),
        "TickIter": asyncgrpc.unary_stream_rpc_method_handler(tick_iter),
        "TickRW": asyncgrpc.unary_stream_rpc_method_handler(tick_rw),
        "Value": asyncgrpc.unary_unary_rpc_method_handler(value_handler),
    }


async def _one_cancelled_stream(channel: grpc.aio.Channel, cid: str,
                                rng: random.Random) -> Optional[str]:
    """One streaming call cancelled at a random point; returns a problem
    description, or None if every message was our own and the call ended
    CANCELLED."""
    method = rng.choice(["EchoIter", "EchoRW", "TickIter", "TickRW"])
    exchanges = rng.randint(0, 8)
    how = rng.choice(["idle", "write_pending", "read_pending"])
    bidi = method.startswith("Echo")
    if bidi:
        call = channel.stream_stream(path(method))(timeout=30)
    else:
        call = channel.unary_stream(path(method))(cid.encode(), timeout=30)
    pending: List[asyncio.Future] = []
    try:
        for j in range(exchanges):
            want = f"{cid}:{j}".encode()
            if bidi:
                await call.write(want)
            got = await call.read()
            if got != want:
                return f"{cid} {method}: message {j} is {got!r}, want {want!r}"
        if how == "write_pending" and bidi:
            pending.append(asyncio.ensure_future(call.write(f"{cid}:{exchanges}".encode())))
        elif how == "read_pending":
            if bidi:
                await call.write(f"{cid}:{exchanges}".encode())
            pending.append(asyncio.ensure_future(call.read()))
            await asyncio.sleep(0)
    except grpc.aio.AioRpcError as exc:
        return f"{cid} {method}: failed before the cancel with {exc.code()}"
    call.cancel()
    for outcome in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(outcome, bytes) and outcome != f"{cid}:{exchanges}".encode():
            return f"{cid} {method}: pending read got {outcome!r}"
        if isinstance(outcome, BaseException) and not isinstance(
                outcome, (asyncio.CancelledError, asyncio.InvalidStateError,
                          grpc.aio.AioRpcError)):
            return f"{cid} {method}: pending op raised {outcome!r}"
    code = await call.code()
    if code != grpc.StatusCode.CANCELLED:
        return f"{cid} {method}: ended {code} after cancel()"
    return None


def test_mid_stream_cancels(server_thread: ServerThread) -> None:
    """CANCELS/2 streaming calls per loop, each cancelled by the client at a
    random point while messages flow (64 at a time). Then the server still
    serves, counts no active call, every handler it entered has exited, and
    no handler saw an exception other than cancellation."""
    tally = Tally()
    server_thread.start(lambda s: s.add_registered_method_handlers(
        SERVICE, _cancel_handlers(tally)))
    total = max(1, CANCELS // 2)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)

    async def main() -> List[str]:
        problems: List[str] = []
        counter = iter(range(total))
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            async def worker() -> None:
                for i in counter:
                    problem = await asyncio.wait_for(
                        _one_cancelled_stream(channel, f"c{i}", rng), 30)
                    if problem:
                        problems.append(problem)
            await asyncio.gather(*[worker() for _ in range(64)])
        return problems

    problems = run_client(main())
    assert problems == [], f"seed={seed}: {problems[:10]}"
    assert_serves(server_thread)
    assert wait_until(lambda: active_calls(server_thread) == 0), active_calls(server_thread)
    assert wait_until(tally.balanced), tally.snapshot()
    snap = tally.snapshot()
    assert snap["errors"] == [], snap
    # The server streams never end by themselves: each one was cancelled.
    for name in ("TickIter", "TickRW"):
        assert snap["cancelled"].get(name, 0) == snap["entered"].get(name, 0), snap
    assert sum(snap["entered"].values()) > total // 4, snap   # the storm reached handlers


def test_fast_writer_does_not_starve_the_server(server_thread: ServerThread) -> None:
    """A server stream writing small messages as fast as the transport takes
    them must not stop the server from reading its sockets: the client's
    cancel reaches the handler, and a client on another connection is
    served, within 0.5 s. Up to 10 rounds (a round passes when the writer
    happens to be stopped by the transport early)."""
    tally = Tally()
    written = [0]

    async def flood(request: bytes, context: Any) -> Any:
        with tally.track("Flood"):
            while True:
                yield b"%d" % written[0]
                written[0] += 1
    server_thread.start(lambda s: s.add_registered_method_handlers(SERVICE, {
        "Flood": asyncgrpc.unary_stream_rpc_method_handler(flood),
        "Value": asyncgrpc.unary_unary_rpc_method_handler(value_handler)}))

    async def one_round(n: int) -> Any:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            # The connection's settings (the client's 4 MiB stream window)
            # reach the server before the flood starts.
            assert await channel.unary_unary(path("Value"))(b"warm", timeout=10) == b"value:warm"
            call = channel.unary_stream(path("Flood"))(b"", timeout=30)
            for _ in range(5000):        # past the connection's start-up
                await call.read()
            call.cancel()
            async with grpc.aio.insecure_channel(server_thread.target) as other:
                own = b"other%d" % n
                try:
                    return await other.unary_unary(path("Value"))(own, timeout=0.5) == b"value:" + own
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

    for n in range(10):
        served = run_client(one_round(n))
        cancelled = wait_until(lambda: tally.cancelled["Flood"] == n + 1, timeout=0.5)
        assert served is True, (n, served, written[0])
        assert cancelled, (n, tally.snapshot(), written[0])


# More calls in flight than requests posted for the method.

def test_calls_beyond_the_posted_requests_see_their_own_metadata(
        server_thread: ServerThread) -> None:
    """More concurrent calls of one method than requests posted for it
    (asyncgrpc._core.REQUESTS_PER_METHOD): each handler sees its own call's
    metadata and request."""
    async def who(request: bytes, context: Any) -> bytes:
        seen = dict(context.invocation_metadata()).get("x-id", "missing")
        await asyncio.sleep(0.02)
        return f"{request.decode()}={seen}".encode()
    server_thread.start(lambda s: s.add_registered_method_handlers(SERVICE, {
        "Who": asyncgrpc.unary_unary_rpc_method_handler(who)}))
    n = 4 * asyncgrpc._core.REQUESTS_PER_METHOD

    async def main() -> List[bytes]:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            method = channel.unary_unary(path("Who"))
            return await asyncio.gather(*[
                method(b"%d" % i, metadata=(("x-id", str(i)),), timeout=30)
                for i in range(n)])
    replies = run_client(main())
    wrong = [(i, r) for i, r in enumerate(replies) if r != f"{i}={i}".encode()]
    assert wrong == [], f"{len(wrong)} of {n} saw another call's metadata: {wrong[:5]}"


# ====================================================================== 2
# Clients killed with SIGKILL in the middle of their RPCs.

KILLED_CLIENT = r'''
import asyncio, sys
import grpc, grpc.aio

async def requests(tag):
    i = 0
    while True:
        yield b"%s:%d" % (tag, i)
        i += 1
        await asyncio.sleep(0.01)

async def main(target, copies):
    channel = grpc.aio.insecure_channel(target)
    calls = []
    for n in range(copies):
        md = lambda kind: (("x-id", "%s-%d" % (kind, n)),)
        calls.append(asyncio.ensure_future(channel.unary_unary("/test.Chaos/SlowUnary")(
            b"u", timeout=60, metadata=md("unary"))))
        stream = channel.unary_stream("/test.Chaos/Ticks")(b"s", timeout=60, metadata=md("server"))
        await stream.read()
        calls.append(asyncio.ensure_future(channel.stream_unary("/test.Chaos/Sink")(
            requests(b"c"), timeout=60, metadata=md("client"))))
        bidi = channel.stream_stream("/test.Chaos/Echo")(timeout=60, metadata=md("bidi"))
        await bidi.write(b"b")
        assert await bidi.read() == b"b"
        calls += [stream, bidi]
    print("ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
'''


def _killed_client_handlers(recorder: Recorder, tally: Tally) -> Dict[str, Any]:
    """Handlers that note ("entered", id), ("done", id, cancelled) from a done
    callback, and how they ended: ("cancelled", id) or ("eof", id, cancelled)."""

    def begin(context: Any) -> str:
        cid = dict(context.invocation_metadata())["x-id"]
        context.add_done_callback(lambda ctx: recorder.add(("done", cid, ctx.cancelled())))
        return cid

    async def slow_unary(request: bytes, context: Any) -> bytes:
        cid = begin(context)
        with tally.track("SlowUnary"):
            recorder.add(("entered", cid))
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                recorder.add(("cancelled", cid))
                raise
        return b"never"

    async def ticks(request: bytes, context: Any) -> Any:
        cid = begin(context)
        with tally.track("Ticks"):
            recorder.add(("entered", cid))
            try:
                while True:
                    yield b"tick"
                    await asyncio.sleep(0.01)
            except (asyncio.CancelledError, GeneratorExit):
                recorder.add(("cancelled", cid))
                raise

    async def sink(request_iterator: Any, context: Any) -> bytes:
        cid = begin(context)
        with tally.track("Sink"):
            n = 0
            try:
                async for _ in request_iterator:
                    n += 1
                    if n == 1:
                        recorder.add(("entered", cid))
            except asyncio.CancelledError:
                recorder.add(("cancelled", cid))
                raise
            recorder.add(("eof", cid, context.cancelled()))
            return b"%d" % n

    async def echo(request_iterator: Any, context: Any) -> Any:
        cid = begin(context)
        with tally.track("Echo"):
            recorder.add(("entered", cid))
            try:
                async for message in request_iterator:
                    yield message
            except (asyncio.CancelledError, GeneratorExit):
                recorder.add(("cancelled", cid))
                raise
            recorder.add(("eof", cid, context.cancelled()))

    return {
        "SlowUnary": asyncgrpc.unary_unary_rpc_method_handler(slow_unary),
        "Ticks": asyncgrpc.unary_stream_rpc_method_handler(ticks),
        "Sink": asyncgrpc.stream_unary_rpc_method_handler(sink),
        "Echo": asyncgrpc.stream_stream_rpc_method_handler(echo),
        "Value": asyncgrpc.unary_unary_rpc_method_handler(value_handler),
    }


def _client_env() -> Dict[str, str]:
    """The environment of a grpcio client subprocess (no sanitizer runtime:
    the client is not what is tested)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


def test_sigkilled_clients(server_thread: ServerThread, recorder: Recorder) -> None:
    """A client process with 2 calls of each kind in flight is SIGKILLed:
    every handler observes the cancellation, each done callback runs once
    with cancelled() true, no call stays active, and a new client is served."""
    tally = Tally()
    server_thread.start(lambda s: s.add_registered_method_handlers(
        SERVICE, _killed_client_handlers(recorder, tally)))
    copies = 2
    ids = {f"{kind}-{n}" for kind in ("unary", "server", "client", "bidi")
           for n in range(copies)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server_thread.target,
                             str(copies)], stdout=subprocess.PIPE, text=True,
                            env=_client_env())
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert recorder.wait_for(lambda items: {i[1] for i in items if i[0] == "entered"} == ids,
                                 timeout=10), recorder.items
        assert active_calls(server_thread) == len(ids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()

    def done_ids(items: List[Any]) -> List[str]:
        return [i[1] for i in items if i[0] == "done"]
    assert recorder.wait_for(lambda items: sorted(done_ids(items)) == sorted(ids), timeout=10), \
        recorder.items
    assert wait_until(tally.balanced), tally.snapshot()
    assert_serves(server_thread)
    time.sleep(0.1)                       # a second done callback would show now
    items = list(recorder.items)
    assert sorted(done_ids(items)) == sorted(ids)            # exactly once each
    assert all(i[2] is True for i in items if i[0] == "done"), items
    # Each handler saw the RPC go: CancelledError, or its read loop ended
    # with context.cancelled() true (never a clean end of stream).
    ended = {i[1]: i for i in items if i[0] in ("cancelled", "eof")}
    assert set(ended) == ids, items
    assert all(i[0] == "cancelled" or i[2] is True for i in ended.values()), items
    assert tally.snapshot()["errors"] == []
    assert wait_until(lambda: active_calls(server_thread) == 0)


# ====================================================================== 3
# A handler exception (or abort) at each point of each stream kind.

SENT = 5          # messages each request-streaming client sends
BEFORE = 3        # messages read and/or written before the failure


class Boom(Exception):
    """The failure the handlers raise on purpose."""


def _failing_handlers(tally: Tally) -> Dict[str, Tuple[Any, str, str, str]]:
    """Method name -> (handler, kind, point, mode) for every combination."""
    out: Dict[str, Tuple[Any, str, str, str]] = {}

    async def fail(context: Any, mode: str, name: str) -> None:
        if mode == "abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"abort {name}")
        raise Boom(name)

    def add(kind: str, style: str, point: str, mode: str) -> None:
        name = f"{kind}_{style}_{point}_{mode}"
        if kind == "unary_stream" and style == "agen":
            async def h(request: bytes, context: Any) -> Any:
                with tally.track(name):
                    if point == "after_writes":
                        for i in range(BEFORE):
                            yield request + b":%d" % i
                    await fail(context, mode, name)
                    yield b"never"
        elif kind == "unary_stream" and style == "write":
            async def h(request: bytes, context: Any) -> None:
                with tally.track(name):
                    if point == "after_writes":
                        for i in range(BEFORE):
                            await context.write(request + b":%d" % i)
                    await fail(context, mode, name)
        elif kind == "unary_stream" and style == "syncgen":
            def h(request: bytes, context: Any) -> Any:     # runs on a thread
                with tally.track(name):
                    if point == "after_writes":
                        for i in range(BEFORE):
                            yield request + b":%d" % i
                    raise Boom(name)
        elif kind == "stream_unary" and style == "iter":
            async def h(request_iterator: Any, context: Any) -> bytes:
                with tally.track(name):
                    if point == "after_reads":
                        n = 0
                        async for _ in request_iterator:
                            n += 1
                            if n == BEFORE:
                                break
                    await fail(context, mode, name)
                    return b"never"
        elif kind == "stream_unary" and style == "read":
            async def h(request_iterator: Any, context: Any) -> bytes:
                with tally.track(name):
                    if point == "after_reads":
                        for _ in range(BEFORE):
                            await context.read()
                    await fail(context, mode, name)
                    return b"never"
        elif kind == "stream_stream" and style == "agen":
            async def h(request_iterator: Any, context: Any) -> Any:
                with tally.track(name):
                    n = 0
                    if point != "start":
                        async for message in request_iterator:
                            if point == "after_writes":
                                yield message
                            n += 1
                            if n == BEFORE:
                                break
                    await fail(context, mode, name)
                    yield b"never"
        else:  # stream_stream, read/write style
            async def h(request_iterator: Any, context: Any) -> None:
                with tally.track(name):
                    if point != "start":
                        for _ in range(BEFORE):
                            message = await context.read()
                            if point == "after_writes":
                                await context.write(message)
                    await fail(context, mode, name)
        constructor = getattr(asyncgrpc, f"{kind}_rpc_method_handler")
        out[name] = (constructor(h), kind, point, mode)

    matrix = {
        ("unary_stream", ("agen", "write", "syncgen")): ("start", "after_writes"),
        ("stream_unary", ("iter", "read")): ("start", "after_reads"),
        ("stream_stream", ("agen", "rw")): ("start", "after_reads", "after_writes"),
    }
    for (kind, styles), points in matrix.items():
        for style in styles:
            for point in points:
                for mode in ("raise", "abort"):
                    if style == "syncgen" and mode == "abort":
                        continue          # abort() is a coroutine
                    add(kind, style, point, mode)
    return out


# grpcio's aio client reports INTERNAL "Internal error from Core" instead of
# the server's status when one of its writes fails because the server already
# ended the RPC (grpc/grpc#36066); the server sent the right status (the sync
# client run below checks it exactly).
GRPCIO_AIO_WRITE_RACE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def _check_failure(name: str, kind: str, point: str, mode: str, cid: str,
                   got: List[bytes], status: Optional[Tuple[Any, str]],
                   aio: bool) -> Optional[str]:
    """None if ``got`` holds exactly the messages written before the failure
    and ``status`` is the expected one; else a description of the problem."""
    if status is None:
        return f"{name} {cid}: ended OK with {got!r}"
    want_messages = ([f"{cid}:{j}".encode() for j in range(BEFORE)]
                     if point == "after_writes" else [])
    if got != want_messages:
        return f"{name} {cid}: messages {got!r}, want {want_messages!r}"
    if aio and kind != "unary_stream" and status == GRPCIO_AIO_WRITE_RACE:
        return None
    if mode == "abort":
        if status != (grpc.StatusCode.FAILED_PRECONDITION, f"abort {name}"):
            return f"{name} {cid}: {status}, want the abort's status"
    elif status[0] != grpc.StatusCode.UNKNOWN:
        return f"{name} {cid}: {status}, want UNKNOWN"
    return None


async def _call_failing(channel: grpc.aio.Channel, name: str, kind: str, point: str,
                        mode: str, cid: str) -> Optional[str]:
    """Call one failing method with the aio client and check what it saw."""
    async def requests() -> Any:
        for j in range(SENT):
            yield f"{cid}:{j}".encode()

    got: List[bytes] = []
    status = None
    try:
        if kind == "unary_stream":
            async for message in channel.unary_stream(path(name))(cid.encode(), timeout=10):
                got.append(message)
        elif kind == "stream_unary":
            got.append(await channel.stream_unary(path(name))(requests(), timeout=10))
        else:
            async for message in channel.stream_stream(path(name))(requests(), timeout=10):
                got.append(message)
    except grpc.aio.AioRpcError as exc:
        status = (exc.code(), exc.details())
    return _check_failure(name, kind, point, mode, cid, got, status, aio=True)


def _call_failing_sync(channel: grpc.Channel, name: str, kind: str, point: str,
                       mode: str, cid: str) -> Optional[str]:
    """Call one failing method with the sync client and check what it saw."""
    requests = [f"{cid}:{j}".encode() for j in range(SENT)]
    got: List[bytes] = []
    status = None
    try:
        if kind == "unary_stream":
            for message in channel.unary_stream(path(name))(cid.encode(), timeout=10):
                got.append(message)
        elif kind == "stream_unary":
            got.append(channel.stream_unary(path(name))(iter(requests), timeout=10))
        else:
            for message in channel.stream_stream(path(name))(iter(requests), timeout=10):
                got.append(message)
    except grpc.RpcError as exc:
        status = (exc.code(), exc.details())
    return _check_failure(name, kind, point, mode, cid, got, status, aio=False)


def test_handler_failure_at_every_point(server_thread: ServerThread,
                                        thread_pool: Any) -> None:
    """Every stream kind and handler style failing (exception or abort)
    before/after its first reads and writes. Each of 3 concurrent aio clients
    and 2 sync clients per method gets the messages written before the
    failure, in order, then UNKNOWN (or the aborted status); nothing hangs,
    every handler exits, none is cancelled."""
    tally = Tally()
    table = _failing_handlers(tally)
    server_thread.start(lambda s: s.add_registered_method_handlers(
        SERVICE, {name: entry[0] for name, entry in table.items()}),
        migration_thread_pool=thread_pool)
    copies, sync_copies = 3, 2

    async def main() -> List[Optional[str]]:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            return await asyncio.wait_for(asyncio.gather(*[
                _call_failing(channel, name, kind, point, mode, f"{name}#{n}")
                for name, (_, kind, point, mode) in table.items()
                for n in range(copies)]), 30)

    problems = [p for p in run_client(main()) if p]
    with grpc.insecure_channel(server_thread.target) as channel, \
            concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_call_failing_sync, channel, name, kind, point, mode,
                               f"{name}#sync{n}")
                   for name, (_, kind, point, mode) in table.items()
                   for n in range(sync_copies)]
        problems += [p for p in (f.result(timeout=30) for f in futures) if p]
    assert problems == [], problems
    assert wait_until(tally.balanced), tally.snapshot()
    snap = tally.snapshot()
    assert snap["entered"] == {name: copies + sync_copies for name in table}, snap
    with tally.lock:
        unexpected = [e for e in tally.errors
                      if not (e[1].startswith("Boom(") or e[1].startswith("AbortError("))]
    assert unexpected == [], unexpected
    assert wait_until(lambda: active_calls(server_thread) == 0)
    # abort and raise are the only ways out: no handler was cancelled
    assert sum(snap["cancelled"].values()) == 0, snap


# ====================================================================== 4
# stop(grace) while a client keeps sending.

def _work_handler(recorder: Recorder) -> Dict[str, Any]:
    async def work(request: bytes, context: Any) -> bytes:
        cid, _, delay = request.decode().partition("|")
        recorder.add(("entered", cid))
        try:
            await asyncio.sleep(int(delay) / 1000)
        except asyncio.CancelledError:
            recorder.add(("cancelled", cid))
            raise
        recorder.add(("completed", cid))
        return b"ok:" + cid.encode()
    return {"Work": asyncgrpc.unary_unary_rpc_method_handler(work),
            "Value": asyncgrpc.unary_unary_rpc_method_handler(value_handler)}


async def _load_then_stop(st: ServerThread, round_no: int,
                          workers: int = 8) -> Dict[str, Tuple[str, Any, str]]:
    """Send unary calls from ``workers`` concurrent senders (every 4th one
    slow, 50 ms); after 40 replies stop the server with grace=1.0 while they
    keep sending. Returns call id -> ("ok", reply, "") or ("error", code,
    details)."""
    outcomes: Dict[str, Tuple[str, Any, str]] = {}
    enough = asyncio.Event()
    stopped = False
    oks = 0

    async with grpc.aio.insecure_channel(st.target) as channel:
        method = channel.unary_unary(path("Work"))

        async def sender(w: int) -> None:
            nonlocal oks
            n = 0
            while not stopped:
                cid = f"r{round_no}-w{w}-{n}"
                delay = 50 if n % 4 == 3 else 0
                n += 1
                try:
                    reply = await method(f"{cid}|{delay}".encode(), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    outcomes[cid] = ("error", exc.code(), exc.details())
                    continue
                outcomes[cid] = ("ok", reply, "")
                oks += 1
                if oks >= 40:
                    enough.set()

        senders = [asyncio.ensure_future(sender(w)) for w in range(workers)]
        await asyncio.wait_for(enough.wait(), 20)
        await asyncio.get_running_loop().run_in_executor(None, lambda: st.stop(grace=1.0))
        stopped = True
        await asyncio.wait_for(asyncio.gather(*senders), 20)
    return outcomes


# An RPC that never reached a handler fails UNAVAILABLE, or CANCELLED when its
# stream reached the gRPC core just as stop() shut the core down (the core
# resets it; grpc.aio servers do the same, more often: no drain phase).
NOT_RUN_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def test_stop_with_grace_under_load(server_thread: ServerThread, recorder: Recorder) -> None:
    """STOP_ROUNDS fresh servers, each stopped with grace=1.0 under steady
    unary load: every RPC whose handler completed (all do, 50 ms << grace)
    is seen OK with its own value; calls that never reached a handler fail (or CANCELLED, see NOT_RUN_CODES); no call hangs (each has a
    5 s deadline, never reached)."""
    problems: List[str] = []
    handled_total = refused_total = 0
    for round_no in range(STOP_ROUNDS):
        recorder.items.clear()
        server_thread.start(lambda s: s.add_registered_method_handlers(
            SERVICE, _work_handler(recorder)))
        outcomes = run_client(_load_then_stop(server_thread, round_no))
        items = list(recorder.items)
        entered: Set[str] = {i[1] for i in items if i[0] == "entered"}
        completed: Set[str] = {i[1] for i in items if i[0] == "completed"}
        for cid in sorted(completed):
            outcome = outcomes.get(cid)
            if outcome != ("ok", b"ok:" + cid.encode(), ""):
                problems.append(f"round {round_no}: {cid} completed in its handler, "
                                f"client saw {outcome}")
        for cid, (kind, value, details) in outcomes.items():
            if kind == "ok" and cid not in completed:
                problems.append(f"round {round_no}: {cid} OK without a handler run")
            if kind == "error" and cid not in entered and value not in NOT_RUN_CODES:
                problems.append(f"round {round_no}: {cid} refused with {value} {details!r}")
            if kind == "error" and value == grpc.StatusCode.DEADLINE_EXCEEDED:
                problems.append(f"round {round_no}: {cid} hung until its deadline")
        if entered - completed:
            problems.append(f"round {round_no}: handlers did not finish within the "
                            f"grace: {sorted(entered - completed)}")
        handled_total += len(completed)
        refused_total += sum(1 for o in outcomes.values() if o[0] == "error")
    assert problems == [], f"{len(problems)} problems, first: {problems[:8]}"
    assert handled_total >= 40 * STOP_ROUNDS
