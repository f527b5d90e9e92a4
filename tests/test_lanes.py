"""Tests of the execution lanes (asyncgrpc/executor.py), run directly on asyncio loops.

Each test drives its own loop with ``asyncio.run``; the lanes are loop-agnostic,
so one pool is shared by the whole module to keep start-up cost low.

Worker processes re-import, by module name, every function they are sent (and
this test module with it), so the functions used in workers are either from the
standard library or defined at module level here.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_executor() -> Any:
    """The module under test (kept as a function so the tests read the same)."""
    from asyncgrpc import executor as module

    return module


executor = _import_executor()


# ---------------------------------------------------------------- worker-side functions


@executor.cpu_bound
def fib(n: int) -> int:
    """Deliberately slow pure-Python work."""
    return n if n < 2 else fib.__wrapped__(n - 1) + fib.__wrapped__(n - 2)


@executor.cpu_bound
def worker_pid() -> int:
    return os.getpid()


def fail_in_worker(message: str) -> None:
    raise ValueError(message)


class OddError(Exception):
    """Pickles, but cannot be rebuilt from its args: the worker must substitute it."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)
        self.b = b


def raise_odd() -> None:
    raise OddError("odd", "b")


_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")
_gauge_lock = threading.Lock()
_gauge = {"now": 0, "max": 0}


def read_context() -> tuple[str, str]:
    return _request_id.get(), threading.current_thread().name


def occupy_thread(seconds: float) -> None:
    with _gauge_lock:
        _gauge["now"] += 1
        _gauge["max"] = max(_gauge["max"], _gauge["now"])
    time.sleep(seconds)
    with _gauge_lock:
        _gauge["now"] -= 1


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def lanes() -> Iterator[Any]:
    lanes = executor.Lanes(process_workers=2, thread_workers=4)
    lanes.start(prestart=True)
    executor._install(lanes)
    try:
        yield lanes
    finally:
        executor._uninstall(lanes)
        lanes.shutdown(timeout=1.0)


async def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # zombie: dead, not yet reaped
    except FileNotFoundError:
        return True


# ---------------------------------------------------------------- results through each lane


def test_process_lane_returns_results(lanes: Any) -> None:
    async def main() -> None:
        assert await executor.run_in_process(pow, 3, 4) == 81
        assert await executor.run_in_process(int, "ff", base=16) == 255
        assert await lanes.run_in_process(os.getpid) != os.getpid()

    asyncio.run(main())


def test_cpu_bound_decorator_runs_in_a_worker(lanes: Any) -> None:
    async def main() -> None:
        assert await fib(18) == 2584
        assert await worker_pid() != os.getpid()
        assert fib.__wrapped__(10) == 55  # the plain function stays callable

    asyncio.run(main())


def test_thread_lane_keeps_contextvars(lanes: Any) -> None:
    async def main() -> None:
        _request_id.set("req-42")
        value, thread_name = await executor.run_in_thread(read_context)
        assert value == "req-42"
        assert thread_name.startswith("asyncgrpc-thread")

    asyncio.run(main())


def test_thread_lane_is_bounded() -> None:
    bounded = executor.Lanes(process_workers=1, thread_workers=2)
    _gauge.update(now=0, max=0)

    async def main() -> None:
        await asyncio.gather(*(bounded.run_in_thread(occupy_thread, 0.1) for _ in range(6)))

    try:
        asyncio.run(main())
    finally:
        bounded.shutdown()
    assert _gauge["max"] == 2


# ---------------------------------------------------------------- failures


def test_exception_carries_remote_traceback(lanes: Any) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="disk on fire") as info:
            await executor.run_in_process(fail_in_worker, "disk on fire")
        cause = info.value.__cause__
        assert isinstance(cause, executor.RemoteTraceback)
        assert "fail_in_worker" in cause.tb
        assert "Traceback (most recent call last)" in cause.tb

    asyncio.run(main())


def test_exception_that_cannot_travel_is_replaced(lanes: Any) -> None:
    async def main() -> None:
        with pytest.raises(Exception) as info:
            await executor.run_in_process(raise_odd)
        assert "OddError" in str(info.value)
        assert "raise_odd" in info.value.__cause__.tb

    asyncio.run(main())


def test_worker_crash_fails_only_its_call(lanes: Any) -> None:
    async def main() -> None:
        crashes_before = lanes.stats()["worker_crashes"]
        sleeper = executor.run_in_process(time.sleep, 0.5)
        crasher = executor.run_in_process(os._exit, 1)
        slept, crashed = await asyncio.gather(sleeper, crasher, return_exceptions=True)
        assert slept is None
        assert isinstance(crashed, executor.WorkerCrashedError)
        assert crashed.exitcode == 1
        assert "_exit" in str(crashed)
        # The pool replaced the worker: later calls succeed.
        assert await asyncio.gather(*(executor.run_in_process(pow, 2, i) for i in range(4))) == [
            1,
            2,
            4,
            8,
        ]
        assert lanes.stats()["worker_crashes"] == crashes_before + 1

    asyncio.run(main())


