"""A small asyncgrpc backend for tests/test_nginx.py, run as a subprocess.

``python tests/_nginx_backend.py NAME [GRACE]`` serves ``test.Nginx`` on
127.0.0.1 (a free port), prints ``listening on PORT`` and, on SIGTERM,
drains with ``await server.stop(GRACE)`` and exits 0 after printing
``stopped``. Every reply names the backend that produced it, so a test can
tell which backend answered each call through the proxy.

Methods (raw bytes, no protobuf):
  Unary    -> b"NAME:REQUEST"; echoes ``x-id`` as initial and trailing
              metadata; a request ``abort:CODE:DETAILS`` aborts with that
              status code (by name) and details, trailing ``x-id`` kept.
  Slow     -> as Unary after 50 ms (keeps calls in flight during a drain).
  Count    -> server streaming: b"NAME:REQUEST:i" for i in range(3).
  Join     -> client streaming: b"NAME:" + b",".join(requests).
  Echo     -> bidi: b"NAME:" + request, for each request.
"""
from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any, AsyncIterator, Tuple

import asyncgrpc

SERVICE = "test.Nginx"


def _id(context: asyncgrpc.ServicerContext) -> Tuple[Tuple[str, str], ...]:
    """The caller's ``x-id`` metadata (empty if it sent none)."""
    return tuple((k, v) for k, v in context.invocation_metadata() if k == "x-id")


def build(name: str, options: Any = None) -> asyncgrpc.Server:
    """The backend server with its handlers (not started)."""
    tag = name.encode()

    async def unary(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
        ident = _id(context)
        await context.send_initial_metadata(ident + (("x-backend", name),))
        context.set_trailing_metadata(ident)
        if request.startswith(b"abort:"):
            _, code, details = request.decode().split(":", 2)
            await context.abort(getattr(asyncgrpc.StatusCode, code), details)
        return tag + b":" + request

    async def slow(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
        await asyncio.sleep(0.05)
        return tag + b":" + request

    async def count(request: bytes, context: asyncgrpc.ServicerContext) -> AsyncIterator[bytes]:
        context.set_trailing_metadata(_id(context))
        for i in range(3):
            yield tag + b":" + request + b":" + str(i).encode()

    async def join(requests: AsyncIterator[bytes], context: asyncgrpc.ServicerContext) -> bytes:
        context.set_trailing_metadata(_id(context))
        return tag + b":" + b",".join([r async for r in requests])

    async def echo(requests: AsyncIterator[bytes],
                   context: asyncgrpc.ServicerContext) -> AsyncIterator[bytes]:
        context.set_trailing_metadata(_id(context))
        async for r in requests:
            yield tag + b":" + r

    server = asyncgrpc.server(options=options)
    server.add_registered_method_handlers(SERVICE, {
        "Unary": asyncgrpc.unary_unary_rpc_method_handler(unary),
        "Slow": asyncgrpc.unary_unary_rpc_method_handler(slow),
        "Count": asyncgrpc.unary_stream_rpc_method_handler(count),
        "Join": asyncgrpc.stream_unary_rpc_method_handler(join),
        "Echo": asyncgrpc.stream_stream_rpc_method_handler(echo),
    })
    return server


async def main(name: str, grace: float) -> None:
    """Serve until SIGTERM, then drain with ``stop(grace)``."""
    server = build(name)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"listening on {port}", flush=True)
    await stop.wait()
    print("draining", flush=True)
    await server.stop(grace)
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0))
