"""The interop test server: ``grpc.testing.TestService`` on asyncgrpc (or,
for comparison, on grpc.aio), as the gRPC interop test descriptions require.

Server features implemented: EmptyCall, UnaryCall, CacheableUnaryCall (a
fresh timestamp payload), StreamingOutputCall, StreamingInputCall,
FullDuplexCall, HalfDuplexCall, CompressedResponse (per message),
Echo Status, Echo Metadata and ResponseParameters.interval_us.
UnimplementedCall and every other service answer UNIMPLEMENTED.

CompressedRequest: neither grpc.aio nor asyncgrpc tells a handler whether a
request arrived compressed, so ``expect_compressed`` is only enforced when the
context offers ``last_message_was_compressed()`` (returning True/False, or
None when unknown); otherwise both compressed and plain requests are accepted.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Any, AsyncIterator, Iterable, List, Optional, Sequence, Tuple

from .._descriptor import add_servicer
from .._status import StatusCode
from . import load_protos

__all__ = ["TestServiceServicer", "build_server", "main", "serve"]

_LOGGER = logging.getLogger("asyncgrpc.interop")

ECHO_INITIAL_KEY = "x-grpc-test-echo-initial"
ECHO_TRAILING_KEY = "x-grpc-test-echo-trailing-bin"
IMPLS = ("asyncgrpc", "grpc_aio")


def _gzip(impl: str) -> Any:
    """The gzip member of the impl's compression enum."""
    if impl != "grpc_aio":
        import asyncgrpc
        enum = getattr(asyncgrpc, "Compression", None)
        if enum is not None:
            return enum.Gzip
    import grpc  # asyncgrpc also takes grpc's enums, as it does grpc.StatusCode
    return grpc.Compression.Gzip


def _status_code(number: int) -> StatusCode:
    try:
        return StatusCode.from_int(number)
    except ValueError:
        return StatusCode.UNKNOWN


class _Echo:
    """Per-RPC echo of the test metadata, the requested status and the
    response compression.

    Initial metadata goes out before the first response (or at the end if
    there is none), so that compression can still be chosen from the first
    request: grpc.aio refuses ``set_compression`` once headers are sent.
    """

    def __init__(self, context: Any, impl: str) -> None:
        self.context = context
        self.impl = impl
        self.initial: List[Tuple[str, Any]] = []
        self.trailing: List[Tuple[str, Any]] = []
        for key, value in context.invocation_metadata() or ():
            if key == ECHO_INITIAL_KEY:
                self.initial.append((key, value))
            elif key == ECHO_TRAILING_KEY:
                self.trailing.append((key, value))
        if self.trailing:
            context.set_trailing_metadata(tuple(self.trailing))
        self.started = False
        self.compressing = False

    async def start(self, compress: bool = False) -> None:
        """Choose the call's compression and send the initial metadata."""
        if self.started:
            return
        self.started = True
        if compress:
            self.context.set_compression(_gzip(self.impl))
            self.compressing = True
        if self.initial or compress:
            # Sent explicitly when compressing too: grpc.aio ignores
            # set_compression() for a unary response whose headers go out
            # implicitly with it.
            await self.context.send_initial_metadata(tuple(self.initial))

    async def before_message(self, compressed: Any) -> None:
        """Get ready to send one response whose ``BoolValue`` ``compressed``
        says whether it must be compressed."""
        want = bool(compressed.value)
        await self.start(want)
        if want and not self.compressing:
            # Headers already went out uncompressed: try anyway (asyncgrpc may
            # allow it); grpc.aio raises, and the RPC fails loudly.
            self.context.set_compression(_gzip(self.impl))
            self.compressing = True
        elif self.compressing and not want:
            self.context.disable_next_message_compression()

    async def check_status(self, echo_status: Any) -> None:
        """End the RPC with the requested status, if one was requested."""
        if echo_status.code == 0:
            return
        await self.start()
        await self.context.abort(_status_code(echo_status.code), echo_status.message,
                                 tuple(self.trailing))

    async def check_compressed(self, expect_compressed: Any) -> None:
        """Fail with INVALID_ARGUMENT if the request was expected compressed
        and the server can tell it was not (see the module docstring)."""
        probe = getattr(self.context, "last_message_was_compressed", None)
        if not expect_compressed.value or probe is None:
            return
        was_compressed = probe()
        if was_compressed is False:
            await self.start()
            await self.context.abort(StatusCode.INVALID_ARGUMENT,
                                     "expected a compressed request",
                                     tuple(self.trailing))


