"""Failed RPCs when one of two backends stops under heavy load.

Two asyncgrpc servers behind one grpcio channel (``round_robin`` over both
addresses), N client threads calling a unary echo without pause (each call
its own value, each reply checked); after 0.3 s one server runs
``stop(grace=2)``, the other serves on. Per loop, counts the repetitions with
any failed RPC and what the clients got. It runs whatever core the
in-place extension is built on (``asyncgrpc._core.CORE_PATCHES`` says
whether asyncgrpc's core patches are in); ``tests/test_drain.py`` is the
same set-up with 6 threads and a handler that sleeps 10 ms.

    python benchmarks/drain_load.py --reps 50 --threads 16
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import threading
import time
from typing import Any, Counter

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import asyncgrpc  # noqa: E402
from conftest import ServerThread  # noqa: E402  (tests/conftest.py)

SERVICE = "bench.Drain"


def _setup(server: Any) -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return request
    server.add_registered_method_handlers(
        SERVICE, {"Echo": asyncgrpc.unary_unary_rpc_method_handler(echo)})


def one_drain(loop_kind: str, threads: int) -> Counter[str]:
    a, b = ServerThread(loop_kind), ServerThread(loop_kind)
    try:
        port_a = a.start(_setup, blocked_loop_threshold=None)
        port_b = b.start(_setup, blocked_loop_threshold=None)
        channel = grpc.insecure_channel(
            f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}",
            options=[("grpc.lb_policy_name", "round_robin")])
        grpc.channel_ready_future(channel).result(timeout=10)
        method = channel.unary_unary(f"/{SERVICE}/Echo")
        done = threading.Event()
        outcomes: Counter[str] = collections.Counter()
        lock = threading.Lock()

        def client(k: int) -> None:
            i = 0
            while not done.is_set():
                value = f"{k}-{i}".encode()
                try:
                    outcome = "ok" if method(value, timeout=10) == value else "wrong reply"
                except grpc.RpcError as err:
                    outcome = f"{err.code().name}: {err.details()}"
                with lock:
                    outcomes[outcome] += 1
                i += 1

        workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        for t in workers:
            t.start()
        time.sleep(0.3)
        a.stop(2.0)
        time.sleep(0.2)
        done.set()
        for t in workers:
            t.join(20)
        channel.close()
        return outcomes
    finally:
        a.close()
        b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"])
    args = parser.parse_args()
    print(f"asyncgrpc on core {asyncgrpc.core_version()} "
          f"(patches: {', '.join(asyncgrpc._core.CORE_PATCHES) or 'none'}), "
          f"grpcio {grpc.__version__}, {args.threads} client threads, "
          f"{args.reps} drains per loop")
    print("| loop | RPCs | drains with failed RPCs | failed RPCs (what the client got) |")
    print("|---|---|---|---|")
    for loop_kind in args.loops:
        total: Counter[str] = collections.Counter()
        lossy = 0
        for _ in range(args.reps):
            outcomes = one_drain(loop_kind, args.threads)
            total.update(outcomes)
            lossy += any(k != "ok" for k in outcomes)
        failed = {k: v for k, v in total.items() if k != "ok"}
        print(f"| {loop_kind} | {sum(total.values())} | {lossy} | {failed or 0} |", flush=True)


if __name__ == "__main__":
    main()
