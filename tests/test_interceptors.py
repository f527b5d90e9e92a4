"""Server interceptors with grpc.aio's semantics: order, pass-through,
wrapping, replacing and refusing handlers, errors, cancellation and
contextvars, for all four RPC kinds, registered and generic methods."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from typing import Any, Optional

import grpc
import grpc.aio
import pytest

import asyncgrpc

import _kinds
from _kinds import KINDS

HOW = ["registered", "generic"]


class Recording(asyncgrpc.ServerInterceptor):
    """Notes (name, method, x-id metadata) and passes the call on."""

    def __init__(self, name: str, recorder: Any) -> None:
        self.name = name
        self.recorder = recorder

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        md = {m.key: m.value for m in details.invocation_metadata}
        self.recorder.add((self.name, details.method, md.get("x-id")))
        return await continuation(details)


class GrpcRecording(grpc.aio.ServerInterceptor):
    """The same, written against grpcio's base class."""

    def __init__(self, name: str, recorder: Any) -> None:
        self.name = name
        self.recorder = recorder

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.recorder.add((self.name, details.method,
                           dict(details.invocation_metadata).get("x-id")))
        return await continuation(details)


@pytest.mark.parametrize("how", HOW)
def test_interceptors_run_in_order_for_every_kind(server_thread, recorder, how):
    server_thread.start(lambda s: _kinds.add(s, how, _kinds.handlers()),
                        interceptors=[Recording("first", recorder),
                                      GrpcRecording("second", recorder)])
    with grpc.insecure_channel(server_thread.target) as channel:
        for kind in KINDS:
            name = uuid.uuid4().hex[:8]
            assert _kinds.call(channel, kind, name, metadata=(("x-id", name),)) \
                == _kinds.expected(kind, name)
            method = _kinds.path(kind)
            assert recorder.items[-2:] == [("first", method, name), ("second", method, name)]
    assert len(recorder.items) == 2 * len(KINDS)


