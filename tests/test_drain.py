"""stop(grace) moves traffic: GOAWAY at once, in-flight RPCs finish, and
nothing in flight is lost.

Two asyncgrpc servers behind one grpcio channel with round_robin over both
addresses, a client sending continuously (each call its own value); one
server stops with a grace period. With GOAWAY sent at once, clients start no
new RPC on the stopping server and move to the other one: no RPC fails.

Two races inside the gRPC core lost RPCs at that moment; the bundled core
carries asyncgrpc's fixes (scripts/core_patches.py, ``_core.CORE_PATCHES``),
a system libgrpc does not, so there the tests below tolerate exactly those
losses (or are strict xfails) and say so:
- ``close-after-peer-read``: the core closed the connection as its last
  stream ended; a frame the client sent in that instant (a BDP ping) met a
  closed socket, the kernel reset the connection and replies the client had
  not read yet were lost.
- ``serve-calls-until-goaway``: a call whose headers arrived after the
  shutdown began (the client sent it before the GOAWAY reached it) was
  cancelled: the client saw CANCELLED.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any, Counter, Dict, Tuple

import grpc
import grpc.aio
import pytest

import asyncgrpc

from _h2frames import ACK, END_STREAM, GOAWAY, HEADERS, PING, RST_STREAM, FrameClient
from conftest import LOOP_KINDS, ServerThread

SERVICE = "test.Drain"
PATCHES = asyncgrpc._core.CORE_PATCHES
CLOSES_AFTER_PEER_READ = "close-after-peer-read" in PATCHES
SERVES_CALLS_UNTIL_GOAWAY = "serve-calls-until-goaway" in PATCHES


def needs_patch(name: str) -> Any:
    """A strict xfail on a core without asyncgrpc's patch ``name``."""
    return pytest.mark.xfail(
        name not in PATCHES, strict=True,
        reason=f"DEFECT (gRPC core {asyncgrpc.core_version()}, not src/): fixed by "
               f"asyncgrpc's core patch {name!r}, which only the bundled core has")


def _setup(delay: float) -> Any:
    async def work(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
        if delay:
            await asyncio.sleep(delay)
        return request

    def setup(server: Any) -> None:
        server.add_registered_method_handlers(
            SERVICE, {"Work": asyncgrpc.unary_unary_rpc_method_handler(work)})
    return setup


def _one_drain(loop_kind: str, grace: float, threads: int = 6, delay: float = 0.01,
               warmup: float = 0.2) -> Tuple[Counter[str], float]:
    """Two servers behind one round_robin channel, ``threads`` clients
    calling without pause (handlers take ``delay`` s); after ``warmup`` s one
    server stops with ``grace``: the outcome of every call, and how long
    stop() took.
    (benchmarks/drain_load.py repeats it under heavier load.)"""
    a, b = ServerThread(loop_kind), ServerThread(loop_kind)
    try:
        port_a = a.start(_setup(delay), blocked_loop_threshold=None)
        port_b = b.start(_setup(delay), blocked_loop_threshold=None)
        channel = grpc.insecure_channel(
            f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}",
            options=[("grpc.lb_policy_name", "round_robin")])
        grpc.channel_ready_future(channel).result(timeout=10)
        method = channel.unary_unary(f"/{SERVICE}/Work")
        done = threading.Event()
        outcomes: Counter[str] = collections.Counter()
        lock = threading.Lock()

        def client(k: int) -> None:
            i = 0
            while not done.is_set():
                value = f"{k}-{i}".encode()
                try:
                    outcome = "ok" if method(value, timeout=10) == value else "wrong reply"
                except grpc.RpcError as err:
                    outcome = f"{err.code().name}: {err.details()}"
                with lock:
                    outcomes[outcome] += 1
                i += 1

        workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        for t in workers:
            t.start()
        time.sleep(warmup)
        started = time.monotonic()
        a.stop(grace)
        took = time.monotonic() - started
        time.sleep(0.2)                    # the other backend goes on serving
        done.set()
        for t in workers:
            t.join(20)
        channel.close()
        return outcomes, took
    finally:
        a.close()
        b.close()


