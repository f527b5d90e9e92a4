"""Echo server on the grpcio synchronous server, ThreadPoolExecutor(100)."""

import argparse
from concurrent import futures

import _stubs

_stubs.ensure()

import grpc  # noqa: E402

import benchmark_pb2  # noqa: E402
import benchmark_pb2_grpc  # noqa: E402


class Echo(benchmark_pb2_grpc.EchoServicer):
    def Unary(self, request, context):
        return benchmark_pb2.EchoReply(payload=request.payload)

    def ServerStream(self, request, context):
        payload = b"x" * request.payload_size
        for _ in range(request.count):
            yield benchmark_pb2.EchoReply(payload=payload)

    def Bidi(self, request_iterator, context):
        for request in request_iterator:
            yield benchmark_pb2.EchoReply(payload=request.payload)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=100))
    benchmark_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port("127.0.0.1:%d" % args.port)
    server.start()
    print("grpc_sync server listening on port %d" % args.port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
