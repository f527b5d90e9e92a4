"""``python -m asyncgrpc.interop --port P [--use_tls] [--server_impl asyncgrpc|grpc_aio]``"""
import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
