"""gRPC server reflection served by asyncgrpc itself.

    asyncgrpc.enable_reflection(server)             # or asyncgrpc.server(reflection=True)

Serves ``grpc.reflection.v1.ServerReflection`` and
``grpc.reflection.v1alpha.ServerReflection`` (grpcurl, grpcui, Postman,
``grpc_cli`` and grpcio-reflection's ``ProtoReflectionDescriptorDatabase``
use one or the other). Answers come from protobuf's default descriptor pool,
where every imported ``*_pb2`` module registers its file, as with
grpcio-reflection; the request and response messages are encoded by hand
(:mod:`asyncgrpc._pbwire`), so neither grpcio nor grpcio-reflection is needed.
protobuf itself is imported when reflection is enabled (it is there whenever
services were generated with protoc).

Answers match grpcio-reflection's: ``list_services`` lists the service names
in sorted order; ``file_by_filename``, ``file_containing_symbol`` and
``file_containing_extension`` return the file and all its transitive
dependencies (the file first); ``all_extension_numbers_of_type`` its sorted
extension numbers; anything unknown gets an ``error_response`` with
``NOT_FOUND`` (5, "not found"), a request with no question
``INVALID_ARGUMENT`` (3, "invalid argument").
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _pbwire
from ._handlers import RpcMethodHandler, method_paths, stream_stream_rpc_method_handler

__all__ = ["ReflectionServicer", "SERVICE_NAMES", "enable_reflection"]

SERVICE_NAMES = ("grpc.reflection.v1.ServerReflection",
                 "grpc.reflection.v1alpha.ServerReflection")
"""The fully qualified names of the two reflection services."""

_NOT_FOUND = (5, "not found")
_INVALID_ARGUMENT = (3, "invalid argument")

# ServerReflectionRequest fields
_FILE_BY_FILENAME = 3
_FILE_CONTAINING_SYMBOL = 4
_FILE_CONTAINING_EXTENSION = 5
_ALL_EXTENSION_NUMBERS_OF_TYPE = 6
_LIST_SERVICES = 7
# ServerReflectionResponse fields
_ORIGINAL_REQUEST = 2
_FILE_DESCRIPTOR_RESPONSE = 4
_ALL_EXTENSION_NUMBERS_RESPONSE = 5
_LIST_SERVICES_RESPONSE = 6
_ERROR_RESPONSE = 7


def _import_protobuf() -> Tuple[Any, Any]:
    """(descriptor_pb2, descriptor_pool), with a clear error without protobuf."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool
    except ImportError as exc:
        raise ImportError("asyncgrpc's server reflection needs the protobuf package "
                          "(pip install protobuf)") from exc
    return descriptor_pb2, descriptor_pool


def _decode_request(data: bytes) -> Tuple[Optional[int], Any]:
    """(field number of the question, its value) of a
    ServerReflectionRequest; (None, None) if it asks nothing. The value of
    file_containing_extension is (containing_type, extension_number)."""
    kind: Optional[int] = None
    value: Any = None
    for number, wire_type, raw in _pbwire.iter_fields(data):
        if wire_type != _pbwire.LEN or not _FILE_BY_FILENAME <= number <= _LIST_SERVICES:
            continue
        assert isinstance(raw, bytes)
        kind = number           # a oneof: the last one read wins
        if number == _FILE_CONTAINING_EXTENSION:
            containing_type, extension_number = "", 0
            for sub, sub_type, sub_raw in _pbwire.iter_fields(raw):
                if sub == 1 and sub_type == _pbwire.LEN:
                    assert isinstance(sub_raw, bytes)
                    containing_type = sub_raw.decode("utf-8")
                elif sub == 2 and sub_type == _pbwire.VARINT:
                    assert isinstance(sub_raw, int)
                    extension_number = _pbwire.as_int32(sub_raw)
            value = (containing_type, extension_number)
        else:
            value = raw.decode("utf-8")
    return kind, value


