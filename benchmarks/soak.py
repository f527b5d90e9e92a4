"""Soak: a long mixed load on one asyncgrpc server, watching for leaks.

Starts one asyncgrpc server in a child process (``--serve``) and drives it
from several grpcio aio client processes with a mix of the four RPC kinds,
client cancels (before and in the middle of streams), deadlines that expire,
handler exceptions and aborts. Every call checks its own reply and status.

After a warm-up (the first ``--warmup`` fraction of the load) the load runs
in ``--samples`` equal phases. At the end of each phase, once the server has
settled (no active call, no handler task left; at most ``--settle`` s), it
samples the server: RSS (VmRSS of /proc/PID/status), open fds (/proc/PID/fd),
``rpcs_started``/``rpcs_finished`` of ``asyncgrpc.stats()``, the server's
active calls, the live asyncio tasks on the server loop that are not its
own infrastructure, and (for diagnosis, after gc.collect()) the number of
memory blocks Python has allocated. Then it prints the samples and a verdict:

- RSS stays within +-``--rss-tolerance`` (5%) of the first sample after warm-up
- the fd count is constant after warm-up
- rpcs_started == rpcs_finished (counted from the start of the load)
- no handler task and no active call is left at any sample
- every call saw its own reply and the status it expected

and exits 1 if a check fails (2 if the load itself could not run).

    python benchmarks/soak.py [--unary 1000000] [--streaming 100000]
        [--loop asyncio|uvloop] [--clients 3] [--concurrency 64]
        [--samples 10] [--json PATH]

tests/test_soak.py runs the same logic in one process (server on a thread).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

SERVICE = "soak.Soak"
SLEEP_FOREVER_S = 3600.0

# ---------------------------------------------------------------------------
# the server side


def _handlers() -> Dict[str, Any]:
    """The soak service: method name -> asyncgrpc handler (raw bytes)."""
    import asyncgrpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def echo_await(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(0)
        return request

    async def fail(request: bytes, context: Any) -> bytes:
        raise ValueError(f"soak failure {request!r}")

    async def abort(request: bytes, context: Any) -> bytes:
        await context.abort(asyncgrpc.StatusCode.INVALID_ARGUMENT,
                            f"abort {request.decode()}")
        return b""

    async def sleep(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(SLEEP_FOREVER_S)
        return request

    async def count(request: bytes, context: Any) -> Any:       # "id:n" -> n messages
        cid, _, n = request.decode().rpartition(":")
        for k in range(int(n)):
            yield f"{cid}:{k}".encode()

    async def ticks(request: bytes, context: Any) -> Any:       # until cancelled
        for k in range(1_000_000):
            await context.write(request + b":%d" % k)
            await asyncio.sleep(0.001)

    async def total(request_iterator: Any, context: Any) -> bytes:
        n = 0
        cid = b""
        async for message in request_iterator:
            cid = message.rpartition(b":")[0]
            n += 1
        return cid + b":%d" % n

    async def bidi(request_iterator: Any, context: Any) -> Any:
        async for message in request_iterator:
            yield message

    async def echo_then_fail(request_iterator: Any, context: Any) -> None:
        while True:
            message = await context.read()
            if message is asyncgrpc.EOF:
                raise RuntimeError("soak stream failure")
            await context.write(message)

    async def echo_then_stall(request_iterator: Any, context: Any) -> Any:
        async for message in request_iterator:
            yield message
            await asyncio.sleep(SLEEP_FOREVER_S)

    return {
        "Echo": asyncgrpc.unary_unary_rpc_method_handler(echo),
        "EchoAwait": asyncgrpc.unary_unary_rpc_method_handler(echo_await),
        "Fail": asyncgrpc.unary_unary_rpc_method_handler(fail),
        "Abort": asyncgrpc.unary_unary_rpc_method_handler(abort),
        "Sleep": asyncgrpc.unary_unary_rpc_method_handler(sleep),
        "Count": asyncgrpc.unary_stream_rpc_method_handler(count),
        "Ticks": asyncgrpc.unary_stream_rpc_method_handler(ticks),
        "Total": asyncgrpc.stream_unary_rpc_method_handler(total),
        "Bidi": asyncgrpc.stream_stream_rpc_method_handler(bidi),
        "EchoThenFail": asyncgrpc.stream_stream_rpc_method_handler(echo_then_fail),
        "EchoThenStall": asyncgrpc.stream_stream_rpc_method_handler(echo_then_stall),
    }


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A fresh event loop of ``kind`` ("asyncio" or "uvloop")."""
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class SoakServer:
    """An asyncgrpc server serving the soak service on a loop of its own
    thread, with a way to sample it from other threads."""

    def __init__(self, loop_kind: str) -> None:
        self.loop = new_loop(loop_kind)
        self.thread = threading.Thread(target=self.loop.run_forever,
                                       name=f"soak-server-{loop_kind}", daemon=True)
        self.thread.start()
        self.server: Any = None
        self.port = 0
        self.infrastructure: set = set()
        self.port = self._call(self._start())

    def _call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> int:
        import logging

        import asyncgrpc
        # Failures are part of the mix: keep their tracebacks out of the log.
        logging.getLogger("asyncgrpc").setLevel(logging.CRITICAL)
        self.server = asyncgrpc.server()
        self.server.add_registered_method_handlers(SERVICE, _handlers())
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.infrastructure = set(asyncio.all_tasks())
        return port

    def _leftover_tasks(self) -> List[asyncio.Task]:
        current = asyncio.current_task()
        return [t for t in asyncio.all_tasks()
                if t is not current and t not in self.infrastructure]

    async def _sample(self, settle: float) -> Dict[str, Any]:
        start = time.monotonic()
        while time.monotonic() - start < settle:
            if self.server._core.active_calls == 0 and not self._leftover_tasks():
                break
            await asyncio.sleep(0.01)
        settled_s = time.monotonic() - start
        gc.collect()
        leftover = self._leftover_tasks()
        stats = self.server.stats()
        return {"rpcs_started": stats["rpcs_started"], "rpcs_finished": stats["rpcs_finished"],
                "active_calls": stats["active_calls"], "tasks": len(leftover),
                "task_names": sorted({t.get_name() for t in leftover})[:5],
                "py_blocks": sys.getallocatedblocks(),
                "settle_s": round(settled_s, 3)}

    def sample(self, settle: float = 5.0) -> Dict[str, Any]:
        """Wait up to ``settle`` s for no active call and no handler task,
        then report the server's counters (from any thread)."""
        return self._call(self._sample(settle), timeout=settle + 30)

    def close(self) -> None:
        try:
            if self.server is not None:
                self._call(self.server.stop(None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.loop.is_running():
                self.loop.close()


def serve_forever(loop_kind: str) -> None:
    """``--serve``: run a SoakServer, print its port, then answer one JSON
    line per command read from stdin ("sample SETTLE", "quit")."""
    server = SoakServer(loop_kind)
    print(json.dumps({"port": server.port}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "sample":
            print(json.dumps(server.sample(float(words[1]))), flush=True)
    server.close()


class ServerProcess:
    """The soak server in a child process (``soak.py --serve``)."""

    def __init__(self, loop_kind: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", "--loop", loop_kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the soak server did not start")
        self.port = json.loads(line)["port"]
        self.pid = self.proc.pid

    def sample(self, settle: float) -> Dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"sample {settle}\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"the server process died (exit status {self.proc.wait(30)})")
        return json.loads(line)

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except BrokenPipeError:
                pass


class InProcessServer:
    """The soak server on a thread of this process (for tests)."""

    def __init__(self, loop_kind: str) -> None:
        self.server = SoakServer(loop_kind)
        self.port = self.server.port
        self.pid = os.getpid()

    def sample(self, settle: float) -> Dict[str, Any]:
        return self.server.sample(settle)

    def close(self) -> None:
        self.server.close()


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------
# the client side: one call of each kind, checking its own values

UNARY_MIX = [(85, "echo"), (5, "echo_await"), (2, "fail"), (2, "abort"),
             (3, "deadline"), (3, "cancel")]
STREAM_MIX = [(30, "server_stream"), (25, "client_stream"), (25, "bidi"),
              (6, "bidi_cancel"), (4, "server_stream_cancel"), (5, "stream_fail"),
              (5, "stream_deadline")]
CALL_TIMEOUT = 60.0        # calls meant to succeed; reaching it is a hang
GRPCIO_AIO_WRITE_RACE = ("StatusCode.INTERNAL", "Internal error from Core")


def _table(mix: Sequence[Tuple[int, str]], seed: int) -> List[str]:
    """100 op names in the proportions of ``mix``, in a fixed shuffled order."""
    names = [name for weight, name in mix for _ in range(weight)]
    assert len(names) == 100
    random.Random(seed).shuffle(names)
    return names


UNARY_TABLE = _table(UNARY_MIX, 1)
STREAM_TABLE = _table(STREAM_MIX, 2)


class Unexpected(Exception):
    """A call saw something other than its own reply and expected status."""


def _m(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def _expect_error(awaitable: Any, code: Any, details: Optional[str] = None) -> None:
    import grpc
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        if exc.code() != code or (details is not None and exc.details() != details):
            raise Unexpected(f"{exc.code()} {exc.details()!r}, want {code} {details!r}")
        return
    raise Unexpected(f"succeeded, want {code}")


async def _to_end(call: Any) -> None:
    """Read a stream to its end; raises AioRpcError if it ends non-OK."""
    import grpc
    while await call.read() != grpc.aio.EOF:
        pass


async def _cancelled(call: Any) -> None:
    """``call`` was cancelled by us: it must end CANCELLED."""
    import grpc
    code = await call.code()
    if code != grpc.StatusCode.CANCELLED:
        raise Unexpected(f"ended {code} after cancel()")


async def unary_op(channel: Any, kind: str, i: int) -> None:
    """One unary call of ``kind``; raises Unexpected on a wrong outcome."""
    import grpc
    own = b"u%d" % i
    if kind in ("echo", "echo_await"):
        method = "Echo" if kind == "echo" else "EchoAwait"
        reply = await channel.unary_unary(_m(method))(own, timeout=CALL_TIMEOUT)
        if reply != own:
            raise Unexpected(f"reply {reply!r} to {own!r}")
    elif kind == "fail":
        await _expect_error(channel.unary_unary(_m("Fail"))(own, timeout=CALL_TIMEOUT),
                            grpc.StatusCode.UNKNOWN)
    elif kind == "abort":
        await _expect_error(channel.unary_unary(_m("Abort"))(own, timeout=CALL_TIMEOUT),
                            grpc.StatusCode.INVALID_ARGUMENT, f"abort u{i}")
    elif kind == "deadline":
        await _expect_error(channel.unary_unary(_m("Sleep"))(own, timeout=0.02),
                            grpc.StatusCode.DEADLINE_EXCEEDED)
    elif kind == "cancel":
        call = channel.unary_unary(_m("Sleep"))(own, timeout=CALL_TIMEOUT)
        await asyncio.sleep(0.005)
        call.cancel()
        await _cancelled(call)
    else:
        raise ValueError(kind)


async def stream_op(channel: Any, kind: str, i: int) -> Optional[str]:
    """One streaming call of ``kind``; raises Unexpected on a wrong outcome.
    Returns another outcome name when the call ended another accepted way."""
    import grpc
    cid = f"s{i}"
    n = 1 + i % 10
    want = [f"{cid}:{k}".encode() for k in range(n)]
    if kind == "server_stream":
        got = [m async for m in channel.unary_stream(_m("Count"))(
            f"{cid}:{n}".encode(), timeout=CALL_TIMEOUT)]
        if got != want:
            raise Unexpected(f"{cid} got {got[:3]!r}... ({len(got)}), want {n}")
    elif kind == "client_stream":
        async def requests() -> Any:
            for message in want:
                yield message
        reply = await channel.stream_unary(_m("Total"))(requests(), timeout=CALL_TIMEOUT)
        if reply != f"{cid}:{n}".encode():
            raise Unexpected(f"{cid} total {reply!r}")
    elif kind in ("bidi", "bidi_cancel"):
        call = channel.stream_stream(_m("Bidi"))(timeout=CALL_TIMEOUT)
        rounds = n if kind == "bidi" else i % 5
        for message in want[:rounds]:
            await call.write(message)
            echoed = await call.read()
            if echoed != message:
                raise Unexpected(f"{cid} echo {echoed!r} of {message!r}")
        if kind == "bidi_cancel":
            call.cancel()
            await _cancelled(call)
            return
        await call.done_writing()
        if await call.read() != grpc.aio.EOF or await call.code() != grpc.StatusCode.OK:
            raise Unexpected(f"{cid} did not end OK")
    elif kind == "server_stream_cancel":
        call = channel.unary_stream(_m("Ticks"))(cid.encode(), timeout=CALL_TIMEOUT)
        for k in range(i % 5):
            got = await call.read()
            if got != f"{cid}:{k}".encode():
                raise Unexpected(f"{cid} tick {got!r}")
        call.cancel()
        await _cancelled(call)
    elif kind == "stream_fail":
        call = channel.stream_stream(_m("EchoThenFail"))(timeout=CALL_TIMEOUT)
        for message in want[:2]:
            await call.write(message)
            if await call.read() != message:
                raise Unexpected(f"{cid} echo before the failure")
        await call.done_writing()
        await _expect_error(_to_end(call), grpc.StatusCode.UNKNOWN)
    elif kind == "stream_deadline":
        call = channel.stream_stream(_m("EchoThenStall"))(timeout=0.1)

        async def stalled() -> None:
            await call.write(want[0])
            if await call.read() != want[0]:
                raise Unexpected(f"{cid} echo before the stall")
            await _to_end(call)
        try:
            await _expect_error(stalled(), grpc.StatusCode.DEADLINE_EXCEEDED)
        except Unexpected:
            # When the deadline ends the RPC during its write, grpcio's aio
            # client reports INTERNAL instead (grpc/grpc#36066).
            if (str(await call.code()), await call.details()) != GRPCIO_AIO_WRITE_RACE:
                raise
            return "stream_deadline (grpcio#36066)"
    else:
        raise ValueError(kind)


@dataclass
class PhaseResult:
    """What the clients saw in one phase."""
    calls: int = 0
    outcomes: Counter = field(default_factory=Counter)
    unexpected: int = 0
    examples: List[str] = field(default_factory=list)

    def add(self, other: "PhaseResult") -> None:
        self.calls += other.calls
        self.outcomes.update(other.outcomes)
        self.unexpected += other.unexpected
        self.examples += other.examples[: max(0, 10 - len(self.examples))]


Slice = Tuple[int, int, int]          # range(start, stop, step)


def _ops(unary: Slice, streaming: Slice) -> Iterator[Tuple[bool, int]]:
    """The unary and streaming indices of a phase, interleaved evenly:
    (is_stream, index)."""
    u, s = range(*unary), range(*streaming)
    nu, ns = len(u), len(s)
    a = b = 0
    while a < nu or b < ns:
        # next: whichever list is further behind its share
        if b >= ns or (a < nu and a * ns <= b * nu):
            yield False, u[a]
            a += 1
        else:
            yield True, s[b]
            b += 1


def tables(only: Optional[str]) -> Tuple[List[str], List[str]]:
    """The unary and streaming op tables: the mix, or only the kind ``only``."""
    if only is None:
        return UNARY_TABLE, STREAM_TABLE
    return [only] * 100, [only] * 100


async def run_phase(channel: Any, unary: Slice, streaming: Slice, concurrency: int,
                    only: Optional[str] = None) -> PhaseResult:
    """Run the calls of a phase on ``channel``, ``concurrency`` at a time
    (all of kind ``only`` if given)."""
    result = PhaseResult()
    ops = _ops(unary, streaming)
    unary_table, stream_table = tables(only)

    async def worker() -> None:
        for is_stream, i in ops:
            kind = (stream_table if is_stream else unary_table)[i % 100]
            try:
                if is_stream:
                    outcome = await stream_op(channel, kind, i)
                else:
                    await unary_op(channel, kind, i)
                    outcome = None
                result.outcomes[outcome or kind] += 1
            except Exception as exc:       # noqa: BLE001 - every failure is reported
                result.unexpected += 1
                if len(result.examples) < 10:
                    result.examples.append(f"{kind} #{i}: {type(exc).__name__}: {exc}")
            result.calls += 1
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return result


def _client_process(conn: Any, target: str, concurrency: int, only: Optional[str]) -> None:
    """A load process: runs the phases it is sent on one channel, kept open
    across phases (so the server's fd count does not move)."""
    import grpc

    async def main() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            loop = asyncio.get_running_loop()
            while True:
                message = await loop.run_in_executor(None, conn.recv)
                if message is None:
                    return
                unary, streaming = message
                result = await run_phase(channel, unary, streaming, concurrency, only)
                conn.send({"calls": result.calls, "outcomes": dict(result.outcomes),
                           "unexpected": result.unexpected, "examples": result.examples})
    asyncio.run(main())
    conn.close()


class ClientPool:
    """``clients`` load processes; each phase is split between them."""

    def __init__(self, target: str, clients: int, concurrency: int,
                 only: Optional[str] = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns = []
        self.procs = []
        for _ in range(clients):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_process, args=(child, target, concurrency, only),
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, unary: Tuple[int, int], streaming: Tuple[int, int]) -> PhaseResult:
        n = len(self.conns)
        for w, conn in enumerate(self.conns):
            conn.send(((unary[0] + w, unary[1], n), (streaming[0] + w, streaming[1], n)))
        total = PhaseResult()
        for conn in self.conns:
            part = conn.recv()
            total.add(PhaseResult(part["calls"], Counter(part["outcomes"]),
                                  part["unexpected"], part["examples"]))
        return total

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        for conn in self.conns:
            conn.close()


class InProcessClients:
    """The load from this thread, on one channel kept open across phases
    (for tests). Its loop runs without asyncio debug mode even under
    ``python -X dev``: the server, not the load, is under test."""

    def __init__(self, target: str, concurrency: int) -> None:
        import grpc
        self.concurrency = concurrency
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(False)

        async def connect() -> Any:
            return grpc.aio.insecure_channel(target)
        self.channel = self.loop.run_until_complete(connect())

    def run(self, unary: Tuple[int, int], streaming: Tuple[int, int]) -> PhaseResult:
        return self.loop.run_until_complete(run_phase(
            self.channel, (unary[0], unary[1], 1), (streaming[0], streaming[1], 1),
            self.concurrency))

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


# ---------------------------------------------------------------------------
# the soak: phases, samples, verdict


@dataclass
class Sample:
    label: str
    elapsed_s: float
    calls: int
    rss_kb: int
    fds: int
    rpcs_started: int
    rpcs_finished: int
    active_calls: int
    tasks: int
    settle_s: float
    py_blocks: int = 0
    task_names: List[str] = field(default_factory=list)


@dataclass
class Report:
    config: Dict[str, Any]
    samples: List[Sample]
    checks: Dict[str, Tuple[bool, str]]
    outcomes: Dict[str, int]
    unexpected: int
    examples: List[str]
    load_s: float
    calls: int

    @property
    def ok(self) -> bool:
        return all(passed for passed, _ in self.checks.values())


def _bounds(total: int, warmup: float, phases: int) -> List[Tuple[int, int]]:
    """[start, stop) of the warm-up then of each phase over ``total`` calls."""
    first = int(total * warmup)
    edges = [0, first] + [first + (total - first) * (k + 1) // phases for k in range(phases)]
    return list(zip(edges, edges[1:]))


def soak(server: Any, clients: Any, unary: int, streaming: int, samples: int = 10,
         warmup: float = 0.1, settle: float = 5.0, rss_tolerance: float = 0.05,
         rss_growth_kb: Optional[int] = None,
         progress: Optional[Callable[[Sample], None]] = None) -> Report:
    """Drive ``clients`` against ``server`` in a warm-up and ``samples``
    phases, sample after each, and judge the samples.

    RSS is judged by ``rss_tolerance`` (relative, both ways, against the first
    sample after the warm-up) or, if ``rss_growth_kb`` is given, by growth
    over that sample of at most that many kB.
    """
    def sample(label: str, elapsed: float, calls: int) -> Sample:
        inside = server.sample(settle)
        s = Sample(label, round(elapsed, 2), calls, rss_kb(server.pid), open_fds(server.pid),
                   inside["rpcs_started"], inside["rpcs_finished"], inside["active_calls"],
                   inside["tasks"], inside["settle_s"], inside["py_blocks"],
                   inside["task_names"])
        if progress is not None:
            progress(s)
        return s

    taken = [sample("start", 0.0, 0)]
    totals = PhaseResult()
    start = time.monotonic()
    unary_bounds = _bounds(unary, warmup, samples)
    stream_bounds = _bounds(streaming, warmup, samples)
    for k, (ub, sb) in enumerate(zip(unary_bounds, stream_bounds)):
        totals.add(clients.run(ub, sb))
        elapsed = time.monotonic() - start
        taken.append(sample("warm-up" if k == 0 else f"phase {k}", elapsed, totals.calls))
    load_s = time.monotonic() - start
    checks = judge(taken, rss_tolerance, rss_growth_kb)
    checks["every call saw its own reply and expected status"] = (
        totals.unexpected == 0, f"{totals.unexpected} unexpected of {totals.calls}")
    config = {"unary": unary, "streaming": streaming, "samples": samples, "warmup": warmup,
              "settle_s": settle, "rss_tolerance": rss_tolerance,
              "rss_growth_kb": rss_growth_kb}
    return Report(config, taken, checks, dict(totals.outcomes), totals.unexpected,
                  totals.examples, round(load_s, 1), totals.calls)


def judge(samples: List[Sample], rss_tolerance: float,
          rss_growth_kb: Optional[int]) -> Dict[str, Tuple[bool, str]]:
    """The verdict's checks over the samples: name -> (passed, detail)."""
    first, warm, after = samples[0], samples[1], samples[1:]
    checks: Dict[str, Tuple[bool, str]] = {}
    rss = [s.rss_kb for s in after]
    if rss_growth_kb is None:
        lo, hi = warm.rss_kb * (1 - rss_tolerance), warm.rss_kb * (1 + rss_tolerance)
        checks[f"RSS within +-{rss_tolerance:.0%} after warm-up"] = (
            all(lo <= r <= hi for r in rss),
            f"{min(rss) / 1024:.1f}..{max(rss) / 1024:.1f} MB, warm-up {warm.rss_kb / 1024:.1f} MB "
            f"({(max(rss) - warm.rss_kb) / warm.rss_kb:+.1%})")
    else:
        growth = max(rss) - warm.rss_kb
        checks[f"RSS growth after warm-up < {rss_growth_kb / 1024:.0f} MB"] = (
            growth < rss_growth_kb, f"{growth / 1024:+.1f} MB over {warm.rss_kb / 1024:.1f} MB")
    fds = [s.fds for s in after]
    checks["fd count constant after warm-up"] = (len(set(fds)) == 1, f"fds {sorted(set(fds))}")
    last = samples[-1]
    started = last.rpcs_started - first.rpcs_started
    finished = last.rpcs_finished - first.rpcs_finished
    checks["rpcs_started == rpcs_finished at the end"] = (
        started == finished, f"started {started}, finished {finished}")
    left = [(s.label, s.tasks, s.task_names) for s in after if s.tasks]
    checks["no handler task left"] = (not left, f"leftover {left[:3]}" if left else "0 at every sample")
    active = [(s.label, s.active_calls) for s in after if s.active_calls]
    checks["no active call left"] = (not active, f"{active[:3]}" if active else "0 at every sample")
    return checks


def print_header() -> None:
    print(f"{'sample':<9} {'time s':>8} {'calls':>9} {'RSS MB':>8} {'dRSS':>7} {'fds':>5} "
          f"{'started':>9} {'finished':>9} {'active':>6} {'tasks':>5} {'settle s':>8} "
          f"{'py blocks':>9}",
          flush=True)


def print_sample(s: Sample, warm: Optional[Sample] = None) -> None:
    delta = "" if warm is None else f"{(s.rss_kb - warm.rss_kb) / warm.rss_kb:+.1%}"
    print(f"{s.label:<9} {s.elapsed_s:>8.1f} {s.calls:>9} {s.rss_kb / 1024:>8.1f} {delta:>7} "
          f"{s.fds:>5} {s.rpcs_started:>9} {s.rpcs_finished:>9} {s.active_calls:>6} "
          f"{s.tasks:>5} {s.settle_s:>8.2f} {s.py_blocks:>9}", flush=True)


def print_report(report: Report) -> None:
    print()
    print(f"load: {report.calls} calls in {report.load_s:.1f} s "
          f"({report.calls / max(report.load_s, 1e-9):.0f} calls/s)")
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items())))
    for example in report.examples:
        print("  unexpected:", example)
    print()
    for name, (passed, detail) in report.checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
    print("verdict:", "PASS" if report.ok else "FAIL")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unary", type=int, default=1_000_000, help="unary calls")
    parser.add_argument("--streaming", type=int, default=100_000, help="streaming calls")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="the server's event loop")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--clients", type=int, default=3, help="load processes")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="calls in flight per load process")
    parser.add_argument("--samples", type=int, default=10, help="phases after the warm-up")
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="fraction of the load run before the first judged sample")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to wait for the server to settle before a sample")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--only", choices=[n for _, n in UNARY_MIX + STREAM_MIX],
                        help="run only this kind of call (to find what leaks)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_forever(args.loop)
        return 0
    if args.only in dict((n, w) for w, n in UNARY_MIX):
        args.streaming = 0
    elif args.only is not None:
        args.unary = 0

    print(f"soak: {args.unary} unary + {args.streaming} streaming calls, server on "
          f"{args.loop}, {args.clients} client processes x {args.concurrency} in flight",
          flush=True)
    wall = time.monotonic()
    server = ServerProcess(args.loop)
    clients = None
    try:
        clients = ClientPool(f"127.0.0.1:{server.port}", args.clients, args.concurrency,
                             args.only)
        print_header()
        shown: List[Sample] = []

        def progress(s: Sample) -> None:
            shown.append(s)
            print_sample(s, shown[1] if len(shown) > 1 else None)
        report = soak(server, clients, args.unary, args.streaming, args.samples,
                      args.warmup, args.settle, args.rss_tolerance, progress=progress)
    except Exception as exc:      # noqa: BLE001
        print(f"soak could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        if clients is not None:
            clients.close()
        server.close()
    report.config.update(loop=args.loop, clients=args.clients, concurrency=args.concurrency,
                         only=args.only,
                         command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    print_report(report)
    print(f"wall time {time.monotonic() - wall:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(report), "ok": report.ok}, f, indent=1)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
