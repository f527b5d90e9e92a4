"""Tests of the blocked-loop watchdog (asyncgrpc/_watchdog.py) on plain asyncio loops.

Timing is kept loose for a busy 2-core machine: stalls are 3x the threshold,
and the "stays silent" test uses a threshold far above asyncio.sleep's jitter.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_watchdog() -> Any:
    """The module under test (kept as a function so the tests read the same)."""
    from asyncgrpc import _watchdog as module

    return module


_watchdog = _import_watchdog()
Watchdog = _watchdog.Watchdog
METHOD = "/helloworld.Greeter/SayHello"


async def blocking_handler() -> str:
    """An RPC handler that wrongly blocks the loop."""
    time.sleep(0.3)
    return "done"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asyncgrpc" and r.levelno == logging.WARNING]


def _watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "asyncgrpc-watchdog"]


def test_fires_once_and_names_the_rpc(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> Any:
        dog = Watchdog(asyncio.get_running_loop(), threshold=0.1)
        dog.start()
        await asyncio.sleep(0.1)
        assert await asyncio.create_task(blocking_handler(), name=METHOD) == "done"
        await asyncio.sleep(0.2)  # let the late heartbeat run: it must not warn again
        dog.stop()
        return dog

    with caplog.at_level(logging.WARNING, logger="asyncgrpc"):
        dog = asyncio.run(main())
    naming = [r for r in _warnings(caplog) if METHOD in r.getMessage()]
    assert len(naming) == 1, [r.getMessage() for r in _warnings(caplog)]
    message = naming[0].getMessage()
    assert "blocking_handler" in message  # the loop thread's stack
    assert "time.sleep(0.3)" in message
    assert dog.stalls >= 1
    assert dog.stats()["longest_stall_s"] >= 0.15


def test_silent_on_a_well_behaved_loop(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> Any:
        dog = Watchdog(asyncio.get_running_loop(), threshold=0.25)
        dog.start()
        stop = time.monotonic() + 1.0
        while time.monotonic() < stop:
            await asyncio.sleep(0.005)
        dog.stop()
        return dog

    with caplog.at_level(logging.WARNING, logger="asyncgrpc"):
        dog = asyncio.run(main())
    assert dog.stalls == 0
    assert _warnings(caplog) == []


def test_unnamed_task_falls_back_to_coroutine_name(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        dog = Watchdog(asyncio.get_running_loop(), threshold=0.1)
        dog.start()
        await asyncio.sleep(0.05)
        await asyncio.create_task(blocking_handler())
        dog.stop()

    with caplog.at_level(logging.WARNING, logger="asyncgrpc"):
        asyncio.run(main())
    assert any("while running blocking_handler" in r.getMessage() for r in _warnings(caplog))


def test_blocking_callback_outside_any_task_reports_no_rpc(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        dog = Watchdog(loop, threshold=0.1)
        dog.start()
        await asyncio.sleep(0.05)
        loop.call_soon(time.sleep, 0.3)
        await asyncio.sleep(0.1)
        dog.stop()

    with caplog.at_level(logging.WARNING, logger="asyncgrpc"):
        asyncio.run(main())
    assert any("while running no RPC" in r.getMessage() for r in _warnings(caplog))


def test_late_beat_counts_a_stall_the_thread_missed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stands in for a C call holding the GIL: the watchdog thread never gets to look.
    monkeypatch.setattr(Watchdog, "_watch", lambda self: None)

    async def main() -> Any:
        dog = Watchdog(asyncio.get_running_loop(), threshold=0.1)
        dog.start()
        await asyncio.sleep(0.05)
        time.sleep(0.3)
        await asyncio.sleep(0.1)
        dog.stop()
        return dog

    with caplog.at_level(logging.WARNING, logger="asyncgrpc"):
        dog = asyncio.run(main())
    assert dog.stalls == 1
    assert any("could not sample" in r.getMessage() for r in _warnings(caplog))


@pytest.mark.parametrize("threshold", [None, 0])
def test_disabled(threshold: float | None) -> None:
    async def main() -> Any:
        dog = Watchdog(asyncio.get_running_loop(), threshold=threshold)
        dog.start()
        assert not dog.enabled
        assert _watchdog_threads() == []
        time.sleep(0.2)
        await asyncio.sleep(0)
        dog.stop()
        return dog

    dog = asyncio.run(main())
    assert dog.stalls == 0
    assert dog.stats()["watchdog_enabled"] is False


def test_stop_ends_thread_and_heartbeat() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        dog = Watchdog(loop, threshold=0.1)
        dog.start()
        await asyncio.sleep(0.05)
        assert len(_watchdog_threads()) == 1
        dog.stop()
        assert _watchdog_threads() == []
        await asyncio.sleep(0.1)
        # No heartbeat left scheduled on the loop.
        scheduled = getattr(loop, "_scheduled", [])
        assert not any(not h.cancelled() and "_heartbeat" in repr(h) for h in scheduled)

    asyncio.run(main())


def test_start_and_stop_from_another_thread() -> None:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        dog = Watchdog(loop, threshold=0.1)
        await asyncio.to_thread(dog.start)
        await asyncio.sleep(0.05)
        await asyncio.create_task(blocking_handler(), name=METHOD)
        await asyncio.sleep(0.05)
        await asyncio.to_thread(dog.stop)
        return dog

    dog = asyncio.run(main())
    assert dog.stalls >= 1
    assert _watchdog_threads() == []


def test_stats_shape() -> None:
    loop = asyncio.new_event_loop()
    try:
        stats = Watchdog(loop, threshold=0.2).stats()
    finally:
        loop.close()
    assert stats == {
        "watchdog_enabled": True,
        "watchdog_threshold_s": 0.2,
        "loop_stalls": 0,
        "longest_stall_s": 0.0,
    }


def test_rejects_negative_threshold() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            Watchdog(loop, threshold=-1)
    finally:
        loop.close()