# On a core without serve-calls-until-goaway, a call the client started in the
# instant the server's GOAWAY went out ends CANCELLED ("CANCELLED") on the
# client: measured with grpc.aio servers in this same test too (grpcio 1.85:
# 3 of 20 repetitions had 1-3 such calls, about 0.1% of the RPCs). Without
# close-after-peer-read, a reset connection can lose replies ("Connection
# reset by peer"). Everything else, refusals by the stopping server above
# all, is a failure; with the patched core, anything but "ok" is.
def _core_race(outcome: str) -> bool:
    if outcome == "CANCELLED: CANCELLED":
        return not SERVES_CALLS_UNTIL_GOAWAY
    if outcome.startswith("UNAVAILABLE") and "reset by peer" in outcome:
        return not CLOSES_AFTER_PEER_READ
    return False


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_stop_with_grace_moves_traffic_to_the_other_backend(loop_kind):
    failures, total, raced = [], 0, 0
    for rep in range(20):
        outcomes, took = _one_drain(loop_kind, grace=2.0)
        assert outcomes["ok"] > 0
        total += sum(outcomes.values())
        raced += sum(n for k, n in outcomes.items() if _core_race(k))
        bad = {k: v for k, v in outcomes.items() if k != "ok" and not _core_race(k)}
        if bad:
            failures.append((rep, bad))
        assert took < 2.0, f"stop waited out its grace with nothing in flight ({took:.2f} s)"
    assert not failures, failures
    assert raced <= total * 0.005, f"{raced} of {total} RPCs lost to the core's GOAWAY races"


