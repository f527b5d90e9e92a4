"""What one pass-through server interceptor costs per RPC.

Runs the Echo benchmark server (benchmarks/servers/asyncgrpc_server.py)
alternately without and with ``--interceptors 1`` (an interceptor whose
``intercept_service`` just awaits the continuation), each run on a fresh
server pinned to one CPU and driven by the C load generator pinned to the
other, and reports the median throughput and server CPU time per RPC of
each and their difference. Server CPU microseconds per RPC is the figure to
read: it does not depend on whether the load generator saturates the server
(throughput does, and on what else runs on the machine; "server busy" shows
how much of its CPU the server used).

    python benchmarks/interceptor_cost.py [--runs 3] [--duration 4] [--scenario unary_10x10]
    python benchmarks/interceptor_cost.py --module grpc.aio     # the same on grpc.aio
"""
from __future__ import annotations

import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (benchmarks/run.py: build, start, measure)


class EchoPeer(run.AsyncgrpcPeer):
    """The asyncgrpc Echo server (or grpc.aio's with --module grpc.aio),
    with a number of pass-through interceptors."""

    def __init__(self, module: str, interceptors: int) -> None:
        super().__init__()
        self.name = f"{module}_{interceptors}icpt"
        self.label = self.name
        self.extra_args = ("--loop", "asyncio", "--module", module,
                           "--interceptors", str(interceptors))
        if module != "asyncgrpc":
            self.needs = (module,)


def main() -> int:
    parser = run.alternate_parser(__doc__, runs=3)
    parser.add_argument("--module", default="asyncgrpc",
                        help="module providing server() (asyncgrpc or grpc.aio)")
    args = parser.parse_args()

    results, _ = run.alternate({n: EchoPeer(args.module, n) for n in (0, 1)}, args.scenario,
                               args.runs, args.duration, args.warmup, "interceptor_cost_")

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[n])

    print(f"{args.module}, scenario {args.scenario}, median of {args.runs} x "
          f"{args.duration:g} s, server on CPU 0, loadgen on CPU 1")
    for n in (0, 1):
        runs = ", ".join("%.1f" % r["server_cpu_us_per_op"] for r in results[n])
        print(f"  {n} interceptor{'s' if n != 1 else ''}: {med(n, 'throughput'):10,.0f} req/s "
              f"(server busy {100 * med(n, 'server_cpu_util'):.0f}%), "
              f"server CPU {med(n, 'server_cpu_us_per_op'):6.1f} us/RPC (runs: {runs})")
    cost = med(1, "server_cpu_us_per_op") - med(0, "server_cpu_us_per_op")
    slower = 100 * (1 - med(1, "throughput") / med(0, "throughput"))
    print(f"  one pass-through interceptor: +{cost:.1f} us of server CPU per RPC, "
          f"throughput {slower:.0f}% lower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
