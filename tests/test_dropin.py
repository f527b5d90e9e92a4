"""A grpc.aio service moves to asyncgrpc.server() unchanged: grpc's type
checks and exceptions, metadata items, abort_with_status, handler
precedence, options and credentials errors, and the companion packages
(grpcio-health-checking, grpcio-reflection, grpcio-status, OpenTelemetry,
grpc-interceptor) used as their documentation says. Where grpc.aio's
behavior is the reference, the same code also runs on grpc.aio."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from typing import Any, Callable, Iterator, List, Tuple

import grpc
import grpc.aio
import pytest

import asyncgrpc

import _kinds
import helloworld_pb2
import helloworld_pb2_grpc
from _kinds import KINDS


@contextlib.contextmanager
def serving(server_thread: Any, impl: str, setup: Callable[[Any], None],
            **kwargs: Any) -> Iterator[str]:
    """Serve with ``asyncgrpc.server`` or ``grpc.aio.server`` (same setup
    code) on the test's server loop; yields the target."""
    if impl == "asyncgrpc":
        server_thread.start(setup, **kwargs)
        yield server_thread.target
        return

    async def go() -> Tuple[Any, int]:
        server = grpc.aio.server(**kwargs)
        setup(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port
    server, port = server_thread.call(go)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server_thread.call(lambda: server.stop(None))


IMPLS = ["asyncgrpc", "grpc.aio"]


# ------------------------------------------------------------ grpc's types

def test_grpc_isinstance_checks_and_abort_error(server_thread, recorder):
    async def handler(request: bytes, context: Any) -> bytes:
        recorder.add(("context", isinstance(context, grpc.aio.ServicerContext)))
        try:
            await context.abort(grpc.StatusCode.NOT_FOUND, "caught by grpc's class")
        except grpc.aio.AbortError as exc:        # grpc.aio code catches it
            recorder.add(("abort", isinstance(exc, asyncgrpc.AbortError)))
            raise
        return b"never"
    server_thread.start(lambda s: s.add_registered_method_handlers(
        "test.Dropin", {"Abort": asyncgrpc.unary_unary_rpc_method_handler(handler)}))
    assert isinstance(server_thread.server, grpc.aio.Server)
    with grpc.insecure_channel(server_thread.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/test.Dropin/Abort")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "caught by grpc's class"
    assert recorder.items == [("context", True), ("abort", True)]


@pytest.mark.parametrize("impl", IMPLS)
def test_invocation_metadata_items_have_key_and_value(server_thread, recorder, impl):
    async def handler(request: bytes, context: Any) -> bytes:
        md = context.invocation_metadata()
        recorder.add([(m.key, m.value, m == (m.key, m.value), isinstance(m, tuple)) for m in md])
        return dict(md)["x-id"].encode()
    blob = bytes(range(256))
    with serving(server_thread, impl, lambda s: s.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(
                "test.Dropin", {"Md": grpc.unary_unary_rpc_method_handler(handler)})])) as target:
        with grpc.insecure_channel(target) as channel:
            rid = uuid.uuid4().hex
            assert channel.unary_unary("/test.Dropin/Md")(
                b"", timeout=10, metadata=(("x-id", rid), ("x-blob-bin", blob))) == rid.encode()
    items = {key: rest for key, *rest in recorder.items[0]}
    assert items["x-id"] == [rid, True, True]
    assert items["x-blob-bin"] == [blob, True, True]


@pytest.mark.parametrize("how", ["registered", "generic"])
def test_concurrent_calls_each_see_their_own_metadata(server_thread, how):
    async def handler(request: Any, context: Any) -> Any:
        if request.name == "0":
            # Hold the loop a moment (as CPU-bound work would) so that the
            # other calls arrive and wait in the core meanwhile.
            time.sleep(0.3)
        return _kinds.Rep(message=f"{request.name}={dict(context.invocation_metadata()).get('x-id')}")
    server_thread.start(lambda s: _kinds.add(s, how, _kinds.handlers({"unary_unary": handler})),
                        blocked_loop_threshold=None)

    async def main() -> List[str]:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            call = channel.unary_unary(_kinds.path("unary_unary"),
                                       request_serializer=_kinds.Req.SerializeToString,
                                       response_deserializer=_kinds.Rep.FromString)
            replies = await asyncio.gather(*[
                call(_kinds.Req(name=str(i)), metadata=(("x-id", str(i)),), timeout=30)
                for i in range(300)])
            return [r.message for r in replies]
    assert asyncio.run(main()) == [f"{i}={i}" for i in range(300)]


