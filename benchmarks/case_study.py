#!/usr/bin/env python3
"""Case study: thread-pool exhaustion when a dependency slows down.

The story, in its own time: a gRPC server with a pool of 100 threads receives
20 requests/s. Each waits 2 s on a downstream dependency, so about 40 threads
are busy. Then the dependency slows to 10 s: 200 threads would be needed, so
within about 5 s every thread is blocked and new requests wait in the pool's
queue -- even requests that need no dependency at all. An asyncio server waits
with ``await`` and holds no thread, so it keeps serving.

Servers compared, each in its own subprocess:

* ``sync``      -- grpcio's sync server on ``ThreadPoolExecutor(100)``, ``time.sleep``;
* ``aio``       -- ``grpc.aio.server()``, ``await asyncio.sleep``;
* ``asyncgrpc`` -- ``asyncgrpc.server()``, same code as ``aio`` (skipped with a
  message if ``import asyncgrpc`` fails).

The client (grpc.aio, in this process) sends open-loop load at a fixed rate,
with a deadline, plus a few "light" requests with no dependency, and records
each request's outcome and latency. The dependency's delay travels in the
request (the client knows when the slowdown starts), so all servers see the
same dependency.

The run is time-scaled: durations are multiplied by ``--scale`` and rates
divided by it, which keeps every ratio and the number of requests in flight of
the story. Latencies are printed in story seconds (measured / scale).

    python benchmarks/case_study.py            # full run, under 3 minutes
    python benchmarks/case_study.py --quick    # same path, under 30 s

Writes a PNG of latency and requests in flight over time (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "SERVER_LABELS",
    "Plan",
    "asyncgrpc_problem",
    "ensure_stubs",
    "percentile",
    "start_server",
    "stop_server",
]

HERE = Path(__file__).resolve().parent
PROTO = HERE / "case_study.proto"
BUILD_ROOT = HERE / "build" / "case_study"  # git-ignored
OUT_DIR = HERE / "out"  # git-ignored

SERVER_LABELS = {
    "sync": "grpcio sync server, ThreadPoolExecutor(100)",
    "aio": "grpc.aio server",
    "asyncgrpc": "asyncgrpc server",
}


# ------------------------------------------------------------------ generated code


def ensure_stubs() -> tuple[ModuleType, ModuleType]:
    """Generate case_study_pb2{,_grpc} with grpcio-tools (once per proto and interpreter)."""
    import google.protobuf

    key = PROTO.read_bytes() + sys.executable.encode() + google.protobuf.__version__.encode()
    out = BUILD_ROOT / hashlib.sha1(key).hexdigest()[:10]
    if not (out / "case_study_pb2_grpc.py").exists():
        from grpc_tools import protoc

        BUILD_ROOT.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".gen-", dir=BUILD_ROOT)
        try:
            rc = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"-I{HERE}",
                    f"--python_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    str(PROTO),
                ]
            )
            if rc != 0:
                raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc}")
            try:
                os.rename(tmp, out)  # atomic: a concurrent run sees all or nothing
            except OSError:
                pass  # another process got there first; its copy is identical
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    import case_study_pb2
    import case_study_pb2_grpc

    return case_study_pb2, case_study_pb2_grpc


# ------------------------------------------------------------------ servers (subprocess side)


def _async_servicer(pb2: ModuleType, pb2_grpc: ModuleType) -> Any:
    class AsyncLab(pb2_grpc.LabServicer):  # type: ignore[misc, name-defined]
        async def Call(self, request: Any, context: Any) -> Any:
            if request.dependency_ms:
                await asyncio.sleep(request.dependency_ms / 1000)
            return pb2.CallReply()

    return AsyncLab()


def _serve_sync(threads: int) -> None:
    import grpc

    pb2, pb2_grpc = ensure_stubs()

    class SyncLab(pb2_grpc.LabServicer):  # type: ignore[misc, name-defined]
        def Call(self, request: Any, context: Any) -> Any:
            if request.dependency_ms:
                time.sleep(request.dependency_ms / 1000)
            return pb2.CallReply()

    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    pb2_grpc.add_LabServicer_to_server(SyncLab(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


async def _serve_async(kind: str) -> None:
    pb2, pb2_grpc = ensure_stubs()
    if kind == "asyncgrpc":
        try:
            import asyncgrpc

            factory = asyncgrpc.server
        except Exception as exc:  # ImportError, or a package without server()
            print(f"SKIP import asyncgrpc failed: {exc!r}", flush=True)
            return
    else:
        import grpc

        factory = grpc.aio.server
    server = factory()
    pb2_grpc.add_LabServicer_to_server(_async_servicer(pb2, pb2_grpc), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


def asyncgrpc_problem() -> str | None:
    """Why ``asyncgrpc.server`` cannot be used here, or None if it can.

    Checked in a throw-away interpreter: a broken native build may kill the
    process that imports it rather than raise ImportError.
    """
    probe = subprocess.run(
        [sys.executable, "-c", "import asyncgrpc; asyncgrpc.server"],
        capture_output=True,
        text=True,
        cwd=HERE,
        check=False,
    )
    if probe.returncode == 0:
        return None
    lines = (probe.stderr or probe.stdout).strip().splitlines()
    return f"import asyncgrpc failed ({lines[-1] if lines else f'exit code {probe.returncode}'})"


def start_server(
    script: Path, argv: list[str], timeout: float = 60.0
) -> tuple[subprocess.Popen[str], int | str]:
    """Run ``script --serve ...``; return the process and its port, or a skip reason (str)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *argv], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if line.startswith("PORT "):
        return proc, int(line.split()[1])
    stop_server(proc)
    if line.startswith("SKIP "):
        return proc, line[5:]
    raise RuntimeError(f"server {argv} did not start (said {line!r})")


