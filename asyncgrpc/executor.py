"""Execution lanes: a process pool for CPU-bound work, a bounded thread pool for blocking calls.

I/O-bound handlers run on the event loop. Work that would block the loop goes to
one of two lanes owned by a :class:`Lanes` object:

* the **process lane** (``run_in_process`` / ``@cpu_bound``): a small pool of
  worker processes of our own. Each worker serves one call at a time over its
  own pipe, so a worker that dies (``os._exit``, a segfault) fails only the call
  it held, and the pool starts a replacement. Workers are started with the
  ``forkserver`` method (``spawn`` where that is missing): forking the server
  process itself would copy the gRPC core's threads and locks in whatever state
  they happen to be, which is unsafe.
* the **thread lane** (``run_in_thread``): a bounded ``ThreadPoolExecutor``;
  the caller's contextvars are carried into the thread, as ``asyncio.to_thread``
  does.

Finding the lanes: a server owns one ``Lanes`` and registers it with
:func:`_install` when it starts and :func:`_uninstall` when it stops. The
module-level functions use the most recently installed ``Lanes``; with none
installed they use a default ``Lanes`` created on first use and shut down at
interpreter exit.

What the process lane needs from user code, as any spawn/forkserver pool does:
functions (and the classes of arguments and results) must be importable by
module and name, and the main program must keep its start-up code under
``if __name__ == "__main__":``, because each worker imports the main module.
Calls are pickled in the caller, so a lambda or a lock fails at once with a
``TypeError`` naming it. The one fork server process (shared by every user of
the forkserver context) lives until this process exits; it holds no gRPC state.

This module imports nothing from the rest of the package, so it can be loaded
(and its worker processes can import it) without the C extension.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import functools
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # imported before our atexit hook is registered: see _shutdown_all
import os
import pickle
import queue
import reprlib
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar, cast

__all__ = [
    "Lanes",
    "LanesClosedError",
    "RemoteTraceback",
    "WorkerCrashedError",
    "cpu_bound",
    "current_lanes",
    "run_in_process",
    "run_in_thread",
]

P = ParamSpec("P")
R = TypeVar("R")

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_SHUTDOWN_TIMEOUT = 2.0


# --------------------------------------------------------------------------- errors


class WorkerCrashedError(RuntimeError):
    """A worker process died while it held the call (the server maps this to INTERNAL)."""

    def __init__(self, message: str, *, pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode


class LanesClosedError(RuntimeError):
    """The lanes were shut down before (or while) the call ran."""


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback; set as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\nTraceback in the worker process:\n" + self.tb


class _RemoteError(Exception):
    """Stands in for a worker exception that could not travel back by pickle."""


# --------------------------------------------------------------------------- helpers


def _describe(obj: object) -> str:
    """A short human name for a callable or value, used in error messages."""
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(qualname, str) and callable(obj):
        return qualname
    return f"{type(obj).__name__} {reprlib.repr(obj)}"


def _exit_description(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception:
        return False
    return True


def _pack(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call in the caller, so that an unpicklable piece fails fast and by name."""
    try:
        return pickle.dumps((fn, args, kwargs), protocol=_PROTOCOL)
    except Exception as exc:
        # Pickling the whole tuple does not say which piece failed: try them one by one.
        culprit = f"the call to {_describe(fn)}"
        if not _picklable(fn):
            culprit = _describe(fn)
        else:
            for i, arg in enumerate(args):
                if not _picklable(arg):
                    culprit = f"argument {i} ({_describe(arg)}) of {_describe(fn)}"
                    break
            else:
                for key, value in kwargs.items():
                    if not _picklable(value):
                        culprit = f"keyword argument {key!r} ({_describe(value)}) of {_describe(fn)}"
                        break
        raise TypeError(f"cannot send {culprit} to a worker process: {exc}") from exc


