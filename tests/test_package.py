"""asyncgrpc as a user gets it: sdist -> wheel -> a clean virtualenv.

One module-scoped build: ``python -m build --sdist`` of the checkout, a
fresh venv (no system site-packages, the running Python's version), ``pip
wheel`` of that sdist in the venv (so the sdist alone must be enough to
build the extension against the system gRPC C core: what ``pip install
asyncgrpc-X.tar.gz`` does), and ``pip install WHEEL[interop]``. Everything
installed runs with its working directory outside the source tree.

Checked: the sdist carries the C sources, headers, build files and package
data; the wheel carries the extension and the package data; the installed
package imports from the venv; a small app serves an RPC and the built-in
health service from it; ``python -m asyncgrpc.interop`` serves interop
calls from it (its protos are package data) and exits 0 on SIGTERM.
A bundled-core build (``ASYNCGRPC_BUNDLED_CORE``) is not covered here.
"""
from __future__ import annotations

import glob
import os
import select
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
INTEROP_PROTOS = ["empty.proto", "messages.proto", "test.proto"]
BUILD_TIMEOUT = 300  # seconds, per build/install step (a loaded machine compiles slowly)

# The package is built here from scratch, without sanitizers: the ASan pass
# of the suite (LD_PRELOAD of libasan) would only run pip and gcc slower.
pytestmark = pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="builds its own non-sanitized wheel; nothing for the AddressSanitizer pass")


def _env() -> Dict[str, str]:
    """The environment of processes run from the venv: no trace of the
    checkout (PYTHONPATH) or of the running venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: List[Any], cwd: Path, timeout: float = BUILD_TIMEOUT) -> str:
    """Run ``cmd``; its stdout, or an assertion error with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The sdist, the wheel built from it and a venv with the wheel installed."""
    pytest.importorskip("build", reason="python -m build is a test dependency: "
                                        "pip install -e '.[test]'")
    work = tmp_path_factory.mktemp("package")
    dist, wheels, venv = work / "dist", work / "wheels", work / "venv"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", dist, ROOT], cwd=ROOT)
    (sdist,) = dist.glob("asyncgrpc-*.tar.gz")
    # The venv is made from the interpreter beneath the running one's venv.
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", venv], cwd=work)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "wheel", "-q", "--no-deps", sdist, "-w", wheels], cwd=work)
    (wheel,) = wheels.glob("asyncgrpc-*.whl")
    _run([python, "-m", "pip", "install", "-q", f"{wheel}[interop]"], cwd=work)
    outside = work / "elsewhere"   # a working directory that is not the checkout
    outside.mkdir()
    return SimpleNamespace(sdist=sdist, wheel=wheel, venv=venv, python=python, cwd=outside)


# -- what the archives hold ---------------------------------------------------

def test_sdist_has_what_a_build_needs(package: SimpleNamespace) -> None:
    with tarfile.open(package.sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n[len(top) + 1:] for n in tar.getnames()}
    sources = {os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "src" / "*.[ch]"))}
    assert sources and sources <= names, sources - names
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in",
            "asyncgrpc/__init__.py", "asyncgrpc/py.typed", "asyncgrpc/_core.pyi",
            "asyncgrpc/health.py", "asyncgrpc/interop/server.py"} <= names
    assert {f"asyncgrpc/interop/protos/grpc/testing/{p}" for p in INTEROP_PROTOS} <= names
    assert not [n for n in names if n.startswith("tests/")], "tests/ is not for the sdist"


def test_wheel_has_the_extension_and_package_data(package: SimpleNamespace) -> None:
    names = set(zipfile.ZipFile(package.wheel).namelist())
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    assert [n for n in names if n.startswith(f"asyncgrpc/_core.{tag}") and n.endswith(".so")]
    assert {"asyncgrpc/py.typed", "asyncgrpc/_core.pyi", "asyncgrpc/health.py",
            "asyncgrpc/reflection.py", "asyncgrpc/interop/__main__.py"} <= names
    assert {f"asyncgrpc/interop/protos/grpc/testing/{p}" for p in INTEROP_PROTOS} <= names


def test_installed_package_is_the_one_imported(package: SimpleNamespace) -> None:
    out = _run([package.python, "-c",
                "import asyncgrpc, asyncgrpc._core, asyncgrpc.interop as i; "
                "print(asyncgrpc.__file__); print(asyncgrpc._core.__file__); print(i.proto_dir())"],
               cwd=package.cwd, timeout=60)
    for line in out.split():
        path = Path(line).resolve()
        assert package.venv.resolve() in path.parents, line
        assert ROOT not in path.parents, line


# -- serving from the installed package ----------------------------------------

class Process:
    """A server in the venv that prints ``listening on PORT`` when ready."""

    def __init__(self, cmd: List[Any], cwd: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env={**_env(), **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self._read_line(60)
        if "listening on " not in line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"server did not start: {line!r}\n"
                                 f"{err.decode(errors='replace')[-5000:]}")
        self.port = int(line.split()[-1])

    def _read_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline, line = time.monotonic() + timeout, b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 1) if ready else b""
            if not chunk:
                break
            line += chunk
        return line.decode(errors="replace").strip()

    def stop(self) -> str:
        """SIGTERM, wait; returns stderr. Asserts a clean exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        text = err.decode(errors="replace")
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}:\n{text[-5000:]}"
        assert "Traceback" not in text, text[-5000:]
        return text


