#!/usr/bin/env python3
"""CPU-bound handlers: inline, on the thread lane, or on the process lane.

A ``Work`` RPC does about 20 ms of pure-Python work. It is run three ways on
the same server, one after the other:

* ``inline``  -- in the handler coroutine, on the event loop;
* ``thread``  -- ``await run_in_thread(burn, n)`` (the GIL still serializes it);
* ``process`` -- ``await run_in_process(burn, n)`` on the bundled process pool.

Meanwhile a light RPC (no work) is sent at a fixed rate; its p99 latency shows
how much the CPU work gets in the way of everything else on the loop.

Host server: ``asyncgrpc.server()`` if ``import asyncgrpc`` gives one, else
``grpc.aio.server()`` with ``asyncgrpc/executor.py``'s ``Lanes`` installed by
hand (labelled in the output). The server runs in a subprocess; the client is
grpc.aio in this process (it shares the machine's cores with the server).

    python benchmarks/cpu_bound.py            # 15 s per lane
    python benchmarks/cpu_bound.py --quick    # under 30 s in all
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from case_study import (
    asyncgrpc_problem,
    ensure_stubs,
    percentile,
    start_server,
    stop_server,
)

__all__ = ["burn"]

REPO = Path(__file__).resolve().parents[1]
LANES = ("inline", "thread", "process")


def burn(iterations: int) -> tuple[int, int]:
    """Pure-Python CPU work; returns a checksum and the pid that did it.

    Module-level, so worker processes find it by name (as ``__main__.burn``).
    """
    acc = 0
    for i in range(iterations):
        acc = (acc * 31 + i) % 1_000_003
    return acc, os.getpid()


def _iterations_per_ms() -> float:
    n = 100_000
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        burn(n)
        best = min(best, time.perf_counter() - started)
    return n / (best * 1000)


# ------------------------------------------------------------------ server (subprocess side)


def _executor_module(host: str) -> ModuleType:
    """The lanes module: the package's with asyncgrpc, else asyncgrpc/executor.py on its own.

    Without asyncgrpc it is imported as top-level ``executor`` from its folder,
    so neither this process nor the workers touch the package's C extension.
    """
    if host == "asyncgrpc":
        from asyncgrpc import executor

        return executor
    sys.path.insert(0, str(REPO / "asyncgrpc"))
    import executor  # type: ignore[import-not-found]

    return executor


async def _serve(host: str, label: str) -> None:
    pb2, pb2_grpc = ensure_stubs()
    if host == "asyncgrpc":
        import asyncgrpc

        factory = asyncgrpc.server
    else:
        import grpc

        factory = grpc.aio.server
    executor = _executor_module(host)
    own_lanes = None
    if host != "asyncgrpc":
        # grpc.aio does not own lanes: install one the way asyncgrpc's server does.
        own_lanes = executor.Lanes()
        own_lanes.start(prestart=True)
        executor._install(own_lanes)
    run_in_thread = executor.run_in_thread
    run_in_process = executor.run_in_process
    per_ms = _iterations_per_ms()

    class Lab(pb2_grpc.LabServicer):  # type: ignore[misc, name-defined]
        async def Call(self, request: Any, context: Any) -> Any:
            return pb2.CallReply()

        async def Work(self, request: Any, context: Any) -> Any:
            n = int(per_ms * request.work_ms)
            if request.lane == "thread":
                checksum, pid = await run_in_thread(burn, n)
            elif request.lane == "process":
                checksum, pid = await run_in_process(burn, n)
            else:
                checksum, pid = burn(n)
            return pb2.WorkReply(checksum=checksum, pid=pid)

    server = factory()
    pb2_grpc.add_LabServicer_to_server(Lab(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    workers = own_lanes.process_workers if own_lanes else "server default"
    print(f"PORT {port}", flush=True)
    print(f"host server: {label}; process workers: {workers}; {per_ms:.0f} iterations/ms", flush=True)
    await stopping.wait()
    await server.stop(0)
    if own_lanes is not None:
        executor._uninstall(own_lanes)
        await own_lanes.stop(timeout=1.0)


# ------------------------------------------------------------------ client


async def _run_lane(stub: Any, pb2: ModuleType, lane: str, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = pb2.WorkRequest(lane=lane, work_ms=args.work_ms)
    # Warm-up: starts worker processes / threads outside the measured window.
    await asyncio.gather(*(stub.Work(request, timeout=60) for _ in range(args.concurrency)))
    work_lat: list[float] = []
    light_lat: list[float] = []
    light_fail = 0
    pids: set[int] = set()
    start = loop.time()
    stop_at = start + args.duration

    async def worker() -> None:
        while loop.time() < stop_at:
            sent = loop.time()
            reply = await stub.Work(request, timeout=60)
            work_lat.append(loop.time() - sent)
            pids.add(reply.pid)

    async def light() -> None:
        nonlocal light_fail
        sent = loop.time()
        try:
            await stub.Call(pb2.CallRequest(), timeout=10)
            light_lat.append(loop.time() - sent)
        except Exception:
            light_fail += 1

    async def prober() -> list[asyncio.Task[None]]:
        tasks = []
        i = 0
        while True:
            at = start + i / args.light_qps
            if at >= stop_at:
                return tasks
            await asyncio.sleep(max(0.0, at - loop.time()))
            tasks.append(asyncio.create_task(light()))
            i += 1

    probes, *_ = await asyncio.gather(prober(), *(worker() for _ in range(args.concurrency)))
    elapsed = loop.time() - start
    await asyncio.gather(*probes)
    return {
        "lane": lane,
        "rps": len(work_lat) / elapsed,
        "work_p50": percentile(work_lat, 50),
        "work_p99": percentile(work_lat, 99),
        "light_p50": percentile(light_lat, 50),
        "light_p99": percentile(light_lat, 99),
        "light_n": len(light_lat),
        "light_fail": light_fail,
        "pids": len(pids),
    }


async def _client(port: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import grpc

    pb2, pb2_grpc = ensure_stubs()
    results = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pb2_grpc.LabStub(channel)
        for lane in args.lanes.split(","):
            results.append(await _run_lane(stub, pb2, lane.strip(), args))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 s per lane (< 30 s in all)")
    parser.add_argument("--duration", type=float, help="seconds per lane (default 15, 4 with --quick)")
    parser.add_argument("--work-ms", type=int, default=20, help="CPU work per Work RPC")
    parser.add_argument("--concurrency", type=int, default=8, help="Work RPCs in flight")
    parser.add_argument("--light-qps", type=float, default=50.0, help="light RPCs per second")
    parser.add_argument("--lanes", default=",".join(LANES))
    parser.add_argument("--serve", choices=("asyncgrpc", "aio"), help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.label))
        return 0
    args.duration = args.duration or (4.0 if args.quick else 15.0)
    ensure_stubs()
    problem = asyncgrpc_problem()
    host = "aio" if problem else "asyncgrpc"
    label = f"grpc.aio.server() [asyncgrpc not used: {problem}]" if problem else "asyncgrpc.server()"
    proc, port = start_server(Path(__file__), ["--serve", host, "--label", label])
    assert isinstance(port, int) and proc.stdout is not None
    host_line = proc.stdout.readline().strip()
    try:
        results = asyncio.run(_client(port, args))
    finally:
        stop_server(proc)
    print(
        f"\n{host_line}\n{args.work_ms} ms of pure-Python work per Work RPC, {args.concurrency} in flight, "
        f"{args.duration:g} s per lane, light RPC at {args.light_qps:g}/s alongside; "
        f"{os.cpu_count()} cores (shared with the client)"
    )
    print(
        f"{'lane':<9}{'work req/s':>11}{'work p50':>10}{'work p99':>10}{'light p50':>11}{'light p99':>11}"
        f"{'light ok':>10}{'pids':>6}"
    )
    for r in results:
        print(
            f"{r['lane']:<9}{r['rps']:>11.1f}{r['work_p50'] * 1000:>8.1f}ms{r['work_p99'] * 1000:>8.1f}ms"
            f"{r['light_p50'] * 1000:>9.1f}ms{r['light_p99'] * 1000:>9.1f}ms"
            f"{r['light_n']:>6}/{r['light_n'] + r['light_fail']:<3}{r['pids']:>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
