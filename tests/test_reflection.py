"""asyncgrpc's built-in gRPC server reflection (asyncgrpc.enable_reflection,
server(reflection=True)), v1 and v1alpha, checked with grpcio-reflection's
client (ProtoReflectionDescriptorDatabase) and raw stubs: list_services,
file_containing_symbol / file_by_filename / file_containing_extension with
transitive dependencies, all_extension_numbers_of_type, NOT_FOUND and
INVALID_ARGUMENT error responses, and answers equal to grpcio-reflection's
own servicer for the same questions."""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import Any, Iterator, List, Sequence

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import asyncgrpc
from asyncgrpc import reflection as ag_reflection

from conftest import ROOT

# A chain of imports: a.proto -> b.proto -> c.proto, with extensions of
# rtest.Base declared in b.proto.
PROTOS = {
    "rtest/c.proto": """
        syntax = "proto2";
        package rtest;
        message Base { optional string v = 1; extensions 100 to 199; }
    """,
    "rtest/b.proto": """
        syntax = "proto2";
        package rtest;
        import "rtest/c.proto";
        message Mid { optional Base base = 1; enum Kind { K0 = 0; K1 = 1; } }
        extend Base { optional int32 ext_b = 123; optional string ext_c = 150; }
    """,
    "rtest/a.proto": """
        syntax = "proto3";
        package rtest;
        import "rtest/b.proto";
        message Req { Mid mid = 1; }
        message Resp { string v = 1; }
        service Probe { rpc Get(Req) returns (Resp); rpc Chat(stream Req) returns (stream Resp); }
    """,
}
V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
ALL_SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection", "rtest.Probe", "test.Raw"]


@pytest.fixture(scope="module")
def rtest(tmp_path_factory: Any) -> Any:
    """rtest/a_pb2 compiled into a temporary directory and imported (its
    files land in protobuf's default pool, as a user's generated code does)."""
    from grpc_tools import protoc

    base = tmp_path_factory.mktemp("rtest")
    for name, text in PROTOS.items():
        path = base / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    for name in PROTOS:
        assert protoc.main(["protoc", f"-I{base}", f"--python_out={base}", name]) == 0
    sys.path.insert(0, str(base))
    try:
        return importlib.import_module("rtest.a_pb2")
    finally:
        sys.path.remove(str(base))


def setup_services(server: Any, rtest: Any) -> None:
    """rtest.Probe (from its descriptor), a raw service, health."""
    class Probe:
        async def Get(self, request: Any, context: Any) -> Any:
            return rtest.Resp(v="ok")
    asyncgrpc.add_servicer(server, Probe(), rtest.DESCRIPTOR.services_by_name["Probe"])
    server.add_generic_rpc_handlers([asyncgrpc.method_handlers_generic_handler(
        "test.Raw", {"Echo": asyncgrpc.unary_unary_rpc_method_handler(lambda r, c: r)})])