def _replies_in_flight(loop_kind: str, connections: int, calls: int) -> Counter[str]:
    """``connections`` client connections with ``calls`` unary calls each in
    flight when stop(grace) begins: the outcome of every call. All replies
    go out together as the handlers wake, and each connection closes right
    after its last one."""
    st = ServerThread(loop_kind)
    try:
        async def slow(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
            await asyncio.sleep(0.3)
            return request
        st.start(lambda s: s.add_registered_method_handlers(
            SERVICE, {"Slow": asyncgrpc.unary_unary_rpc_method_handler(slow)}),
            blocked_loop_threshold=None)

        async def client() -> Counter[str]:
            channels = [grpc.aio.insecure_channel(
                st.target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
            try:
                pending = [(f"{c}-{i}".encode(),
                            ch.unary_unary(f"/{SERVICE}/Slow")(f"{c}-{i}".encode(), timeout=20))
                           for c, ch in enumerate(channels) for i in range(calls)]
                await asyncio.sleep(0.1)
                stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                    st.server.stop(10), st.loop))
                out: Counter[str] = collections.Counter()
                for value, call in pending:
                    try:
                        out["ok" if await call == value else "wrong reply"] += 1
                    except grpc.aio.AioRpcError as err:
                        out[f"{err.code().name}: {err.details()}"] += 1
                await stopping
                return out
            finally:
                for ch in channels:
                    await ch.close()
        return asyncio.run(client())
    finally:
        st.close()


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_replies_in_flight_all_arrive_when_the_server_closes(loop_kind):
    """4 connections x 25 calls in flight as stop(grace) begins, 10 times:
    every reply arrives (the core closes each connection once its client
    has read everything, so a client's BDP ping cannot reset it)."""
    lost = []
    for rep in range(10):
        outcomes = _replies_in_flight(loop_kind, connections=4, calls=25)
        bad = {k: v for k, v in outcomes.items() if k != "ok" and not _core_race(k)}
        assert not bad, (rep, outcomes)
        if set(outcomes) != {"ok"}:
            lost.append((rep, dict(outcomes)))
    # Without the patch, replies are lost to resets in some repetitions
    # (6 of 30 on core 1.51, benchmarks/RESULTS.md); only that kind of loss
    # passes there, and none with the patch.
    if CLOSES_AFTER_PEER_READ:
        assert not lost, lost


def _frame_client_setup(release: threading.Event, entered: threading.Event) -> Any:
    async def slow(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.005)
        return b"slow"

    async def echo(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
        return request

    def setup(server: Any) -> None:
        server.add_registered_method_handlers(SERVICE, {
            "Slow": asyncgrpc.unary_unary_rpc_method_handler(slow),
            "Echo": asyncgrpc.unary_unary_rpc_method_handler(echo)})
    return setup


def _stream_ends(client: FrameClient, *sids: int) -> Dict[int, Tuple[bytes, Dict[str, str]]]:
    """Read until every stream of ``sids`` ended: for each, (its DATA, its
    trailers) or (its DATA, {"rst": code}) when it was reset."""
    data = {sid: b"" for sid in sids}
    ends: Dict[int, Tuple[bytes, Dict[str, str]]] = {}
    while len(ends) < len(sids):
        frame = client.read_frame()
        assert frame is not None, f"connection ended before streams {set(sids) - set(ends)}"
        sid = frame.stream_id
        if sid not in data or sid in ends:
            continue
        if frame.type == 0:                       # DATA
            data[sid] += frame.payload
        elif frame.type == RST_STREAM:
            ends[sid] = (data[sid], {"rst": str(int.from_bytes(frame.payload, "big"))})
        elif frame.type == HEADERS and frame.flags & END_STREAM:
            ends[sid] = (data[sid], dict(frame.headers or []))
    return ends


def _stream_end(client: FrameClient, sid: int) -> Tuple[bytes, Dict[str, str]]:
    return _stream_ends(client, sid)[sid]


def _closes_cleanly(client: FrameClient) -> bool:
    """Read (answering PINGs) until the server ends the connection: True if
    it closed it (FIN), False on a reset or when 5 s pass."""
    client.read_until(lambda frame: False, timeout=5)
    return client.eof and not client.reset


@needs_patch("serve-calls-until-goaway")
def test_call_sent_before_the_goaway_arrived_is_served(server_thread):
    """A client sends a call after the server's stop() began, before the
    server's (first) GOAWAY reached it. The final GOAWAY's last stream id
    then covers the call, which tells the client it is processed: the server
    must serve it, not cancel it."""
    release, entered = threading.Event(), threading.Event()
    server_thread.start(_frame_client_setup(release, entered))
    client = FrameClient("127.0.0.1", server_thread.port)
    try:
        first = client.request(f"/{SERVICE}/Slow", b"")   # keeps the connection busy
        assert entered.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(
            server_thread.server.stop(10), server_thread.loop)
        goaway, _ = client.read_until(lambda f: f.type == GOAWAY)
        assert goaway is not None and goaway.goaway_last_stream == 2**31 - 1
        client.auto_ack_pings = False
        ping, _ = client.read_until(lambda f: f.type == PING and not f.flags & ACK)
        assert ping is not None, "no PING after the graceful GOAWAY"
        # The call a client has on the wire while the GOAWAY travels.
        late = client.request(f"/{SERVICE}/Echo", b"late")
        client.auto_ack_pings = True
        client.ping(ping.payload, ack=True)
        data, trailers = _stream_end(client, late)
        assert trailers.get("grpc-status") == "0", trailers
        assert data.endswith(b"late")
        release.set()
        data, trailers = _stream_end(client, first)
        assert trailers.get("grpc-status") == "0" and data.endswith(b"slow")
        assert _closes_cleanly(client)
        stopping.result(10)
    finally:
        release.set()
        client.close()


@needs_patch("serve-calls-until-goaway")
def test_more_late_calls_than_requests_posted_are_served_or_refused(server_thread):
    """More calls arrive in the GOAWAY window than the server has requests
    posted for the method (none is posted once stop() began): each is either
    served with its own reply or refused with RST_STREAM(REFUSED_STREAM),
    which tells the client it was not processed. None is cancelled, none
    waits for the grace to run out."""
    release, entered = threading.Event(), threading.Event()
    server_thread.start(_frame_client_setup(release, entered))
    client = FrameClient("127.0.0.1", server_thread.port)
    n = asyncgrpc._core.REQUESTS_PER_METHOD + 6
    try:
        first = client.request(f"/{SERVICE}/Slow", b"")
        assert entered.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(
            server_thread.server.stop(10), server_thread.loop)
        goaway, _ = client.read_until(lambda f: f.type == GOAWAY)
        assert goaway is not None
        client.auto_ack_pings = False
        ping, _ = client.read_until(lambda f: f.type == PING and not f.flags & ACK)
        assert ping is not None
        late = {client.request(f"/{SERVICE}/Echo", b"late-%d" % i): b"late-%d" % i
                for i in range(n)}
        client.auto_ack_pings = True
        client.ping(ping.payload, ack=True)
        served, refused, other = 0, 0, []
        ends = _stream_ends(client, *late)
        for sid, value in late.items():
            data, trailers = ends[sid]
            if trailers.get("grpc-status") == "0" and data.endswith(value):
                served += 1
            elif trailers == {"rst": "7"}:
                refused += 1
            else:
                other.append((sid, data, trailers))
        assert not other, other[:3]
        assert served >= 1 and refused >= 1, (served, refused)
        release.set()
        _, trailers = _stream_end(client, first)
        assert trailers.get("grpc-status") == "0"
        assert _closes_cleanly(client)
        stopping.result(10)
    finally:
        release.set()
        client.close()


@needs_patch("close-after-peer-read")
def test_frame_sent_after_the_last_reply_is_read_before_the_close(server_thread):
    """After the server's final GOAWAY and its last reply, the client sends a
    PING (as grpcio's BDP estimator does on receiving data). The server must
    read it (answer it) and then end the connection cleanly, rather than
    close with the PING unread, which makes the kernel reset the connection
    and lose replies the client had not read yet."""
    release, entered = threading.Event(), threading.Event()
    server_thread.start(_frame_client_setup(release, entered))
    client = FrameClient("127.0.0.1", server_thread.port)
    try:
        sid = client.request(f"/{SERVICE}/Slow", b"")
        assert entered.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(
            server_thread.server.stop(10), server_thread.loop)
        final, _ = client.read_until(
            lambda f: f.type == GOAWAY and f.goaway_last_stream == sid)
        assert final is not None, "no final GOAWAY"
        client.auto_ack_pings = False      # the test answers from here on
        release.set()
        data, trailers = _stream_end(client, sid)
        assert trailers.get("grpc-status") == "0" and data.endswith(b"slow")
        client.ping(b"afterlst")
        acked = False
        while True:
            frame = client.read_frame()
            if frame is None:
                break
            if frame.type == PING and frame.flags & ACK and frame.payload == b"afterlst":
                acked = True
            elif frame.type == PING and not frame.flags & ACK:
                client.ping(frame.payload, ack=True)
        assert acked, "the server closed without reading the client's PING"
        assert client.eof and not client.reset, "the connection was reset"
        stopping.result(10)
    finally:
        release.set()
        client.close()


@pytest.mark.parametrize("grace", [0.5, None])
def test_a_client_that_never_answers_does_not_hold_stop_past_its_grace(server_thread, grace):
    """A client that answers no PING (neither the graceful GOAWAY's nor the
    one a patched core sends before closing) and never closes: stop(grace)
    still returns once the grace is over, and the connection is closed."""
    release, entered = threading.Event(), threading.Event()
    release.set()
    server_thread.start(_frame_client_setup(release, entered))
    client = FrameClient("127.0.0.1", server_thread.port)
    try:
        sid = client.request(f"/{SERVICE}/Slow", b"")
        client.auto_ack_pings = False
        _, trailers = _stream_end(client, sid)
        assert trailers.get("grpc-status") == "0"
        started = time.monotonic()
        server_thread.call(lambda: server_thread.server.stop(grace), timeout=30)
        took = time.monotonic() - started
        assert took < (grace or 0) + 2.0, took
        client.read_until(lambda frame: False, timeout=5)
        assert client.eof or client.reset, "the server left the connection open"
    finally:
        client.close()


def test_later_stop_cuts_a_running_grace_short(server_thread):
    """stop(None) (or a shorter grace) while stop(60) waits for an RPC ends
    the wait at once and cancels that RPC, as in grpc.aio."""
    entered = threading.Event()

    async def stuck(request, context):
        entered.set()
        await asyncio.sleep(60)
        return b"late"
    server_thread.start(lambda s: s.add_registered_method_handlers(
        SERVICE, {"Stuck": asyncgrpc.unary_unary_rpc_method_handler(stuck)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        future = channel.unary_unary(f"/{SERVICE}/Stuck").future(b"", timeout=30)
        assert entered.wait(10)
        server = server_thread.server
        long_stop = asyncio.run_coroutine_threadsafe(server.stop(60), server_thread.loop)
        time.sleep(0.3)
        assert not long_stop.done()
        started = time.monotonic()
        server_thread.call(lambda: server.stop(0.1), timeout=10)
        long_stop.result(10)
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.RpcError) as info:
            future.result(10)
    # The core's word for a call cancelled by the server's stop (grpc.aio: the same).
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
