"""Serve a protobuf service from its descriptor, without grpcio-generated code.

``add_servicer(server, servicer, service_descriptor)`` needs only a ``*_pb2``
module made by plain ``protoc --python_out`` (no ``*_pb2_grpc``): the request
and response classes, and whether each side streams, come from the
``ServiceDescriptor``; the behaviors are the servicer's methods of the same
names. Nothing here imports grpcio, and the server is only used through its
public ``add_registered_method_handlers``, so any object with grpc.aio's
server API will do.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from ._handlers import (
    RpcMethodHandler,
    stream_stream_rpc_method_handler,
    stream_unary_rpc_method_handler,
    unary_stream_rpc_method_handler,
    unary_unary_rpc_method_handler,
)
from ._status import StatusCode

__all__ = ["add_servicer", "method_handlers"]


def _message_class(descriptor: Any) -> Any:
    """The generated class of a message descriptor (protobuf >= 4.21 spells
    this ``GetMessageClass``; older releases only have the factory object)."""
    from google.protobuf import message_factory

    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is not None:
        return get_class(descriptor)
    factory = message_factory.MessageFactory(descriptor.file.pool)
    return factory.GetPrototype(descriptor)  # pragma: no cover - old protobuf


def _unimplemented(full_method: str, request_streaming: bool,
                   response_streaming: bool) -> Callable[..., Any]:
    """A behavior of the given kind that ends the RPC with UNIMPLEMENTED."""
    details = f"Method not implemented: {full_method}"

    if response_streaming:
        async def unimplemented_stream(request: Any, context: Any) -> Any:
            await context.abort(StatusCode.UNIMPLEMENTED, details)
            yield  # pragma: no cover - makes this an async generator
        return unimplemented_stream

    async def unimplemented(request: Any, context: Any) -> Any:
        await context.abort(StatusCode.UNIMPLEMENTED, details)
    return unimplemented


_CONSTRUCTORS = {
    (False, False): unary_unary_rpc_method_handler,
    (False, True): unary_stream_rpc_method_handler,
    (True, False): stream_unary_rpc_method_handler,
    (True, True): stream_stream_rpc_method_handler,
}


def method_handlers(servicer: Any, service_descriptor: Any) -> Dict[str, RpcMethodHandler]:
    """The handler of each method of ``service_descriptor`` (method name ->
    handler), with ``servicer``'s methods as behaviors; methods the servicer
    lacks answer UNIMPLEMENTED."""
    handlers: Dict[str, RpcMethodHandler] = {}
    for method in service_descriptor.methods:
        request_class = _message_class(method.input_type)
        response_class = _message_class(method.output_type)
        kind = (bool(method.client_streaming), bool(method.server_streaming))
        behavior = getattr(servicer, method.name, None)
        if behavior is None or not callable(behavior):
            behavior = _unimplemented(method.full_name, *kind)
        handlers[method.name] = _CONSTRUCTORS[kind](
            behavior,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    return handlers


def add_servicer(server: Any, servicer: Any, service_descriptor: Any) -> None:
    """Register every method of the protobuf service ``service_descriptor``
    (a ``google.protobuf.descriptor.ServiceDescriptor``, e.g.
    ``test_pb2.DESCRIPTOR.services_by_name["TestService"]``) on ``server``.

    Each method calls ``servicer.<MethodName>(request, context)`` (or
    ``(request_iterator, context)`` for client streaming), written as for
    grpc.aio: coroutine functions for unary responses, async generators (or
    coroutines using ``context.write``) for streamed ones. Methods the
    servicer does not define end with ``UNIMPLEMENTED``.
    """
    server.add_registered_method_handlers(
        service_descriptor.full_name, method_handlers(servicer, service_descriptor))
