#!/usr/bin/env python3
"""Server memory per open idle stream (issue 11, point 5).

For each server: start it (as benchmarks/run.py does, pinned to CPU 0), let
the C load generator (`loadgen --method hold`, pinned to CPU 1) open
`--connections` TCP connections, then `--streams` server-streaming `Hold`
calls spread over them.  The server answers each with one reply (the client
waits for it, so every handler is known to run) and then keeps the stream
open, sending nothing, until the client cancels it.  The streams are opened
at `--open-rate` per second (default 2000; 0 opens them all at once: a
burst), stay open `--hold` seconds once all are open, then the client
cancels them all; each must end CANCELLED, or the run fails.

The server's resident set (VmRSS from /proc/PID/status, all threads) is read

  idle      the server is ready, after a small warm-up round of streams;
  conns     the connections are open, no stream yet;
  open      every stream is open (the last sample of the hold, taken every
            0.25 s after 0.5 s of settling);
  after     1 s after the streams were cancelled and the client went away;

and the table reports (open - conns) / streams as the memory per stream.

    python benchmarks/idle_streams.py         # 10,000 streams over 100 connections
    python benchmarks/idle_streams.py --servers asyncgrpc,grpc_aio
    python benchmarks/idle_streams.py --quick              # smoke, ~30 s

Servers: those of run.py whose Echo service has the Hold method (cpp,
grpc_aio, grpclib, asyncgrpc, asyncgrpc_uvloop, pygrpc_native_aio).  The
thread-per-call servers (grpc_sync, pygrpc_native_sync) are left out: they
would need one thread per open stream.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (benchmarks/run.py: peers, server start, loadgen)

HOLD_PEERS = ["asyncgrpc", "asyncgrpc_uvloop", "grpc_aio", "cpp",
              "pygrpc_native_aio", "grpclib"]
PAYLOAD = 16
SETTLE_S = 0.5        # after a phase change, before its RSS is read
SAMPLE_EVERY_S = 0.25
AFTER_S = 1.0


def read_status(pid: int) -> dict:
    """VmRSS, RssAnon and VmHWM of a process, in bytes."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024  # kB
    return out


class HoldRun:
    """One `loadgen --method hold` run against a started server, sampling
    the server's memory at each phase the loadgen announces on stderr."""

    def __init__(self, ctx, server, streams: int, connections: int,
                 hold_s: float, open_timeout: float, open_rate: float) -> None:
        self.ctx = ctx
        self.server = server
        self.streams = streams
        self.connections = connections
        self.hold_s = hold_s
        self.open_timeout = open_timeout
        self.open_rate = open_rate
        self.samples: dict = {}
        self.open_samples: list = []
        self.stderr_lines: list = []
        self.error: str = ""

    def _sample(self) -> dict:
        return read_status(self.server.pid)

    def run(self) -> dict:
        """Runs the loadgen to the end; returns its JSON report (raises
        run.BenchError on any failure)."""
        per_conn = self.streams // self.connections
        cmd = self.ctx.pinning.client(
            [run.LOADGEN, "--target", "127.0.0.1:%d" % self.server.port,
             "--method", "hold", "--connections", str(self.connections),
             "--inflight", str(per_conn), "--stream-messages", "1",
             "--payload", str(PAYLOAD), "--duration", str(self.hold_s),
             "--open-timeout", str(self.open_timeout), "--wait-stdin",
             "--json"] + (["--rate", str(self.open_rate)] if self.open_rate
                          else []))
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=run._die_with_parent)
        released = threading.Event()

        def on_open() -> None:
            # sample during the hold until the loadgen releases the streams
            time.sleep(SETTLE_S)
            while not released.is_set():
                try:
                    self.open_samples.append(self._sample())
                except OSError as e:
                    self.error = "cannot read the server's memory: %s" % e
                    return
                released.wait(SAMPLE_EVERY_S)

        sampler = None

        def read_stderr() -> None:
            nonlocal sampler
            for line in proc.stderr:
                line = line.rstrip("\n")
                try:
                    if line == "loadgen: connected":
                        time.sleep(SETTLE_S)
                        self.samples["conns"] = self._sample()
                        proc.stdin.write("go\n")
                        proc.stdin.flush()
                        continue
                    if line.startswith("loadgen: streams open "):
                        self.samples["t_open"] = time.monotonic()
                        sampler = threading.Thread(target=on_open, daemon=True)
                        sampler.start()
                        continue
                    if line == "loadgen: releasing":
                        released.set()
                        continue
                except (OSError, ValueError) as e:  # server or loadgen gone
                    self.error = "%s: %s" % (line, e)
                self.stderr_lines.append(line)
            released.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        limit = self.open_timeout + self.hold_s + 60
        timer = threading.Timer(limit, proc.kill)
        timer.start()
        try:
            out = proc.stdout.read()
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)
            if sampler is not None:
                sampler.join(5)
        if proc.returncode != 0:
            failed = [l for l in self.stderr_lines if "FAILED" in l or "only" in l]
            raise run.BenchError("loadgen hold failed (exit %d): %s" % (
                proc.returncode, "; ".join(failed[-2:]) or
                "\n".join(self.stderr_lines[-10:])))
        if self.error:
            raise run.BenchError(self.error)
        if "conns" not in self.samples or not self.open_samples:
            raise run.BenchError("no memory sample while the streams were open"
                                 " (hold too short?)")
        try:
            return json.loads(out)
        except ValueError:
            raise run.BenchError("loadgen printed no valid JSON: %r" % out[-300:])


