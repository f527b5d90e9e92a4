"""The per-call write queue and read-ahead of streaming RPCs (src/call.c).

``await context.write(m)`` (and each ``yield`` of a response generator)
returns without suspending while the call's queue is below its high-water
mark; the status goes only after every queued message; a message that has
already arrived is returned by ``read()`` without suspending. "Without
suspending" is observed the way a handler would: a callback scheduled with
``loop.call_soon`` before the writes has not run after them.
"""
from __future__ import annotations

import asyncio
from typing import Any, List

import grpc
import grpc.aio
import pytest

import asyncgrpc

from conftest import Recorder, ServerThread

SERVICE = "test.WriteQueue"
SMALL = 200          # 200 x 16 B stays far below the 64 KiB mark


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def _scheduled_marker() -> List[int]:
    """A list that gets an item as soon as the loop runs its next callback."""
    marker: List[int] = []
    asyncio.get_running_loop().call_soon(marker.append, 1)
    return marker


def _setup(recorder: Recorder):
    async def writes(request: bytes, context: Any) -> None:
        marker = _scheduled_marker()
        for i in range(SMALL):
            await context.write(b"%015d" % i)
        recorder.add(("writes", marker == []))

    async def yields(request: bytes, context: Any) -> Any:
        marker = _scheduled_marker()
        for i in range(SMALL):
            yield b"%015d" % i
        recorder.add(("yields", marker == []))

    async def write_then_abort(request: bytes, context: Any) -> None:
        n = int(request)
        for i in range(n):
            await context.write(b"m%d" % i)
        context.set_trailing_metadata((("x-written", str(n)),))
        await context.abort(grpc.StatusCode.NOT_FOUND, f"after {n}")

    async def yield_then_code(request: bytes, context: Any) -> Any:
        n = int(request)
        for i in range(n):
            yield b"m%d" % i
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details(f"after {n}")

    async def big_writes(request: bytes, context: Any) -> None:
        # 256 KiB each: every write is above the mark and waits for the
        # transport; the writer must not run ahead of a client that does
        # not read.
        chunk = b"x" * (256 << 10)
        for i in range(int(request)):
            await context.write(chunk)
            recorder.add(("big", i))

    async def read_twice(request_iterator: Any, context: Any) -> bytes:
        first = await context.read()
        await asyncio.sleep(0.3)            # the rest of the stream arrives
        marker = _scheduled_marker()
        second = await context.read()
        recorder.add(("read_ahead", marker == []))
        rest = []
        while True:
            m = await context.read()
            if m is asyncgrpc.EOF:
                break
            rest.append(m)
        again = await context.read()        # after EOF: EOF again
        return b"|".join([first, second, *rest, b"EOF" if again is asyncgrpc.EOF else b"?"])

    async def iterate_twice(request_iterator: Any, context: Any) -> bytes:
        it = request_iterator.__aiter__()
        first = await it.__anext__()
        await asyncio.sleep(0.3)
        marker = _scheduled_marker()
        second = await it.__anext__()
        recorder.add(("iterator_ahead", marker == []))
        rest = [m async for m in it]
        return b"|".join([first, second, *rest])

    def setup(server: Any) -> None:
        server.add_registered_method_handlers(SERVICE, {
            "Writes": asyncgrpc.unary_stream_rpc_method_handler(writes),
            "Yields": asyncgrpc.unary_stream_rpc_method_handler(yields),
            "WriteThenAbort": asyncgrpc.unary_stream_rpc_method_handler(write_then_abort),
            "YieldThenCode": asyncgrpc.unary_stream_rpc_method_handler(yield_then_code),
            "BigWrites": asyncgrpc.unary_stream_rpc_method_handler(big_writes),
            "ReadTwice": asyncgrpc.stream_unary_rpc_method_handler(read_twice),
            "IterateTwice": asyncgrpc.stream_unary_rpc_method_handler(iterate_twice),
        })
    return setup


@pytest.mark.parametrize("method", ["Writes", "Yields"])
def test_writes_below_the_mark_do_not_suspend(server_thread: ServerThread,
                                              recorder: Recorder, method: str) -> None:
    server_thread.start(_setup(recorder))
    with grpc.insecure_channel(server_thread.target) as channel:
        got = list(channel.unary_stream(path(method))(b"", timeout=10))
    assert got == [b"%015d" % i for i in range(SMALL)]
    assert recorder.wait_for(lambda items: len(items) == 1)
    assert recorder.items == [(method.lower(), True)]