# ------------------------------------------------------------ handler choice

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", ["generic_first", "registered_first"])
def test_registered_handler_wins_over_generic(server_thread, impl, order):
    async def registered(request: bytes, context: Any) -> bytes:
        return b"registered"

    async def generic(request: bytes, context: Any) -> bytes:
        return b"generic"

    def setup(server: Any) -> None:
        def add_generic() -> None:
            server.add_generic_rpc_handlers([
                grpc.method_handlers_generic_handler(
                    "test.Dropin", {"M": grpc.unary_unary_rpc_method_handler(generic)}),
                _kinds.Opaque({"M": grpc.unary_unary_rpc_method_handler(generic)})])

        def add_registered() -> None:
            server.add_registered_method_handlers(
                "test.Dropin", {"M": grpc.unary_unary_rpc_method_handler(registered)})
        for step in ((add_generic, add_registered) if order == "generic_first"
                     else (add_registered, add_generic)):
            step()
    with serving(server_thread, impl, setup) as target:
        with grpc.insecure_channel(target) as channel:
            assert channel.unary_unary("/test.Dropin/M")(b"", timeout=10) == b"registered"


def test_opaque_generic_handler_before_a_table_is_asked_first(server_thread):
    """Generic handlers are asked in order, as with grpc.aio: a table the
    server can read must not jump ahead of an earlier opaque handler."""
    async def first(request: bytes, context: Any) -> bytes:
        return b"first"

    async def second(request: bytes, context: Any) -> bytes:
        return b"second"
    server_thread.start(lambda s: s.add_generic_rpc_handlers([
        _kinds.Opaque({"M": grpc.unary_unary_rpc_method_handler(first)}),
        grpc.method_handlers_generic_handler(
            _kinds.SERVICE, {"M": grpc.unary_unary_rpc_method_handler(second),
                             "N": grpc.unary_unary_rpc_method_handler(second)})]))
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary(f"/{_kinds.SERVICE}/M")(b"", timeout=10) == b"first"
        assert channel.unary_unary(f"/{_kinds.SERVICE}/N")(b"", timeout=10) == b"second"


@pytest.mark.parametrize("impl", IMPLS)
def test_generic_handler_exception_reads_like_grpc_aio(server_thread, impl, caplog):
    class Broken(grpc.GenericRpcHandler):
        def service(self, handler_call_details: Any) -> Any:
            raise KeyError("lookup failed")
    with caplog.at_level(logging.CRITICAL):
        # server(handlers=[...]) adds generic handlers, as with grpc.aio
        with serving(server_thread, impl, lambda s: None, handlers=[Broken()]) as target:
            with grpc.insecure_channel(target) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    channel.unary_unary("/test.Dropin/Any")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert info.value.details() == "Unexpected <class 'KeyError'>: 'lookup failed'"


@pytest.mark.parametrize("impl", IMPLS)
def test_interceptor_none_and_error_statuses_match_grpc_aio(server_thread, impl, caplog):
    class Gate(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            what = dict(details.invocation_metadata).get("x-gate")
            if what == "none":
                return None
            if what == "raise":
                raise RuntimeError("gate broke")
            return await continuation(details)
    with caplog.at_level(logging.CRITICAL):
        with serving(server_thread, impl,
                     lambda s: _kinds.add(s, "registered", _kinds.handlers()),
                     interceptors=[Gate()]) as target:
            with grpc.insecure_channel(target) as channel:
                seen = []
                for kind in KINDS:
                    for gate in ("none", "raise"):
                        with pytest.raises(grpc.RpcError) as info:
                            _kinds.call(channel, kind, metadata=(("x-gate", gate),))
                        seen.append((kind, gate, info.value.code(), info.value.details()))
                    name = uuid.uuid4().hex[:6]
                    assert _kinds.call(channel, kind, name) == _kinds.expected(kind, name)
    for kind, gate, code, details in seen:
        if gate == "none":
            assert (code, details) == (grpc.StatusCode.UNIMPLEMENTED, "Method not found!"), kind
        else:
            assert (code, details) == (grpc.StatusCode.UNKNOWN,
                                       "Unexpected <class 'RuntimeError'>: gate broke"), kind


# ------------------------------------------------------------ configuration

def test_options_accept_float_and_bytes(server_thread):
    async def hello(request: bytes, context: Any) -> bytes:
        return b"hello " + request
    # grpc.aio takes these: bytes as a string argument, other types ignored
    options = [("grpc.primary_user_agent", b"dropin-test"),
               ("grpc.asyncgrpc_test_float", 0.5),
               ("grpc.max_receive_message_length", 1 << 20)]
    server_thread.start(lambda s: s.add_registered_method_handlers(
        "test.Dropin", {"Hello": asyncgrpc.unary_unary_rpc_method_handler(hello)}),
        options=options)
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary("/test.Dropin/Hello")(b"you", timeout=10) == b"hello you"


def test_grpcio_credentials_error_says_what_to_pass():
    server = asyncgrpc.server()
    try:
        with pytest.raises(TypeError) as info:
            server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(b"k", b"c")]))
        message = str(info.value)
        assert "asyncgrpc.ssl_server_credentials(...)" in message
        assert "same arguments" in message
    finally:
        asyncio.run(server.stop(None))