def _unpack_reply(reply: bytes) -> tuple[bool, Any]:
    """Decode a worker reply into (ok, value-or-exception)."""
    try:
        ok, *rest = pickle.loads(reply)
    except Exception as exc:
        return False, _RemoteError(f"could not decode the worker's reply: {exc!r}")
    if ok:
        return True, rest[0]
    error, tb = rest
    if error is None:
        error = _RemoteError(tb.strip().splitlines()[-1] if tb.strip() else "unknown error")
    error.__cause__ = RemoteTraceback(tb)
    return False, error


# --------------------------------------------------------------------------- worker side


def _error_reply(exc: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(exc))
    try:
        data = pickle.dumps((False, exc, tb), protocol=_PROTOCOL)
        pickle.loads(data)  # some exception classes pickle but cannot be rebuilt
        return data
    except Exception:
        return pickle.dumps((False, None, tb), protocol=_PROTOCOL)


def _run_call(data: bytes) -> bytes:
    """Run one pickled call and return the pickled reply; never raises."""
    fn: Any = None
    try:
        fn, args, kwargs = pickle.loads(data)
        # A @cpu_bound wrapper travels by reference; run the plain function it wraps.
        target = getattr(fn, "_asyncgrpc_inline", fn)
        result = target(*args, **kwargs)
    except BaseException as exc:  # SystemExit from user code is an error, not our exit
        return _error_reply(exc)
    try:
        return pickle.dumps((True, result), protocol=_PROTOCOL)
    except Exception as exc:
        err = TypeError(f"cannot send the result of {_describe(fn)} back from the worker: {exc}")
        err.__cause__ = exc
        return _error_reply(err)


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Worker process loop: one call at a time until the parent closes the pipe."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # parent closed its end (shutdown) or died: no orphan left behind
        try:
            conn.send_bytes(_run_call(data))
        except (EOFError, OSError):
            return


# --------------------------------------------------------------------------- process pool


class _Job:
    __slots__ = ("future", "name", "payload")

    def __init__(self, payload: bytes, future: concurrent.futures.Future[Any], name: str) -> None:
        self.payload = payload
        self.future = future
        self.name = name


_STOP = object()  # queue sentinel: one per slot thread at shutdown


class _Slot:
    """One worker process and the thread in this process that feeds it.

    The thread blocks on the worker's pipe, so the event loop never does; a dead
    worker shows up as EOF on that pipe and fails only the job this slot held.
    """

    def __init__(self, pool: _ProcessPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: Any = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.busy = False
        self.thread = threading.Thread(
            target=self._serve, name=f"asyncgrpc-process-feeder-{index}", daemon=True
        )

    # Daemon thread: the interpreter joins non-daemon threads *before* atexit hooks
    # run, and the atexit hook is what tells this thread to stop.

    def _start_worker(self) -> None:
        ctx: Any = self.pool.ctx
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_worker_main,
            args=(child_conn,),
            name=f"asyncgrpc-worker-{self.index}",
            daemon=False,  # daemonic processes may not start children of their own
        )
        try:
            proc.start()
        finally:
            # Only the worker may hold its end, or its death would not show up as EOF.
            child_conn.close()
        self.proc, self.conn = proc, parent_conn
        self.pool._note_started()

    def _ensure_worker(self) -> None:
        if self.proc is not None and self.proc.exitcode is None:
            return
        self._drop_worker()
        self._start_worker()

    def _drop_worker(self) -> int | None:
        """Forget the current worker, reaping it; returns its exit code."""
        proc, conn = self.proc, self.conn
        self.proc = self.conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        proc.join(1.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(1.0)
        code: int | None = proc.exitcode
        if code is not None:
            proc.close()
        return code

    def _serve(self) -> None:
        try:
            self._ensure_worker()  # warm start: later calls find a running worker
        except Exception:
            pass  # retried, and reported, with the first job
        while True:
            job = self.pool.jobs.get()
            if job is _STOP:
                break
            # False means the caller cancelled while queued: drop the work unstarted.
            if not job.future.set_running_or_notify_cancel():
                self.pool._note_dequeued()
                continue
            self.pool._note_dequeued()
            self.busy = True
            try:
                self._run(job)
            finally:
                self.busy = False
        self._retire()

    def _run(self, job: _Job) -> None:
        for _attempt in range(2):
            try:
                self._ensure_worker()
            except Exception as exc:
                job.future.set_exception(RuntimeError(f"could not start a worker process: {exc!r}"))
                return
            assert self.conn is not None
            try:
                self.conn.send_bytes(job.payload)
                break
            except OSError:
                # The worker died while idle; the job has not started, so retry once.
                self._drop_worker()
        else:
            job.future.set_exception(WorkerCrashedError("worker process died before the call started"))
            return
        pid = self.proc.pid if self.proc is not None else None
        try:
            reply = self.conn.recv_bytes()
        except (EOFError, OSError):
            code = self._drop_worker()
            if self.pool.closed:
                job.future.set_exception(LanesClosedError(f"process lane shut down while running {job.name}"))
                return
            self.pool._note_crash()
            job.future.set_exception(
                WorkerCrashedError(
                    f"worker process {pid} died ({_exit_description(code)}) while running {job.name}",
                    pid=pid,
                    exitcode=code,
                )
            )
            try:
                self._ensure_worker()  # replace it now so the next call does not wait
            except Exception:
                pass
            return
        ok, value = _unpack_reply(reply)
        self.pool._note_done()
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)

    def _retire(self) -> None:
        """Stop the worker: closing the pipe makes an idle worker exit on its own."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.join(_SHUTDOWN_TIMEOUT)
        if proc.exitcode is None:
            proc.terminate()
            proc.join(1.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(1.0)
        if proc.exitcode is not None:
            proc.close()

    def terminate_worker(self) -> None:
        """Called from the shutting-down thread when this slot's worker is stuck."""
        proc = self.proc
        if proc is None:
            return
        try:
            proc.terminate()
        except (ValueError, OSError):
            pass  # already closed/reaped by the slot thread


