"""The three lanes through a real server: process pool, thread pool and the
blocked-loop watchdog are started and stopped by asyncgrpc.server()."""
from __future__ import annotations

import logging
import os
import threading
import time

import grpc
import pytest

import asyncgrpc

from test_unary import add_raw_methods, path


def square(x: int) -> int:          # module-level: the worker imports it by name
    return x * x


def crash() -> None:
    os._exit(3)


@asyncgrpc.cpu_bound
def cube(x: int) -> int:
    return x * x * x


def test_process_and_thread_lanes_from_handlers(server_thread, recorder):
    async def in_process(request, context):
        return str(await asyncgrpc.run_in_process(square, int(request))).encode()

    async def decorated(request, context):
        return str(await cube(int(request))).encode()

    async def in_thread(request, context):
        name = await asyncgrpc.run_in_thread(lambda: threading.current_thread().name)
        return name.encode()

    async def crashing(request, context):
        await asyncgrpc.run_in_process(crash)
        return b"unreachable"

    async def pids(request, context):
        return ",".join(map(str, server_thread.server._lanes.worker_pids())).encode()
    server_thread.start(lambda s: add_raw_methods(s, {
        "Square": in_process, "Cube": decorated, "Thread": in_thread,
        "Crash": crashing, "Pids": pids}), process_workers=2)
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary(path("Square"))(b"12", timeout=60) == b"144"
        assert channel.unary_unary(path("Cube"))(b"3", timeout=60) == b"27"
        thread_name = channel.unary_unary(path("Thread"))(b"", timeout=10).decode()
        assert thread_name != f"server-{server_thread.loop_kind}"
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("Crash"))(b"", timeout=60)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        # the pool replaced the worker: later calls succeed
        assert channel.unary_unary(path("Square"))(b"5", timeout=60) == b"25"
        worker_pids = [int(p) for p in channel.unary_unary(path("Pids"))(b"", timeout=10).split(b",")
                       if p]
    assert worker_pids
    server_thread.stop(grace=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in worker_pids):
        time.sleep(0.05)
    assert not [p for p in worker_pids if _alive(p)], "worker processes outlived the server"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_blocked_loop_is_reported_with_the_method(server_thread, caplog):
    async def blocking(request, context):
        time.sleep(0.3)                 # the mistake the watchdog is for
        return b"slow"

    async def polite(request, context):
        return b"fast"
    server_thread.start(lambda s: add_raw_methods(s, {"Block": blocking, "Polite": polite}),
                        blocked_loop_threshold=0.1)
    with caplog.at_level(logging.WARNING, logger="asyncgrpc"):
        with grpc.insecure_channel(server_thread.target) as channel:
            for _ in range(20):
                channel.unary_unary(path("Polite"))(b"", timeout=10)
            time.sleep(0.3)
            assert server_thread.server.stats()["loop_stalls"] == 0
            assert channel.unary_unary(path("Block"))(b"", timeout=10) == b"slow"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server_thread.server.stats()["loop_stalls"] == 0:
        time.sleep(0.05)
    assert server_thread.server.stats()["loop_stalls"] >= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(path("Block") in m for m in warnings), warnings
    assert not any(path("Polite") in m for m in warnings)


def test_watchdog_can_be_turned_off(server_thread):
    server_thread.start(lambda s: None, blocked_loop_threshold=None)
    assert server_thread.server.stats()["watchdog_enabled"] in (False, 0)
