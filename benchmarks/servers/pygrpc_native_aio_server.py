"""Echo server on pygrpc-native's asyncio server (pygrpc_native.aio.server(),
HTTP/2 and gRPC in Rust threads, handlers on the asyncio loop).

The servicer is grpc_aio_server.Echo, the very class the grpc.aio peer runs.
pygrpc-native 0.5 serves unary and server-streaming methods itself; the bidi
method goes to a grpc.aio server it runs behind it on a Unix socket, so the
bidi scenario measures that relay, not a native path.
"""

import argparse
import asyncio

import _stubs

_stubs.ensure()

import pygrpc_native  # noqa: E402
import pygrpc_native.aio  # noqa: E402

import benchmark_pb2_grpc  # noqa: E402
from grpc_aio_server import Echo  # noqa: E402


async def serve(port: int) -> None:
    """Serves Echo on 127.0.0.1:port until killed."""
    server = pygrpc_native.aio.server()
    benchmark_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port("127.0.0.1:%d" % port)
    await server.start()
    print("pygrpc_native %s aio server listening on port %d" % (
        pygrpc_native.__version__, port), flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
