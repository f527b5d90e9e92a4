"""The greeter example server: a grpc.aio servicer served by asyncgrpc.

Run:  python examples/greeter/server.py [--port 50051]
or, from the command line with worker processes (register() below):
      cd examples/greeter && python -m asyncgrpc serve server:register --bind 127.0.0.1:50051 --workers 2
(The stubs helloworld_pb2*.py are generated next to this file by
examples/greeter/generate.py, which run_example.py calls.)
"""
import argparse
import asyncio
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asyncgrpc  # noqa: E402
import helloworld_pb2  # noqa: E402
import helloworld_pb2_grpc  # noqa: E402


class Greeter(helloworld_pb2_grpc.GreeterServicer):
    async def SayHello(self, request, context):
        return helloworld_pb2.HelloReply(message=f"Hello, {request.name}!")


def register(server: asyncgrpc.Server) -> None:
    """Add the Greeter service to ``server`` (for ``python -m asyncgrpc serve``)."""
    helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)


async def serve(port: int) -> None:
    server = asyncgrpc.server()                      # was: grpc.aio.server()
    register(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"serving on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=50051)
    asyncio.run(serve(parser.parse_args().port))
