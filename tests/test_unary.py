"""Unary RPCs through asyncgrpc, with grpcio sync and aio clients as peers."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
import grpc.aio
import pytest

import asyncgrpc

import helloworld_pb2
import helloworld_pb2_grpc

SERVICE = "test.Unary"


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


class Greeter(helloworld_pb2_grpc.GreeterServicer):
    """A servicer written for grpc.aio, used unchanged."""

    async def SayHello(self, request, context):
        return helloworld_pb2.HelloReply(message=f"Hello {request.name}")


def add_raw_methods(server, methods, register=True):
    """Serve raw-bytes methods under test.Unary, either registered with the
    core (fast path) or only through a generic handler (per-call lookup)."""
    handlers = {name: asyncgrpc.unary_unary_rpc_method_handler(fn)
                for name, fn in methods.items()}
    if register:
        server.add_registered_method_handlers(SERVICE, handlers)
    else:
        class Generic(asyncgrpc.GenericRpcHandler):
            def service(self, details):
                return handlers.get(details.method.rsplit("/", 1)[-1]) \
                    if details.method.startswith(f"/{SERVICE}/") else None
        server.add_generic_rpc_handlers([Generic()])


def test_greeter_servicer_unchanged_sync_client(server_thread):
    server_thread.start(lambda s: helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), s))
    with grpc.insecure_channel(server_thread.target) as channel:
        stub = helloworld_pb2_grpc.GreeterStub(channel)
        reply = stub.SayHello(helloworld_pb2.HelloRequest(name="world"), timeout=10)
    assert reply.message == "Hello world"


def test_greeter_servicer_unchanged_aio_client(server_thread):
    server_thread.start(lambda s: helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), s))

    async def main():
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            stub = helloworld_pb2_grpc.GreeterStub(channel)
            replies = await asyncio.gather(*[
                stub.SayHello(helloworld_pb2.HelloRequest(name=str(i)), timeout=10)
                for i in range(50)])
        return [r.message for r in replies]
    assert asyncio.run(main()) == [f"Hello {i}" for i in range(50)]


@pytest.mark.parametrize("register", [True, False], ids=["registered", "generic"])
def test_raw_echo_and_empty_message(server_thread, register):
    async def echo(request, context):
        return request[::-1]
    server_thread.start(lambda s: add_raw_methods(s, {"Echo": echo}, register))
    with grpc.insecure_channel(server_thread.target) as channel:
        call = channel.unary_unary(path("Echo"))
        assert call(b"abc", timeout=10) == b"cba"
        assert call(b"", timeout=10) == b""
        big = bytes(range(256)) * 4096       # 1 MiB
        assert call(big, timeout=10) == big[::-1]


def test_sync_handler_runs_on_migration_thread_pool(server_thread, thread_pool):
    import threading
    seen = []

    def blocking(request, context):
        seen.append(threading.current_thread().name)
        time.sleep(0.05)
        return b"done:" + request
    server_thread.start(lambda s: add_raw_methods(s, {"Block": blocking}),
                        migration_thread_pool=thread_pool)
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary(path("Block"))(b"x", timeout=10) == b"done:x"
    assert seen and seen[0] != f"server-{server_thread.loop_kind}"


def test_grpcio_generic_handler_accepted(server_thread):
    async def hello(request, context):
        return b"hi " + request
    handler = grpc.method_handlers_generic_handler(
        "test.GrpcGeneric", {"Hello": grpc.unary_unary_rpc_method_handler(hello)})
    server_thread.start(lambda s: s.add_generic_rpc_handlers((handler,)))
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary("/test.GrpcGeneric/Hello")(b"you", timeout=10) == b"hi you"


# ---------------------------------------------------------------- metadata

def test_metadata_both_ways_with_binary_values(server_thread, recorder):
    blob = bytes(range(256))

    async def meta(request, context):
        recorder.add(dict(context.invocation_metadata()))
        await context.send_initial_metadata((("x-initial", "hello"), ("x-initial-bin", blob)))
        context.set_trailing_metadata((("x-trailing", "bye"), ("x-trailing-bin", b"\x00\xff\n")))
        return b"ok"
    server_thread.start(lambda s: add_raw_methods(s, {"Meta": meta}))
    with grpc.insecure_channel(server_thread.target) as channel:
        response, call = channel.unary_unary(path("Meta")).with_call(
            b"", timeout=10,
            metadata=(("x-client", "value"), ("x-client-bin", blob[::-1])))
    assert response == b"ok"
    seen = recorder.items[0]
    assert seen["x-client"] == "value"
    assert seen["x-client-bin"] == blob[::-1]
    initial = dict(call.initial_metadata())
    assert initial["x-initial"] == "hello"
    assert initial["x-initial-bin"] == blob
    trailing = dict(call.trailing_metadata())
    assert trailing["x-trailing"] == "bye"
    assert trailing["x-trailing-bin"] == b"\x00\xff\n"


@pytest.mark.parametrize("bad, error", [
    ((("Upper-Case", "v"),), ValueError),
    ((("x-key", b"bytes-on-text-key"),), None),   # bytes on a text key are accepted as grpc.aio does
    ((("x-key", 123),), TypeError),
    ((("x-bin", 123),), TypeError),
    ((("x-key", "line\nbreak"),), ValueError),
    (("not-a-pair",), TypeError),
    ((("", "empty"),), ValueError),
])
def test_invalid_metadata_raises_in_handler(server_thread, recorder, bad, error):
    async def handler(request, context):
        try:
            context.set_trailing_metadata(bad)
        except Exception as exc:          # report what the handler saw
            recorder.add(exc)
            return type(exc).__name__.encode() + b": " + str(exc).encode()
        recorder.add(None)
        return b"accepted"
    server_thread.start(lambda s: add_raw_methods(s, {"Bad": handler}))
    with grpc.insecure_channel(server_thread.target) as channel:
        reply = channel.unary_unary(path("Bad"))(b"", timeout=10)
    seen = recorder.items[0]
    if error is None:
        assert seen is None and reply == b"accepted"
    else:
        assert isinstance(seen, error), reply
        assert b"metadata" in reply


def test_invalid_initial_metadata_raises_and_rpc_still_answers(server_thread):
    async def handler(request, context):
        with pytest.raises(ValueError, match="invalid metadata key"):
            await context.send_initial_metadata((("Bad Key", "v"),))
        return b"still fine"
    server_thread.start(lambda s: add_raw_methods(s, {"BadInitial": handler}))
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary(path("BadInitial"))(b"", timeout=10) == b"still fine"


# ---------------------------------------------------------------- statuses

NON_OK = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]
DETAILS = "détails — ошибка — 詳細 ✓"


@pytest.mark.parametrize("code", NON_OK, ids=lambda c: c.name)
def test_abort_every_code(server_thread, code):
    async def handler(request, context):
        await context.abort(code, DETAILS, trailing_metadata=(("x-why", "abort"),))
    server_thread.start(lambda s: add_raw_methods(s, {"Abort": handler}))
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("Abort"))(b"", timeout=10)
    assert info.value.code() == code
    assert info.value.details() == DETAILS
    assert dict(info.value.trailing_metadata())["x-why"] == "abort"


@pytest.mark.parametrize("code", NON_OK, ids=lambda c: c.name)
def test_set_code_every_code_with_asyncgrpc_status(server_thread, code):
    ours = getattr(asyncgrpc.StatusCode, code.name)

    async def handler(request, context):
        context.set_code(ours)
        context.set_details(DETAILS)
        assert context.code() is ours and context.details() == DETAILS
        return b"discarded"
    server_thread.start(lambda s: add_raw_methods(s, {"SetCode": handler}))
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("SetCode"))(b"", timeout=10)
    assert info.value.code() == code
    assert info.value.details() == DETAILS


def test_abort_ok_becomes_unknown_and_swallowed_abort_still_ends(server_thread):
    async def ok_abort(request, context):
        await context.abort(grpc.StatusCode.OK, "not ok")

    async def swallowed(request, context):
        try:
            await context.abort(asyncgrpc.StatusCode.NOT_FOUND, "gone")
        except asyncgrpc.AbortError:
            pass
        return b"ignored"
    server_thread.start(lambda s: add_raw_methods(s, {"OkAbort": ok_abort, "Swallow": swallowed}))
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("OkAbort"))(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNKNOWN
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("Swallow"))(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "gone"


def test_handler_exception_is_unknown_and_logged(server_thread, caplog):
    async def boom(request, context):
        raise ValueError("kaputt")

    async def boom_with_code(request, context):
        context.set_code(grpc.StatusCode.PERMISSION_DENIED)
        raise RuntimeError("denied")
    server_thread.start(lambda s: add_raw_methods(s, {"Boom": boom, "BoomCode": boom_with_code}))
    with caplog.at_level(logging.ERROR, logger="asyncgrpc"):
        with grpc.insecure_channel(server_thread.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(path("Boom"))(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNKNOWN
            assert "kaputt" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(path("BoomCode"))(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    records = [r for r in caplog.records if "Boom" in r.getMessage()]
    assert records, caplog.text
    assert records[0].exc_info and records[0].exc_info[0] is ValueError
    assert "kaputt" in caplog.text and "Traceback" in caplog.text


def test_handler_raising_before_await_and_returning_non_awaitable(server_thread):
    def not_async(request, context):      # a sync handler that raises
        raise KeyError("sync")

    class Weird:
        async def __call__(self, request, context):
            return b"callable object"
    server_thread.start(lambda s: add_raw_methods(s, {"Sync": not_async, "Obj": Weird()}))
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("Sync"))(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNKNOWN
        assert channel.unary_unary(path("Obj"))(b"", timeout=10) == b"callable object"


def test_unknown_method_and_service_are_unimplemented(server_thread):
    server_thread.start(lambda s: helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), s))
    with grpc.insecure_channel(server_thread.target) as channel:
        for method in ("/helloworld.Greeter/NoSuchMethod", "/no.such.Service/Method"):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(method)(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, method


def test_bad_request_bytes_is_internal(server_thread):
    server_thread.start(lambda s: helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), s))
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/helloworld.Greeter/SayHello")(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL


def test_unserializable_response_is_internal(server_thread):
    async def wrong_type(request, context):
        return "a str, not a HelloReply"

    async def none_reply(request, context):
        return None
    methods = {"Wrong": asyncgrpc.unary_unary_rpc_method_handler(
        wrong_type, response_serializer=helloworld_pb2.HelloReply.SerializeToString),
        "NoneRaw": asyncgrpc.unary_unary_rpc_method_handler(none_reply)}
    server_thread.start(lambda s: s.add_registered_method_handlers(SERVICE, methods))
    with grpc.insecure_channel(server_thread.target) as channel:
        for name in ("Wrong", "NoneRaw"):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(path(name))(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.INTERNAL, name


def test_maximum_concurrent_rpcs_rejects_beyond_limit(server_thread):
    release = asyncio.Event()

    async def hold(request, context):
        await release.wait()
        return b"held"
    server_thread.start(lambda s: add_raw_methods(s, {"Hold": hold}), maximum_concurrent_rpcs=2)

    async def main():
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            method = channel.unary_unary(path("Hold"))
            held = [asyncio.ensure_future(method(b"", timeout=10)) for _ in range(2)]
            while server_thread.server._core.active_calls < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await method(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            server_thread.loop.call_soon_threadsafe(release.set)
            return await asyncio.gather(*held)
    assert asyncio.run(main()) == [b"held", b"held"]


def test_thousand_concurrent_rpcs(server_thread):
    async def slow_echo(request, context):
        await asyncio.sleep(0.01)
        return request
    server_thread.start(lambda s: add_raw_methods(s, {"Echo": slow_echo}))

    async def main():
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            method = channel.unary_unary(path("Echo"))
            payloads = [str(i).encode() for i in range(1000)]
            return payloads, await asyncio.gather(*[method(p, timeout=60) for p in payloads])
    sent, received = asyncio.run(main())
    assert received == sent


def test_stats_count_events_per_rpc(server_thread):
    async def echo(request, context):
        return request
    server_thread.start(lambda s: add_raw_methods(s, {"Echo": echo}))
    with grpc.insecure_channel(server_thread.target) as channel:
        method = channel.unary_unary(path("Echo"))
        method(b"warm", timeout=10)
        time.sleep(0.2)          # let the warm-up RPC's last events land
        before = asyncgrpc.stats()
        for _ in range(20):
            method(b"x", timeout=10)
    time.sleep(0.2)
    after = asyncgrpc.stats()
    rpcs = after["rpcs_finished"] - before["rpcs_finished"]
    events = after["events"] - before["events"]
    assert rpcs == 20
    # new call + final batch + recv-close: three completion events per RPC
    assert events == 3 * rpcs
    assert after["wakeups"] > before["wakeups"]
    assert after["eventfd_writes"] - before["eventfd_writes"] <= events


def test_peer_and_auth_context_on_insecure_port(server_thread, recorder):
    async def who(request, context):
        recorder.add((context.peer(), context.auth_context(),
                      context.peer_identities(), context.peer_identity_key()))
        return b""
    server_thread.start(lambda s: add_raw_methods(s, {"Who": who}))
    with grpc.insecure_channel(server_thread.target) as channel:
        channel.unary_unary(path("Who"))(b"", timeout=10)
    peer, auth, identities, key = recorder.items[0]
    assert peer.startswith("ipv4:127.0.0.1:")
    assert auth.get("transport_security_type") == [b"insecure"]
    assert identities is None and key is None
