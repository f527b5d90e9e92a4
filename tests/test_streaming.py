"""Streaming RPCs of every kind, in both handler styles, with grpcio clients."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import grpc
import grpc.aio
import pytest

import asyncgrpc

from _proxy import CountingProxy

SERVICE = "test.Stream"


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


# ---------------------------------------------------------------- handlers

async def count_up(request, context):                  # unary-stream, generator style
    for i in range(int(request)):
        yield str(i).encode()


async def count_up_writes(request, context):           # unary-stream, write() style
    for i in range(int(request)):
        await context.write(str(i).encode())


async def total(request_iterator, context):            # stream-unary, iterator style
    n = count = 0
    async for message in request_iterator:
        n += int(message)
        count += 1
    return f"{count}:{n}".encode()


async def total_reads(request_iterator, context):      # stream-unary, read() style
    n = count = 0
    while True:
        message = await context.read()
        if message is asyncgrpc.EOF:
            break
        assert message == grpc.aio.EOF or True       # comparable with grpc's sentinel
        n += int(message)
        count += 1
    return f"{count}:{n}".encode()


async def echo_stream(request_iterator, context):      # stream-stream, generator style
    async for message in request_iterator:
        yield message


async def echo_reads(request_iterator, context):       # stream-stream, read/write style
    while True:
        message = await context.read()
        if message == grpc.aio.EOF:
            return
        await context.write(message)


HANDLERS = {
    "CountUp": asyncgrpc.unary_stream_rpc_method_handler(count_up),
    "CountUpWrites": asyncgrpc.unary_stream_rpc_method_handler(count_up_writes),
    "Total": asyncgrpc.stream_unary_rpc_method_handler(total),
    "TotalReads": asyncgrpc.stream_unary_rpc_method_handler(total_reads),
    "Echo": asyncgrpc.stream_stream_rpc_method_handler(echo_stream),
    "EchoReads": asyncgrpc.stream_stream_rpc_method_handler(echo_reads),
}


def add_stream_methods(server, extra=None, register=True):
    handlers = dict(HANDLERS, **(extra or {}))
    if register:
        server.add_registered_method_handlers(SERVICE, handlers)
    else:
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, handlers)])


N = 10_000


@pytest.mark.parametrize("method", ["CountUp", "CountUpWrites"])
def test_unary_stream_10k_in_order(server_thread, method):
    server_thread.start(add_stream_methods)
    with grpc.insecure_channel(server_thread.target) as channel:
        got = list(channel.unary_stream(path(method))(str(N).encode(), timeout=60))
    assert got == [str(i).encode() for i in range(N)]


@pytest.mark.parametrize("method", ["Total", "TotalReads"])
def test_stream_unary_10k(server_thread, method):
    server_thread.start(add_stream_methods)
    with grpc.insecure_channel(server_thread.target) as channel:
        reply = channel.stream_unary(path(method))(
            (str(i).encode() for i in range(N)), timeout=60)
    assert reply == f"{N}:{sum(range(N))}".encode()


@pytest.mark.parametrize("register", [True, False], ids=["registered", "generic"])
@pytest.mark.parametrize("method", ["Echo", "EchoReads"])
def test_stream_stream_10k_in_order(server_thread, method, register):
    server_thread.start(lambda s: add_stream_methods(s, register=register))
    with grpc.insecure_channel(server_thread.target) as channel:
        got = list(channel.stream_stream(path(method))(
            (str(i).encode() for i in range(N)), timeout=60))
    assert got == [str(i).encode() for i in range(N)]


@pytest.mark.parametrize("method", ["Echo", "EchoReads"])
def test_bidi_ping_pong_1000_round_trips(server_thread, method):
    server_thread.start(add_stream_methods)

    async def main():
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            call = channel.stream_stream(path(method))(timeout=60)
            for i in range(1000):
                await call.write(str(i).encode())
                assert await call.read() == str(i).encode()
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF        # server half-closed too
            return await call.code()
    assert asyncio.run(main()) == grpc.StatusCode.OK


def test_empty_streams_and_status_after_stream(server_thread):
    async def fail_after_two(request, context):
        yield b"1"
        yield b"2"
        await context.abort(grpc.StatusCode.DATA_LOSS, "lost après deux")
    server_thread.start(lambda s: add_stream_methods(
        s, {"FailAfterTwo": asyncgrpc.unary_stream_rpc_method_handler(fail_after_two)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        assert list(channel.unary_stream(path("CountUp"))(b"0", timeout=10)) == []
        assert list(channel.stream_stream(path("Echo"))(iter(()), timeout=10)) == []
        assert channel.stream_unary(path("Total"))(iter(()), timeout=10) == b"0:0"
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for message in channel.unary_stream(path("FailAfterTwo"))(b"", timeout=10):
                got.append(message)
    assert got == [b"1", b"2"]
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert info.value.details() == "lost après deux"


def test_metadata_with_streams(server_thread):
    async def meta(request_iterator, context):
        md = dict(context.invocation_metadata())
        await context.send_initial_metadata((("x-echo", md["x-in"]),))
        async for message in request_iterator:
            yield message
        context.set_trailing_metadata((("x-trailing-bin", b"\x00\x01"),))
    server_thread.start(lambda s: add_stream_methods(
        s, {"Meta": asyncgrpc.stream_stream_rpc_method_handler(meta)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        call = channel.stream_stream(path("Meta"))(iter([b"a", b"b"]), timeout=10,
                                                   metadata=(("x-in", "v"),))
        assert list(call) == [b"a", b"b"]
        assert dict(call.initial_metadata())["x-echo"] == "v"
        assert dict(call.trailing_metadata())["x-trailing-bin"] == b"\x00\x01"


def test_sync_generator_handler_runs_off_the_loop(server_thread, thread_pool):
    def gen(request, context):
        for i in range(3):
            time.sleep(0.01)
            yield threading.current_thread().name.encode()
    server_thread.start(lambda s: add_stream_methods(
        s, {"Gen": grpc.unary_stream_rpc_method_handler(gen)}),
        migration_thread_pool=thread_pool)
    with grpc.insecure_channel(server_thread.target) as channel:
        names = list(channel.unary_stream(path("Gen"))(b"", timeout=10))
    assert len(names) == 3
    assert all(n != f"server-{server_thread.loop_kind}".encode() for n in names)


# ---------------------------------------------------------------- deadline and cancel

def _blocking_handlers(recorder):
    async def wait_forever(context):
        context.add_done_callback(lambda ctx: recorder.add("callback"))
        recorder.add("started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            recorder.add(("cancelled", context.cancelled()))
            raise

    async def us(request, context):
        yield b"first"
        await wait_forever(context)

    async def su(request_iterator, context):
        await wait_forever(context)
        return b""

    async def ss(request_iterator, context):
        yield b"first"
        await wait_forever(context)
    return {"BlockUS": asyncgrpc.unary_stream_rpc_method_handler(us),
            "BlockSU": asyncgrpc.stream_unary_rpc_method_handler(su),
            "BlockSS": asyncgrpc.stream_stream_rpc_method_handler(ss)}


def _start_call(channel, method, timeout):
    if method == "BlockUS":
        return channel.unary_stream(path(method))(b"", timeout=timeout)
    if method == "BlockSU":
        return channel.stream_unary(path(method))(_forever(), timeout=timeout)
    return channel.stream_stream(path(method))(_forever(), timeout=timeout)


async def _forever():
    yield b"one"
    await asyncio.sleep(120)


@pytest.mark.parametrize("method", ["BlockUS", "BlockSU", "BlockSS"])
def test_deadline_cancels_streaming_handler(server_thread, recorder, method):
    server_thread.start(lambda s: add_stream_methods(s, _blocking_handlers(recorder)))

    async def main():
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            call = _start_call(channel, method, timeout=0.5)
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                if method == "BlockSU":
                    await call
                else:
                    async for _ in call:
                        pass
            return info.value.code(), time.monotonic() - start
    code, took = asyncio.run(main())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 2
    assert recorder.wait_for(lambda items: ("cancelled", True) in items, timeout=5), recorder.items
    time.sleep(0.1)
    assert recorder.items.count("callback") == 1


@pytest.mark.parametrize("method", ["BlockUS", "BlockSU", "BlockSS"])
def test_client_cancel_mid_stream_cancels_handler(server_thread, recorder, method):
    server_thread.start(lambda s: add_stream_methods(s, _blocking_handlers(recorder)))

    async def main():
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            call = _start_call(channel, method, timeout=30)
            while "started" not in recorder.items:
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                if method == "BlockSU":
                    await call
                else:
                    async for _ in call:
                        pass
    asyncio.run(main())
    assert recorder.wait_for(lambda items: ("cancelled", True) in items, timeout=5), recorder.items
    time.sleep(0.1)
    assert recorder.items.count("callback") == 1


def test_handler_ignoring_cancel_cannot_outlive_deadline(server_thread, recorder):
    async def stubborn(request, context):
        yield b"first"
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                recorder.add("ignored a cancel")
            if context.done():
                recorder.add("rpc over")
                return
    server_thread.start(lambda s: add_stream_methods(
        s, {"Stubborn": asyncgrpc.unary_stream_rpc_method_handler(stubborn)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(channel.unary_stream(path("Stubborn"))(b"", timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2
    assert recorder.wait_for(lambda items: "rpc over" in items, timeout=5)


# ---------------------------------------------------------------- back-pressure

SLOW_SERVER = r'''
import asyncio, sys
import asyncgrpc

CHUNK = b"x" * (1 << 20)

async def firehose(request, context):
    for _ in range(int(request)):
        yield CHUNK

async def main():
    server = asyncgrpc.server()
    server.add_registered_method_handlers("test.Stream", {
        "Firehose": asyncgrpc.unary_stream_rpc_method_handler(firehose)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
'''


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_slow_reader_bounds_server_memory_over_1gb():
    env = dict(os.environ)
    sanitized = "libasan" in env.get("LD_PRELOAD", "")
    if sanitized:
        # ASan keeps freed memory in quarantine (256 MB by default): keep it
        # small so RSS shows what the server holds.
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=16"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        port = int(proc.stdout.readline())
        baseline = _rss_mb(proc.pid)
        peak = baseline
        received = 0
        options = [("grpc.max_receive_message_length", 2 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stream = channel.unary_stream(path("Firehose"))(b"1024", timeout=120)
            for i, message in enumerate(stream):
                received += len(message)
                if i < 200:
                    time.sleep(0.005)          # a slow reader at first
                if i % 16 == 0:
                    peak = max(peak, _rss_mb(proc.pid))
        assert received == 1024 << 20          # 1 GiB went through
        # Without back-pressure the server would buffer hundreds of MB.
        assert peak - baseline < (250 if sanitized else 150), (baseline, peak)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


# ---------------------------------------------------------------- compression

BIG = b"compressible " * 80_000         # ~1 MB


def _compression_handlers():
    async def per_call(request, context):
        context.set_compression(asyncgrpc.Compression.Gzip)
        return BIG

    async def plain(request, context):
        return BIG

    async def uncompressed_next(request, context):
        context.set_compression(grpc.Compression.Deflate)
        context.disable_next_message_compression()
        yield BIG
        yield BIG

    async def echo_len(request, context):
        return str(len(request)).encode()
    return {"PerCall": asyncgrpc.unary_unary_rpc_method_handler(per_call),
            "Plain": asyncgrpc.unary_unary_rpc_method_handler(plain),
            "NoCompressNext": asyncgrpc.unary_stream_rpc_method_handler(uncompressed_next),
            "EchoLen": asyncgrpc.unary_unary_rpc_method_handler(echo_len)}


def _bytes_for(proxy, fn):
    before = proxy.downstream
    fn()
    time.sleep(0.1)
    return proxy.downstream - before


@pytest.mark.parametrize("default", [None, grpc.Compression.Gzip])
def test_response_compression_on_the_wire(server_thread, default):
    server_thread.start(lambda s: s.add_registered_method_handlers(SERVICE, _compression_handlers()),
                        compression=default)
    proxy = CountingProxy(server_thread.port)
    try:
        options = [("grpc.max_receive_message_length", 8 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=options) as channel:
            call = lambda name: channel.unary_unary(path(name))(b"", timeout=10)  # noqa: E731
            assert call("Plain") == BIG                     # warm up the connection
            per_call = _bytes_for(proxy, lambda: call("PerCall") == BIG or pytest.fail())
            plain = _bytes_for(proxy, lambda: call("Plain") == BIG or pytest.fail())
            stream = _bytes_for(proxy, lambda: list(channel.unary_stream(path("NoCompressNext"))(
                b"", timeout=10)) == [BIG, BIG] or pytest.fail())
    finally:
        proxy.close()
    assert per_call < len(BIG) / 10                # set_compression(Gzip) compressed it
    if default is None:
        assert plain > len(BIG)                    # no default: sent as is
    else:
        assert plain < len(BIG) / 10               # server(compression=Gzip) default
    # first message uncompressed, second compressed with deflate
    assert len(BIG) < stream < 1.5 * len(BIG)


@pytest.mark.parametrize("algorithm", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests_are_accepted(server_thread, algorithm):
    server_thread.start(lambda s: add_stream_methods(s, _compression_handlers()))
    with grpc.insecure_channel(server_thread.target, compression=algorithm) as channel:
        assert channel.unary_unary(path("EchoLen"))(BIG, timeout=10) == str(len(BIG)).encode()
        assert channel.stream_unary(path("Total"))(
            (str(i).encode() * 100 for i in range(10)), timeout=10).startswith(b"10:")


# ---------------------------------------------------------------- limits

def test_max_send_message_length(server_thread):
    server_thread.start(lambda s: s.add_registered_method_handlers(SERVICE, _compression_handlers()),
                        options=[("grpc.max_send_message_length", 1000)])
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("Plain"))(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_max_receive_message_length_on_a_stream(server_thread):
    server_thread.start(add_stream_methods, options=[("grpc.max_receive_message_length", 100)])
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(channel.stream_stream(path("Echo"))(iter([b"ok", b"x" * 1000]), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_read_write_outside_their_kind_is_a_usage_error(server_thread, recorder):
    async def unary(request, context):
        try:
            await context.read()
        except asyncgrpc.UsageError as exc:
            recorder.add(str(exc))
        try:
            await context.write(b"x")
        except asyncgrpc.UsageError as exc:
            recorder.add(str(exc))
        return b"ok"
    server_thread.start(lambda s: s.add_registered_method_handlers(
        SERVICE, {"Unary": asyncgrpc.unary_unary_rpc_method_handler(unary)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary(path("Unary"))(b"", timeout=10) == b"ok"
    assert len(recorder.items) == 2


def test_bad_request_in_a_stream_is_internal(server_thread):
    import helloworld_pb2

    async def names(request_iterator, context):
        async for request in request_iterator:
            yield request.name.encode()
    handler = asyncgrpc.stream_stream_rpc_method_handler(
        names, request_deserializer=helloworld_pb2.HelloRequest.FromString)
    server_thread.start(lambda s: s.add_registered_method_handlers(SERVICE, {"Names": handler}))
    good = helloworld_pb2.HelloRequest(name="ok").SerializeToString()
    with grpc.insecure_channel(server_thread.target) as channel:
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for message in channel.stream_stream(path("Names"))(iter([good, b"\xff\xff"]),
                                                                timeout=10):
                got.append(message)
    assert got == [b"ok"]
    assert info.value.code() == grpc.StatusCode.INTERNAL


def test_unserializable_stream_response_is_internal(server_thread):
    import helloworld_pb2

    async def bad(request, context):
        yield helloworld_pb2.HelloReply(message="fine")
        yield "not a HelloReply"
    handler = asyncgrpc.unary_stream_rpc_method_handler(
        bad, response_serializer=helloworld_pb2.HelloReply.SerializeToString)
    server_thread.start(lambda s: s.add_registered_method_handlers(SERVICE, {"Bad": handler}))
    with grpc.insecure_channel(server_thread.target) as channel:
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for message in channel.unary_stream(path("Bad"))(b"", timeout=10):
                got.append(message)
    assert len(got) == 1
    assert info.value.code() == grpc.StatusCode.INTERNAL


def test_read_and_write_work_with_asyncio_helpers(server_thread, recorder):
    """read()/write() work under asyncio.wait_for and gather; a read() cut
    short by wait_for loses no message (the next read() gets it)."""
    async def patient(request_iterator, context):
        timeouts = 0
        while True:
            try:
                message = await asyncio.wait_for(context.read(), 0.1)
            except asyncio.TimeoutError:
                timeouts += 1
                continue
            if message is asyncgrpc.EOF:
                break
            await asyncio.wait_for(context.write(message), 5)
            (echoed,) = await asyncio.gather(asyncio.sleep(0, message))
            await context.write(echoed + b"!")
        recorder.add(timeouts)
    server_thread.start(lambda s: s.add_registered_method_handlers(
        SERVICE, {"Patient": asyncgrpc.stream_stream_rpc_method_handler(patient)}))

    async def slow_requests():
        for m in (b"a", b"b"):
            await asyncio.sleep(0.35)
            yield m

    async def main():
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            call = channel.stream_stream(path("Patient"))(slow_requests(), timeout=10)
            return [m async for m in call]
    assert asyncio.run(main()) == [b"a", b"a!", b"b", b"b!"]
    assert recorder.items[0] >= 2          # reads timed out, and no message was lost
