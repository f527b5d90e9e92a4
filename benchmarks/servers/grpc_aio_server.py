"""Echo server on grpc.aio (the reference the project wants to beat)."""

import argparse
import asyncio

import _stubs

_stubs.ensure()

import grpc  # noqa: E402

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


async def serve(port):
    server = grpc.aio.server()
    benchmark_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port("127.0.0.1:%d" % port)
    await server.start()
    print("grpc_aio server listening on port %d" % port, flush=True)
    await server.wait_for_termination()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