def _pid_if_alive(proc: Any) -> int | None:
    """The pid of a running worker; None if gone (read from other threads, so racy by design)."""
    try:
        return proc.pid if proc is not None and proc.exitcode is None else None
    except ValueError:
        return None  # the slot thread closed it meanwhile


class _ProcessPool:
    """A fixed number of single-call workers sharing one job queue."""

    def __init__(self, workers: int, start_method: str) -> None:
        self.ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # By default the fork server imports __main__ (the server program, so
            # grpc and our C core too) and forks every worker from that state. We
            # want it to hold nothing but the interpreter: each worker imports the
            # main module itself, after the fork. (Process-wide setting; it has
            # no effect once a fork server is running.)
            self.ctx.set_forkserver_preload([])
        self.workers = workers
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.slots: list[_Slot] = []
        self.closed = False
        self._lock = threading.Lock()
        self._queued = 0
        self._started = 0
        self._crashes = 0
        self._done = 0

    # Counters are read by stats() from any thread.
    def _note_dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _note_started(self) -> None:
        with self._lock:
            self._started += 1

    def _note_crash(self) -> None:
        with self._lock:
            self._crashes += 1

    def _note_done(self) -> None:
        with self._lock:
            self._done += 1

    def _spawn_slots(self) -> None:
        # Called under self._lock. Worker processes start in the slot threads, so
        # the event loop never waits for a process to come up.
        if not self.slots:
            self.slots = [_Slot(self, i) for i in range(self.workers)]
            for slot in self.slots:
                slot.thread.start()

    def prestart(self) -> None:
        with self._lock:
            if not self.closed:
                self._spawn_slots()

    def submit(self, payload: bytes, name: str) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        # The lock makes "closed" and "put" atomic, so no job lands behind the
        # shutdown sentinels where nobody would ever run or cancel it.
        with self._lock:
            if self.closed:
                raise LanesClosedError("the process lane is shut down")
            self._spawn_slots()
            self._queued += 1
            self.jobs.put(_Job(payload, future, name))
        return future

    def shutdown(self, timeout: float) -> None:
        with self._lock:
            if self.closed:
                slots = []
            else:
                self.closed = True
                slots = list(self.slots)
                # Work not started yet is dropped.
                while True:
                    try:
                        job = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    self._queued -= 1
                    job.future.cancel()
                for _ in slots:
                    self.jobs.put(_STOP)
        deadline = time.monotonic() + timeout
        for slot in slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
        # Threads still alive wait on a worker busy with work nobody will wait for.
        for slot in slots:
            if slot.thread.is_alive():
                slot.terminate_worker()
        for slot in slots:
            slot.thread.join(_SHUTDOWN_TIMEOUT + 3.0)

    def pids(self) -> list[int]:
        return [pid for s in self.slots if (pid := _pid_if_alive(s.proc)) is not None]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "process_workers": self.workers,
                "process_workers_alive": sum(1 for s in self.slots if _pid_if_alive(s.proc) is not None),
                "process_busy": sum(1 for s in self.slots if s.busy),
                "process_queued": self._queued,
                "process_completed": self._done,
                "process_workers_started": self._started,
                "worker_crashes": self._crashes,
            }


