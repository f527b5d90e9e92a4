"""Blocked-event-loop detector.

A heartbeat callback on the loop re-arms itself every ``threshold / 4`` seconds
and stamps a monotonic time. A daemon thread wakes at the same rate and, if the
stamp has gone stale by more than ``threshold``, logs one warning for that stall
(logger ``asyncgrpc``) naming the RPC whose handler task is running and showing
the loop thread's current stack. Nothing is added per callback or per RPC: the
cost is a few dozen timer callbacks and thread wake-ups a second.

The server names each handler task with the full method path (for example
``/helloworld.Greeter/SayHello``); that name is what the warning reports.

If the thread cannot run during the stall (a C extension holding the GIL), the
heartbeat still notices the late beat afterwards, counts the stall and logs it
without a stack.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time
import traceback
from typing import Any

__all__ = ["DEFAULT_THRESHOLD", "Watchdog", "describe_task"]

DEFAULT_THRESHOLD = 0.1
_DEFAULT_TASK_NAME = re.compile(r"Task-\d+\Z")  # what asyncio calls an unnamed task
_logger = logging.getLogger("asyncgrpc")


def _running_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
    """The task the loop is running now, read from another thread."""
    # current_task(loop) only reads the loop's entry in a dict (and on newer
    # Pythons looks the loop's thread up), so calling it off the loop is safe.
    try:
        return asyncio.current_task(loop)
    except Exception:
        current = getattr(asyncio.tasks, "_current_tasks", None)
        return current.get(loop) if isinstance(current, dict) else None


def describe_task(task: asyncio.Task[Any] | None) -> str:
    """The RPC method path the server gave the task, else its coroutine's name."""
    if task is None:
        return "no RPC"
    name = task.get_name()
    if not _DEFAULT_TASK_NAME.match(name):
        return name
    qualname = getattr(task.get_coro(), "__qualname__", None)
    return f"{qualname} ({name})" if qualname else name


class Watchdog:
    """Warns when ``loop`` does not turn for more than ``threshold`` seconds.

    ``threshold`` of ``None`` or ``0`` turns it off (``start()`` does nothing).
    ``start()`` and ``stop()`` may be called from the loop thread or any other.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold: float | None = DEFAULT_THRESHOLD,
        *,
        logger: logging.Logger | None = None,
        stack_limit: int = 40,
    ) -> None:
        if threshold is not None and threshold < 0:
            raise ValueError("threshold must be positive, or None/0 to turn the watchdog off")
        self.loop = loop
        self.threshold = float(threshold) if threshold else None
        self.logger = logger or _logger
        self.stack_limit = stack_limit
        # Beats (and checks) come twice per threshold, so a stall is seen
        # within ~1.5 x threshold; fewer wake-ups keep the cost near 0.5% of
        # a core (benchmarks/watchdog_cost.py).
        self._interval = max(self.threshold / 2, 0.001) if self.threshold else 0.0
        self._lock = threading.Lock()
        self._beat = time.monotonic()
        self._reported_beat: float | None = None  # the stale beat already reported
        self._stalls = 0
        self._longest = 0.0
        self._lag = 0.0  # how late the last heartbeat ran (event-loop lag)
        self._loop_thread_id: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._running = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    @property
    def stalls(self) -> int:
        """How many stalls were seen since start."""
        return self._stalls

    @property
    def lag(self) -> float:
        """Event-loop lag: how many seconds late the last heartbeat ran
        (0.0 before the first one); asyncgrpc.metrics reports it."""
        return self._lag

    def stats(self) -> dict[str, Any]:
        """For the server's stats API."""
        return {
            "watchdog_enabled": self.enabled,
            "watchdog_threshold_s": self.threshold,
            "loop_stalls": self._stalls,
            "longest_stall_s": round(self._longest, 6),
        }

    def start(self) -> None:
        if not self.enabled or self._running:
            return
        self._running = True
        self._stop.clear()
        self._beat = time.monotonic()
        if self._on_loop_thread():
            self._arm()
        else:
            self.loop.call_soon_threadsafe(self._arm)
        self._thread = threading.Thread(target=self._watch, name="asyncgrpc-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False  # the next beat will not re-arm itself
        self._stop.set()
        handle, self._handle = self._handle, None
        if handle is not None:
            if self._on_loop_thread():
                handle.cancel()
            elif not self.loop.is_closed():
                self.loop.call_soon_threadsafe(handle.cancel)
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    # ------------------------------------------------------------------ loop side

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def _arm(self) -> None:
        self._loop_thread_id = threading.get_ident()
        self._beat = time.monotonic()
        if self._running:
            self._handle = self.loop.call_later(self._interval, self._heartbeat)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        prev, self._beat = self._beat, now
        assert self.threshold is not None
        late = now - prev - self._interval
        self._lag = max(late, 0.0)
        if late > self.threshold:
            self._longest = max(self._longest, late)
            with self._lock:
                missed = self._reported_beat != prev
                if missed:
                    self._reported_beat = prev
                    self._stalls += 1
            if missed:
                self.logger.warning(
                    "event loop was blocked for %.3f s (threshold %.3f s); the watchdog thread "
                    "could not sample it meanwhile (the GIL was probably held)",
                    late,
                    self.threshold,
                )
        if self._running:
            self._handle = self.loop.call_later(self._interval, self._heartbeat)

    # ------------------------------------------------------------------ watchdog thread

    def _watch(self) -> None:
        assert self.threshold is not None
        limit = self.threshold + self._interval
        while not self._stop.wait(self._interval):
            beat = self._beat
            if not self.loop.is_running():
                # A stopped loop is not a blocked one; mark this beat as seen so
                # the late beat on restart is not counted either.
                with self._lock:
                    self._reported_beat = beat
                continue
            stale = time.monotonic() - beat
            if stale <= limit:
                continue
            with self._lock:
                if self._reported_beat == beat:
                    continue  # this stall was reported already: one warning per stall
                self._reported_beat = beat
                self._stalls += 1
            self._report(stale - self._interval)

    def _report(self, blocked_for: float) -> None:
        what = describe_task(_running_task(self.loop))
        frame = sys._current_frames().get(self._loop_thread_id) if self._loop_thread_id else None
        if frame is not None:
            stack = "".join(traceback.format_stack(frame, limit=self.stack_limit))
        else:
            stack = "  <loop thread stack unavailable>\n"
        del frame  # do not keep the loop thread's frames alive
        self.logger.warning(
            "event loop blocked for at least %.3f s (threshold %.3f s) while running %s; "
            "loop thread stack (most recent call last):\n%s",
            blocked_for,
            self.threshold,
            what,
            stack.rstrip("\n"),
        )
