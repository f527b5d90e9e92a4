"""Which gRPC C core the extension runs on, and that it keeps to itself.

* ``asyncgrpc.core_version()`` is a well-formed version equal to what the
  linked core reports (a system libgrpc asked directly through ctypes; the
  bundled core's pinned version), and is the expected one when
  ``ASYNCGRPC_EXPECT_CORE`` says which: ``system``, ``bundled`` or a version
  such as ``29.0.0`` (CI's bundled job sets ``bundled``).
* An ``ASYNCGRPC_BUNDLED_CORE=1`` build needs no gRPC, Abseil, SSL, c-ares,
  zlib or C++ runtime library at run time and exports nothing but its init
  function.
* grpcio and asyncgrpc live in one process (either imported first): an
  asyncgrpc server answers grpcio sync clients in the same process, each
  call with its own reply, on both event loops.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest

import asyncgrpc
from asyncgrpc import _core

from conftest import GENERATED, LOOP_KINDS, ROOT

EXTENSION = _core.__file__
BUNDLED = _core.BUNDLED_CORE is not None
needs_bundled = pytest.mark.skipif(not BUNDLED, reason="system-core build "
                                   "(ASYNCGRPC_BUNDLED_CORE=1 builds only)")


def _build_core_module() -> ModuleType:
    """scripts/build_core.py, which pins the bundled core."""
    spec = importlib.util.spec_from_file_location(
        "build_core", os.path.join(ROOT, "scripts", "build_core.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_core", module)  # its dataclass needs it
    spec.loader.exec_module(sys.modules["build_core"])
    return sys.modules["build_core"]


def _needed_libraries(path: str) -> list[str]:
    """The DT_NEEDED entries of a shared object."""
    out = subprocess.run(["readelf", "-d", path], check=True, capture_output=True,
                         text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _loaded_libgrpc() -> str:
    """Path of the libgrpc the dynamic loader resolves for the extension."""
    out = subprocess.run(["ldd", EXTENSION], check=True, capture_output=True,
                         text=True).stdout
    match = re.search(r"^\s*libgrpc\.so\S*\s+=>\s+(\S+)", out, re.MULTILINE)
    assert match, f"ldd shows no libgrpc:\n{out}"
    return match.group(1)


def test_core_version_is_a_version_string():
    version = asyncgrpc.core_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert "core_version" in asyncgrpc.__all__
    assert version == _core.grpc_version()


def test_core_patches_name_what_was_compiled_in():
    """``_core.CORE_PATCHES``: every patch of scripts/core_patches.py, in
    order, on the bundled core (the tests of tests/test_drain.py choose what
    to demand by it); none on a system libgrpc, which asyncgrpc cannot patch."""
    assert isinstance(_core.CORE_PATCHES, tuple)
    if BUNDLED:
        _build_core_module()            # loads scripts/core_patches.py too
        patches = sys.modules["core_patches"]
        assert _core.CORE_PATCHES == tuple(patches.names())
        assert _core.CORE_PATCHES == ("close-after-peer-read", "serve-calls-until-goaway")
    else:
        assert _core.CORE_PATCHES == ()


def test_core_patches_fail_loudly_on_sources_they_do_not_fit(tmp_path):
    """A patch whose text is not found exactly once stops the build (a new
    grpcio version must be looked at, not patched blindly)."""
    _build_core_module()
    patches = sys.modules["core_patches"]
    for patch in {p.path: p for p in patches.PATCHES}.values():
        target = tmp_path / patch.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("// a source that changed upstream\n")
    with pytest.raises(SystemExit, match="out of date"):
        patches.patched_sources(tmp_path)


def test_core_version_is_what_the_linked_core_reports():
    if BUNDLED:
        pins = _build_core_module()
        assert _core.BUNDLED_CORE == pins.GRPCIO_VERSION
        assert asyncgrpc.core_version() == pins.CORE_VERSION
    else:
        lib = ctypes.CDLL(_loaded_libgrpc())
        lib.grpc_version_string.restype = ctypes.c_char_p
        assert asyncgrpc.core_version() == lib.grpc_version_string().decode()


def test_core_is_the_expected_one():
    expected = os.environ.get("ASYNCGRPC_EXPECT_CORE")
    if not expected:
        pytest.skip("ASYNCGRPC_EXPECT_CORE is not set")
    if expected == "bundled":
        assert BUNDLED, f"expected the bundled core, got a system libgrpc " \
                        f"{asyncgrpc.core_version()}"
        assert asyncgrpc.core_version() == _build_core_module().CORE_VERSION
    elif expected == "system":
        assert not BUNDLED, f"expected a system libgrpc, got the bundled " \
                            f"core of grpcio {_core.BUNDLED_CORE}"
        assert any(n.startswith("libgrpc.so") for n in _needed_libraries(EXTENSION))
    else:
        assert asyncgrpc.core_version() == expected


@needs_bundled
def test_bundled_extension_needs_no_core_libraries():
    needed = _needed_libraries(EXTENSION)
    forbidden = ("libgrpc", "libgpr", "libabsl", "libssl", "libcrypto", "libcares",
                 "libre2", "libupb", "libaddress_sorting", "libz.", "libstdc++")
    assert not [n for n in needed if n.startswith(forbidden)], needed
    # Only the C library and its companions remain.
    assert set(needed) <= {"libc.so.6", "libm.so.6", "libpthread.so.0",
                           "librt.so.1", "libdl.so.2", "ld-linux-x86-64.so.2"}, needed


@needs_bundled
def test_bundled_extension_exports_only_its_init_function():
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", EXTENSION], check=True,
                         capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert exported == {"PyInit__core"}, sorted(exported)[:20]


_COEXIST = textwrap.dedent("""
    import asyncio, sys, threading
    sys.path.insert(0, sys.argv[3])
    if sys.argv[1] == "grpc-first":
        import grpc
        import asyncgrpc
    else:
        import asyncgrpc
        import grpc
    import helloworld_pb2, helloworld_pb2_grpc

    class Greeter(helloworld_pb2_grpc.GreeterServicer):
        async def SayHello(self, request, context):
            return helloworld_pb2.HelloReply(message="Hello " + request.name)

    def call_all(target, out):
        with grpc.insecure_channel(target) as channel:
            stub = helloworld_pb2_grpc.GreeterStub(channel)
            for i in range(20):
                reply = stub.SayHello(helloworld_pb2.HelloRequest(name=f"n{i}"),
                                      timeout=10)
                out.append((f"n{i}", reply.message))

    async def main():
        server = asyncgrpc.server()
        helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        replies = []
        # The grpcio client's core and ours run side by side in this process.
        await asyncio.get_running_loop().run_in_executor(
            None, call_all, f"127.0.0.1:{port}", replies)
        await server.stop(None)
        assert [m for _, m in replies] == ["Hello " + n for n, _ in replies], replies
        assert len(replies) == 20
        print("ok", asyncgrpc.core_version(), grpc.__version__)

    if sys.argv[2] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
""")


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
@pytest.mark.parametrize("order", ["grpc-first", "asyncgrpc-first"])
def test_grpcio_and_asyncgrpc_in_one_process(order, loop_kind):
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", _COEXIST, order, loop_kind, GENERATED],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"ok {asyncgrpc.core_version()} "), result.stdout


_EXPERIMENTS = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    import asyncgrpc
    print(repr(libc.getenv(b"GRPC_EXPERIMENTS")), repr(os.environ.get("GRPC_EXPERIMENTS")))
""")


@needs_bundled
@pytest.mark.parametrize("given", [None, "-event_engine_client"])
def test_bundled_core_experiments_do_not_leak(given):
    """The bundled core keeps its transport on iomgr (GRPC_EXPERIMENTS set
    by a constructor while the core reads its configuration): afterwards the
    variable is gone from the process (a grpcio loaded later keeps its
    defaults), and a value the user gave is left as it was."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if given is not None:
        env["GRPC_EXPERIMENTS"] = given
    out = subprocess.run([sys.executable, "-c", _EXPERIMENTS], env=env, check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout.split()
    if given is None:
        assert out == ["None", "None"], out
    else:
        assert out == [repr(given.encode()), repr(given)], out