# --------------------------------------------------------------------------- lanes


_all_lanes: weakref.WeakSet[Lanes] = weakref.WeakSet()


class Lanes:
    """A process lane and a thread lane, owned by one server (or the default).

    ``Lanes(process_workers=None, thread_workers=None)``: ``None`` means
    ``os.cpu_count()`` worker processes and ``min(32, cpu_count + 4)`` threads.
    ``start()`` is cheap and idempotent; worker processes start on first use (or
    at once, in the background, with ``start(prestart=True)``). ``shutdown()``
    blocks; ``await stop()`` does the same off the event loop.
    """

    def __init__(
        self,
        process_workers: int | None = None,
        thread_workers: int | None = None,
        *,
        start_method: str | None = None,
    ) -> None:
        cpus = os.cpu_count() or 1
        self.process_workers = process_workers or cpus
        self.thread_workers = thread_workers or min(32, cpus + 4)
        if self.process_workers < 1 or self.thread_workers < 1:
            raise ValueError("worker counts must be at least 1")
        if start_method is None:
            methods = multiprocessing.get_all_start_methods()
            start_method = "forkserver" if "forkserver" in methods else "spawn"
        if start_method == "fork":
            raise ValueError("the 'fork' start method is unsafe with gRPC's threads")
        self.start_method = start_method
        self._lock = threading.Lock()
        self._process: _ProcessPool | None = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread_calls = 0
        self._closed = False
        _all_lanes.add(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self, *, prestart: bool = False) -> None:
        """Make the lanes ready; with ``prestart`` begin starting worker processes now."""
        self._process_pool()
        self._thread_pool()
        if prestart and self._process is not None:
            self._process.prestart()

    def _process_pool(self) -> _ProcessPool:
        with self._lock:
            if self._closed:
                raise LanesClosedError("these lanes are shut down")
            if self._process is None:
                self._process = _ProcessPool(self.process_workers, self.start_method)
            return self._process

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise LanesClosedError("these lanes are shut down")
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.thread_workers, thread_name_prefix="asyncgrpc-thread"
                )
            return self._threads

    async def run_in_process(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Run ``fn(*args, **kwargs)`` in a worker process and return its result.

        Arguments are pickled here, so an unpicklable one raises ``TypeError`` at
        once. Cancelling the awaiting task drops the call if it has not started;
        a started call runs to the end and its result is discarded.
        """
        pool = self._process_pool()
        payload = _pack(fn, args, kwargs)
        future = pool.submit(payload, _describe(fn))
        return await asyncio.wrap_future(future)

    async def run_in_thread(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Run a blocking ``fn(*args, **kwargs)`` on the thread lane, keeping contextvars."""
        pool = self._thread_pool()
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        with self._lock:
            self._thread_calls += 1
        try:
            return await loop.run_in_executor(pool, call)
        finally:
            with self._lock:
                self._thread_calls -= 1

    def worker_pids(self) -> list[int]:
        """Pids of the worker processes currently running (for tests and diagnostics)."""
        pool = self._process
        return pool.pids() if pool is not None else []

    def stats(self) -> dict[str, int]:
        """Counters for the server's stats API."""
        pool = self._process
        out = (
            pool.stats()
            if pool is not None
            else {
                "process_workers": self.process_workers,
                "process_workers_alive": 0,
                "process_busy": 0,
                "process_queued": 0,
                "process_completed": 0,
                "process_workers_started": 0,
                "worker_crashes": 0,
            }
        )
        out["thread_workers"] = self.thread_workers
        with self._lock:
            out["thread_calls_active"] = self._thread_calls
        return out

    def shutdown(self, timeout: float = _SHUTDOWN_TIMEOUT) -> None:
        """Stop both lanes (blocking, idempotent).

        Queued calls are cancelled. Idle workers exit at once; a worker still
        busy after ``timeout`` seconds is terminated, and its caller (if any
        still waits) gets ``LanesClosedError``. Running thread calls finish in
        the background: a thread cannot be interrupted.
        """
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
        if process is not None:
            process.shutdown(timeout)

    async def stop(self, timeout: float = _SHUTDOWN_TIMEOUT) -> None:
        """``shutdown()`` in a helper thread, so the event loop keeps serving meanwhile."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def _finished() -> None:
            if not done.done():
                done.set_result(None)

        def _work() -> None:
            try:
                self.shutdown(timeout)
            finally:
                loop.call_soon_threadsafe(_finished)

        # A plain thread, not the loop's default executor, which may be shut down already.
        threading.Thread(target=_work, name="asyncgrpc-lanes-stop", daemon=True).start()
        await asyncio.shield(done)


# --------------------------------------------------------------------------- current lanes


_registry_lock = threading.Lock()
_installed: list[Lanes] = []
_default: Lanes | None = None


def _install(lanes: Lanes) -> None:
    """Make ``lanes`` the target of the module-level functions (server start)."""
    with _registry_lock:
        _installed.append(lanes)


def _uninstall(lanes: Lanes) -> None:
    """Undo :func:`_install` (server stop); the previous lanes, or the default, apply again."""
    with _registry_lock:
        for i in range(len(_installed) - 1, -1, -1):
            if _installed[i] is lanes:
                del _installed[i]
                break


def current_lanes() -> Lanes:
    """The most recently installed lanes, else the default (created on first use)."""
    global _default
    with _registry_lock:
        if _installed:
            return _installed[-1]
        if _default is None or _default.closed:
            _default = Lanes()
        return _default


async def run_in_process(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run ``fn(*args, **kwargs)`` in the current lanes' process pool."""
    return await current_lanes().run_in_process(fn, *args, **kwargs)


async def run_in_thread(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run blocking ``fn(*args, **kwargs)`` in the current lanes' thread pool."""
    return await current_lanes().run_in_thread(fn, *args, **kwargs)


class _CpuBound(Generic[P, R]):
    """What ``@cpu_bound`` returns: calling it gives an awaitable run in the process lane.

    It pickles by reference to its module-level name (like a plain function);
    the worker imports that module, finds this wrapper again and runs the
    original function it holds in ``_asyncgrpc_inline``.
    """

    def __init__(self, fn: Callable[P, R]) -> None:
        functools.update_wrapper(self, fn)
        self._asyncgrpc_inline = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        # Sent as itself: it pickles by name, and the worker unwraps it.
        return run_in_process(cast(Callable[..., R], self), *args, **kwargs)

    def __reduce__(self) -> str:
        # A string tells pickle "a global of this name in my __module__"; pickle
        # then checks that the name really leads back to this object.
        return self.__qualname__  # type: ignore[attr-defined, no-any-return]

    def __repr__(self) -> str:
        return f"<cpu_bound {self.__module__}.{self.__qualname__}>"  # type: ignore[attr-defined]


def cpu_bound(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Decorate a module-level function so that ``await fn(...)`` runs it in a worker process.

    The plain function stays available as ``fn.__wrapped__`` for direct calls.
    """
    return _CpuBound(fn)


def _shutdown_all() -> None:
    # Registered after multiprocessing.util's own hook, so it runs first (atexit is
    # LIFO): that hook would otherwise wait forever on our non-daemon workers.
    for lanes in list(_all_lanes):
        try:
            lanes.shutdown(timeout=1.0)
        except Exception:
            pass


atexit.register(_shutdown_all)
