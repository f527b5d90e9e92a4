"""Echo server on pygrpc-native's grpcio-style sync server
(pygrpc_native.server(), HTTP/2 and gRPC in Rust threads), handlers in a
ThreadPoolExecutor(100) as for the grpcio sync peer.

The servicer is grpc_sync_server.Echo, the very class the grpc_sync peer
runs.  pygrpc-native 0.5 serves unary and server-streaming methods itself;
the bidi method goes to a grpcio server it runs behind it on a Unix socket,
so the bidi scenario measures that relay, not a native path.
"""

import argparse
from concurrent import futures

import _stubs

_stubs.ensure()

import pygrpc_native  # noqa: E402

import benchmark_pb2_grpc  # noqa: E402
from grpc_sync_server import Echo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = pygrpc_native.server(futures.ThreadPoolExecutor(max_workers=100))
    benchmark_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port("127.0.0.1:%d" % args.port)
    server.start()
    print("pygrpc_native %s sync server listening on port %d" % (
        pygrpc_native.__version__, args.port), flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