def test_worker_killed_by_signal(lanes: Any) -> None:
    async def main() -> None:
        # SIGKILL stands in for a segfault here (no core dump on the test machine).
        with pytest.raises(executor.WorkerCrashedError, match="SIGKILL"):
            await executor.run_in_process(signal.raise_signal, signal.SIGKILL)
        assert await executor.run_in_process(pow, 2, 3) == 8

    asyncio.run(main())


def test_unpicklable_call_fails_fast_and_names_the_culprit(lanes: Any) -> None:
    async def main() -> None:
        completed = lanes.stats()["process_completed"]
        with pytest.raises(TypeError, match=r"cannot send .*<lambda>.* to a worker process"):
            await executor.run_in_process(lambda: 1)
        with pytest.raises(TypeError, match=r"cannot send argument 0 \(lock .*\) of len"):
            await executor.run_in_process(len, threading.Lock())
        with pytest.raises(TypeError, match=r"keyword argument 'key'"):
            await executor.run_in_process(sorted, [1], key=lambda x: x)
        assert lanes.stats()["process_completed"] == completed  # nothing reached a worker
        # An unpicklable result fails in the caller too, naming the function.
        with pytest.raises(TypeError, match="cannot send the result of"):
            await executor.run_in_process(threading.Lock)

    asyncio.run(main())


def test_cancel_drops_work_not_started(lanes: Any, tmp_path: Path) -> None:
    marker = tmp_path / "should-not-exist"

    async def main() -> None:
        await _wait_for(lambda: lanes.stats()["process_workers_alive"] == 2)
        blockers = [asyncio.ensure_future(executor.run_in_process(time.sleep, 1.0)) for _ in range(2)]
        await _wait_for(lambda: lanes.stats()["process_busy"] == 2)
        victim = asyncio.ensure_future(executor.run_in_process(os.mkdir, str(marker)))
        await _wait_for(lambda: lanes.stats()["process_queued"] == 1)
        victim.cancel()
        await asyncio.gather(*blockers)
        # Two more calls pass through both workers after the cancelled one.
        await asyncio.gather(*(executor.run_in_process(os.getpid) for _ in range(2)))
        assert victim.cancelled()
        assert lanes.stats()["process_queued"] == 0

    asyncio.run(main())
    assert not marker.exists()


# ---------------------------------------------------------------- shutdown and lookup


def test_stop_leaves_no_orphan_processes() -> None:
    own = executor.Lanes(process_workers=2, thread_workers=1)

    async def main() -> list[int]:
        own.start(prestart=True)
        await _wait_for(lambda: len(own.worker_pids()) == 2)
        pids = own.worker_pids()
        # One worker is busy with work nobody will wait for: stop must terminate it.
        stuck = asyncio.ensure_future(own.run_in_process(time.sleep, 60))
        await _wait_for(lambda: own.stats()["process_busy"] == 1)
        await own.stop(timeout=0.5)
        with pytest.raises(executor.LanesClosedError):
            await stuck
        with pytest.raises(executor.LanesClosedError):
            await own.run_in_process(pow, 2, 2)
        return pids

    started = time.monotonic()
    pids = asyncio.run(main())
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 5
    while not all(_process_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_process_gone(pid) for pid in pids), pids


def test_install_and_default_lanes(lanes: Any) -> None:
    other = executor.Lanes(process_workers=1, thread_workers=1)
    executor._install(other)
    try:
        assert executor.current_lanes() is other
    finally:
        executor._uninstall(other)
        other.shutdown()
    assert executor.current_lanes() is lanes
    executor._uninstall(lanes)
    try:
        default = executor.current_lanes()
        assert default is not lanes
        assert executor.current_lanes() is default  # created once, then reused
    finally:
        executor._install(lanes)
        default.shutdown()
    assert executor.current_lanes() is lanes


def test_stats_shape(lanes: Any) -> None:
    stats = lanes.stats()
    for key in (
        "process_workers",
        "process_workers_alive",
        "process_busy",
        "process_queued",
        "process_completed",
        "worker_crashes",
        "thread_workers",
        "thread_calls_active",
    ):
        assert isinstance(stats[key], int), key
    assert stats["process_workers"] == 2
    assert stats["thread_workers"] == 4
