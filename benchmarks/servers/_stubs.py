"""Generates the Python modules for proto/benchmark.proto (benchmark_pb2,
benchmark_pb2_grpc) with grpcio-tools, into a build directory that is not
committed, and makes them importable.

The directory is specific to the interpreter, since the generated code must
match the protobuf runtime that will import it.

    python benchmarks/servers/_stubs.py      # generate, print the directory
"""

import hashlib
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.dirname(HERE)
PROTO_DIR = os.path.join(os.path.dirname(BENCH_DIR), "proto")
PROTO_FILE = os.path.join(PROTO_DIR, "benchmark.proto")
BUILD_ROOT = os.environ.get(
    "ASYNCGRPC_BENCH_BUILD", os.path.join(BENCH_DIR, "build"))


def stubs_dir():
    key = "%s|%d.%d" % (os.path.realpath(sys.executable), *sys.version_info[:2])
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    return os.path.join(BUILD_ROOT, "py", tag)


def _up_to_date(out):
    target = os.path.join(out, "benchmark_pb2_grpc.py")
    return (os.path.exists(target)
            and os.path.getmtime(target) >= os.path.getmtime(PROTO_FILE))


def ensure():
    """Generates the stubs if needed, puts them on sys.path, returns the dir."""
    out = stubs_dir()
    if not _up_to_date(out):
        from grpc_tools import protoc  # grpcio-tools
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".gen-", dir=os.path.dirname(out))
        try:
            rc = protoc.main([
                "grpc_tools.protoc",
                "--proto_path=" + PROTO_DIR,
                "--python_out=" + tmp,
                "--grpc_python_out=" + tmp,
                PROTO_FILE,
            ])
            if rc != 0:
                raise RuntimeError("grpc_tools.protoc failed with %d" % rc)
            # replace atomically, so concurrent runs never see half a dir
            old = None
            if os.path.exists(out):
                old = out + ".old.%d" % os.getpid()
                os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                if not _up_to_date(out):  # lost a race to another process?
                    raise
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if out not in sys.path:
        sys.path.insert(0, out)
    return out


if __name__ == "__main__":
    print(ensure())