APP = '''
import asyncio, signal
import asyncgrpc

async def hello(request, context):
    return b"hello " + request

async def main():
    server = asyncgrpc.server()
    server.add_registered_method_handlers(
        "pkg.App", {"Hello": asyncgrpc.unary_unary_rpc_method_handler(hello)})
    health = asyncgrpc.enable_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    health.set("pkg.App", "SERVING")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("listening on", port, flush=True)
    await stop.wait()
    await server.stop(5)

asyncio.run(main())
'''

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _health_request(service: str) -> bytes:
    """A HealthCheckRequest by hand (field 1, string): the client needs no
    grpcio-health-checking."""
    data = service.encode()
    assert len(data) < 128
    return (b"\x0a" + bytes([len(data)]) + data) if data else b""


def test_app_serves_rpcs_and_health_from_the_installed_package(package: SimpleNamespace) -> None:
    app = package.cwd / "app.py"
    app.write_text(APP)
    server = Process([package.python, app], cwd=package.cwd)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            ident = uuid.uuid4().hex.encode()
            assert channel.unary_unary("/pkg.App/Hello")(ident, timeout=10) == b"hello " + ident
            check = channel.unary_unary(HEALTH_CHECK)
            # HealthCheckResponse{status: SERVING} is field 1, varint 1.
            assert check(_health_request(""), timeout=10) == b"\x08\x01"
            assert check(_health_request("pkg.App"), timeout=10) == b"\x08\x01"
            with pytest.raises(grpc.RpcError) as info:
                check(_health_request("pkg.Nope"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


def test_interop_server_runs_from_the_installed_wheel(package: SimpleNamespace) -> None:
    from google.protobuf import message_factory

    from asyncgrpc.interop import load_protos   # the client's copy, from the checkout
    protos = load_protos()
    messages = protos.messages_pb2
    service = protos.test_pb2.DESCRIPTOR.services_by_name["TestService"]

    def method(name: str, kind: str) -> Any:
        m = service.methods_by_name[name]
        return getattr(channel, kind)(
            f"/{service.full_name}/{name}",
            request_serializer=message_factory.GetMessageClass(m.input_type).SerializeToString,
            response_deserializer=message_factory.GetMessageClass(m.output_type).FromString)

    server = Process([package.python, "-m", "asyncgrpc.interop", "--port", "0",
                      "--host", "127.0.0.1"], cwd=package.cwd,
                     env={"ASYNCGRPC_INTEROP_CACHE": str(package.cwd / "interop-cache")})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            empty = method("EmptyCall", "unary_unary")(protos.empty_pb2.Empty(), timeout=10)
            assert empty == protos.empty_pb2.Empty()
            reply = method("UnaryCall", "unary_unary")(
                messages.SimpleRequest(response_size=314, payload=messages.Payload(body=b"x" * 27)),
                timeout=10)
            assert len(reply.payload.body) == 314
            sizes = [5, 17, 3]
            replies = list(method("StreamingOutputCall", "unary_stream")(
                messages.StreamingOutputCallRequest(
                    response_parameters=[messages.ResponseParameters(size=s) for s in sizes]),
                timeout=10))
            assert [len(r.payload.body) for r in replies] == sizes
            with pytest.raises(grpc.RpcError) as info:
                method("UnaryCall", "unary_unary")(messages.SimpleRequest(
                    response_status=messages.EchoStatus(code=2, message="from the wheel")),
                    timeout=10)
            assert info.value.code() == grpc.StatusCode.UNKNOWN
            assert info.value.details() == "from the wheel"
    finally:
        server.stop()
    # The modules were generated from the wheel's protos, into the cache given.
    assert list((package.cwd / "interop-cache").glob("*/test_pb2.py"))