@pytest.mark.parametrize("n", [1, 50, 3000])
def test_status_follows_every_queued_message(server_thread: ServerThread,
                                             recorder: Recorder, n: int) -> None:
    """The handler ends (abort, or set_code and return) right after its
    writes returned: the client still gets every message, in order, then the
    status with its details and trailing metadata."""
    server_thread.start(_setup(recorder))

    async def main() -> None:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            for method, code in (("WriteThenAbort", grpc.StatusCode.NOT_FOUND),
                                 ("YieldThenCode", grpc.StatusCode.RESOURCE_EXHAUSTED)):
                call = channel.unary_stream(path(method))(str(n).encode(), timeout=20)
                got = [m async for m in _drain(call)]
                assert got == [b"m%d" % i for i in range(n)], (method, len(got))
                assert await call.code() == code
                assert await call.details() == f"after {n}"
                if method == "WriteThenAbort":
                    assert ("x-written", str(n)) in tuple(await call.trailing_metadata())
    asyncio.run(main())


async def _drain(call: Any) -> Any:
    try:
        async for m in call:
            yield m
    except grpc.aio.AioRpcError:
        return


def test_writer_waits_for_a_client_that_does_not_read(server_thread: ServerThread,
                                                      recorder: Recorder) -> None:
    """Above the mark write() waits for the transport: with a client that
    reads nothing, the handler gets only as far as the flow-control windows
    take (a few MiB), not through all 400 x 256 KiB = 100 MiB."""
    server_thread.start(_setup(recorder))

    async def main() -> None:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            call = channel.unary_stream(path("BigWrites"))(b"400", timeout=20)
            await asyncio.sleep(1.0)
            stalled = len(recorder.items)
            assert stalled < 100, stalled       # 25 MiB: windows are 4 MiB at most
            # Then the client reads everything; nothing was lost or reordered.
            n = 0
            async for m in call:
                assert len(m) == 256 << 10
                n += 1
            assert n == 400
    asyncio.run(main())
    assert [i for _, i in recorder.items] == list(range(400))


def test_read_returns_an_arrived_message_without_suspending(
        server_thread: ServerThread, recorder: Recorder) -> None:
    server_thread.start(_setup(recorder))
    with grpc.insecure_channel(server_thread.target) as channel:
        reply = channel.stream_unary(path("ReadTwice"))(
            iter([b"a", b"b", b"c", b"d"]), timeout=10)
    assert reply == b"a|b|c|d|EOF"
    assert recorder.items == [("read_ahead", True)]


def test_request_iterator_returns_an_arrived_message_without_suspending(
        server_thread: ServerThread, recorder: Recorder) -> None:
    server_thread.start(_setup(recorder))
    with grpc.insecure_channel(server_thread.target) as channel:
        method = channel.stream_unary(path("IterateTwice"))
        assert method(iter([b"a", b"b", b"c", b"d"]), timeout=10) == b"a|b|c|d"
        assert method(iter([b"a", b"b"]), timeout=10) == b"a|b"
    assert recorder.items == [("iterator_ahead", True)] * 2


# ------------------------------------------------------------ adversarial

def _adversary_setup(tally: Any, written: dict):
    async def flood(request: bytes, context: Any) -> None:
        # Each stream writes its own id into every message, as fast as the
        # queue takes them (most writes do not suspend).
        own = request.decode()
        n = 0
        with tally.track("Flood"):
            for i in range(1000):
                await context.write(f"{own}:{i}".encode())
                n += 1
        written[own] = n

    async def two_writers(request: bytes, context: Any) -> None:
        async def writer(tag: str) -> None:
            for i in range(300):
                await context.write(f"{tag}{i}".encode())
        await asyncio.gather(writer("a"), writer("b"))

    async def big_then_wait(request: bytes, context: Any) -> None:
        chunk = b"y" * (256 << 10)
        with tally.track("Big"):
            for _ in range(10_000):
                await context.write(chunk)

    def setup(server: Any) -> None:
        server.add_registered_method_handlers(SERVICE, {
            "Flood": asyncgrpc.unary_stream_rpc_method_handler(flood),
            "TwoWriters": asyncgrpc.unary_stream_rpc_method_handler(two_writers),
            "Big": asyncgrpc.unary_stream_rpc_method_handler(big_then_wait),
        })
    return setup