def _error(code: Tuple[int, str]) -> bytes:
    """An ErrorResponse as the ``error_response`` field."""
    body = _pbwire.varint_field(1, code[0]) + _pbwire.string_field(2, code[1])
    return _pbwire.bytes_field(_ERROR_RESPONSE, body)


def _file_of_symbol(pool: Any, symbol: str) -> Any:
    """The file defining ``symbol``; unlike protobuf's own look-up (and
    grpcio-reflection), a method ``pkg.Service.Method`` is found too, as
    grpc's C++ and Go servers do (``grpcurl describe`` asks for methods)."""
    try:
        return pool.FindFileContainingSymbol(symbol)
    except KeyError:
        service_name, _, method = symbol.rpartition(".")
        if not service_name:
            raise
        service = pool.FindServiceByName(service_name)
        if method not in service.methods_by_name:
            raise
        return service.file


class ReflectionServicer:
    """Answers ServerReflectionInfo streams from protobuf descriptor pools.

    ``service_names``: the names ``list_services`` answers, or a callable
    returning them (asked once, on the first ``list_services``).
    ``pool``: the descriptor pool to read (protobuf's default pool if None);
    the files of asyncgrpc's own services (health, reflection) are found
    even when the pool lacks them.
    """

    def __init__(self, service_names: "Iterable[str] | Callable[[], Iterable[str]]",
                 pool: Any = None) -> None:
        descriptor_pb2, descriptor_pool = _import_protobuf()
        self._descriptor_pb2 = descriptor_pb2
        self._pools: List[Any] = [pool if pool is not None else descriptor_pool.Default()]
        self._builtin_pool: Any = None
        self._names_source = service_names
        self._names: Optional[Tuple[str, ...]] = None
        self._serialized: Dict[Tuple[int, str], bytes] = {}

    # -- descriptor look-ups ---------------------------------------------
    def _all_pools(self) -> List[Any]:
        """The user's pool, then one holding asyncgrpc's own files."""
        if self._builtin_pool is None:
            from google.protobuf import descriptor_pool

            from ._protos import FILES
            builtin = descriptor_pool.DescriptorPool()
            for data in FILES.values():
                builtin.Add(self._descriptor_pb2.FileDescriptorProto.FromString(data))
            self._builtin_pool = builtin
            self._pools.append(builtin)
        return self._pools

    def _find(self, lookup: Callable[[Any], Any]) -> Any:
        """The first pool's answer to ``lookup(pool)``; KeyError if none has one."""
        for pool in self._all_pools():
            try:
                return lookup(pool)
            except (KeyError, TypeError, ValueError):
                continue
        raise KeyError("not found")

    def _serialize(self, file: Any) -> bytes:
        key = (id(file.pool), file.name)
        data = self._serialized.get(key)
        if data is None:
            proto = self._descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            data = proto.SerializeToString()
            self._serialized[key] = data
        return data

    def _file_response(self, file: Any) -> bytes:
        """A FileDescriptorResponse: ``file``, then its transitive
        dependencies (each once)."""
        seen: Dict[str, Any] = {}
        stack = [file]
        while stack:
            current = stack.pop()
            if current.name in seen:
                continue
            seen[current.name] = current
            stack.extend(reversed(current.dependencies))
        body = b"".join(_pbwire.bytes_field(1, self._serialize(f)) for f in seen.values())
        return _pbwire.bytes_field(_FILE_DESCRIPTOR_RESPONSE, body)

    def service_names(self) -> Tuple[str, ...]:
        """The sorted service names ``list_services`` answers."""
        if self._names is None:
            source = self._names_source
            names = source() if callable(source) else source
            self._names = tuple(sorted(set(names)))
        return self._names

    def answer(self, kind: Optional[int], value: Any) -> bytes:
        """The ``message_response`` part of the response to one question."""
        try:
            if kind == _LIST_SERVICES:
                body = b"".join(_pbwire.bytes_field(1, _pbwire.string_field(1, name))
                                for name in self.service_names())
                return _pbwire.bytes_field(_LIST_SERVICES_RESPONSE, body)
            if kind == _FILE_BY_FILENAME:
                return self._file_response(self._find(lambda p: p.FindFileByName(value)))
            if kind == _FILE_CONTAINING_SYMBOL:
                return self._file_response(self._find(lambda p: _file_of_symbol(p, value)))
            if kind == _FILE_CONTAINING_EXTENSION:
                containing_type, number = value

                def by_extension(pool: Any) -> Any:
                    message = pool.FindMessageTypeByName(containing_type)
                    extension = pool.FindExtensionByNumber(message, number)
                    return pool.FindFileContainingSymbol(extension.full_name)
                return self._file_response(self._find(by_extension))
            if kind == _ALL_EXTENSION_NUMBERS_OF_TYPE:
                def numbers(pool: Any) -> Tuple[str, List[int]]:
                    message = pool.FindMessageTypeByName(value)
                    return message.full_name, sorted(e.number for e in
                                                     pool.FindAllExtensions(message))
                base, extension_numbers = self._find(numbers)
                body = (_pbwire.string_field(1, base)
                        + _pbwire.packed_varints_field(2, extension_numbers))
                return _pbwire.bytes_field(_ALL_EXTENSION_NUMBERS_RESPONSE, body)
        except KeyError:
            return _error(_NOT_FOUND)
        return _error(_INVALID_ARGUMENT)

    def respond(self, request: bytes) -> bytes:
        """The ServerReflectionResponse to one serialized request (which it
        echoes as ``original_request``)."""
        try:
            kind, value = _decode_request(request)
        except (ValueError, UnicodeDecodeError):
            kind, value = None, None
        return _pbwire.bytes_field(_ORIGINAL_REQUEST, request) + self.answer(kind, value)

    async def ServerReflectionInfo(self, request_iterator: AsyncIterator[bytes],
                                   context: Any) -> AsyncIterator[bytes]:
        """One response per request, in order, until the client half-closes."""
        async for request in request_iterator:
            yield self.respond(request)

    def method_handlers(self) -> Dict[str, RpcMethodHandler]:
        """The handler of ServerReflectionInfo (raw bytes in and out)."""
        return {"ServerReflectionInfo":
                stream_stream_rpc_method_handler(self.ServerReflectionInfo)}


