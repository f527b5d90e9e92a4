"""What asyncgrpc's RPC metrics (asyncgrpc.enable_metrics) cost.

Runs the Echo benchmark server (benchmarks/servers/asyncgrpc_server.py)
alternately without and with ``--metrics``, each run on a fresh server
pinned to one CPU and driven by the C load generator pinned to the other,
and reports the median throughput and server CPU time per RPC of each and
their difference. The machine may be shared: the runs alternate (off, on,
off, on, ...) so that a change in background load hits both, and the
medians are compared.

    python benchmarks/metrics_cost.py [--runs 5] [--duration 4] [--scenario unary_10x10]
"""
from __future__ import annotations

import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (benchmarks/run.py: build, start, measure)


class EchoPeer(run.AsyncgrpcPeer):
    """The asyncgrpc Echo server with metrics off or on."""

    def __init__(self, metrics: bool) -> None:
        super().__init__()
        self.name = "asyncgrpc_metrics_" + ("on" if metrics else "off")
        self.label = self.name
        self.extra_args = ("--loop", "asyncio") + (("--metrics",) if metrics else ())


def main() -> int:
    parser = run.alternate_parser(__doc__, runs=5)
    args = parser.parse_args()

    results, _ = run.alternate({on: EchoPeer(on) for on in (False, True)}, args.scenario,
                               args.runs, args.duration, args.warmup, "metrics_cost_")

    def med(on: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[on])

    print(f"scenario {args.scenario}, median of {args.runs} alternating runs x "
          f"{args.duration:g} s, server on CPU 0, loadgen on CPU 1")
    for on in (False, True):
        tput = ", ".join("%.0f" % r["throughput"] for r in results[on])
        cpu = ", ".join("%.1f" % r["server_cpu_us_per_op"] for r in results[on])
        print(f"  metrics {'on ' if on else 'off'}: {med(on, 'throughput'):10,.0f} req/s "
              f"(server busy {100 * med(on, 'server_cpu_util'):.0f}%), "
              f"server CPU {med(on, 'server_cpu_us_per_op'):5.1f} us/RPC, "
              f"p99 {statistics.median(r['latency_us']['p99'] for r in results[on]) / 1000:.1f} ms"
              f"\n      runs: {tput} req/s; {cpu} us/RPC")
    cost = med(True, "server_cpu_us_per_op") - med(False, "server_cpu_us_per_op")
    change = 100 * (med(True, "throughput") / med(False, "throughput") - 1)
    print(f"  metrics on vs off: {cost:+.2f} us of server CPU per RPC "
          f"({100 * cost / med(False, 'server_cpu_us_per_op'):+.1f}%), "
          f"throughput {change:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