def warm_up(ctx, server, streams: int) -> None:
    """A small hold round first, so that one-time costs (code paths and
    pools touched by the first streams) are not counted per stream."""
    if streams <= 0:
        return
    cmd = ctx.pinning.client(
        [run.LOADGEN, "--target", "127.0.0.1:%d" % server.port,
         "--method", "hold", "--connections", "1", "--inflight", str(streams),
         "--stream-messages", "1", "--payload", str(PAYLOAD),
         "--duration", "0.2", "--open-timeout", "30"])
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=90, preexec_fn=run._die_with_parent)
    if p.returncode != 0:
        raise run.BenchError("warm-up hold round failed: %s" %
                             p.stdout.strip().splitlines()[-1:])


def measure(ctx, peer, args) -> dict:
    """One server: start, warm up, hold the streams, sample, stop."""
    server = run.Server(ctx, peer, "idle_%s" % peer.name)
    try:
        server.wait_ready()
        warm_up(ctx, server, args.warmup_streams)
        time.sleep(SETTLE_S)
        idle = read_status(server.pid)
        hold = HoldRun(ctx, server, args.streams, args.connections, args.hold,
                       args.open_timeout, args.open_rate)
        lg = hold.run()
        time.sleep(AFTER_S)
        if not server.alive():
            raise run.BenchError("server died:\n%s" % run.tail(server.log_path))
        after = read_status(server.pid)
    finally:
        server.stop()
    conns = hold.samples["conns"]
    opened = hold.open_samples[-1]
    n = lg["streams"]
    return {
        "server": peer.name,
        "status": "ok",
        "streams": n,
        "connections": args.connections,
        "open_s": lg["open_s"],
        "open_rate": args.open_rate,
        "open_latency_us": lg["latency_us"],
        "rss": {"idle": idle["VmRSS"], "conns": conns["VmRSS"],
                "open": opened["VmRSS"], "after": after["VmRSS"]},
        "rss_anon": {"idle": idle["RssAnon"], "conns": conns["RssAnon"],
                     "open": opened["RssAnon"], "after": after["RssAnon"]},
        "open_rss_samples": [s["VmRSS"] for s in hold.open_samples],
        "hwm": after["VmHWM"],
        "per_stream_bytes": (opened["VmRSS"] - conns["VmRSS"]) / n,
        "per_stream_anon_bytes": (opened["RssAnon"] - conns["RssAnon"]) / n,
        "per_connection_bytes": (conns["VmRSS"] - idle["VmRSS"]) /
        args.connections,
        "status_counts": lg["status_counts"],
    }


def fmt_mib(b: float) -> str:
    return "%.1f" % (b / 1048576.0)