def registered_service_names(server: Any) -> List[str]:
    """The services ``server`` serves, from its registered method paths
    (``/pkg.Service/Method``) and the tables of its generic handlers that
    can be read (grpcio's and asyncgrpc's dictionary handlers)."""
    paths: List[str] = list(getattr(server, "_explicit", {}))
    names = set()
    for handler in getattr(server, "_generic_handlers", ()):
        paths.extend(path for path, _ in method_paths(handler))
        service_name = getattr(handler, "service_name", None)
        if callable(service_name):
            try:
                name = service_name()
            except Exception:
                name = None
            if isinstance(name, str) and name:
                names.add(name)
    for path in paths:
        parts = path.split("/")
        if len(parts) == 3 and not parts[0] and parts[1]:
            names.add(parts[1])
    return sorted(names)


def enable_reflection(server: Any, service_names: Optional[Sequence[str]] = None) -> None:
    """Serve gRPC server reflection (v1 and v1alpha) on ``server``, before
    ``start()``.

    ``service_names``: what ``list_services`` answers; None means every
    service registered on the server when it is first asked (services added
    after this call count), which includes the reflection services
    themselves and health if enabled. Raises ImportError without protobuf.
    """
    if getattr(server, "_reflection_servicer", None) is not None:
        return
    names: "Iterable[str] | Callable[[], Iterable[str]]"
    if service_names is None:
        names = lambda: registered_service_names(server)  # noqa: E731
    elif isinstance(service_names, str):
        raise TypeError("service_names must be a sequence of names, not a str")
    else:
        names = tuple(service_names)
    servicer = ReflectionServicer(names)
    handlers = servicer.method_handlers()
    for name in SERVICE_NAMES:
        server.add_registered_method_handlers(name, handlers)
    server._reflection_servicer = servicer