def test_out_of_order_server_calls_raise_where_grpc_aio_goes_on():
    """Documented differences (docs/parity.md): grpc.aio lets these pass."""
    async def main() -> None:
        server = asyncgrpc.server()
        with pytest.raises(RuntimeError, match="not started"):
            await server.wait_for_termination(0.01)      # grpc.aio: returns True
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            with pytest.raises(RuntimeError, match="already started"):
                server.add_generic_rpc_handlers([])        # grpc.aio: accepted
            with pytest.raises(RuntimeError, match="already started"):
                server.add_insecure_port("127.0.0.1:0")    # grpc.aio: accepted
        finally:
            await server.stop(None)
        assert await server.wait_for_termination(0.01) is False
    asyncio.run(main())


# ------------------------------------------------------------ grpcio-status

def rich_status(name: str) -> Any:
    """A google.rpc.Status with a BadRequest detail naming ``name``."""
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="name", description=f"bad {name}")]))
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"invalid {name}",
                             details=[detail])


def test_abort_with_rich_status_async_and_sync(server_thread):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    async def async_handler(request: bytes, context: Any) -> bytes:
        await context.abort_with_status(rpc_status.to_status(rich_status(request.decode())))
        return b"never"

    def sync_handler(request: bytes, context: Any) -> bytes:
        context.abort_with_status(rpc_status.to_status(rich_status(request.decode())))
        return b"never"
    server_thread.start(lambda s: s.add_registered_method_handlers("test.Dropin", {
        "Async": asyncgrpc.unary_unary_rpc_method_handler(async_handler),
        "Sync": asyncgrpc.unary_unary_rpc_method_handler(sync_handler)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        for method in ("Async", "Sync"):
            name = uuid.uuid4().hex[:8]
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(f"/test.Dropin/{method}")(name.encode(), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(info.value)
            assert status is not None and status.message == f"invalid {name}"
            bad = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(bad)
            assert bad.field_violations[0].description == f"bad {name}"


# ------------------------------------------------------------ health checking

def test_health_aio_servicer_check_and_watch(server_thread):
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    servicer = health.aio.HealthServicer()
    server_thread.start(lambda s: health_pb2_grpc.add_HealthServicer_to_server(servicer, s))
    server_thread.call(lambda: servicer.set("svc", health_pb2.HealthCheckResponse.SERVING))
    with grpc.insecure_channel(server_thread.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=10).status \
            == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="unknown"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server_thread.call(lambda: servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING))
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


def test_health_sync_servicer_check_and_watch_release_their_threads(server_thread):
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    servicer = health.HealthServicer()
    servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="health")
    try:
        server_thread.start(lambda s: health_pb2_grpc.add_HealthServicer_to_server(servicer, s),
                            migration_thread_pool=pool)
        with grpc.insecure_channel(server_thread.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # more watches, one after the other, than the pool has threads:
            # each cancelled watch must give its thread back
            for round_ in range(3):
                watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=10)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                watch.cancel()
            assert stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=10).status \
                == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server_thread.stop()
        pool.shutdown(wait=True)


# ------------------------------------------------------------ reflection

class Greeter(helloworld_pb2_grpc.GreeterServicer):
    async def SayHello(self, request: Any, context: Any) -> Any:
        return helloworld_pb2.HelloReply(message=f"Hello {request.name}")


def test_reflection_lists_and_describes_services(server_thread):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha import reflection
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    greeter_name = helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"].full_name

    def setup(server: Any) -> None:
        helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
        reflection.enable_server_reflection((greeter_name, reflection.SERVICE_NAME), server)
    server_thread.start(setup)
    with grpc.insecure_channel(server_thread.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {greeter_name, reflection.SERVICE_NAME}
        method = DescriptorPool(database).FindServiceByName(greeter_name) \
            .methods_by_name["SayHello"]
        assert method.input_type.full_name == "helloworld.HelloRequest"
        assert method.output_type.full_name == "helloworld.HelloReply"
        # and the service itself answers next to the reflection service
        reply = helloworld_pb2_grpc.GreeterStub(channel).SayHello(
            helloworld_pb2.HelloRequest(name="refl"), timeout=10)
        assert reply.message == "Hello refl"


# ------------------------------------------------------------ OpenTelemetry

@pytest.fixture
def spans() -> Iterator[Tuple[Any, Any]]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def check_server_spans(target: str, exporter: Any) -> None:
    """Call every kind with a traceparent of its own; each must produce a
    SERVER span continuing that trace, with the rpc.* attributes."""
    from opentelemetry.trace import SpanKind
    with grpc.insecure_channel(target) as channel:
        parents = {}
        for kind in KINDS:
            trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            parents[_kinds.path(kind)] = (int(trace_id, 16), int(span_id, 16))
            name = uuid.uuid4().hex[:6]
            assert _kinds.call(channel, kind, name, metadata=(
                ("traceparent", f"00-{trace_id}-{span_id}-01"),)) == _kinds.expected(kind, name)
    finished = {s.name: s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER}
    assert set(finished) == set(parents)
    for method, (trace_id, span_id) in parents.items():
        span = finished[method]
        assert span.context.trace_id == trace_id and span.parent.span_id == span_id
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == _kinds.SERVICE
        assert span.attributes["rpc.method"] == method.rsplit("/", 1)[1]


def test_opentelemetry_aio_server_interceptor(server_thread, spans):
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    provider, exporter = spans
    server_thread.start(lambda s: _kinds.add(s, "registered", _kinds.handlers()),
                        interceptors=[aio_server_interceptor(tracer_provider=provider)])
    check_server_spans(server_thread.target, exporter)


def test_opentelemetry_instrumentor_is_honoured(server_thread, spans):
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer
    provider, exporter = spans
    instrumentor = GrpcAioInstrumentorServer()
    instrumentor.instrument(tracer_provider=provider)
    try:
        server_thread.start(lambda s: _kinds.add(s, "generic", _kinds.handlers()))
        assert len(server_thread.server._interceptors) == 1
    finally:
        instrumentor.uninstrument()
    check_server_spans(server_thread.target, exporter)


# ------------------------------------------------------------ grpc-interceptor

def test_grpc_interceptor_async_server_interceptor(server_thread, recorder):
    from grpc_interceptor import AsyncServerInterceptor

    class Tagging(AsyncServerInterceptor):
        async def intercept(self, method: Any, request_or_iterator: Any, context: Any,
                            method_name: str) -> Any:
            recorder.add(method_name)
            context.set_trailing_metadata((("x-intercepted", method_name),))
            response = method(request_or_iterator, context)
            if hasattr(response, "__aiter__"):
                return response
            return await response
    server_thread.start(lambda s: _kinds.add(s, "registered", _kinds.handlers()),
                        interceptors=[Tagging()])
    with grpc.insecure_channel(server_thread.target) as channel:
        for kind in KINDS:
            name = uuid.uuid4().hex[:6]
            assert _kinds.call(channel, kind, name) == _kinds.expected(kind, name)
    assert recorder.items == [_kinds.path(k) for k in KINDS]


def test_grpc_interceptor_exception_to_status(server_thread):
    from grpc_interceptor import AsyncExceptionToStatusInterceptor
    from grpc_interceptor.exceptions import NotFound, PermissionDenied

    async def uu(request: Any, context: Any) -> Any:
        raise NotFound(f"no {request.name}")

    async def us(request: Any, context: Any) -> Any:
        yield _kinds.Rep(message="one")
        raise PermissionDenied(f"stop {request.name}")
    server_thread.start(
        lambda s: _kinds.add(s, "registered", _kinds.handlers({"unary_unary": uu,
                                                              "unary_stream": us})),
        interceptors=[AsyncExceptionToStatusInterceptor()])
    with grpc.insecure_channel(server_thread.target) as channel:
        name = uuid.uuid4().hex[:6]
        with pytest.raises(grpc.RpcError) as info:
            _kinds.call(channel, "unary_unary", name)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.NOT_FOUND,
                                                             f"no {name}")
        got = []
        stream = channel.unary_stream(_kinds.path("unary_stream"),
                                      request_serializer=_kinds.Req.SerializeToString,
                                      response_deserializer=_kinds.Rep.FromString)
        with pytest.raises(grpc.RpcError) as info:
            for reply in stream(_kinds.Req(name=name), timeout=10):
                got.append(reply.message)
        assert got == ["one"]
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.PERMISSION_DENIED, f"stop {name}")
