"""Worker processes: ``python -m asyncgrpc serve --workers N``.

Serves the Echo benchmark service (benchmarks/servers/asyncgrpc_server.py,
``register``) through the command line with 1 and 2 workers, metrics on
(``--metrics-port``: worker k serves its counters on port P+k), and reports:

* spread: ``--connections`` grpcio channels, each its own connection, make
  one Unary call each; the per-worker counts come from each worker's
  ``grpc_server_handled_total``;
* throughput with 1 and 2 workers under the C load generator (unary,
  10 connections x 10 in flight by default), alternating runs, and how the
  loadgen's RPCs spread over the workers in each run.

Nothing is pinned: the workers and the load generator share the machine's
CPUs (2 on this project's machine), so the 2-worker figure is what two
workers get while the load generator takes a good part of a core.

    python benchmarks/workers.py [--runs 3] [--duration 4] [--connections 100]
"""
from __future__ import annotations

import os
import socket
import statistics
import sys
import urllib.request
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (benchmarks/run.py: build, start, measure)

UNARY = ("grpc_server_handled_total", "asyncgrpc.bench.Echo", "Unary")


def _consecutive_free_ports(n: int) -> int:
    """P such that P .. P+n-1 are free now."""
    for _ in range(100):
        base = run.free_port()
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def handled_per_worker(metrics_port: int, workers: int) -> List[int]:
    """Unary RPCs each worker completed with OK, read from its metrics port."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for k in range(workers):
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + k}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        total = 0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if (s.name == UNARY[0] and s.labels.get("grpc_service") == UNARY[1]
                        and s.labels.get("grpc_method") == UNARY[2]
                        and s.labels.get("grpc_code") == "OK"):
                    total += int(s.value)
        out.append(total)
    return out


class WorkersPeer(run.AsyncgrpcPeer):
    """``python -m asyncgrpc serve asyncgrpc_server:register --workers N``."""

    def __init__(self, workers: int) -> None:
        super().__init__()
        self.workers = workers
        self.name = f"asyncgrpc_{workers}worker{'s' if workers > 1 else ''}"
        self.label = self.name
        self.metrics_port: Optional[int] = None

    def env(self, ctx: Any) -> Dict[str, str]:
        env = super().env(ctx)
        env["PYTHONPATH"] = os.pathsep.join(
            [run.SERVERS_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        return env

    def command(self, ctx: Any, port: int) -> List[str]:
        self.metrics_port = _consecutive_free_ports(self.workers)
        return [ctx.python, "-m", "asyncgrpc", "serve", "asyncgrpc_server:register",
                "--bind", f"127.0.0.1:{port}", "--workers", str(self.workers),
                "--metrics-port", str(self.metrics_port), "--metrics-addr", "127.0.0.1"]

    def extra_stats(self, ctx: Any, server: Any) -> Dict[str, Any]:
        assert self.metrics_port is not None
        return {"per_worker": handled_per_worker(self.metrics_port, self.workers)}


def spread(ctx: Any, connections: int) -> List[int]:
    """Per-worker counts of ``connections`` one-call connections (2 workers)."""
    import grpc

    peer = WorkersPeer(2)
    server = run.Server(ctx, peer, "spread")
    try:
        server.wait_ready()
        before = handled_per_worker(peer.metrics_port, 2)
        for i in range(connections):
            with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                ch.unary_unary("/asyncgrpc.bench.Echo/Unary")(b"", timeout=10)
        after = handled_per_worker(peer.metrics_port, 2)
    finally:
        server.stop()
    return [a - b for a, b in zip(after, before)]


def main() -> int:
    parser = run.alternate_parser(__doc__, runs=3)
    parser.add_argument("--connections", type=int, default=100,
                        help="grpcio connections of the spread test (default 100)")
    args = parser.parse_args()

    # Nothing pinned: the workers and the load generator share the CPUs.
    results, counts = run.alternate(
        {n: WorkersPeer(n) for n in (1, 2)}, args.scenario, args.runs, args.duration,
        args.warmup, "workers_", server_cpus="0,1", client_cpus="0,1", pin=False,
        before=lambda ctx: spread(ctx, args.connections))
    print(f"spread: {args.connections} grpcio connections, one Unary call each, 2 workers: "
          f"{counts[0]} / {counts[1]}")
    print(f"scenario {args.scenario}, median of {args.runs} alternating runs x {args.duration:g} s, "
          "nothing pinned (workers and loadgen share the CPUs), metrics on")
    for n in (1, 2):
        tput = statistics.median(r["throughput"] for r in results[n])
        p99 = statistics.median(r["latency_us"]["p99"] for r in results[n]) / 1000
        runs = ", ".join("%.0f" % r["throughput"] for r in results[n])
        split = "; ".join("/".join(str(c) for c in r["extra"]["per_worker"])
                          for r in results[n])
        print(f"  {n} worker{'s' if n > 1 else ' '}: {tput:10,.0f} req/s, p99 {p99:.1f} ms "
              f"(runs: {runs})\n      RPCs per worker in each run (whole run incl. warm-up): {split}")
    ratio = (statistics.median(r["throughput"] for r in results[2])
             / statistics.median(r["throughput"] for r in results[1]))
    print(f"  2 workers / 1 worker: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
