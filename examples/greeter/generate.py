"""Generate helloworld_pb2.py and helloworld_pb2_grpc.py next to this file."""
import os
import sys

from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def main() -> None:
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={HERE}",
                      f"--grpc_python_out={HERE}",
                      os.path.join(PROTO_DIR, "helloworld.proto")])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")


if __name__ == "__main__":
    main()