def stop_server(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ the load (client side)


@dataclass(frozen=True)
class Plan:
    """The story's numbers, in story seconds, and the time scale of the run."""

    scale: float
    threads: int = 100
    qps: float = 20.0
    probe_qps: float = 2.0
    dep_normal: float = 2.0
    dep_slow: float = 10.0
    deadline: float = 15.0  # above the slow dependency: only queueing makes a request fail
    normal_phase: float = 20.0
    slow_phase: float = 40.0

    def t(self, story_seconds: float) -> float:
        """Story seconds to real seconds."""
        return story_seconds * self.scale


@dataclass
class Record:
    kind: str  # "main" (waits on the dependency) or "probe" (no dependency)
    sent: float  # real seconds since the start of the load
    latency: float  # real seconds
    code: str


def client_watchdog(loop: asyncio.AbstractEventLoop) -> Any:
    """asyncgrpc's watchdog on the client's loop: were the client's own timings disturbed?

    Loaded from its file's folder (it needs nothing else of the package); it
    logs nowhere here, only counts stalls longer than 0.1 s.
    """
    folder = str(HERE.parent / "asyncgrpc")
    if folder not in sys.path:
        sys.path.append(folder)
    import _watchdog  # type: ignore[import-not-found]

    quiet = logging.getLogger("case_study.client_loop")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    return _watchdog.Watchdog(loop, threshold=0.1, logger=quiet)


async def drive(port: int, plan: Plan) -> tuple[list[Record], dict[str, Any]]:
    """Send the open-loop schedule to one server; return every request and client-loop stats."""
    import grpc

    pb2, pb2_grpc = ensure_stubs()
    loop = asyncio.get_running_loop()
    schedule: list[tuple[float, str, int]] = []
    total = plan.normal_phase + plan.slow_phase
    for i in range(int(total * plan.qps)):
        at = i / plan.qps
        dep = plan.dep_normal if at < plan.normal_phase else plan.dep_slow
        schedule.append((plan.t(at), "main", round(plan.t(dep) * 1000)))
    for i in range(int(total * plan.probe_qps)):
        schedule.append((plan.t((i + 0.5) / plan.probe_qps), "probe", 0))
    schedule.sort()

    records: list[Record] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pb2_grpc.LabStub(channel)
        # One warm-up call, so connection set-up is not in the first sample.
        await stub.Call(pb2.CallRequest(), timeout=5)
        start = loop.time()

        async def one(kind: str, dep_ms: int) -> None:
            sent = loop.time()
            try:
                await stub.Call(pb2.CallRequest(dependency_ms=dep_ms), timeout=plan.t(plan.deadline))
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            records.append(Record(kind, sent - start, loop.time() - sent, code))

        tasks = []
        dog = client_watchdog(loop)
        dog.start()
        for at, kind, dep_ms in schedule:
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(kind, dep_ms)))
        await asyncio.gather(*tasks)
        dog.stop()
    return records, dog.stats()


