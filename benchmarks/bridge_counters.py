"""Measure the bridge's counters per RPC at several load levels.

Starts an asyncgrpc echo server in a child process (pinned to CPU 0 when
taskset exists), drives it with a grpc.aio client (CPU 1) closed-loop at each
concurrency level, and reads asyncgrpc.stats() from the server through an
extra method before and after each level. Prints completion events, eventfd
writes, loop wake-ups and baton hand-backs per RPC.

    python benchmarks/bridge_counters.py [--levels 1,10,100] [--seconds 3]
                                         [--loop asyncio|uvloop] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time

SERVER_CODE = r'''
import asyncio, json, sys
import asyncgrpc

async def echo(request, context):
    return request

async def stats(request, context):
    return json.dumps(asyncgrpc.stats()).encode()

async def main(port):
    server = asyncgrpc.server()
    server.add_registered_method_handlers("bench.Counters", {
        "Echo": asyncgrpc.unary_unary_rpc_method_handler(echo),
        "Stats": asyncgrpc.unary_unary_rpc_method_handler(stats)})
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

if sys.argv[2] == "uvloop":
    import uvloop
    uvloop.install()
asyncio.run(main(int(sys.argv[1])))
'''

KEYS = ["events", "events_inline", "events_via_ring", "eventfd_writes", "wakeups",
        "drains", "baton_to_poller"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: int) -> list:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() > 1 else []


async def run_level(target: str, inflight: int, seconds: float) -> dict:
    import grpc.aio
    async with grpc.aio.insecure_channel(target) as channel:
        echo = channel.unary_unary("/bench.Counters/Echo")
        stats = channel.unary_unary("/bench.Counters/Stats")
        await echo(b"warm-up", timeout=10)
        await asyncio.sleep(0.1)
        before = json.loads(await stats(b"", timeout=10))
        count = 0
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < stop_at:
                assert await echo(b"x" * 16, timeout=10) == b"x" * 16
                count += 1
        start = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(inflight)])
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.1)
        after = json.loads(await stats(b"", timeout=10))
    rpcs = after["rpcs_finished"] - before["rpcs_finished"] - 1   # the Stats call itself
    row = {"inflight": inflight, "rpcs": count, "rpc_per_s": count / elapsed}
    for key in KEYS:
        row[key] = (after[key] - before[key]) / max(rpcs, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,10,100")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--quick", action="store_true", help="0.5 s per level")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else args.seconds
    port = free_port()
    server = subprocess.Popen(pinned(0) + [sys.executable, "-c", SERVER_CODE, str(port), args.loop],
                              stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            sys.exit("the server did not start")
        rows = []
        for level in [int(x) for x in args.levels.split(",")]:
            rows.append(asyncio.run(run_level(f"127.0.0.1:{port}", level, seconds)))
    finally:
        server.terminate()
        server.wait(10)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"asyncgrpc bridge counters per RPC ({args.loop} loop, grpc.aio client, "
          f"{seconds:g} s per level)")
    header = ["in flight", "RPC/s"] + KEYS
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(" | ".join([str(r["inflight"]), f"{r['rpc_per_s']:.0f}"]
                         + [f"{r[k]:.3f}" for k in KEYS]))


if __name__ == "__main__":
    main()