def ask(target: str, path: str, requests: Sequence[rpb.ServerReflectionRequest]
        ) -> List[rpb.ServerReflectionResponse]:
    """Send ``requests`` on one ServerReflectionInfo stream (v1 and v1alpha
    messages are the same on the wire)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            path, request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString)
        return list(call(iter(requests), timeout=10))


def file_names(response: rpb.ServerReflectionResponse) -> List[str]:
    return [descriptor_pb2.FileDescriptorProto.FromString(data).name
            for data in response.file_descriptor_response.file_descriptor_proto]


def test_list_services_lists_exactly_the_registered_services(server_thread, rtest):
    """Services added after enable_reflection count; health and the two
    reflection services are listed; both protocol versions answer."""
    def setup(server: Any) -> None:
        asyncgrpc.enable_reflection(server)
        setup_services(server, rtest)
    server_thread.start(setup, health=True)
    for path in (V1, V1ALPHA):
        (reply,) = ask(server_thread.target, path,
                       [rpb.ServerReflectionRequest(list_services="*")])
        assert [s.name for s in reply.list_services_response.service] == ALL_SERVICES
        assert reply.original_request.list_services == "*"
    with grpc.insecure_channel(server_thread.target) as channel:
        assert ProtoReflectionDescriptorDatabase(channel).get_services() == ALL_SERVICES


def test_explicit_service_names_and_keyword(server_thread, rtest):
    """service_names given: exactly those (grpcio-reflection's semantics);
    server(reflection=True) without health lists no health service."""
    server_thread.start(lambda s: (setup_services(s, rtest),
                                   asyncgrpc.enable_reflection(s, ["rtest.Probe", "a.B"])))
    (reply,) = ask(server_thread.target, V1, [rpb.ServerReflectionRequest(list_services="")])
    assert [s.name for s in reply.list_services_response.service] == ["a.B", "rtest.Probe"]


def test_descriptor_database_client_resolves_services_and_dependencies(server_thread, rtest):
    """grpcio-reflection's client builds a pool from our answers: the
    service's methods and the message types two imports away resolve."""
    server_thread.start(lambda s: setup_services(s, rtest), reflection=True)
    with grpc.insecure_channel(server_thread.target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("rtest.Probe")
        assert [(m.name, m.input_type.full_name, m.output_type.full_name,
                 m.client_streaming, m.server_streaming) for m in service.methods] == [
            ("Get", "rtest.Req", "rtest.Resp", False, False),
            ("Chat", "rtest.Req", "rtest.Resp", True, True)]
        mid = pool.FindMessageTypeByName("rtest.Req").fields_by_name["mid"].message_type
        assert mid.fields_by_name["base"].message_type.full_name == "rtest.Base"
        assert pool.FindFileByName("rtest/c.proto").package == "rtest"
        reflection = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
        assert reflection.methods[0].name == "ServerReflectionInfo"


def test_file_requests_return_the_file_and_its_transitive_dependencies(server_thread, rtest):
    server_thread.start(lambda s: setup_services(s, rtest), reflection=True)
    R = rpb.ServerReflectionRequest
    replies = ask(server_thread.target, V1, [
        R(file_containing_symbol="rtest.Probe"),            # a service
        R(file_containing_symbol="rtest.Probe.Get"),        # a method
        R(file_containing_symbol="rtest.Mid"),              # a message
        R(file_containing_symbol="rtest.Mid.Kind"),         # a nested enum
        R(file_by_filename="rtest/b.proto"),
        R(file_by_filename="rtest/c.proto"),
        R(file_containing_extension=rpb.ExtensionRequest(containing_type="rtest.Base",
                                                         extension_number=150)),
    ])
    assert [file_names(r) for r in replies] == [
        ["rtest/a.proto", "rtest/b.proto", "rtest/c.proto"],
        ["rtest/a.proto", "rtest/b.proto", "rtest/c.proto"],
        ["rtest/b.proto", "rtest/c.proto"],
        ["rtest/b.proto", "rtest/c.proto"],
        ["rtest/b.proto", "rtest/c.proto"],
        ["rtest/c.proto"],
        ["rtest/b.proto", "rtest/c.proto"],
    ]
    # the files are the real descriptors, in request order
    first = descriptor_pb2.FileDescriptorProto.FromString(
        replies[0].file_descriptor_response.file_descriptor_proto[0])
    assert [s.name for s in first.service] == ["Probe"]
    assert list(first.dependency) == ["rtest/b.proto"]
    assert replies[4].original_request.file_by_filename == "rtest/b.proto"


def test_unknown_things_get_not_found_error_responses(server_thread, rtest):
    server_thread.start(lambda s: setup_services(s, rtest), reflection=True)
    R = rpb.ServerReflectionRequest
    replies = ask(server_thread.target, V1ALPHA, [
        R(file_containing_symbol="rtest.Nope"),
        R(file_by_filename="nope.proto"),
        R(file_containing_extension=rpb.ExtensionRequest(containing_type="rtest.Base",
                                                         extension_number=199)),
        R(all_extension_numbers_of_type="rtest.Nope"),
        R(host="only-a-host"),                       # no question at all
        R(all_extension_numbers_of_type="rtest.Base"),
        R(file_containing_symbol="rtest.Probe"),     # the stream still works
    ])
    errors = [(r.WhichOneof("message_response"), r.error_response.error_code,
               r.error_response.error_message) for r in replies[:5]]
    assert errors == [("error_response", 5, "not found")] * 4 + [
        ("error_response", 3, "invalid argument")]
    assert replies[0].original_request.file_containing_symbol == "rtest.Nope"
    numbers = replies[5].all_extension_numbers_response
    assert (numbers.base_type_name, list(numbers.extension_number)) == ("rtest.Base", [123, 150])
    assert file_names(replies[6])[0] == "rtest/a.proto"


def test_answers_equal_grpcio_reflections_servicer(server_thread, rtest):
    """The same questions to grpcio-reflection's asyncio servicer (run on a
    second asyncgrpc server) and to ours get equal answers."""
    from grpc_reflection.v1alpha import reflection as grpcio_reflection

    server_thread.start(lambda s: setup_services(s, rtest), reflection=True)
    ours = server_thread.target
    other = type(server_thread)(server_thread.loop_kind)
    try:
        other.start(lambda s: grpcio_reflection.enable_server_reflection(ALL_SERVICES[1:], s))
        R = rpb.ServerReflectionRequest
        questions = [
            R(list_services=""), R(file_containing_symbol="rtest.Req"),
            R(file_by_filename="rtest/a.proto"), R(file_by_filename="missing.proto"),
            R(file_containing_extension=rpb.ExtensionRequest(containing_type="rtest.Base",
                                                             extension_number=123)),
            R(file_containing_extension=rpb.ExtensionRequest(containing_type="rtest.Base",
                                                             extension_number=-1)),
            R(all_extension_numbers_of_type="rtest.Base"), R(all_extension_numbers_of_type="x"),
            R(), R(host="h", file_containing_symbol="rtest.Mid.K1"),
        ]
        theirs = ask(other.target, V1ALPHA, questions)
    finally:
        other.close()
    mine = ask(ours, V1ALPHA, questions)
    # grpcio's list has what it was told; ours has no health here
    assert [s.name for s in mine[0].list_services_response.service] == ALL_SERVICES[1:]
    assert mine == theirs


def test_own_files_served_when_the_default_pool_lacks_them():
    """Without grpcio-reflection/-health-checking imported, reflection still
    describes its own and health's services (embedded descriptors)."""
    servicer = ag_reflection.ReflectionServicer(["x"], pool=descriptor_pool.DescriptorPool())
    R = rpb.ServerReflectionRequest
    for symbol, name in [
            ("grpc.reflection.v1.ServerReflection", "grpc/reflection/v1/reflection.proto"),
            ("grpc.reflection.v1alpha.ServerReflectionRequest",
             "grpc/reflection/v1alpha/reflection.proto"),
            ("grpc.health.v1.Health.Watch", "grpc/health/v1/health.proto")]:
        request = R(file_containing_symbol=symbol)
        reply = rpb.ServerReflectionResponse.FromString(
            servicer.respond(request.SerializeToString()))
        assert file_names(reply) == [name]
        assert reply.original_request == request


def test_embedded_descriptors_match_the_proto_files():
    """asyncgrpc/_protos.py is what scripts/gen_builtin_protos.py makes of
    proto/grpc/... now."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import gen_builtin_protos
    finally:
        sys.path.pop(0)
    from asyncgrpc._protos import FILES
    assert gen_builtin_protos.compile_files() == FILES


def test_enable_reflection_without_protobuf_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    server = asyncgrpc.server()
    try:
        with pytest.raises(ImportError, match="pip install protobuf"):
            asyncgrpc.enable_reflection(server)
    finally:
        asyncio.run(server.stop(None))