class TestServiceServicer:
    """``grpc.testing.TestService``, written as for grpc.aio. It has no
    ``UnimplementedCall``, so :func:`add_servicer` makes that one answer
    UNIMPLEMENTED."""

    def __init__(self, impl: str = "asyncgrpc") -> None:
        self.impl = impl
        protos = load_protos()
        self.empty_pb2 = protos.empty_pb2
        self.messages = protos.messages_pb2

    def _payload(self, size: int) -> Any:
        if size < 0:
            raise ValueError("negative payload size")
        return self.messages.Payload(type=self.messages.COMPRESSABLE, body=bytes(size))

    async def _check_type(self, echo: _Echo, response_type: int) -> None:
        if response_type != self.messages.COMPRESSABLE:
            await echo.start()
            await echo.context.abort(StatusCode.INVALID_ARGUMENT,
                                     f"unsupported response_type {response_type}",
                                     tuple(echo.trailing))

    async def EmptyCall(self, request: Any, context: Any) -> Any:
        echo = _Echo(context, self.impl)
        await echo.start()
        return self.empty_pb2.Empty()

    async def UnaryCall(self, request: Any, context: Any) -> Any:
        echo = _Echo(context, self.impl)
        await echo.check_compressed(request.expect_compressed)
        await echo.start(request.response_compressed.value)
        await echo.check_status(request.response_status)
        await self._check_type(echo, request.response_type)
        return self.messages.SimpleResponse(payload=self._payload(request.response_size))

    async def CacheableUnaryCall(self, request: Any, context: Any) -> Any:
        echo = _Echo(context, self.impl)
        await echo.start()
        body = str(time.time_ns()).encode()
        return self.messages.SimpleResponse(
            payload=self.messages.Payload(type=self.messages.COMPRESSABLE, body=body))

    async def _responses(self, echo: _Echo, request: Any) -> AsyncIterator[Any]:
        """The responses one StreamingOutputCallRequest asks for, each after
        its ``interval_us``, compressed as asked; then its echo status."""
        await self._check_type(echo, request.response_type)
        for params in request.response_parameters:
            if params.interval_us > 0:
                await asyncio.sleep(params.interval_us / 1e6)
            await echo.before_message(params.compressed)
            yield self.messages.StreamingOutputCallResponse(payload=self._payload(params.size))
        await echo.check_status(request.response_status)

    async def StreamingOutputCall(self, request: Any, context: Any) -> AsyncIterator[Any]:
        echo = _Echo(context, self.impl)
        await echo.start(any(p.compressed.value for p in request.response_parameters))
        async for response in self._responses(echo, request):
            yield response

    async def StreamingInputCall(self, request_iterator: Any, context: Any) -> Any:
        echo = _Echo(context, self.impl)
        total = 0
        async for request in request_iterator:
            await echo.check_compressed(request.expect_compressed)
            total += len(request.payload.body)
        await echo.start()
        return self.messages.StreamingInputCallResponse(aggregated_payload_size=total)

    async def FullDuplexCall(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        echo = _Echo(context, self.impl)
        async for request in request_iterator:
            await echo.start(any(p.compressed.value for p in request.response_parameters))
            async for response in self._responses(echo, request):
                yield response
        await echo.start()

    async def HalfDuplexCall(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        echo = _Echo(context, self.impl)
        requests = [request async for request in request_iterator]
        await echo.start(any(p.compressed.value
                             for r in requests for p in r.response_parameters))
        for request in requests:
            async for response in self._responses(echo, request):
                yield response


def _read(path: Optional[str], what: str) -> bytes:
    if not path:
        raise SystemExit(f"--use_tls needs --{what} (PEM file)")
    with open(path, "rb") as f:
        return f.read()


def build_server(impl: str = "asyncgrpc") -> Any:
    """A server of the given impl with the interop service registered."""
    if impl == "grpc_aio":
        import grpc.aio
        server = grpc.aio.server()
    elif impl == "asyncgrpc":
        import asyncgrpc
        server = asyncgrpc.server()
    else:
        raise ValueError(f"unknown server impl {impl!r} (one of {', '.join(IMPLS)})")
    test_pb2 = load_protos().test_pb2
    add_servicer(server, TestServiceServicer(impl),
                 test_pb2.DESCRIPTOR.services_by_name["TestService"])
    return server


def _add_port(server: Any, impl: str, address: str, use_tls: bool,
              cert_file: Optional[str], key_file: Optional[str]) -> int:
    if not use_tls:
        return server.add_insecure_port(address)
    cert, key = _read(cert_file, "tls_cert_file"), _read(key_file, "tls_key_file")
    if impl == "grpc_aio":
        import grpc
        credentials = grpc.ssl_server_credentials([(key, cert)])
    else:
        import asyncgrpc
        make = getattr(asyncgrpc, "ssl_server_credentials", None)
        if make is None:
            raise SystemExit("this asyncgrpc has no TLS support (no ssl_server_credentials)")
        credentials = make([(key, cert)])
    return server.add_secure_port(address, credentials)


async def serve(port: int, impl: str = "asyncgrpc", host: str = "[::]",
                use_tls: bool = False, tls_cert_file: Optional[str] = None,
                tls_key_file: Optional[str] = None) -> None:
    """Serve until SIGINT/SIGTERM; prints ``listening on <port>`` once bound."""
    server = build_server(impl)
    bound = _add_port(server, impl, f"{host}:{port}", use_tls, tls_cert_file, tls_key_file)
    if not bound:
        raise SystemExit(f"could not bind {host}:{port}")
    await server.start()
    print(f"asyncgrpc interop server ({impl}, {'tls' if use_tls else 'plaintext'}) "
          f"listening on {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    await stop.wait()
    await server.stop(1.0)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m asyncgrpc.interop",
        description="gRPC interop test server (grpc.testing.TestService) on asyncgrpc")
    parser.add_argument("--port", type=int, required=True,
                        help="port to listen on (0 picks a free one; it is printed)")
    parser.add_argument("--host", default="[::]", help="address to bind (default [::])")
    parser.add_argument("--use_tls", type=_bool, nargs="?", const=True, default=False,
                        help="serve TLS (--use_tls or --use_tls=true)")
    parser.add_argument("--tls_cert_file", help="PEM certificate chain for --use_tls")
    parser.add_argument("--tls_key_file", help="PEM private key for --use_tls")
    parser.add_argument("--server_impl", choices=IMPLS, default="asyncgrpc",
                        help="server to test (default asyncgrpc)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop (default asyncio)")
    return parser.parse_args(argv)


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.loop == "uvloop":
        import uvloop
        runner = uvloop.run
    else:
        runner = asyncio.run
    try:
        runner(serve(args.port, args.server_impl, args.host, args.use_tls,
                     args.tls_cert_file, args.tls_key_file))
    except KeyboardInterrupt:  # pragma: no cover
        pass
    return 0
