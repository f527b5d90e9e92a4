"""Echo server on grpclib (pure-Python HTTP/2 gRPC on asyncio).

The handlers are mapped by hand (grpclib's __mapping__ protocol), so no
grpclib code generator is needed; the messages are the same benchmark_pb2.
"""

import argparse
import asyncio

import _stubs

_stubs.ensure()

from grpclib.const import Cardinality, Handler  # noqa: E402
from grpclib.server import Server  # noqa: E402

import benchmark_pb2  # noqa: E402

SERVICE = "/asyncgrpc.bench.Echo/"


class Echo:
    async def Unary(self, stream):
        request = await stream.recv_message()
        await stream.send_message(
            benchmark_pb2.EchoReply(payload=request.payload))

    async def ServerStream(self, stream):
        request = await stream.recv_message()
        payload = b"x" * request.payload_size
        for _ in range(request.count):
            await stream.send_message(benchmark_pb2.EchoReply(payload=payload))

    async def Bidi(self, stream):
        async for request in stream:
            await stream.send_message(
                benchmark_pb2.EchoReply(payload=request.payload))

    async def Hold(self, stream):
        # `count` replies, then nothing until the client cancels
        request = await stream.recv_message()
        payload = b"x" * request.payload_size
        for _ in range(request.count):
            await stream.send_message(benchmark_pb2.EchoReply(payload=payload))
        await asyncio.get_running_loop().create_future()

    def __mapping__(self):
        req, rep = benchmark_pb2.EchoRequest, benchmark_pb2.EchoReply
        return {
            SERVICE + "Unary": Handler(
                self.Unary, Cardinality.UNARY_UNARY, req, rep),
            SERVICE + "ServerStream": Handler(
                self.ServerStream, Cardinality.UNARY_STREAM,
                benchmark_pb2.StreamRequest, rep),
            SERVICE + "Bidi": Handler(
                self.Bidi, Cardinality.STREAM_STREAM, req, rep),
            SERVICE + "Hold": Handler(
                self.Hold, Cardinality.UNARY_STREAM,
                benchmark_pb2.StreamRequest, rep),
        }


async def serve(port):
    server = Server([Echo()])
    await server.start("127.0.0.1", port)
    print("grpclib server listening on port %d" % port, flush=True)
    await server.wait_closed()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
