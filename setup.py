"""Build script for the asyncgrpc C extension.

Project metadata lives in pyproject.toml; this file only describes the
extension ``asyncgrpc._core``. It links one of two gRPC C cores:

* by default, the system's: compiler and linker flags come from
  ``pkg-config grpc`` (Debian 12: libgrpc 1.51.1, core version 29.0.0,
  which carries known vulnerabilities; see README, "Which gRPC core").
* with ``ASYNCGRPC_BUNDLED_CORE=1``, a current core compiled from the
  pinned grpcio sdist (scripts/build_core.py: version and sha256 pinned
  there, build cached in ``~/.cache/asyncgrpc``: about 11 minutes on two
  vCPUs the first time, seconds afterwards) and linked statically with its symbols hidden
  (``-fvisibility=hidden``, ``-Wl,--exclude-libs,ALL``, a version script
  exporting only ``PyInit__core``, static libstdc++): the extension then
  needs no libgrpc/libssl/libabsl at run time and lives beside grpcio in
  one process. ``ASYNCGRPC_BUNDLED_CORE=1 pip wheel .`` makes a wheel that
  installs anywhere with the same glibc or newer.

Environment switches:
  ASYNCGRPC_BUNDLED_CORE=1    link the bundled core instead of pkg-config's.
  ASYNCGRPC_CORE_CACHE=DIR    where the bundled core is built and kept.
  ASYNCGRPC_CORE_JOBS=N       parallel compilers for it (default: CPUs).
  ASYNCGRPC_SANITIZE=address  build with AddressSanitizer and UBSan
                              (run Python with LD_PRELOAD of libasan).
  ASYNCGRPC_DEBUG=1           build with -O0 -g.
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))

_INSTALL_HINT = (
    "asyncgrpc needs the gRPC C core and pkg-config to build.\n"
    "Install them first:\n"
    "  Debian/Ubuntu: sudo apt-get install libgrpc-dev pkg-config\n"
    "  Fedora:        sudo dnf install grpc-devel pkgconf-pkg-config\n"
    "  Homebrew:      brew install grpc pkg-config\n"
)


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        sys.exit("error: pkg-config was not found.\n" + _INSTALL_HINT)
    try:
        out = subprocess.run(
            ["pkg-config", *args, "grpc"],
            check=True, capture_output=True, text=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit("error: pkg-config cannot find the gRPC C core (grpc.pc): "
                 + exc.stderr.strip() + "\n" + _INSTALL_HINT)
    return shlex.split(out)


def _bundled() -> bool:
    return os.environ.get("ASYNCGRPC_BUNDLED_CORE", "") not in ("", "0")


def _bundled_core_flags() -> tuple[list[str], list[str], str]:
    """Compile and link flags for the core built by scripts/build_core.py."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import build_core
    finally:
        sys.path.pop(0)
    core = build_core.build()
    version_script = os.path.join(ROOT, "scripts", "exports.map")
    cflags = ["-I" + str(core.include_dir),
              f'-DASYNCGRPC_BUNDLED_GRPCIO="{core.version}"',
              f'-DASYNCGRPC_CORE_PATCHES="{" ".join(core.patches)}"']
    libs = [
        str(core.archive),
        # Nothing of the archive (nor of libstdc++/libgcc) is exported:
        # only PyInit__core is, so grpcio's own core in the same process
        # never binds to ours, nor ours to its.
        "-Wl,--exclude-libs,ALL",
        f"-Wl,--version-script={version_script}",
        "-Wl,--gc-sections",
        "-static-libstdc++", "-static-libgcc",
        *("-l" + lib for lib in core.libraries),
    ]
    return cflags, libs, str(core.archive)


class BuildExt(build_ext):
    """build_ext that keeps the two cores' builds apart and checks the link.

    The objects of src/ compiled against one core's headers must never be
    linked with the other core: each core gets its own build_temp, and an
    existing extension built for the other core is rebuilt, however new it
    is. After a bundled-core link, every undefined symbol must come from
    Python or the system libraries (which carry symbol versions): a shared
    object may keep undefined symbols until it is loaded, so a core source
    that scripts/build_core.py leaves out but is needed shows up here.
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        if _bundled():
            self.build_temp = os.path.join(self.build_temp, "bundled-core")

    def build_extension(self, ext: Extension) -> None:
        target = self.get_ext_fullpath(ext.name)
        if os.path.exists(target) and _links_system_grpc(target) == _bundled():
            self.force = True
        if _bundled():
            # Built here, not when setup.py is loaded: pip loads it several
            # times (metadata, requirements) before building anything.
            cflags, libs, archive = _bundled_core_flags()
            ext.extra_compile_args = cflags + ext.extra_compile_args
            ext.extra_link_args = libs + ext.extra_link_args
            ext.depends = [*ext.depends, archive]  # relink when it changes
        super().build_extension(ext)
        if _bundled():
            _check_undefined(self.get_ext_fullpath(ext.name))


def _links_system_grpc(path: str) -> bool:
    """Whether the shared object at path needs a system libgrpc."""
    try:
        out = subprocess.run(["readelf", "-d", path],
                             capture_output=True, text=True).stdout
    except OSError:  # no binutils: assume it was built the same way
        return not _bundled()
    return "[libgrpc.so" in out


def _check_undefined(path: str) -> None:
    out = subprocess.run(["nm", "-D", "--undefined-only", path],
                         check=True, capture_output=True, text=True).stdout
    missing = []
    for line in out.splitlines():
        kind, name = line.split()[-2:]
        # Weak references ("w", "v") may stay unresolved (optional hooks,
        # thread_local initialisers); versioned ones are the system's.
        if kind in ("w", "v") or "@" in name or name.startswith(("Py", "_Py")):
            continue
        missing.append(name)
    if missing:
        os.unlink(path)  # a later build must not take it for up to date
        sys.exit(f"error: {path} has undefined symbols the bundled gRPC core "
                 "should define (a source scripts/build_core.py leaves out is "
                 "needed):\n  " + "\n  ".join(sorted(missing)[:50]))


def _extension() -> Extension:
    if _bundled():
        cflags, libs = [], []  # added by BuildExt.build_extension
    else:
        cflags = _pkg_config("--cflags")
        libs = _pkg_config("--libs")
    extra_compile = ["-std=c11", "-Wall", "-Wextra", "-Werror",
                     "-Wno-missing-field-initializers", "-fvisibility=hidden"]
    extra_link: list[str] = []
    if os.environ.get("ASYNCGRPC_DEBUG"):
        extra_compile += ["-O0", "-g"]
    sanitize = os.environ.get("ASYNCGRPC_SANITIZE", "")
    if sanitize:
        if sanitize != "address":
            sys.exit("error: ASYNCGRPC_SANITIZE supports only 'address' "
                     "(AddressSanitizer + UBSan)")
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined", "-g", "-O1"]
        extra_compile += san
        extra_link += san
    return Extension(
        "asyncgrpc._core",
        sources=sorted(glob.glob(os.path.join("src", "*.c"))),
        depends=sorted(glob.glob(os.path.join("src", "*.h"))),
        extra_compile_args=cflags + extra_compile,
        extra_link_args=libs + extra_link,
        # Link with g++ when the C++ core is in: -static-libstdc++ needs it.
        language="c++" if _bundled() else None,
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
