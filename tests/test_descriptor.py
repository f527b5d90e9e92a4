"""asyncgrpc._descriptor.add_servicer: serving a protobuf service from its
descriptor, with only ``protoc --python_out`` modules (no ``*_pb2_grpc``).

The service is ``grpc.testing.TestService`` (see asyncgrpc.interop), whose
methods cover all four kinds. Servers are asyncgrpc, or grpc.aio as a
reference, chosen like tests/test_interop.py by ``ASYNCGRPC_SERVER_IMPLS``
(comma-separated ``asyncgrpc``, ``grpc_aio`` or ``all``; default asyncgrpc).
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace
from typing import Any, Iterator, List

import grpc
import pytest

from asyncgrpc._descriptor import add_servicer, method_handlers
from asyncgrpc.interop import load_protos

IMPLS_ENV = "ASYNCGRPC_SERVER_IMPLS"
ALL_IMPLS = ("asyncgrpc", "grpc_aio")


def _impls() -> List[str]:
    names = [n.strip() for n in os.environ.get(IMPLS_ENV, "asyncgrpc").split(",") if n.strip()]
    return list(ALL_IMPLS) if names == ["all"] else names


PROTOS = load_protos()
messages = PROTOS.messages_pb2
empty_pb2 = PROTOS.empty_pb2
SERVICE = PROTOS.test_pb2.DESCRIPTOR.services_by_name["TestService"]
TIMEOUT = 10


class PartialServicer:
    """One method of each kind; EmptyCall, CacheableUnaryCall, HalfDuplexCall
    and UnimplementedCall are missing."""

    async def UnaryCall(self, request, context):
        return messages.SimpleResponse(payload=messages.Payload(body=bytes(request.response_size)))

    async def StreamingOutputCall(self, request, context):
        for params in request.response_parameters:
            yield messages.StreamingOutputCallResponse(
                payload=messages.Payload(body=bytes(params.size)))

    async def StreamingInputCall(self, request_iterator, context):
        total = 0
        async for request in request_iterator:
            total += len(request.payload.body)
        return messages.StreamingInputCallResponse(aggregated_payload_size=total)

    async def FullDuplexCall(self, request_iterator, context):
        async for request in request_iterator:
            for params in request.response_parameters:
                yield messages.StreamingOutputCallResponse(
                    payload=messages.Payload(body=bytes(params.size)))


class Served:
    """A server of the given impl, on an event loop of its own thread, with
    ``servicer`` registered through add_servicer."""

    def __init__(self, impl: str, servicer: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> Any:
            if impl == "grpc_aio":
                import grpc.aio
                server = grpc.aio.server()
            else:
                import asyncgrpc
                server = asyncgrpc.server()
            add_servicer(server, servicer, SERVICE)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port
        self.server, self.port = self._run(start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def method(self, name: str) -> Any:
        method = SERVICE.methods_by_name[name]
        factory = {
            (False, False): self.channel.unary_unary, (False, True): self.channel.unary_stream,
            (True, False): self.channel.stream_unary, (True, True): self.channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        request_class = type(self.request_of(name))
        return factory(f"/{SERVICE.full_name}/{name}",
                       request_serializer=request_class.SerializeToString,
                       response_deserializer=_response_class(name).FromString)

    @staticmethod
    def request_of(name: str) -> Any:
        from google.protobuf import message_factory
        return message_factory.GetMessageClass(SERVICE.methods_by_name[name].input_type)()

    def close(self) -> None:
        self.channel.close()
        try:
            self._run(self.server.stop(None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()


def _response_class(name: str) -> Any:
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(SERVICE.methods_by_name[name].output_type)


@pytest.fixture(params=_impls())
def impl(request: Any) -> str:
    return request.param


@pytest.fixture
def served(impl: str) -> Iterator[Served]:
    s = Served(impl, PartialServicer())
    yield s
    s.close()


# -- without a server --------------------------------------------------------

def test_handlers_follow_the_descriptor():
    handlers = method_handlers(PartialServicer(), SERVICE)
    assert sorted(handlers) == sorted(m.name for m in SERVICE.methods)
    for method in SERVICE.methods:
        handler = handlers[method.name]
        assert handler.request_streaming == method.client_streaming
        assert handler.response_streaming == method.server_streaming
        behaviors = [handler.unary_unary, handler.unary_stream,
                     handler.stream_unary, handler.stream_stream]
        assert sum(b is not None for b in behaviors) == 1
        request = Served.request_of(method.name)
        assert type(handler.request_deserializer(request.SerializeToString())) is type(request)
        response = _response_class(method.name)()
        assert handler.response_serializer(response) == response.SerializeToString()
    servicer_methods = {"UnaryCall", "StreamingOutputCall", "StreamingInputCall",
                        "FullDuplexCall"}
    for name in servicer_methods:
        handler = handlers[name]
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        assert behavior.__func__ is getattr(PartialServicer, name)


def test_registers_one_service_by_full_name():
    calls = []

    class Recorder:
        def add_registered_method_handlers(self, service_name, handlers):
            calls.append((service_name, dict(handlers)))
    add_servicer(Recorder(), PartialServicer(), SERVICE)
    assert [name for name, _ in calls] == ["grpc.testing.TestService"]
    assert len(calls[0][1]) == len(SERVICE.methods)


def test_needs_neither_grpcio_nor_pb2_grpc(tmp_path):
    """Only the *_pb2 modules exist, and add_servicer works in a process
    where importing grpc fails."""
    assert not list(PROTOS.directory.glob("*_pb2_grpc.py"))
    script = textwrap.dedent("""
        import sys

        class NoGrpc:
            def find_spec(self, name, path=None, target=None):
                if name == "grpc" or name.startswith("grpc."):
                    raise ImportError("grpcio is blocked in this test")
                return None
        sys.meta_path.insert(0, NoGrpc())

        import asyncgrpc
        from asyncgrpc._descriptor import add_servicer
        from asyncgrpc.interop import load_protos

        service = load_protos().test_pb2.DESCRIPTOR.services_by_name["TestService"]
        registered = {}

        class FakeServer:
            def add_registered_method_handlers(self, name, handlers):
                registered[name] = handlers

        add_servicer(FakeServer(), object(), service)
        handlers = registered["grpc.testing.TestService"]
        assert len(handlers) == 8, handlers
        assert handlers["FullDuplexCall"].stream_stream is not None
        assert not [m for m in sys.modules if m == "grpc" or m.startswith("grpc.")]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env={**os.environ,
                                             "ASYNCGRPC_INTEROP_CACHE": str(PROTOS.directory.parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- served ------------------------------------------------------------------

def test_unary_unary(served):
    response = served.method("UnaryCall")(messages.SimpleRequest(response_size=123),
                                          timeout=TIMEOUT)
    assert response.payload.body == bytes(123)


def test_unary_stream(served):
    request = messages.StreamingOutputCallRequest(response_parameters=[
        messages.ResponseParameters(size=s) for s in (1, 2, 3)])
    responses = list(served.method("StreamingOutputCall")(request, timeout=TIMEOUT))
    assert [len(r.payload.body) for r in responses] == [1, 2, 3]


def test_stream_unary(served):
    requests = [messages.StreamingInputCallRequest(payload=messages.Payload(body=bytes(s)))
                for s in (10, 20, 30)]
    response = served.method("StreamingInputCall")(iter(requests), timeout=TIMEOUT)
    assert response.aggregated_payload_size == 60


def test_stream_stream(served):
    requests = [messages.StreamingOutputCallRequest(response_parameters=[
        messages.ResponseParameters(size=s)]) for s in (4, 5)]
    responses = list(served.method("FullDuplexCall")(iter(requests), timeout=TIMEOUT))
    assert [len(r.payload.body) for r in responses] == [4, 5]


@pytest.mark.parametrize("name", ["EmptyCall", "CacheableUnaryCall", "HalfDuplexCall",
                                  "UnimplementedCall"])
def test_missing_method_is_unimplemented(served, name):
    _assert_unimplemented(served, name)


def test_every_kind_unimplemented_on_an_empty_servicer(impl):
    s = Served(impl, SimpleNamespace(UnaryCall="not callable"))
    try:
        for name in ("UnaryCall", "StreamingOutputCall", "StreamingInputCall",
                     "FullDuplexCall"):
            _assert_unimplemented(s, name)
    finally:
        s.close()


def _assert_unimplemented(served: Served, name: str) -> None:
    method = SERVICE.methods_by_name[name]
    request = served.request_of(name)
    call = served.method(name)
    with pytest.raises(grpc.RpcError) as raised:
        argument = iter([request]) if method.client_streaming else request
        result = call(argument, timeout=TIMEOUT)
        if method.server_streaming:
            list(result)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
    assert name in raised.value.details()
