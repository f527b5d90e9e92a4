"""Plain ``def`` handlers get grpc's synchronous ServicerContext: abort()
raises and its status reaches the client, the context's methods work from
the handler's thread, every kind runs on the migration thread pool, and
request-streaming handlers get a blocking iterator."""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
import uuid
from typing import Any, Iterator, List

import grpc
import grpc.aio
import pytest

import asyncgrpc

import _kinds
from _kinds import KINDS


def aborting(kind: str, recorder: Any) -> Any:
    """A sync handler of ``kind`` that aborts (streaming replies: after one
    reply) and records what abort() raised; code after abort must not run."""
    def check_abort(context: Any) -> None:
        try:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"no {kind}",
                          (("x-why", kind),))
        except BaseException as exc:
            recorder.add((kind, type(exc), isinstance(exc, asyncgrpc.AbortError),
                          isinstance(exc, grpc.aio.AbortError)))
            raise
        recorder.add((kind, "abort returned"))

    def uu(request: Any, context: Any) -> Any:
        check_abort(context)
        return _kinds.Rep(message="after abort")

    def us(request: Any, context: Any) -> Iterator[Any]:
        yield _kinds.Rep(message="first")
        check_abort(context)
        yield _kinds.Rep(message="after abort")

    def su(request_iterator: Any, context: Any) -> Any:
        for _ in request_iterator:
            pass
        check_abort(context)
        return _kinds.Rep(message="after abort")

    def ss(request_iterator: Any, context: Any) -> Iterator[Any]:
        for r in request_iterator:
            yield _kinds.Rep(message=r.name)
            check_abort(context)
            yield _kinds.Rep(message="after abort")
    return {"unary_unary": uu, "unary_stream": us, "stream_unary": su, "stream_stream": ss}[kind]


