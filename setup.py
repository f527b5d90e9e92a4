"""Build script for the asyncgrpc C extension.

Project metadata lives in pyproject.toml; this file only describes the
extension ``asyncgrpc._core``, whose compiler and linker flags come from
``pkg-config grpc``.

Environment switches:
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


def _extension() -> Extension:
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
    )


setup(ext_modules=[_extension()])