def format_table(rows: list) -> str:
    head = ["server", "streams", "open s", "idle MiB", "+conns MiB",
            "open MiB", "after MiB", "KiB/stream", "KiB/conn"]
    lines_rows = []
    for r in rows:
        if r["status"] != "ok":
            lines_rows.append([r["server"], r["status"].upper()] +
                              [""] * (len(head) - 2))
            continue
        rss = r["rss"]
        lines_rows.append([
            r["server"], "{:,}".format(r["streams"]), "%.2f" % r["open_s"],
            fmt_mib(rss["idle"]), fmt_mib(rss["conns"]), fmt_mib(rss["open"]),
            fmt_mib(rss["after"]), "%.2f" % (r["per_stream_bytes"] / 1024),
            "%.1f" % (r["per_connection_bytes"] / 1024)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines_rows)]
    out = []
    for i, row in enumerate([head] + lines_rows):
        out.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                             for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    out.append("* VmRSS of the server process; KiB/stream = (open - conns) / "
               "streams; KiB/conn = (conns - idle) / connections;")
    out.append("  open s = time for the client to open every stream and get "
               "its first reply (paced by --open-rate).")
    notes = [r for r in rows if r["status"] != "ok"]
    if notes:
        out.append("")
        out.append("notes:")
        for r in notes:
            out.append("  %s: %s" % (r["server"], r["error"].splitlines()[0]))
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", help="comma-separated among %s (default: all;"
                   " named ones must run, others that cannot are skipped)" %
                   ", ".join(HOLD_PEERS))
    p.add_argument("--streams", type=int, help="open streams (default 10000)")
    p.add_argument("--connections", type=int,
                   help="TCP connections they are spread over (default 100:"
                        " 100 streams each, the max_concurrent_streams some"
                        " servers (grpclib) advertise)")
    p.add_argument("--hold", type=float,
                   help="seconds every stream stays open (default 3)")
    p.add_argument("--open-rate", type=float, default=2000.0,
                   help="streams opened per second (default 2000; 0: all at "
                        "once)")
    p.add_argument("--warmup-streams", type=int, default=100,
                   help="streams of the warm-up round (default 100; 0: none)")
    p.add_argument("--open-timeout", type=float, default=30.0,
                   help="seconds allowed to open every stream (default 30)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 500 streams over 5 connections, 1 s hold")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the Python servers (default: this one)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "idle_streams"),
                   help="directory for logs and results.json "
                        "(default benchmarks/out/idle_streams)")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--no-pin", action="store_true")
    args = p.parse_args(argv)
    if args.servers:
        args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
        args.explicit = True
    else:
        args.server_list = list(HOLD_PEERS)
        args.explicit = False
    bad = [s for s in args.server_list if s not in HOLD_PEERS]
    if bad or not args.server_list:
        p.error("unknown server(s) %s; choose among %s" % (
            ", ".join(bad), ", ".join(HOLD_PEERS)))
    if args.streams is None:
        args.streams = 500 if args.quick else 10000
    if args.connections is None:
        args.connections = 5 if args.quick else 100
    if args.hold is None:
        args.hold = 1.0 if args.quick else 3.0
    if args.streams < args.connections or args.streams % args.connections:
        p.error("--streams must be a multiple of --connections")
    if args.hold < SETTLE_S + SAMPLE_EVERY_S:
        p.error("--hold must be at least %.2f s" % (SETTLE_S + SAMPLE_EVERY_S))
    # what run.Context reads
    args.duration = args.hold
    args.warmup = 0.0
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    ctx = run.Context(args)
    os.makedirs(ctx.log_dir, exist_ok=True)
    peers = {c.name: c() for c in run.PEER_CLASSES}
    rows, errors = [], []
    try:
        print("building the load generator ...", flush=True)
        run.build_loadgen()
        for name in args.server_list:
            peer = peers[name]
            print("== %s: %d streams over %d connections, %s" % (
                name, args.streams, args.connections,
                "%g opened per second" % args.open_rate if args.open_rate
                else "opened all at once"), flush=True)
            try:
                peer.prepare(ctx)
                row = measure(ctx, peer, args)
                print("   open in %.2f s, %.2f KiB per stream" % (
                    row["open_s"], row["per_stream_bytes"] / 1024), flush=True)
            except run.PeerUnavailable as e:
                status = "error" if args.explicit else "skipped"
                row = {"server": name, "status": status, "error": str(e)}
                if args.explicit:
                    errors.append("%s: %s" % (name, e))
                print("   %s: %s" % (status, str(e).splitlines()[0]), flush=True)
            except (run.BenchError, subprocess.TimeoutExpired) as e:
                row = {"server": name, "status": "error", "error": str(e)}
                errors.append("%s: %s" % (name, e))
                print("   ERROR: %s" % e, flush=True)
            rows.append(row)
    except run.BenchError as e:
        errors.append(str(e))
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        ctx.stop_all()
    table = format_table(rows)
    print()
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": ["idle_streams.py"] + (
            argv if argv is not None else sys.argv[1:]),
            "streams": args.streams, "connections": args.connections,
            "hold_s": args.hold, "open_rate": args.open_rate,
            "results": rows, "errors": errors}, f, indent=1)
    print("wrote %s" % os.path.join(args.out, "results.json"))
    print("elapsed %.0f s" % (time.monotonic() - t0))
    if errors:
        print("\nFAILED:", file=sys.stderr)
        for e in errors:
            print("  " + e.replace("\n", "\n    "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
