"""Failed RPCs when one of two backends stops under heavy load.

Two asyncgrpc servers behind one grpcio channel (``round_robin`` over both
addresses), N client threads calling a unary echo without pause (each call
its own value, each reply checked); after 0.3 s one server runs
``stop(grace=2)``, the other serves on. Per loop, counts the repetitions with
any failed RPC and what the clients got. It runs whatever core the
in-place extension is built on (``asyncgrpc._core.CORE_PATCHES`` says
whether asyncgrpc's core patches are in). The set-up is
``tests/test_drain.py``'s, which runs it with 6 threads and a handler that
sleeps 10 ms.

    python benchmarks/drain_load.py --reps 50 --threads 16
    python benchmarks/drain_load.py --reps 15 --in-flight 4x25

The second form is ``tests/test_drain.py``'s replies-in-flight case: one
server, 4 connections with 25 calls each in flight (the handler sleeps
0.3 s) when ``stop(10)`` begins; what counts is the replies lost.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Counter

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import asyncgrpc  # noqa: E402
import test_drain  # noqa: E402  (tests/test_drain.py)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"])
    parser.add_argument("--in-flight", metavar="CONNxCALLS",
                        help="instead: one server, CONN connections with CALLS "
                             "unary calls each in flight when stop() begins (e.g. 4x25)")
    args = parser.parse_args()
    what = (f"{args.in_flight} calls in flight" if args.in_flight
            else f"{args.threads} client threads")
    print(f"asyncgrpc on core {asyncgrpc.core_version()} "
          f"(patches: {', '.join(asyncgrpc._core.CORE_PATCHES) or 'none'}), "
          f"grpcio {grpc.__version__}, {what}, {args.reps} drains per loop")
    print("| loop | RPCs | drains with failed RPCs | failed RPCs (what the client got) |")
    print("|---|---|---|---|")
    for loop_kind in args.loops:
        total: Counter[str] = collections.Counter()
        lossy = 0
        for _ in range(args.reps):
            if args.in_flight:
                conns, calls = (int(n) for n in args.in_flight.split("x"))
                outcomes = test_drain._replies_in_flight(loop_kind, conns, calls)
            else:
                outcomes, _ = test_drain._one_drain(loop_kind, grace=2.0, threads=args.threads,
                                                    delay=0.0, warmup=0.3)
            total.update(outcomes)
            lossy += any(k != "ok" for k in outcomes)
        failed = {k: v for k, v in total.items() if k != "ok"}
        print(f"| {loop_kind} | {sum(total.values())} | {lossy} | {failed or 0} |", flush=True)


if __name__ == "__main__":
    main()
