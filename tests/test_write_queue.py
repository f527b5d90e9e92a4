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
