#!/usr/bin/env bash
# Instructions per unary RPC with asyncgrpc's metrics off and on, counted by
# callgrind (load-independent, unlike CPU time on a shared machine).
#
#   bash benchmarks/metrics_callgrind.sh [SMALL [LARGE]]     (default 2000 6000)
#
# For each variant, `python -m asyncgrpc serve asyncgrpc_server:register`
# runs under valgrind --tool=callgrind (metrics on: --metrics-port 0) while
# the C load generator makes SMALL, then LARGE unary RPCs (10 connections x
# 10 in flight); the server gets SIGTERM and callgrind prints the
# instructions it collected. Per RPC: (Ir(LARGE) - Ir(SMALL)) / (LARGE -
# SMALL), which cancels start-up and shutdown. Needs valgrind and the
# loadgen (python benchmarks/run.py --quick builds it). About a minute.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
LOADGEN="$HERE/build/loadgen/loadgen"
SMALL=${1:-2000}
LARGE=${2:-6000}
OUT="$(mktemp -d /tmp/metrics_callgrind.XXXXXX)"
"$PY" "$HERE/servers/_stubs.py" >/dev/null

ir() {   # ir NAME N [serve args...] -> instructions collected
    local name=$1 n=$2 port vpid
    shift 2
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    (cd "$HERE/servers" && PYTHONPATH="$HERE/servers" exec valgrind --tool=callgrind \
        --callgrind-out-file="$OUT/$name.cg" "$PY" -m asyncgrpc serve asyncgrpc_server:register \
        --bind "127.0.0.1:$port" "$@") >"$OUT/$name.log" 2>&1 &
    vpid=$!
    for _ in $(seq 600); do grep -q "serving on" "$OUT/$name.log" && break; sleep 0.5; done
    "$LOADGEN" --target "127.0.0.1:$port" --method unary --connections 10 --inflight 10 \
        --requests "$n" --warmup 0 --duration 600 --payload 16 >"$OUT/$name.lg" 2>&1
    kill -TERM "$vpid"
    wait "$vpid"
    grep -q "OK=$n" "$OUT/$name.lg" || { echo "loadgen failed: $OUT/$name.lg" >&2; exit 1; }
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$OUT/$name.log"
}

for variant in off on; do
    args=()
    [ "$variant" = on ] && args=(--metrics-port 0 --metrics-addr 127.0.0.1)
    small=$(ir "${variant}_$SMALL" "$SMALL" "${args[@]}")
    large=$(ir "${variant}_$LARGE" "$LARGE" "${args[@]}")
    echo "metrics $variant: $(( (large - small) / (LARGE - SMALL) )) instructions per RPC"
done
echo "callgrind files: $OUT (callgrind_annotate --inclusive=yes $OUT/on_$LARGE.cg | grep metrics_)"
