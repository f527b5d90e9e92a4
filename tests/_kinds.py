"""Shared by the drop-in tests: one handler of each RPC kind on protobuf
messages (so the serializers matter), and a client call of each kind that
checks its own reply."""
from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List

import grpc

import helloworld_pb2

Req = helloworld_pb2.HelloRequest
Rep = helloworld_pb2.HelloReply
SERVICE = "test.Kinds"
KINDS = ["unary_unary", "unary_stream", "stream_unary", "stream_stream"]
METHOD = {"unary_unary": "UU", "unary_stream": "US", "stream_unary": "SU", "stream_stream": "SS"}


def path(kind: str) -> str:
    """The full method path of ``kind``'s method."""
    return f"/{SERVICE}/{METHOD[kind]}"


async def uu(request: Any, context: Any) -> Any:
    return Rep(message=f"uu {request.name}")


async def us(request: Any, context: Any) -> Any:
    for i in range(3):
        yield Rep(message=f"us {request.name} {i}")


async def su(request_iterator: Any, context: Any) -> Any:
    names = [r.name async for r in request_iterator]
    return Rep(message="su " + ",".join(names))


async def ss(request_iterator: Any, context: Any) -> Any:
    async for r in request_iterator:
        yield Rep(message=f"ss {r.name}")


BEHAVIORS: Dict[str, Callable[..., Any]] = {
    "unary_unary": uu, "unary_stream": us, "stream_unary": su, "stream_stream": ss}


def handler(kind: str, behavior: Callable[..., Any]) -> Any:
    """A grpcio method handler of ``kind`` on HelloRequest/HelloReply."""
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, request_deserializer=Req.FromString,
                response_serializer=Rep.SerializeToString)


def handlers(behaviors: Dict[str, Callable[..., Any]] = BEHAVIORS) -> Dict[str, Any]:
    """Method name -> handler, one per kind."""
    return {METHOD[k]: handler(k, b) for k, b in behaviors.items()}


class Opaque(grpc.GenericRpcHandler):
    """A generic handler the server cannot look into (asked per call)."""

    def __init__(self, table: Dict[str, Any]) -> None:
        self._table = {f"/{SERVICE}/{name}": h for name, h in table.items()}

    def service(self, handler_call_details: Any) -> Any:
        return self._table.get(handler_call_details.method)


def add(server: Any, how: str, table: Dict[str, Any]) -> None:
    """Serve ``table`` as registered methods or through an opaque generic handler."""
    if how == "registered":
        server.add_registered_method_handlers(SERVICE, table)
    else:
        server.add_generic_rpc_handlers([Opaque(table)])


def expected(kind: str, name: str) -> List[str]:
    """What the handlers above answer to a call of ``kind`` for ``name``."""
    return {"unary_unary": [f"uu {name}"],
            "unary_stream": [f"us {name} {i}" for i in range(3)],
            "stream_unary": [f"su {name}-0,{name}-1"],
            "stream_stream": [f"ss {name}-0", f"ss {name}-1"]}[kind]


def call(channel: grpc.Channel, kind: str, name: str = "", metadata: Any = None,
         timeout: float = 10, method: str = "") -> List[str]:
    """Make one call of ``kind`` (requests named after ``name``) and return
    the reply messages' text."""
    name = name or uuid.uuid4().hex[:8]
    multi = getattr(channel, kind)(method or path(kind), request_serializer=Req.SerializeToString,
                                   response_deserializer=Rep.FromString)
    if kind.startswith("unary_"):
        request: Any = Req(name=name)
    else:
        request = iter([Req(name=f"{name}-0"), Req(name=f"{name}-1")])
    result = multi(request, timeout=timeout, metadata=metadata)
    if kind.endswith("_unary"):
        return [result.message]
    return [r.message for r in result]
