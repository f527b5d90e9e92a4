"""Echo server on asyncgrpc: the grpc.aio server with only the server
factory changed (asyncgrpc.server() instead of grpc.aio.server()).

--loop picks the event loop.  --module names the module whose server() is
used (default asyncgrpc); `--module grpc.aio` runs the very same code on
grpc.aio, which is how this script is checked before asyncgrpc exists.
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


async def serve(impl, port, label):
    server = impl.server()
    benchmark_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
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
    args = parser.parse_args()
    impl = importlib.import_module(args.module)
    label = "%s (%s loop)" % (args.module, args.loop)
    coro = serve(impl, args.port, label)
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
