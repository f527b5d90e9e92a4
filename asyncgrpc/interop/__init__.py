"""The gRPC interoperability test server for asyncgrpc.

``python -m asyncgrpc.interop --port P`` serves ``grpc.testing.TestService``
as the public gRPC interop test descriptions require of a server, so any
language's interop client can be pointed at asyncgrpc.

The ``.proto`` files ship inside the package (``asyncgrpc/interop/protos/
grpc/testing/*.proto``, package data), their ``*_pb2`` modules do not:
:func:`load_protos` generates them with ``grpc_tools.protoc`` on first use
into a cache directory keyed by the protos' contents and the protobuf and
grpcio-tools versions, and imports them from there. The generated files
import each other as ``grpc.testing.*``, which would collide with grpcio's
``grpc`` package, so those imports are made relative and the modules are
loaded as the package ``asyncgrpc.interop._pb``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import List, Optional

__all__ = ["PROTO_FILES", "ProtoError", "load_protos", "proto_dir"]

#: The interop protos, relative to the proto root, in import order.
PROTO_FILES = ("grpc/testing/empty.proto", "grpc/testing/messages.proto",
               "grpc/testing/test.proto")

_PACKAGE = __name__ + "._pb"
_GENERATED_PACKAGE = "grpc.testing"
_lock = threading.Lock()
_loaded: Optional[SimpleNamespace] = None


class ProtoError(RuntimeError):
    """The interop protos could not be found, compiled or imported."""


def proto_dir() -> Path:
    """The directory holding ``grpc/testing/*.proto``: ``$ASYNCGRPC_INTEROP_PROTO_DIR``
    if set, else the ``protos`` directory shipped in this package."""
    env = os.environ.get("ASYNCGRPC_INTEROP_PROTO_DIR")
    root = Path(env) if env else Path(__file__).resolve().parent / "protos"
    missing = [name for name in PROTO_FILES if not (root / name).is_file()]
    if missing:
        raise ProtoError(
            f"the interop protos {', '.join(missing)} are not under {root}; "
            + ("set ASYNCGRPC_INTEROP_PROTO_DIR to the directory that holds "
               "grpc/testing/*.proto" if env else
               "this asyncgrpc installation is incomplete (reinstall it)"))
    return root


def _cache_root() -> Path:
    env = os.environ.get("ASYNCGRPC_INTEROP_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "asyncgrpc" / "interop"


def _writable_root() -> Path:
    """The cache root, or a per-user temp directory if it cannot be written."""
    for root in (_cache_root(),
                 Path(tempfile.gettempdir()) / f"asyncgrpc-interop-{os.getuid()}"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK | os.X_OK):
                return root
        except OSError:
            continue
    raise ProtoError("no writable directory for the generated interop modules "
                     "(set ASYNCGRPC_INTEROP_CACHE)")


def _protoc() -> ModuleType:
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise ProtoError(
            "the asyncgrpc interop server compiles its .proto files at first use and "
            "needs grpcio-tools for that: pip install grpcio-tools") from exc
    return protoc


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "not-installed"


def _cache_key(root: Path, tools_version: str) -> str:
    import google.protobuf
    digest = hashlib.sha256()
    digest.update(f"protobuf={google.protobuf.__version__};tools={tools_version};"
                  f"py={sys.version_info[:2]}\n".encode())
    for name in PROTO_FILES:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()[:24]


def _module_names() -> List[str]:
    return [Path(name).stem + "_pb2" for name in PROTO_FILES]


def _complete(directory: Path) -> bool:
    return all((directory / f"{name}.py").is_file()
               for name in ["__init__", *_module_names()])


def _generate(root: Path, target: Path) -> None:
    """Compile the protos into ``target`` (a new directory, renamed into
    place atomically so concurrent processes never see half a cache)."""
    protoc = _protoc()
    import grpc_tools
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        out = staging / "out"
        out.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out}",
                *[str(root / name) for name in PROTO_FILES]]
        rc = protoc.main(args)
        if rc != 0:
            raise ProtoError(f"protoc failed (exit {rc}) on the interop protos in {root}")
        package = staging / "pkg"
        package.mkdir()
        generated_dir = out.joinpath(*_GENERATED_PACKAGE.split("."))
        prefix = f"from {_GENERATED_PACKAGE} import "
        for module in _module_names():
            text = (generated_dir / f"{module}.py").read_text()
            text = text.replace(prefix, "from . import ")
            for line in text.splitlines():
                # An import form we do not rewrite: refuse rather than load
                # grpcio's ``grpc`` package by mistake.
                if line.startswith(("import grpc", "from grpc")):
                    raise ProtoError(f"unexpected import in generated {module}: {line}")
            (package / f"{module}.py").write_text(text)
        (package / "__init__.py").write_text(
            '"""Generated by asyncgrpc.interop from grpc/testing/*.proto."""\n')
        try:
            os.rename(package, target)
        except OSError:
            if not _complete(target):  # unless somebody else won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _import_package(directory: Path) -> SimpleNamespace:
    spec = importlib.util.spec_from_file_location(
        _PACKAGE, directory / "__init__.py", submodule_search_locations=[str(directory)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package
    try:
        spec.loader.exec_module(package)
        modules = {name: importlib.import_module(f"{_PACKAGE}.{name}")
                   for name in _module_names()}
    except Exception:
        for name in [n for n in sys.modules if n == _PACKAGE or n.startswith(_PACKAGE + ".")]:
            del sys.modules[name]
        raise
    return SimpleNamespace(directory=directory, **modules)


def load_protos() -> SimpleNamespace:
    """The interop ``*_pb2`` modules, generated on first use.

    Returns a namespace with ``empty_pb2``, ``messages_pb2`` and ``test_pb2``
    (and ``directory``, where they were generated). Raises
    :class:`ProtoError` naming ``pip install grpcio-tools`` if the
    compiler is missing.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        root = proto_dir()
        # The generated code must match the protobuf runtime, and may differ
        # between protoc releases: both versions are part of the key.
        cache = _writable_root()
        target = cache / _cache_key(root, _dist_version("grpcio-tools"))
        if not _complete(target):
            if target.exists():  # damaged by hand: start over
                shutil.rmtree(target, ignore_errors=True)
            _generate(root, target)
        _loaded = _import_package(target)
        return _loaded


def __getattr__(name: str) -> ModuleType:
    # ``asyncgrpc.interop.test_pb2`` and friends, generated on first access.
    if name in _module_names():
        return getattr(load_protos(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