def test_sync_abort_raises_and_its_status_reaches_the_client(server_thread, recorder):
    table = _kinds.handlers({k: aborting(k, recorder) for k in KINDS})
    server_thread.start(lambda s: _kinds.add(s, "registered", table))
    with grpc.insecure_channel(server_thread.target) as channel:
        for kind in KINDS:
            replies: List[str] = []
            multi = getattr(channel, kind)(_kinds.path(kind),
                                           request_serializer=_kinds.Req.SerializeToString,
                                           response_deserializer=_kinds.Rep.FromString)
            request = _kinds.Req(name="r0") if kind.startswith("unary_") \
                else iter([_kinds.Req(name="r0"), _kinds.Req(name="r1")])
            with pytest.raises(grpc.RpcError) as info:
                if kind.endswith("_stream"):
                    for reply in multi(request, timeout=10):
                        replies.append(reply.message)
                else:
                    multi(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, kind
            assert info.value.details() == f"no {kind}"
            assert dict(info.value.trailing_metadata())["x-why"] == kind
            # a streaming handler's replies before abort() arrive, none after
            assert replies == {"unary_stream": ["first"], "stream_stream": ["r0"]}.get(kind, [])
            assert recorder.wait_for(lambda items: any(i[0] == kind for i in items))
    for kind in KINDS:
        (entry,) = [i for i in recorder.items if i[0] == kind]
        assert entry[1:] == (entry[1], True, True), entry   # raised both AbortErrors


def test_sync_abort_with_status(server_thread):
    class Status:                      # the shape of grpc.Status
        code = grpc.StatusCode.FAILED_PRECONDITION
        details = "precondition"
        trailing_metadata = (("x-status-bin", b"\x00\x01"),)

    def handler(request: Any, context: Any) -> Any:
        context.abort_with_status(Status())
        return b"never"
    server_thread.start(lambda s: s.add_registered_method_handlers(
        "test.Sync", {"M": asyncgrpc.unary_unary_rpc_method_handler(handler)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/test.Sync/M")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "precondition"
    assert dict(info.value.trailing_metadata())["x-status-bin"] == b"\x00\x01"


def test_sync_context_methods_work_from_the_handler_thread(server_thread, recorder):
    loop_thread = f"server-{server_thread.loop_kind}"

    def handler(request: bytes, context: Any) -> bytes:
        assert threading.current_thread().name != loop_thread
        assert isinstance(context, grpc.ServicerContext)
        md = context.invocation_metadata()
        assert md[-1].key == "x-id" and md[-1] == ("x-id", request.decode())
        assert context.peer().startswith("ipv4:127.0.0.1:")
        assert 0 < context.time_remaining() <= 11   # deadline 10 s, as the core rounds it
        assert context.is_active() and not context.cancelled()
        assert context.auth_context()["transport_security_type"] == [b"insecure"]
        assert context.peer_identities() is None and context.peer_identity_key() is None
        context.send_initial_metadata((("x-initial", request.decode()),))
        with pytest.raises(ValueError):
            context.set_trailing_metadata((("Bad Key", "v"),))   # raises in this thread
        context.set_trailing_metadata((("x-trailing", request.decode()),))
        assert context.trailing_metadata() == (("x-trailing", request.decode()),)
        assert context.add_callback(lambda: recorder.add(("callback", request))) is True
        context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        context.set_details(f"exists {request.decode()}")
        assert context.code() == grpc.StatusCode.ALREADY_EXISTS
        assert context.details() == f"exists {request.decode()}"
        return b"discarded"
    server_thread.start(lambda s: s.add_registered_method_handlers(
        "test.Sync", {"M": asyncgrpc.unary_unary_rpc_method_handler(handler)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        for _ in range(3):
            rid = uuid.uuid4().hex
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/test.Sync/M")(rid.encode(), timeout=10,
                                                    metadata=(("x-id", rid),))
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert info.value.details() == f"exists {rid}"
            assert dict(info.value.initial_metadata())["x-initial"] == rid
            assert dict(info.value.trailing_metadata())["x-trailing"] == rid
            assert recorder.wait_for(lambda items: ("callback", rid.encode()) in items)


def test_add_callback_after_the_rpc_ended_returns_false(server_thread, recorder):
    def handler(request: bytes, context: Any) -> bytes:
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        recorder.add(context.add_callback(lambda: recorder.add("called")))
        return b"late"
    server_thread.start(lambda s: s.add_registered_method_handlers(
        "test.Sync", {"M": asyncgrpc.unary_unary_rpc_method_handler(handler)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/test.Sync/M")(b"", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert recorder.wait_for(lambda items: False in items)
    assert "called" not in recorder.items


@pytest.mark.parametrize("how", ["registered", "generic"])
def test_every_sync_kind_runs_on_the_migration_pool(server_thread, how):
    pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="migration")

    def where() -> str:
        return threading.current_thread().name

    def uu(request: Any, context: Any) -> Any:
        return _kinds.Rep(message=f"{request.name}@{where()}")

    def us(request: Any, context: Any) -> Any:        # a plain function returning a list
        return [_kinds.Rep(message=f"{request.name}.{i}@{where()}") for i in range(2)]

    def su(request_iterator: Any, context: Any) -> Any:
        names = [r.name for r in request_iterator]
        return _kinds.Rep(message=f"{','.join(names)}@{where()}")

    def ss(request_iterator: Any, context: Any) -> Any:
        first = where()                                # the call itself runs on the pool
        for r in request_iterator:
            yield _kinds.Rep(message=f"{r.name}@{first}/{where()}")
    table = _kinds.handlers({"unary_unary": uu, "unary_stream": us,
                             "stream_unary": su, "stream_stream": ss})
    try:
        server_thread.start(lambda s: _kinds.add(s, how, table), migration_thread_pool=pool)
        with grpc.insecure_channel(server_thread.target) as channel:
            name = uuid.uuid4().hex[:6]
            replies = {kind: _kinds.call(channel, kind, name) for kind in KINDS}
    finally:
        server_thread.stop()
        pool.shutdown(wait=True)
    texts = [r.split("@")[0] for rs in replies.values() for r in rs]
    assert texts == [name, f"{name}.0", f"{name}.1", f"{name}-0,{name}-1",
                     f"{name}-0", f"{name}-1"]
    places = [p for rs in replies.values() for r in rs for p in r.split("@")[1].split("/")]
    assert places and all(p.startswith("migration") for p in places), places


def test_sync_request_iterator_yields_each_message_as_it_arrives(server_thread):
    """Ping-pong: the client sends the next request only after the reply to
    the previous one, so a handler that read to the end first would hang."""
    def echo(request_iterator: Any, context: Any) -> Any:
        for request in request_iterator:
            yield request
    server_thread.start(lambda s: s.add_registered_method_handlers(
        "test.Sync", {"Echo": asyncgrpc.stream_stream_rpc_method_handler(echo)}))
    outbox: "queue.Queue[Any]" = queue.Queue()

    def requests() -> Iterator[bytes]:
        while True:
            item = outbox.get(timeout=10)
            if item is None:
                return
            yield item
    with grpc.insecure_channel(server_thread.target) as channel:
        outbox.put(b"0")
        responses = channel.stream_stream("/test.Sync/Echo")(requests(), timeout=20)
        got = []
        for i, reply in enumerate(responses):
            got.append(reply)
            outbox.put(str(i + 1).encode() if i < 19 else None)
    assert got == [str(i).encode() for i in range(20)]


def test_sync_stream_handler_sees_cancellation_and_frees_its_thread(server_thread, recorder):
    """A sync generator blocked waiting for requests ends when the client
    cancels; its pool thread is free again."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="only")
    started = threading.Event()

    def slow(request_iterator: Any, context: Any) -> Any:
        started.set()
        for request in request_iterator:      # blocks: the client sends nothing more
            yield request
        recorder.add(("iterator ended", context.is_active()))

    def quick(request: bytes, context: Any) -> bytes:
        return b"quick " + request
    try:
        server_thread.start(lambda s: s.add_registered_method_handlers("test.Sync", {
            "Slow": asyncgrpc.stream_stream_rpc_method_handler(slow),
            "Quick": asyncgrpc.unary_unary_rpc_method_handler(quick)}),
            migration_thread_pool=pool)
        with grpc.insecure_channel(server_thread.target) as channel:
            hold = threading.Event()

            def requests() -> Iterator[bytes]:
                hold.wait(10)
                return
                yield b""
            call = channel.stream_stream("/test.Sync/Slow")(requests(), timeout=20)
            assert started.wait(10)
            call.cancel()
            hold.set()
            assert recorder.wait_for(lambda items: ("iterator ended", False) in items)
            # the only pool thread serves the next call
            assert channel.unary_unary("/test.Sync/Quick")(b"x", timeout=10) == b"quick x"
    finally:
        server_thread.stop()
        pool.shutdown(wait=True)


def test_sync_cancel_ends_the_rpc_with_cancelled(server_thread, recorder):
    def handler(request: bytes, context: Any) -> bytes:
        context.cancel()
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        recorder.add(("active after cancel", context.is_active()))
        return b"dropped"
    server_thread.start(lambda s: s.add_registered_method_handlers(
        "test.Sync", {"M": asyncgrpc.unary_unary_rpc_method_handler(handler)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/test.Sync/M")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert recorder.wait_for(lambda items: ("active after cancel", False) in items)
