"""Echo server on asyncgrpc: the grpc.aio server with only the server
factory changed (asyncgrpc.server() instead of grpc.aio.server()).

--loop picks the event loop.  --module names the module whose server() is
used (default asyncgrpc); `--module grpc.aio` runs the very same code on
grpc.aio, which is how this script is checked before asyncgrpc exists.
--interceptors N installs N pass-through server interceptors (for
benchmarks/interceptor_cost.py). --metrics turns asyncgrpc's RPC metrics on
(for benchmarks/metrics_cost.py). register(server) adds the Echo service, for
`python -m asyncgrpc serve asyncgrpc_server:register` (benchmarks/workers.py).
"""

import argparse
import asyncio
import importlib

import _stubs

_stubs.ensure()

import benchmark_pb2  # noqa: E402
import benchmark_pb2_grpc  # noqa: E402


class Echo(benchmark_pb2_grpc.EchoServicer):
    async def Unary(self, request, context):
        return benchmark_pb2.EchoReply(payload=request.payload)

    async def ServerStream(self, request, context):
        payload = b"x" * request.payload_size
        for _ in range(request.count):
            yield benchmark_pb2.EchoReply(payload=payload)

    async def Bidi(self, request_iterator, context):
        async for request in request_iterator:
            yield benchmark_pb2.EchoReply(payload=request.payload)

    async def Hold(self, request, context):
        # `count` replies, then nothing until the client cancels (the
        # handler is cancelled then): benchmarks/idle_streams.py
        payload = b"x" * request.payload_size
        for _ in range(request.count):
            yield benchmark_pb2.EchoReply(payload=payload)
        await asyncio.get_running_loop().create_future()


def pass_through_class(impl):
    """A server interceptor class (on impl.ServerInterceptor, which both
    asyncgrpc and grpc.aio provide) that hands every call on unchanged."""

    class PassThrough(impl.ServerInterceptor):
        async def intercept_service(self, continuation, handler_call_details):
            return await continuation(handler_call_details)
    return PassThrough


def register(server):
    """Add the Echo service to ``server``."""
    benchmark_pb2_grpc.add_EchoServicer_to_server(Echo(), server)


async def serve(impl, port, label, interceptors=0, metrics=False):
    if interceptors:
        cls = pass_through_class(impl)
        server = impl.server(interceptors=[cls() for _ in range(interceptors)])
    else:
        server = impl.server()
    if metrics:
        impl.enable_metrics(server, opentelemetry=False)
    register(server)
    server.add_insecure_port("127.0.0.1:%d" % port)
    await server.start()
    print("%s server listening on port %d" % (label, port), flush=True)
    await server.wait_for_termination()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"),
                        default="asyncio")
    parser.add_argument("--module", default="asyncgrpc",
                        help="module providing server() (default asyncgrpc)")
    parser.add_argument("--interceptors", type=int, default=0,
                        help="number of pass-through interceptors (default 0)")
    parser.add_argument("--metrics", action="store_true",
                        help="asyncgrpc.enable_metrics(server) (asyncgrpc only)")
    args = parser.parse_args()
    impl = importlib.import_module(args.module)
    label = "%s (%s loop, %d interceptors%s)" % (args.module, args.loop, args.interceptors,
                                                ", metrics" if args.metrics else "")
    coro = serve(impl, args.port, label, args.interceptors, args.metrics)
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