def test_concurrent_streams_get_their_own_messages_and_cancels_free_them(
        server_thread: ServerThread) -> None:
    """48 streams over 4 connections, each writing its own id; every other
    one is cancelled by its client after a few messages, while the server's
    queue for it is full. The others get exactly their own 1,000 messages in
    order; every cancelled handler ends with CancelledError; nothing stays
    active."""
    from test_chaos import Tally, active_calls, wait_until

    tally = Tally()
    written: dict = {}
    server_thread.start(_adversary_setup(tally, written))

    async def one(channel: Any, cid: str, cancel_after: int) -> List[bytes]:
        call = channel.unary_stream(path("Flood"))(cid.encode(), timeout=30)
        got: List[bytes] = []
        async for m in call:
            got.append(m)
            if cancel_after and len(got) == cancel_after:
                call.cancel()
                break
        return got

    async def main() -> None:
        channels = [grpc.aio.insecure_channel(
            server_thread.target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(4)]
        try:
            jobs = []
            for i in range(48):
                cancel_after = 0 if i % 2 == 0 else 3 + i
                jobs.append(one(channels[i % 4], f"s{i}", cancel_after))
            results = await asyncio.gather(*jobs)
        finally:
            for ch in channels:
                await ch.close()
        for i, got in enumerate(results):
            want = [f"s{i}:{k}".encode() for k in range(len(got))]
            assert got == want, (i, got[:3])
            if i % 2 == 0:
                assert len(got) == 1000, (i, len(got))
            else:
                assert len(got) == 3 + i, (i, len(got))
    asyncio.run(main())
    assert wait_until(tally.balanced), tally.snapshot()
    snap = tally.snapshot()
    assert snap["errors"] == [], snap
    assert snap["entered"]["Flood"] == 48, snap
    # Every uncancelled stream wrote all of its messages. A cancelled one may
    # have had all of its messages taken by the transport's windows before
    # the cancel arrived; every other cancelled one ended with CancelledError.
    finished = {int(k[1:]) for k in written}
    assert set(range(0, 48, 2)) <= finished, sorted(finished)
    assert all(written[f"s{i}"] == 1000 for i in finished), written
    cut_short = 24 - len(finished - set(range(0, 48, 2)))
    assert snap["cancelled"].get("Flood", 0) == cut_short, (snap, sorted(finished))
    assert wait_until(lambda: active_calls(server_thread) == 0), active_calls(server_thread)


def test_two_tasks_writing_one_stream(server_thread: ServerThread) -> None:
    """Two tasks of one handler write to the same call at once: every
    message arrives once, and each task's messages keep their order."""
    server_thread.start(_adversary_setup(None, {}))
    with grpc.insecure_channel(server_thread.target) as channel:
        got = list(channel.unary_stream(path("TwoWriters"))(b"", timeout=10))
    assert sorted(got) == sorted([f"{t}{i}".encode() for t in "ab" for i in range(300)])
    for tag in "ab":
        mine = [int(m[1:]) for m in got if m[:1] == tag.encode()]
        assert mine == list(range(300))


_KILLED_READER = """
import sys, grpc
ch = grpc.insecure_channel(sys.argv[1])
call = ch.unary_stream(sys.argv[2])(b"", timeout=60)
next(call)                      # one message, then stop reading
print("read", flush=True)
sys.stdin.readline()            # wait to be killed
"""


def test_client_killed_while_the_writer_waits_above_the_mark(
        server_thread: ServerThread) -> None:
    """A client reads one 256 KiB message, stops reading (the server's queue
    fills and the writer waits above the mark), and is SIGKILLed: the
    handler's write raises CancelledError, the call ends, the server
    serves on."""
    import subprocess
    import sys as _sys

    from test_chaos import Tally, active_calls, wait_until

    tally = Tally()
    server_thread.start(_adversary_setup(tally, {}))
    proc = subprocess.Popen([_sys.executable, "-c", _KILLED_READER, server_thread.target,
                             path("Big")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    with proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "read"
        assert wait_until(lambda: tally.snapshot()["entered"].get("Big") == 1)
        proc.kill()
        proc.wait(10)
    assert wait_until(tally.balanced, timeout=20), tally.snapshot()
    assert tally.snapshot()["cancelled"].get("Big") == 1, tally.snapshot()
    assert wait_until(lambda: active_calls(server_thread) == 0), active_calls(server_thread)
    with grpc.insecure_channel(server_thread.target) as channel:
        assert list(channel.unary_stream(path("TwoWriters"))(b"", timeout=10))