def wrap(handler: Any, tag: str) -> Any:
    """``handler`` with a behavior that adds ``tag`` to each reply and sets
    trailing metadata, of the same kind and serializers."""
    inner = (handler.unary_unary or handler.unary_stream or handler.stream_unary
             or handler.stream_stream)
    kind = _kinds.KINDS[2 * handler.request_streaming + handler.response_streaming]
    if handler.response_streaming:
        async def behavior(request: Any, context: Any) -> Any:
            context.set_trailing_metadata((("x-wrapped", tag),))
            async for reply in inner(request, context):
                yield _kinds.Rep(message=f"{reply.message} [{tag}]")
    else:
        async def behavior(request: Any, context: Any) -> Any:
            context.set_trailing_metadata((("x-wrapped", tag),))
            reply = await inner(request, context)
            return _kinds.Rep(message=f"{reply.message} [{tag}]")
    return getattr(grpc, f"{kind}_rpc_method_handler")(
        behavior, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class Wrapping(asyncgrpc.ServerInterceptor):
    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        return None if handler is None else wrap(handler, self.tag)


@pytest.mark.parametrize("how", HOW)
def test_wrapping_interceptors_nest_in_order(server_thread, how):
    server_thread.start(lambda s: _kinds.add(s, how, _kinds.handlers()),
                        interceptors=[Wrapping("outer"), Wrapping("inner")])
    with grpc.insecure_channel(server_thread.target) as channel:
        for kind in KINDS:
            name = uuid.uuid4().hex[:8]
            got = _kinds.call(channel, kind, name)
            # the first interceptor's wrapper runs outermost
            assert got == [f"{m} [inner] [outer]" for m in _kinds.expected(kind, name)], kind


def str_handler(kind: str) -> Any:
    """A handler of ``kind`` on str messages (utf-8), unlike the protobuf
    ones it replaces: the final handler's serializers must be used."""
    async def uu(request: str, context: Any) -> str:
        return f"replaced {request}"

    async def us(request: str, context: Any) -> Any:
        yield f"replaced {request}"

    async def su(requests: Any, context: Any) -> str:
        return "replaced " + ",".join([r async for r in requests])

    async def ss(requests: Any, context: Any) -> Any:
        async for r in requests:
            yield f"replaced {r}"
    behavior = {"unary_unary": uu, "unary_stream": us, "stream_unary": su,
                "stream_stream": ss}[kind]
    return getattr(grpc, f"{kind}_rpc_method_handler")(
        behavior, request_deserializer=bytes.decode, response_serializer=str.encode)


class Replacing(asyncgrpc.ServerInterceptor):
    """Serves /test.Kinds/* with str handlers instead of the real ones, and
    /test.Other/<kind> (which no handler serves) too."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        for kind in KINDS:
            if details.method in (_kinds.path(kind), f"/test.Other/{kind}"):
                return str_handler(kind)
        return await continuation(details)


@pytest.mark.parametrize("how", HOW)
def test_interceptor_replaces_handler_and_its_serializers_are_used(server_thread, how):
    server_thread.start(lambda s: _kinds.add(s, how, _kinds.handlers()),
                        interceptors=[Replacing()])
    with grpc.insecure_channel(server_thread.target) as channel:
        for kind in KINDS:
            for method in (_kinds.path(kind), f"/test.Other/{kind}"):
                multi = getattr(channel, kind)(method)
                if kind.startswith("unary_"):
                    result = multi(b"x1", timeout=10)
                else:
                    result = multi(iter([b"x1", b"x2"]), timeout=10)
                got = [result] if kind.endswith("_unary") else list(result)
                want = {"unary_unary": [b"replaced x1"], "unary_stream": [b"replaced x1"],
                        "stream_unary": [b"replaced x1,x2"],
                        "stream_stream": [b"replaced x1", b"replaced x2"]}[kind]
                assert got == want, (kind, method)


class Refusing(asyncgrpc.ServerInterceptor):
    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if dict(details.invocation_metadata).get("x-refuse"):
            return None
        return await continuation(details)


@pytest.mark.parametrize("how", HOW)
def test_interceptor_returning_none_is_unimplemented(server_thread, how):
    server_thread.start(lambda s: _kinds.add(s, how, _kinds.handlers()),
                        interceptors=[Refusing()])
    with grpc.insecure_channel(server_thread.target) as channel:
        for kind in KINDS:
            with pytest.raises(grpc.RpcError) as info:
                _kinds.call(channel, kind, metadata=(("x-refuse", "1"),))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, kind
            assert info.value.details() == "Method not found!"
            name = uuid.uuid4().hex[:8]
            assert _kinds.call(channel, kind, name) == _kinds.expected(kind, name)
        with pytest.raises(grpc.RpcError) as info:
            _kinds.call(channel, "unary_unary", method="/no.Such/Method")
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


class Rerouting(asyncgrpc.ServerInterceptor):
    """Hands the continuation other details: the handler is looked up for
    the method it names, as with grpc.aio."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.startswith("/test.Alias/"):
            details = asyncgrpc.HandlerCallDetails(
                details.method.replace("/test.Alias/", f"/{_kinds.SERVICE}/"),
                details.invocation_metadata)
        return await continuation(details)


def test_continuation_looks_up_the_details_it_is_given(server_thread):
    server_thread.start(lambda s: _kinds.add(s, "registered", _kinds.handlers()),
                        interceptors=[Rerouting()])
    with grpc.insecure_channel(server_thread.target) as channel:
        for kind in KINDS:
            name = uuid.uuid4().hex[:8]
            alias = _kinds.path(kind).replace(f"/{_kinds.SERVICE}/", "/test.Alias/")
            assert _kinds.call(channel, kind, name, method=alias) == _kinds.expected(kind, name)


class Raising(asyncgrpc.ServerInterceptor):
    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        raise ValueError(f"boom in {details.method}")


@pytest.mark.parametrize("how", HOW)
def test_interceptor_exception_is_unknown_and_logged(server_thread, caplog, how):
    server_thread.start(lambda s: _kinds.add(s, how, _kinds.handlers()),
                        interceptors=[Raising()])
    with caplog.at_level(logging.ERROR, logger="asyncgrpc"):
        with grpc.insecure_channel(server_thread.target) as channel:
            for kind in KINDS:
                with pytest.raises(grpc.RpcError) as info:
                    _kinds.call(channel, kind)
                assert info.value.code() == grpc.StatusCode.UNKNOWN, kind
                # grpc.aio's wording
                assert info.value.details() == \
                    f"Unexpected <class 'ValueError'>: boom in {_kinds.path(kind)}"
    assert "boom in /test.Kinds/SS" in caplog.text and "Traceback" in caplog.text


class Blocking(asyncgrpc.ServerInterceptor):
    """Waits forever (until cancelled) for calls with x-block metadata."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        tag = dict(details.invocation_metadata).get("x-block")
        if tag:
            self.recorder.add(("waiting", tag))
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.recorder.add(("cancelled", tag))
                raise
        return await continuation(details)


@pytest.mark.parametrize("how", HOW)
def test_interceptor_is_cancelled_with_the_rpc(server_thread, recorder, how):
    server_thread.start(lambda s: _kinds.add(s, how, _kinds.handlers()),
                        interceptors=[Blocking(recorder)])
    with grpc.insecure_channel(server_thread.target) as channel:
        for kind in ("unary_unary", "stream_stream"):
            with pytest.raises(grpc.RpcError) as info:
                _kinds.call(channel, kind, metadata=(("x-block", kind),), timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert recorder.wait_for(lambda items: ("cancelled", kind) in items), recorder.items
        # the server still serves
        assert _kinds.call(channel, "unary_unary", "ok") == ["uu ok"]


def test_stop_cancels_interceptors_in_flight(server_thread, recorder):
    server_thread.start(lambda s: _kinds.add(s, "registered", _kinds.handlers()),
                        interceptors=[Blocking(recorder)])

    async def main() -> Any:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            calls = [channel.unary_unary(_kinds.path("unary_unary"))(
                _kinds.Req(name="a").SerializeToString(), metadata=(("x-block", "uu"),)),
                channel.stream_stream(_kinds.path("stream_stream"))(
                    iter([]), metadata=(("x-block", "ss"),))]
            while len(recorder.items) < 2:
                await asyncio.sleep(0.01)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                server_thread.server.stop(None), server_thread.loop))
            return [await c.code() for c in calls]
    codes = asyncio.run(main())
    assert all(c != grpc.StatusCode.OK for c in codes), codes
    assert {("cancelled", "uu"), ("cancelled", "ss")} <= set(recorder.items)


REQUEST_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("request_id",
                                                                            default=None)


class SettingContextVar(asyncgrpc.ServerInterceptor):
    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        REQUEST_ID.set(dict(details.invocation_metadata).get("x-id"))
        return await continuation(details)


@pytest.mark.parametrize("how", HOW)
def test_contextvars_set_by_interceptor_reach_only_their_handler(server_thread, how):
    def seen(context: Any) -> str:
        return f"{REQUEST_ID.get()}|{dict(context.invocation_metadata()).get('x-id')}"

    async def uu(request: Any, context: Any) -> Any:
        return _kinds.Rep(message=seen(context))

    async def ss(request_iterator: Any, context: Any) -> Any:
        async for r in request_iterator:
            yield _kinds.Rep(message=seen(context))
    table = _kinds.handlers({"unary_unary": uu, "stream_stream": ss})
    server_thread.start(lambda s: _kinds.add(s, how, table), interceptors=[SettingContextVar()])

    async def main() -> None:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            uu_call = channel.unary_unary(_kinds.path("unary_unary"),
                                          request_serializer=_kinds.Req.SerializeToString,
                                          response_deserializer=_kinds.Rep.FromString)
            # One after the other: with calls waiting in the core, a call may
            # be handed another's metadata (see test_dropin.py::
            # test_concurrent_calls_each_see_their_own_metadata).
            for _ in range(5):
                i = uuid.uuid4().hex
                reply = await uu_call(_kinds.Req(), metadata=(("x-id", i),), timeout=10)
                assert reply.message == f"{i}|{i}"
            # a call without the metadata sees the default, not a leftover
            assert (await uu_call(_kinds.Req(), timeout=10)).message == "None|None"
            ss_call = channel.stream_stream(_kinds.path("stream_stream"),
                                            request_serializer=_kinds.Req.SerializeToString,
                                            response_deserializer=_kinds.Rep.FromString)
            got = [r.message async for r in ss_call(iter([_kinds.Req()]),
                                                    metadata=(("x-id", "s1"),), timeout=10)]
            assert got == ["s1|s1"]
    asyncio.run(main())


def test_sync_handlers_behind_interceptors(server_thread, recorder):
    import threading

    def uu(request: Any, context: Any) -> Any:
        return _kinds.Rep(message=f"{request.name} on {threading.current_thread().name}")

    def ss(request_iterator: Any, context: Any) -> Any:
        for r in request_iterator:
            yield _kinds.Rep(message=f"{r.name} on {threading.current_thread().name}")
    table = _kinds.handlers({"unary_unary": uu, "stream_stream": ss})
    server_thread.start(lambda s: _kinds.add(s, "registered", table),
                        interceptors=[Recording("r", recorder)])
    loop_thread = f"server-{server_thread.loop_kind}"
    with grpc.insecure_channel(server_thread.target) as channel:
        (reply,) = _kinds.call(channel, "unary_unary", "a")
        assert reply.startswith("a on ") and loop_thread not in reply
        replies = _kinds.call(channel, "stream_stream", "b")
        assert [r.split(" on ")[0] for r in replies] == ["b-0", "b-1"]
        assert all(loop_thread not in r for r in replies)
    assert [i[0] for i in recorder.items] == ["r", "r"]


def test_interceptor_replacing_unary_with_other_kind_fails_loudly(server_thread):
    """asyncgrpc needs a registered unary-unary method's final handler to be
    unary-unary too (the core already read it as such): a clear UNKNOWN."""
    class Streaming(asyncgrpc.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            return str_handler("unary_stream")
    server_thread.start(lambda s: _kinds.add(s, "registered", _kinds.handlers()),
                        interceptors=[Streaming()])
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _kinds.call(channel, "unary_unary")
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert "unary_stream handler" in info.value.details()


def test_invalid_interceptor_is_rejected_like_grpc_aio():
    with pytest.raises(ValueError, match="Interceptor must be ServerInterceptor"):
        asyncgrpc.server(interceptors=[object()])


def test_server_interceptor_base_is_abstract_and_registered_with_grpc():
    with pytest.raises(TypeError):
        asyncgrpc.ServerInterceptor()    # intercept_service is abstract
    server = asyncgrpc.server()          # registers asyncgrpc's classes with grpc's ABCs
    asyncio.run(server.stop(None))
    assert isinstance(SettingContextVar(), grpc.aio.ServerInterceptor)