# ------------------------------------------------------------------ reporting


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def peak_in_flight(records: list[Record]) -> int:
    events = sorted([(r.sent, 1) for r in records] + [(r.sent + r.latency, -1) for r in records])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def in_flight_series(records: list[Record], points: int = 400) -> tuple[list[float], list[int]]:
    end = max((r.sent + r.latency for r in records), default=0.0)
    times = [end * i / points for i in range(points + 1)]
    counts = [sum(1 for r in records if r.sent <= t < r.sent + r.latency) for t in times]
    return times, counts


def summarize(label: str, records: list[Record], plan: Plan, client: dict[str, Any]) -> dict[str, Any]:
    slow_at = plan.t(plan.normal_phase)
    rows = {
        "before slowdown": [r for r in records if r.kind == "main" and r.sent < slow_at],
        "after slowdown": [r for r in records if r.kind == "main" and r.sent >= slow_at],
        "light, after slowdown": [r for r in records if r.kind == "probe" and r.sent >= slow_at],
    }
    print(f"\n== {label} ==")
    print(f"  {'requests':<24}{'sent':>6}{'ok':>9}{'p50':>10}{'p99':>10}   failures")
    out: dict[str, Any] = {"label": label}
    for name, rs in rows.items():
        lat = [r.latency / plan.scale for r in rs]
        ok = sum(1 for r in rs if r.code == "OK")
        fails: dict[str, int] = {}
        for r in rs:
            if r.code != "OK":
                fails[r.code] = fails.get(r.code, 0) + 1
        rate = 100.0 * ok / len(rs) if rs else float("nan")
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        fail_text = ", ".join(f"{k} {v}" for k, v in sorted(fails.items())) or "-"
        print(f"  {name:<24}{len(rs):>6}{rate:>8.1f}%{p50:>9.2f}s{p99:>9.2f}s   {fail_text}")
        out[name] = {"sent": len(rs), "ok_pct": rate, "p50": p50, "p99": p99}
    peak = peak_in_flight(records)
    print(f"  peak requests in flight: {peak}   (story: {plan.threads} threads in the sync pool)")
    print(
        f"  client loop stalls > 0.1 s real: {client['loop_stalls']} "
        f"(longest {client['longest_stall_s']:.2f} s real; nonzero: a busy machine disturbed the timings)"
    )
    out["peak"] = peak
    return out


