"""Build the gRPC C core that ``ASYNCGRPC_BUNDLED_CORE=1`` links into asyncgrpc.

The sources are those of grpcio's source distribution on PyPI (the C core
and its third-party libraries: Abseil, BoringSSL, c-ares, re2, upb,
utf8_range, zlib), pinned by version AND sha256 below; nothing else is
downloaded. The objects are compiled the way grpcio's setup.py compiles them
(same include directories and defines, ``-fvisibility=hidden``), minus the
parts a server does not use (xDS and its envoy protos, RLS, grpclb, ALTS, the
cloud call credentials, the client-only load-balancing policies), and
archived into one static library that setup.py links with
``-Wl,--exclude-libs,ALL``: nothing of the core is exported from
``asyncgrpc._core``, which therefore runs beside grpcio in one process.

asyncgrpc changes three sources of the core (scripts/core_patches.py: how
a server closes a connection after its GOAWAY, and which calls it still
serves once shutdown began); the patched copies are compiled instead of the
originals.

The build lives outside the source tree, in
``${ASYNCGRPC_CORE_CACHE:-~/.cache/asyncgrpc}/core-<version>-<flags hash>/``,
one object file per source, and is reused when present: only missing
objects are compiled. Environment:

  ASYNCGRPC_CORE_CACHE   cache directory (default ~/.cache/asyncgrpc)
  ASYNCGRPC_CORE_JOBS    parallel compiler processes (default: CPU count)
  ASYNCGRPC_CORE_SDIST   a local copy of the pinned sdist (hash-checked)
  CC / CXX               compilers (default gcc / g++)

Run it by hand to fill the cache (setup.py calls :func:`build` itself)::

    python scripts/build_core.py            # build, print the archive path
    python scripts/build_core.py --print-dir
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path


def _load_core_patches():
    """scripts/core_patches.py (asyncgrpc's changes to the core), found
    beside this file however this file was loaded."""
    if "core_patches" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "core_patches", Path(__file__).resolve().with_name("core_patches.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["core_patches"] = module   # its dataclass needs it
        spec.loader.exec_module(module)
    return sys.modules["core_patches"]


core_patches = _load_core_patches()

GRPCIO_VERSION = "1.85.1"
GRPCIO_SDIST_SHA256 = "5f530287d5de5f7f66089ead81de44f6787162944dab3922efa65dfdff108a1d"
# What grpc_version_string() of this core returns (the C core's own
# version; checked against the sources when they are unpacked).
CORE_VERSION = "58.0.0"
GRPCIO_SDIST_URL = (
    "https://files.pythonhosted.org/packages/f0/03/"
    "f9e805772d4d01da2a1754a5f63c58601eacaf8f1e878729217188de7d16/"
    f"grpcio-{GRPCIO_VERSION}.tar.gz"
)

# Parts of grpcio's CORE_SOURCE_FILES a server built on the C core API does
# not need. The defines below switch off their registration in the plugin
# registry (GRPC_NO_XDS, GRPC_NO_RLS, GRPC_MINIMAL_LB_POLICY); the rest is
# reachable only through public API functions asyncgrpc does not call
# (ALTS, cloud credentials), so the linker never asks for it. setup.py
# checks after linking that no symbol was left undefined.
EXCLUDED_PREFIXES = (
    # xDS: client, server config fetcher, resolver, LB policies, filters,
    # credentials and the generated envoy/xds/udpa/cel protos.
    "src/core/xds/",
    "src/core/ext/upb-gen/envoy/",
    "src/core/ext/upb-gen/xds/",
    "src/core/ext/upb-gen/udpa/",
    "src/core/ext/upb-gen/validate/",
    "src/core/ext/upb-gen/cel/",
    "src/core/ext/upbdefs-gen/",
    "src/core/ext/filters/rbac/",
    "src/core/ext/filters/gcp_authentication/",
    "src/core/ext/filters/stateful_session/",
    "src/core/ext/filters/fault_injection/",
    "src/core/filter/composite/",
    "src/core/filter/ext_proc/",
    "src/core/resolver/xds/",
    "src/core/resolver/google_c2p/",
    "src/core/credentials/transport/xds/",
    "src/core/server/xds_",
    "src/core/handshaker/http_connect/xds_http_proxy_mapper.cc",
    # Client-side load balancing beyond pick_first (GRPC_MINIMAL_LB_POLICY)
    # and RLS (GRPC_NO_RLS).
    "src/core/load_balancing/xds/",
    "src/core/load_balancing/rls/",
    "src/core/load_balancing/priority/",
    "src/core/load_balancing/outlier_detection/",
    "src/core/load_balancing/weighted_target/",
    "src/core/load_balancing/round_robin/",
    "src/core/load_balancing/ring_hash/",
    "src/core/load_balancing/autosharding/",
    "src/core/load_balancing/weighted_round_robin/",
    # ALTS (Google-internal transport security) and cloud call credentials.
    "src/core/tsi/alts/",
    "src/core/credentials/transport/alts/",
    "src/core/credentials/call/external/",
    "src/core/credentials/call/gcp_service_account_identity/",
    "src/core/credentials/call/gdch_service_account/",
    "src/core/ext/upb-gen/grpc/gcp/",
    # Call credentials and Google default credentials: a client's; the
    # registries that name them are registered only with xDS.
    "src/core/credentials/call/jwt/",
    "src/core/credentials/call/jwt_token_file/",
    "src/core/credentials/call/oauth2/",
    "src/core/credentials/call/iam/",
    "src/core/credentials/call/plugin/",
    "src/core/credentials/call/token_fetcher/",
    "src/core/credentials/call/jwt_util.cc",
    "src/core/credentials/call/json_util.cc",
    "src/core/credentials/call/regional_access_boundary_fetcher.cc",
    "src/core/credentials/call/call_creds_registry_init.cc",
    "src/core/credentials/transport/google_default/",
    "src/core/credentials/transport/channel_creds_registry_init.cc",
    "src/core/util/gcp_metadata_query.cc",
    "src/core/util/http_client/",
    # gRPC authorization policy engines (grpc_authorization_policy_provider_*
    # create them), RBAC matchers and the regular expressions they need.
    "src/core/lib/security/authorization/",
    "src/core/util/matchers.cc",
    "third_party/re2/",
    # In-process transport, the legacy channelz API, fake and local
    # credentials (tests' and same-host clients'), census context.
    "src/core/ext/transport/inproc/",
    "src/core/channelz/v2tov1/",
    "src/core/credentials/transport/fake/",
    "src/core/tsi/fake_transport_security.cc",
    "src/core/credentials/transport/local/",
    "src/core/ext/filters/census/",
    # Windows and Apple sources listed among the portable ones (they
    # compile to nothing on Linux).
    "third_party/address_sorting/address_sorting_windows.c",
    "src/core/util/windows/",
    "src/core/lib/event_engine/windows/",
    "src/core/lib/event_engine/cf_engine/",
)
EXCLUDED_SUFFIXES = ("_windows.cc", "_windows.c", "_apple.cc")

# Files that define a symbol the kept code references, although they sit
# under an excluded prefix.
KEPT_DESPITE_PREFIX: tuple[str, ...] = (
    # The server's authorization filter is always in the filter stack
    # (lib/surface/init.cc); it only asks a policy provider, if given one.
    "src/core/lib/security/authorization/grpc_server_authz_filter.cc",
    "src/core/lib/security/authorization/authorization_policy_provider_vtable.cc",
    # HTTP/1 request formatting and response parsing: the HTTP CONNECT
    # handshaker and the chttp2 transport use them.
    "src/core/util/http_client/format_request.cc",
    "src/core/util/http_client/parser.cc",
    # Backend metrics (ORCA load reports) and channelz's promise protos.
    "src/core/ext/upb-gen/xds/data/orca/",
    "src/core/ext/upbdefs-gen/src/proto/grpc/channelz/v2/",
    "src/core/ext/upbdefs-gen/google/protobuf/",
)

DEFINES = (
    # grpcio's (setup.py, non-Windows).
    "HAVE_CONFIG_H=1",
    "GRPC_ENABLE_FORK_SUPPORT=1",
    "GRPC_POSIX_FORK_ALLOW_PTHREAD_ATFORK=1",
    "__STDC_FORMAT_MACROS",
    'GRPC_XDS_USER_AGENT_NAME_SUFFIX="asyncgrpc"',
    f'GRPC_XDS_USER_AGENT_VERSION_SUFFIX="{GRPCIO_VERSION}"',
    # Ours: leave out what a server does not use (see EXCLUDED_PREFIXES).
    "GRPC_NO_XDS",
    "GRPC_NO_RLS",
    "GRPC_MINIMAL_LB_POLICY",
)

# Relative to the sdist root; grpcio's setup.py order.
INCLUDE_DIRS = (
    "include",
    ".",
    "third_party/abseil-cpp",
    "third_party/address_sorting/include",
    "third_party/cares/cares/include",
    "third_party/cares",
    "third_party/cares/cares",
    "third_party/cares/cares/src/lib/include",
    "third_party/cares/cares/src/lib",
    "third_party/cares/config_linux",
    "third_party/re2",
    "third_party/boringssl-with-bazel/include",
    "third_party/upb",
    "src/core/ext/upb-gen",
    "src/core/ext/upbdefs-gen",
    "third_party/utf8_range",
    "third_party/xxhash",
    "third_party/cel-c",
    "third_party/zlib",
)

COMMON_FLAGS = (
    "-fPIC", "-pthread", "-O2", "-DNDEBUG",
    "-fvisibility=hidden", "-fno-wrapv",
    "-ffunction-sections", "-fdata-sections",
    "-w",  # third-party code: its warnings are not ours to fix
)
C_FLAGS = ("-std=gnu11",)
CXX_FLAGS = ("-std=c++17", "-fno-exceptions", "-fvisibility-inlines-hidden")

# Libraries the archive needs from the system at link time.
LINK_LIBRARIES = ("pthread", "rt", "m", "dl")

ARCHIVE_NAME = "libasyncgrpc_grpc_core.a"

# A precompiled header of what most of the core's C++ files include first
# (the standard library, Abseil, the core's base headers): it cuts the
# compile time of src/core/ by about a third. It changes no object (only
# headers with include guards, compiled with the same flags); a file that
# does not compile with it is compiled again without it.
PCH_HEADERS = (
    "<grpc/support/port_platform.h>",
    "<algorithm>", "<atomic>", "<functional>", "<map>", "<memory>",
    "<optional>", "<string>", "<utility>", "<variant>", "<vector>",
    '"absl/log/log.h"', '"absl/log/check.h"', '"absl/status/status.h"',
    '"absl/status/statusor.h"', '"absl/strings/str_cat.h"',
    '"absl/strings/str_format.h"', '"absl/strings/string_view.h"',
    '"absl/functional/any_invocable.h"', '"absl/container/flat_hash_map.h"',
    "<grpc/grpc.h>", "<grpc/event_engine/event_engine.h>",
    '"src/core/util/grpc_check.h"', '"src/core/util/ref_counted_ptr.h"',
    '"src/core/lib/debug/trace.h"', '"src/core/lib/iomgr/exec_ctx.h"',
    '"src/core/lib/channel/channel_args.h"', '"src/core/lib/slice/slice.h"',
    '"src/core/lib/experiments/experiments.h"',
    '"src/core/config/core_configuration.h"', '"src/core/call/metadata_batch.h"',
    '"src/core/lib/promise/promise.h"', '"src/core/lib/resource_quota/arena.h"',
    '"src/core/lib/transport/transport.h"', '"src/core/channelz/channelz.h"',
)
PCH_NAME = "asyncgrpc_core_pch.h"


@dataclasses.dataclass(frozen=True)
class CoreBuild:
    """What setup.py needs to link against a finished core build."""

    version: str           # grpcio release the sources come from
    archive: Path          # the static library
    include_dir: Path      # the core's public headers (grpc/grpc.h ...)
    libraries: tuple[str, ...]
    patches: tuple[str, ...]  # names of scripts/core_patches.py's patches


def _log(msg: str) -> None:
    print(f"[asyncgrpc core] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """The directory holding the sdist, its sources and the builds."""
    env = os.environ.get("ASYNCGRPC_CORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "asyncgrpc"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(root: Path) -> Path:
    """The pinned grpcio sdist in the cache, downloaded from PyPI if absent."""
    target = root / f"grpcio-{GRPCIO_VERSION}.tar.gz"
    if target.exists() and _sha256(target) == GRPCIO_SDIST_SHA256:
        return target
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        local = os.environ.get("ASYNCGRPC_CORE_SDIST")
        if local:
            _log(f"copying {local}")
            shutil.copyfile(local, tmp)
        else:
            _log(f"downloading {GRPCIO_SDIST_URL}")
            with urllib.request.urlopen(GRPCIO_SDIST_URL, timeout=120) as resp, \
                    open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
        got = _sha256(tmp)
        if got != GRPCIO_SDIST_SHA256:
            raise SystemExit(
                f"error: grpcio-{GRPCIO_VERSION}.tar.gz has sha256 {got}, "
                f"expected {GRPCIO_SDIST_SHA256}; refusing to build from it")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def extract(sdist: Path, root: Path) -> Path:
    """The unpacked sdist (unpacked once; a stamp marks completion)."""
    src = root / f"grpcio-{GRPCIO_VERSION}"
    stamp = root / f".grpcio-{GRPCIO_VERSION}.extracted-{GRPCIO_SDIST_SHA256[:16]}"
    if stamp.exists() and src.is_dir():
        return src
    _log(f"unpacking {sdist.name}")
    shutil.rmtree(src, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp / f"grpcio-{GRPCIO_VERSION}", src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    version_cc = (src / "src" / "core" / "lib" / "surface" / "version.cc").read_text()
    if f'return "{CORE_VERSION}";' not in version_cc:
        raise SystemExit(f"error: grpcio {GRPCIO_VERSION}'s core does not report "
                         f"version {CORE_VERSION} (scripts/build_core.py is out of date)")
    stamp.touch()
    return src


def _grpcio_lists(src: Path) -> tuple[list[str], list[str]]:
    """CORE_SOURCE_FILES and the x86/arm assembly files of the sdist."""
    namespace: dict = {}
    path = src / "src" / "python" / "grpcio" / "grpc_core_dependencies.py"
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return (list(namespace["CORE_SOURCE_FILES"]),
            list(namespace["ASM_SOURCE_FILES"]["crypto_asm"]))


def source_files(src: Path) -> list[str]:
    """The sources compiled into the archive, relative to the sdist root."""
    core, asm = _grpcio_lists(src)
    kept = [f for f in core
            if f.startswith(KEPT_DESPITE_PREFIX)
            or not (f.startswith(EXCLUDED_PREFIXES) or f.endswith(EXCLUDED_SUFFIXES))]
    return kept + asm


def _compilers() -> tuple[list[str], list[str]]:
    return (shlex.split(os.environ.get("CC", "gcc")),
            shlex.split(os.environ.get("CXX", "g++")))


def _flags_key() -> str:
    """Hash of everything that changes the objects (except the file list)."""
    cc, cxx = _compilers()
    parts = [GRPCIO_VERSION, GRPCIO_SDIST_SHA256, *DEFINES, *INCLUDE_DIRS,
             *COMMON_FLAGS, *C_FLAGS, *CXX_FLAGS, shlex.join(cc), shlex.join(cxx)]
    for tool in (cc, cxx):
        out = subprocess.run([*tool, "--version"], capture_output=True, text=True)
        parts.append(out.stdout.splitlines()[0] if out.stdout else "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def build_dir() -> Path:
    """Where this configuration's objects and archive live."""
    return cache_root() / f"core-{GRPCIO_VERSION}-{_flags_key()}"


def _object_name(source: str) -> str:
    return source.replace("/", "__") + ".o"


def _base_command(src: Path, cxx_source: bool) -> list[str]:
    cc, cxx = _compilers()
    if cxx_source:
        cmd = [*cxx, *COMMON_FLAGS, *CXX_FLAGS]
    else:  # .c and .S
        cmd = [*cc, *COMMON_FLAGS, *C_FLAGS]
    cmd += [f"-D{d}" for d in DEFINES]
    return cmd + [f"-I{src / d}" for d in INCLUDE_DIRS]


def _compile_command(src: Path, source: str, obj: Path,
                     pch: Path | None = None, path: Path | None = None) -> list[str]:
    """The compiler command for ``source`` (read from ``path`` when given:
    a patched copy; its includes still resolve in the sdist)."""
    cmd = _base_command(src, source.endswith((".cc", ".cpp")))
    if pch is not None:
        cmd += ["-include", str(pch), "-Winvalid-pch"]
    return cmd + ["-c", str(path or src / source), "-o", str(obj)]


def _uses_pch(source: str) -> bool:
    return source.startswith("src/core/") and source.endswith(".cc")


def _make_pch(src: Path, out: Path) -> Path | None:
    """The precompiled header (built once per build dir); None if it fails."""
    key = hashlib.sha256("\n".join(PCH_HEADERS).encode()).hexdigest()[:8]
    header = out / f"pch-{key}" / PCH_NAME
    gch = header.with_name(PCH_NAME + ".gch")
    if gch.exists():
        return header
    header.parent.mkdir(exist_ok=True)
    header.write_text("".join(f"#include {h}\n" for h in PCH_HEADERS))
    tmp = gch.with_name(f"{gch.name}.tmp{os.getpid()}")
    proc = subprocess.run(
        [*_base_command(src, True), "-x", "c++-header", str(header),
         "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        _log("precompiled header failed, compiling without it:\n"
             + proc.stderr[-2000:])
        return None
    os.replace(tmp, gch)
    return header


def _compile_one(src: Path, source: str, obj: Path, pch: Path | None,
                 path: Path | None = None) -> str | None:
    """Compile one source; None on success, else the compiler's message."""
    tmp = obj.with_suffix(f".tmp{os.getpid()}")
    attempts = [pch, None] if pch is not None and _uses_pch(source) else [None]
    for header in attempts:
        proc = subprocess.run(_compile_command(src, source, tmp, header, path),
                              capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, obj)  # a killed build leaves no truncated object
            return None
        tmp.unlink(missing_ok=True)
    return f"{source}:\n{proc.stderr.strip()}"


def build(jobs: int | None = None) -> CoreBuild:
    """Compile the missing objects and (re)make the archive if needed."""
    root = cache_root()
    src = extract(fetch_sdist(root), root)
    out = build_dir()
    objdir = out / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    sources = source_files(src)
    # A patched source is compiled from its copy in patched/ into an object
    # named after the patched text, so changing a patch recompiles that file
    # only, and an unpatched build could never pick the object up.
    patched: dict[str, Path] = {}
    names = {s: _object_name(s) for s in sources}
    for source, text in core_patches.patched_sources(src).items():
        copy = out / "patched" / source
        if not copy.exists() or copy.read_text() != text:
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(text)
        patched[source] = copy
        names[source] = names[source][:-2] + f".{core_patches.digest(text)}.o"
    objects = [objdir / names[s] for s in sources]
    todo = [(s, o) for s, o in zip(sources, objects) if not o.exists()]
    if todo:
        jobs = jobs or int(os.environ.get("ASYNCGRPC_CORE_JOBS") or 0) or os.cpu_count() or 1
        _log(f"compiling {len(todo)} of {len(sources)} core sources "
             f"with {jobs} jobs into {out}")
        started = time.monotonic()
        errors: list[str] = []
        done = 0
        pch = _make_pch(src, out) if any(_uses_pch(s) for s, _ in todo) else None
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            # C++ first: the longest compiles should not be left for the end.
            todo.sort(key=lambda so: not so[0].endswith(".cc"))
            for err in pool.map(
                    lambda so: _compile_one(src, *so, pch, patched.get(so[0])), todo):
                done += 1
                if err:
                    errors.append(err)
                if done % 100 == 0 or done == len(todo):
                    _log(f"{done}/{len(todo)} compiled "
                         f"({time.monotonic() - started:.0f} s)")
        if errors:
            raise SystemExit("error: compiling the gRPC core failed:\n"
                             + "\n\n".join(errors[:5]))
        _log(f"compiled in {time.monotonic() - started:.0f} s")
    archive = out / ARCHIVE_NAME
    listing = "\n".join(str(o) for o in objects) + "\n"
    list_file = out / "objects.txt"
    if todo or not archive.exists() or not list_file.exists() \
            or list_file.read_text() != listing:
        # pid-suffixed: two builds sharing the cache never write one file.
        tmp_archive = out / f"{ARCHIVE_NAME}.tmp{os.getpid()}"
        tmp_archive.unlink(missing_ok=True)
        tmp_list = out / f"objects.txt.tmp{os.getpid()}"
        tmp_list.write_text(listing)
        subprocess.run(["ar", "rcs", str(tmp_archive), f"@{tmp_list}"], check=True)
        os.replace(tmp_archive, archive)
        os.replace(tmp_list, list_file)
        _log(f"archived {len(objects)} objects into {archive}")
    return CoreBuild(version=GRPCIO_VERSION, archive=archive,
                     include_dir=src / "include", libraries=LINK_LIBRARIES,
                     patches=tuple(core_patches.names()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", "-j", type=int, default=None)
    parser.add_argument("--print-dir", action="store_true",
                        help="print the build directory and exit (no build)")
    parser.add_argument("--list", action="store_true",
                        help="print the sources that are compiled and exit")
    args = parser.parse_args()
    if args.print_dir:
        print(build_dir())
        return
    if args.list:
        root = cache_root()
        print("\n".join(source_files(extract(fetch_sdist(root), root))))
        return
    print(build(args.jobs).archive)


if __name__ == "__main__":
    main()