def plot(results: dict[str, list[Record]], plan: Plan, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 7.5), sharex=True, squeeze=False)
    slow_at = plan.normal_phase
    for col, (kind, records) in enumerate(results.items()):
        top, bottom = axes[0][col], axes[1][col]
        for sel, style, name in (
            (lambda r: r.kind == "main" and r.code == "OK", {"c": "tab:blue", "s": 4}, "dependency call, ok"),
            (
                lambda r: r.kind == "main" and r.code != "OK",
                {"c": "tab:red", "s": 6, "marker": "x"},
                "dependency call, failed",
            ),
            (
                lambda r: r.kind == "probe",
                {"c": "tab:green", "s": 10, "marker": "^"},
                "light call (no dependency)",
            ),
        ):
            pts = [r for r in records if sel(r)]
            top.scatter(
                [r.sent / plan.scale for r in pts],
                [r.latency / plan.scale for r in pts],
                label=name,
                **style,  # type: ignore[arg-type]
            )
        top.axvline(slow_at, color="gray", ls="--", lw=1)
        top.axhline(plan.deadline, color="tab:red", ls=":", lw=1)
        top.set_title(SERVER_LABELS[kind], fontsize=10)
        top.set_ylabel("latency (story s)")
        times, counts = in_flight_series(records)
        bottom.plot([t / plan.scale for t in times], counts, color="tab:purple")
        bottom.axhline(plan.threads, color="gray", ls=":", lw=1)
        bottom.axvline(slow_at, color="gray", ls="--", lw=1)
        bottom.set_ylabel("requests in flight")
        bottom.set_xlabel("time (story s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9)
    fig.suptitle(
        f"Thread-pool exhaustion case study (time scale {plan.scale:g}); "
        "dashed: the dependency slows, dotted: deadline / pool size"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 30 s), same code path")
    parser.add_argument("--scale", type=float, help="time scale (default 0.4, or 0.1 with --quick)")
    parser.add_argument("--servers", default="sync,aio,asyncgrpc", help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "case_study.png", help="PNG path")
    parser.add_argument("--serve", choices=sorted(SERVER_LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve == "sync":
        _serve_sync(args.threads)
        return 0
    if args.serve:
        asyncio.run(_serve_async(args.serve))
        return 0

    if args.quick:
        plan = Plan(scale=args.scale or 0.1, normal_phase=15.0, slow_phase=30.0)
    else:
        plan = Plan(scale=args.scale or 0.4)
    ensure_stubs()
    print(
        f"time scale {plan.scale:g}: {plan.qps / plan.scale:g} requests/s (+{plan.probe_qps / plan.scale:g} "
        f"light/s), dependency {plan.t(plan.dep_normal):g} s -> {plan.t(plan.dep_slow):g} s after "
        f"{plan.t(plan.normal_phase):g} s, load for {plan.t(plan.normal_phase + plan.slow_phase):g} s, "
        f"deadline {plan.t(plan.deadline):g} s"
    )
    print(
        f"story: {plan.qps:g} req/s, dependency {plan.dep_normal:g} s -> {plan.dep_slow:g} s, "
        f"deadline {plan.deadline:g} s, {plan.threads} threads; latencies below in story seconds"
    )
    results: dict[str, list[Record]] = {}
    summaries = []
    for kind in [k.strip() for k in args.servers.split(",") if k.strip()]:
        if kind == "asyncgrpc" and (problem := asyncgrpc_problem()):
            print(f"\n== {SERVER_LABELS[kind]} ==\n  skipped: {problem}")
            continue
        proc, port = start_server(Path(__file__), ["--serve", kind, "--threads", str(plan.threads)])
        if isinstance(port, str):
            print(f"\n== {SERVER_LABELS[kind]} ==\n  skipped: {port}")
            continue
        try:
            records, client = asyncio.run(drive(port, plan))
        finally:
            stop_server(proc)
        results[kind] = records
        summaries.append(summarize(SERVER_LABELS[kind], records, plan, client))
    if summaries:
        print("\nsummary (after the slowdown):")
        print(f"  {'server':<44}{'ok':>8}{'p99':>9}{'light p99':>11}{'peak in flight':>16}")
        for s in summaries:
            a, light = s["after slowdown"], s["light, after slowdown"]
            row = f"{a['ok_pct']:>7.1f}%{a['p99']:>8.2f}s{light['p99']:>10.2f}s{s['peak']:>16}"
            print(f"  {s['label']:<44}{row}")
    if results:
        plot(results, plan, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
