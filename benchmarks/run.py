#!/usr/bin/env python3
"""Runs the Echo benchmark against several gRPC server implementations.

For every (server, scenario) pair: start the server pinned to one CPU, wait
until it answers, drive it with the C load generator pinned to another CPU,
and measure the server's CPU time over the load generator's measurement
window.  Prints one table and writes results.json, results.txt and PNG plots
into the output directory.

    python benchmarks/run.py                        # all servers, full run
    python benchmarks/run.py --servers cpp,grpc_aio
    python benchmarks/run.py --quick --servers asyncgrpc   # < 60 s smoke

See benchmarks/README.md for what is measured and how.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SERVERS_DIR = os.path.join(HERE, "servers")
BUILD_DIR = os.environ.get("ASYNCGRPC_BENCH_BUILD", os.path.join(HERE, "build"))
LOADGEN = os.path.join(BUILD_DIR, "loadgen", "loadgen")
CPP_SERVER = os.path.join(BUILD_DIR, "cpp_callback", "server")
CLK_TCK = os.sysconf("SC_CLK_TCK")

START_TIMEOUT = 30.0  # seconds for a server to answer its first RPC
STOP_TIMEOUT = 5.0


class BenchError(Exception):
    """A failure that makes the run exit non-zero."""


class PeerUnavailable(Exception):
    """The peer cannot run here (not installed, does not build or start)."""


# --------------------------------------------------------------------------
# scenarios


class Scenario:
    def __init__(self, name, method, connections, inflight, payload=16,
                 stream_messages=None, rate=None, description=""):
        self.name = name
        self.method = method
        self.connections = connections
        self.inflight = inflight
        self.payload = payload
        self.stream_messages = stream_messages
        self.rate = rate
        self.description = description

    @property
    def unit(self):
        return "req/s" if self.method == "unary" else "msgs/s"

    def loadgen_args(self):
        args = ["--method", self.method,
                "--connections", str(self.connections),
                "--inflight", str(self.inflight),
                "--payload", str(self.payload)]
        if self.stream_messages is not None:
            args += ["--stream-messages", str(self.stream_messages)]
        if self.rate:
            args += ["--rate", str(self.rate)]
        return args

    def as_dict(self):
        return {k: getattr(self, k) for k in (
            "name", "method", "connections", "inflight", "payload",
            "stream_messages", "rate", "description", "unit")}


SCENARIOS = [
    Scenario("unary_1x1", "unary", 1, 1,
             description="unary, 1 connection x 1 in flight: latency"),
    Scenario("unary_10x10", "unary", 10, 10,
             description="unary, 10 connections x 10 in flight: throughput"),
    Scenario("stream_2x4", "server_stream", 2, 4, stream_messages=100,
             description="server streaming, 2 connections x 4 streams, "
                         "100 x 16 B replies per stream"),
    Scenario("bidi_2x8", "bidi", 2, 8, stream_messages=1000,
             description="bidi ping-pong, 2 connections x 8 streams, "
                         "1000 messages per stream"),
    Scenario("unary_50x20", "unary", 50, 20,
             description="unary, 50 connections x 20 in flight (1000 RPCs "
                         "in flight): many connections"),
    Scenario("stream_10x20", "server_stream", 10, 20, stream_messages=100,
             description="server streaming, 10 connections x 20 streams "
                         "(200 concurrent streams), 100 x 16 B replies per "
                         "stream"),
    # not run by default; ask for them with --scenarios
    Scenario("unary_1x32", "unary", 1, 32,
             description="unary, 1 connection x 32 in flight"),
    Scenario("unary_rate2000", "unary", 4, 50, rate=2000,
             description="unary open loop at 2000 req/s over 4 connections "
                         "(latency from the intended send time)"),
]
DEFAULT_SCENARIOS = ["unary_1x1", "unary_10x10", "stream_2x4", "bidi_2x8",
                     "unary_50x20", "stream_10x20"]
SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}


# --------------------------------------------------------------------------
# process helpers


def _die_with_parent():
    """preexec_fn: the child gets SIGTERM if this script dies, even by
    SIGKILL, so that no server is left behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def proc_cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds():
    """CPU time used on the whole machine (all CPUs), in seconds."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    # user nice system idle iowait irq softirq steal ...
    vals = [int(x) for x in parts[1:]]
    busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)
    return busy / CLK_TCK


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_checked(cmd, what, cwd=None, env=None, timeout=600):
    """Runs a build step; returns its output or raises with it."""
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError("%s failed: %s" % (what, e))
    if p.returncode != 0:
        raise BenchError("%s failed (exit %d):\n%s" % (
            what, p.returncode, p.stdout[-4000:]))
    return p.stdout


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class Pinning:
    def __init__(self, server_cpus, client_cpus, enabled):
        self.server_cpus = server_cpus
        self.client_cpus = client_cpus
        self.enabled = enabled and shutil.which("taskset") is not None

    def server(self, cmd):
        return ["taskset", "-c", self.server_cpus] + cmd if self.enabled else cmd

    def client(self, cmd):
        return ["taskset", "-c", self.client_cpus] + cmd if self.enabled else cmd


# --------------------------------------------------------------------------
# peers


class Peer:
    """One server implementation.  Subclasses say how to build and start it.

    Hooks, in the order they are used:
      prepare(ctx)          build / check; raise PeerUnavailable if it can't run
      command(ctx, port)    argv of the server (before CPU pinning)
      env(ctx)              environment of the server
      extra_stats(ctx, srv) after each measured run, while the server still
                            runs: a dict of implementation-specific counters
                            to store with the result, or None
      scenario_note(sc)     a caveat printed under the table, or None
    """

    name = None
    label = None

    def prepare(self, ctx):
        pass

    def command(self, ctx, port):
        raise NotImplementedError

    def env(self, ctx):
        return dict(os.environ)

    def extra_stats(self, ctx, server):
        return None

    def scenario_note(self, scenario):
        """A caveat to print under the table for this peer in `scenario`
        (e.g. a method it does not serve natively), or None."""
        return None


class CppPeer(Peer):
    name = "cpp"
    label = "C++ callback"

    def prepare(self, ctx):
        try:
            run_checked(["make", "-C", os.path.join(SERVERS_DIR, "cpp_callback"),
                         "-j2", "BUILD=" + os.path.dirname(CPP_SERVER)],
                        "building the C++ server")
        except BenchError as e:
            raise PeerUnavailable(str(e))

    def command(self, ctx, port):
        return [CPP_SERVER, "--port", str(port)]


class PythonPeer(Peer):
    script = None
    extra_args = ()
    needs = ()  # modules that must import in the server's interpreter

    def _check_imports(self, ctx, env):
        code = "; ".join("import %s" % m for m in self.needs) or "pass"
        # run from the servers' directory: that is what the server scripts
        # see first on sys.path (not the current directory)
        p = subprocess.run([ctx.python, "-c", code], env=env, cwd=SERVERS_DIR,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=60)
        if p.returncode != 0:
            last = (p.stdout.strip().splitlines() or ["?"])[-1]
            return last
        return None

    def prepare(self, ctx):
        ctx.ensure_python_stubs()
        err = self._check_imports(ctx, self.env(ctx))
        if err:
            raise PeerUnavailable("%s cannot import %s: %s" % (
                ctx.python, ", ".join(self.needs), err))

    def command(self, ctx, port):
        return ([ctx.python, os.path.join(SERVERS_DIR, self.script),
                 "--port", str(port)] + list(self.extra_args))


class GrpcAioPeer(PythonPeer):
    name, label, script, needs = ("grpc_aio", "grpc.aio", "grpc_aio_server.py",
                                  ("grpc",))


class GrpcSyncPeer(PythonPeer):
    name, label, script, needs = ("grpc_sync", "grpcio sync",
                                  "grpc_sync_server.py", ("grpc",))


class GrpclibPeer(PythonPeer):
    name, label, script, needs = ("grpclib", "grpclib", "grpclib_server.py",
                                  ("grpclib",))


class AsyncgrpcPeer(PythonPeer):
    name, label, script = "asyncgrpc", "asyncgrpc", "asyncgrpc_server.py"
    loop = "asyncio"
    needs = ("asyncgrpc",)

    def __init__(self):
        self._pythonpath = None
        self.extra_args = ("--loop", self.loop)

    def env(self, ctx):
        env = dict(os.environ)
        if self._pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                [self._pythonpath] + [p for p in env.get("PYTHONPATH", "").split(
                    os.pathsep) if p])
        return env

    def prepare(self, ctx):
        ctx.ensure_python_stubs()
        if self.loop == "uvloop":
            self.needs = ("asyncgrpc", "uvloop")
        # installed (pip install / -e), or else built in place in the repo
        self._pythonpath = None
        err = self._check_imports(ctx, self.env(ctx))
        if err:
            self._pythonpath = REPO
            err2 = self._check_imports(ctx, self.env(ctx))
            if err2:
                self._pythonpath = None
                raise PeerUnavailable("%s cannot import %s: %s" % (
                    ctx.python, ", ".join(self.needs), err2))

    def extra_stats(self, ctx, server):
        # Placeholder: once the asyncgrpc server can report its internal
        # counters (e.g. through a file or a signal), read them here and
        # return them as a dict; they are stored in results.json.
        return None


class AsyncgrpcUvloopPeer(AsyncgrpcPeer):
    name, label, loop = "asyncgrpc_uvloop", "asyncgrpc+uvloop", "uvloop"


class AsyncgrpcBundledPeer(AsyncgrpcPeer):
    """asyncgrpc built on the bundled gRPC core (ASYNCGRPC_BUNDLED_CORE=1),
    installed in another interpreter: --bundled-python (or the environment
    variable ASYNCGRPC_BUNDLED_PYTHON), e.g. the venv that
    `bash scripts/dev.sh wheel-bundled DIR` makes (DIR/venv/bin/python; it
    needs grpcio-tools and protobuf for the stubs, uvloop for the uvloop
    peer). Unavailable without it."""
    name, label = "asyncgrpc_bundled", "asyncgrpc (bundled core)"

    def _python(self, ctx):
        return ctx.bundled_python or os.environ.get("ASYNCGRPC_BUNDLED_PYTHON")

    def prepare(self, ctx):
        py = self._python(ctx)
        if not py:
            raise PeerUnavailable("no --bundled-python (an interpreter with "
                                  "asyncgrpc built on the bundled core)")
        needs = "import uvloop; " if self.loop == "uvloop" else ""
        code = (needs + "import asyncgrpc, grpc_tools; "
                "assert asyncgrpc._core.BUNDLED_CORE, 'not a bundled-core build'; "
                "print(asyncgrpc.core_version())")
        p = subprocess.run([py, "-c", code], cwd=SERVERS_DIR, env=dict(os.environ),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=60)
        if p.returncode != 0:
            raise PeerUnavailable("%s: %s" % (py, (p.stdout.strip().splitlines()
                                                   or ["?"])[-1]))
        self.core_version = p.stdout.strip().splitlines()[-1]

    def command(self, ctx, port):
        return [self._python(ctx), os.path.join(SERVERS_DIR, self.script),
                "--port", str(port)] + list(self.extra_args)

    def env(self, ctx):
        return dict(os.environ)


class AsyncgrpcBundledUvloopPeer(AsyncgrpcBundledPeer):
    name, label, loop = ("asyncgrpc_bundled_uvloop", "asyncgrpc+uvloop (bundled core)",
                         "uvloop")


class PygrpcNativePeer(PythonPeer):
    """pygrpc-native (PyPI pygrpc-native): HTTP/2 and gRPC in Rust threads,
    grpcio's server API.  It serves unary and server-streaming methods
    itself and relays the others (bidi) to a grpcio server behind it."""

    needs = ("grpc", "pygrpc_native")

    def scenario_note(self, scenario):
        if scenario.method == "bidi":
            return ("bidi is relayed by pygrpc-native to a grpcio server "
                    "behind it (not served natively)")
        return None


class PygrpcNativeAioPeer(PygrpcNativePeer):
    name, label, script = ("pygrpc_native_aio", "pygrpc-native aio",
                           "pygrpc_native_aio_server.py")


class PygrpcNativeSyncPeer(PygrpcNativePeer):
    name, label, script = ("pygrpc_native_sync", "pygrpc-native sync",
                           "pygrpc_native_sync_server.py")


PEER_CLASSES = [CppPeer, GrpcAioPeer, GrpcSyncPeer, GrpclibPeer,
                AsyncgrpcPeer, AsyncgrpcUvloopPeer, AsyncgrpcBundledPeer,
                AsyncgrpcBundledUvloopPeer, PygrpcNativeAioPeer,
                PygrpcNativeSyncPeer]
PEER_NAMES = [c.name for c in PEER_CLASSES]


# --------------------------------------------------------------------------
# running


class Server:
    """A started server process."""

    def __init__(self, ctx, peer, tag):
        self.ctx = ctx
        self.peer = peer
        self.port = free_port()
        self.log_path = os.path.join(ctx.log_dir, "%s.log" % tag)
        self.log = open(self.log_path, "w")
        cmd = ctx.pinning.server(peer.command(ctx, self.port))
        self.log.write("$ %s\n" % " ".join(cmd))
        self.log.flush()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, env=peer.env(ctx),
            preexec_fn=_die_with_parent)
        ctx.live.add(self)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def wait_ready(self, timeout=START_TIMEOUT):
        """Retries one unary RPC until the server answers."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise PeerUnavailable(
                    "server exited with status %s before answering:\n%s" % (
                        self.proc.returncode, tail(self.log_path)))
            p = subprocess.run(
                [LOADGEN, "--target", "127.0.0.1:%d" % self.port,
                 "--method", "unary", "--requests", "1", "--warmup", "0",
                 "--duration", "5", "--connect-timeout", "1",
                 "--drain-timeout", "2"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                preexec_fn=_die_with_parent)
            if p.returncode == 0:
                return
            last = p.stdout.strip().splitlines()[-1:] or [""]
            last = last[0]
            time.sleep(0.2)
        raise PeerUnavailable("server did not answer within %.0f s (%s):\n%s" % (
            timeout, last, tail(self.log_path)))

    def stop(self):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.ctx.live.discard(self)


def run_loadgen(ctx, server, scenario):
    """Runs one measurement; returns the result dict (raises BenchError)."""
    cmd = ctx.pinning.client(
        [LOADGEN, "--target", "127.0.0.1:%d" % server.port,
         "--duration", str(ctx.duration), "--warmup", str(ctx.warmup),
         "--json"] + scenario.loadgen_args())
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_die_with_parent)
    marks = {}
    stderr_lines = []

    def sample():
        return {"t": time.monotonic(),
                "server_cpu": proc_cpu_seconds(server.pid),
                "machine_busy": machine_busy_seconds()}

    def read_stderr():
        for line in proc.stderr:
            line = line.rstrip("\n")
            try:
                if line == "loadgen: window start":
                    marks["start"] = sample()
                    continue
                if line == "loadgen: window end":
                    marks["end"] = sample()
                    continue
            except OSError as e:  # server gone
                marks["error"] = "cannot read the server's CPU time: %s" % e
            stderr_lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    limit = ctx.warmup + ctx.duration + 60
    timed_out = []

    def on_timeout():
        timed_out.append(True)
        proc.kill()

    timer = threading.Timer(limit, on_timeout)
    timer.start()
    try:
        out = proc.stdout.read()  # stderr is consumed by the reader thread
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    if timed_out:
        raise BenchError("loadgen did not finish within %.0f s" % limit)
    if proc.returncode != 0:
        failed = [l for l in stderr_lines if l.startswith("loadgen: FAILED")]
        raise BenchError("loadgen failed (exit %d): %s\n%s" % (
            proc.returncode, failed[-1][len("loadgen: "):] if failed else "",
            "\n".join(stderr_lines[-20:])))
    if "error" in marks:
        raise BenchError(marks["error"])
    if "start" not in marks or "end" not in marks:
        raise BenchError("loadgen printed no measurement window markers")
    try:
        lg = json.loads(out)
    except ValueError:
        raise BenchError("loadgen printed no valid JSON: %r" % out[-500:])
    if not lg.get("ok"):
        raise BenchError("loadgen reports failure: %s" % lg.get("first_error"))
    if not server.alive():
        raise BenchError("server died during the run:\n%s" % tail(server.log_path))

    wall = marks["end"]["t"] - marks["start"]["t"]
    server_cpu = marks["end"]["server_cpu"] - marks["start"]["server_cpu"]
    busy = marks["end"]["machine_busy"] - marks["start"]["machine_busy"]
    client_cpu = lg["client_cpu"] * lg["duration_s"]
    ops = lg["rpcs"] if scenario.method == "unary" else lg["messages"]
    throughput = (lg["rpcs_per_s"] if scenario.method == "unary"
                  else lg["msgs_per_s"])
    if ops <= 0:
        raise BenchError("no %s completed in the measurement window" % (
            "RPC" if scenario.method == "unary" else "message"))
    return {
        "throughput": throughput,
        "unit": scenario.unit,
        "ops": ops,
        "latency_us": lg["latency_us"],
        "latency_of": lg["latency_of"],
        "server_cpu_s": server_cpu,
        "server_cpu_util": server_cpu / wall if wall > 0 else None,
        "server_cpu_us_per_op": server_cpu * 1e6 / ops,
        "client_cpu_util": lg["client_cpu"],
        # CPU used by anything else on the machine: a noise indicator
        "other_cpu_util": max(0.0, busy - server_cpu - client_cpu) / wall
        if wall > 0 else None,
        "loadgen": lg,
    }


def measure(ctx, peer, scenario, tag, repeat):
    """Starts a fresh server for each of `repeat` runs of the scenario and
    returns the run with the median throughput (all runs are kept in
    'repeats')."""
    runs = []
    for i in range(repeat):
        server = Server(ctx, peer, tag if repeat == 1 else "%s_%d" % (tag, i))
        try:
            server.wait_ready()
            res = run_loadgen(ctx, server, scenario)
            # implementation-specific counters, read while the server runs
            res["extra"] = peer.extra_stats(ctx, server)
        finally:
            server.stop()
        runs.append(res)
    ranked = sorted(runs, key=lambda r: r["throughput"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    if repeat > 1:
        chosen["repeats"] = [
            {k: r[k] for k in ("throughput", "latency_us",
                               "server_cpu_us_per_op", "other_cpu_util")}
            for r in runs]
    return chosen


class Context:
    def __init__(self, args):
        self.python = args.python
        self.bundled_python = getattr(args, "bundled_python", None)
        self.duration = args.duration
        self.warmup = args.warmup
        self.out_dir = args.out
        self.log_dir = os.path.join(args.out, "logs")
        self.pinning = Pinning(args.server_cpus, args.client_cpus,
                               not args.no_pin)
        self.live = set()
        self._stubs_done = False

    def ensure_python_stubs(self):
        if self._stubs_done:
            return
        try:
            run_checked([self.python, os.path.join(SERVERS_DIR, "_stubs.py")],
                        "generating the Python stubs with %s" % self.python)
        except BenchError as e:
            raise PeerUnavailable(str(e))
        self._stubs_done = True

    def stop_all(self):
        for server in list(self.live):
            try:
                server.stop()
            except Exception as e:  # keep stopping the others
                print("warning: stopping %s: %s" % (server.peer.name, e),
                      file=sys.stderr)


def build_loadgen():
    run_checked(["make", "-C", os.path.join(HERE, "loadgen"), "-j2",
                 "BUILD=" + os.path.dirname(LOADGEN)], "building the loadgen")


def alternate_parser(doc, runs):
    """The command line the A/B programs share (their own options are added
    to it): --runs (default ``runs``), --duration, --warmup, --scenario."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=runs,
                        help="runs of each variant, alternating (default %d)" % runs)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--scenario", default="unary_10x10",
                        choices=sorted(SCENARIO_BY_NAME))
    return parser


def alternate(peers, scenario_name, runs, duration, warmup, prefix,
              server_cpus="0", client_cpus="1", pin=True, before=None):
    """The A/B measurement of the cost programs (metrics_cost.py,
    interceptor_cost.py, workers.py): each peer of ``peers`` (key -> peer)
    measured ``runs`` times on a fresh server, the peers taking turns so
    that a change in background load hits all of them. ``before(ctx)`` runs
    once, after the peers are prepared, and its result is returned with the
    list of results per key."""
    ctx = Context(argparse.Namespace(
        python=sys.executable, duration=duration, warmup=warmup,
        out=tempfile.mkdtemp(prefix=prefix), server_cpus=server_cpus,
        client_cpus=client_cpus, no_pin=not pin))
    os.makedirs(ctx.log_dir, exist_ok=True)
    build_loadgen()
    scenario = SCENARIO_BY_NAME[scenario_name]
    for peer in peers.values():
        peer.prepare(ctx)
    results = {key: [] for key in peers}
    try:
        first = before(ctx) if before is not None else None
        for i in range(runs):
            for key, peer in peers.items():
                results[key].append(measure(ctx, peer, scenario, "%s_%d" % (peer.name, i), 1))
    finally:
        ctx.stop_all()
    return results, first


# --------------------------------------------------------------------------
# report


def fmt_num(v, digits=0):
    if v is None:
        return "-"
    return "{:,.{}f}".format(v, digits)


def add_ratios(results):
    ok = [r for r in results if r["status"] == "ok"]
    base = {}
    for r in ok:
        base[(r["server"], r["scenario"])] = r["throughput"]
    for r in results:
        r["ratio_to_grpc_aio"] = r["ratio_to_cpp"] = None
        if r["status"] != "ok":
            continue
        aio = base.get(("grpc_aio", r["scenario"]))
        cpp = base.get(("cpp", r["scenario"]))
        if aio:
            r["ratio_to_grpc_aio"] = r["throughput"] / aio
        if cpp:
            r["ratio_to_cpp"] = r["throughput"] / cpp


def format_table(results, scenarios):
    head = ["server", "scenario", "req/s*", "p50 us", "p90 us", "p99 us",
            "p99.9 us", "CPU us/op", "srv CPU", "lg CPU", "x aio", "x C++"]
    rows = []
    shown_skips = set()
    for r in results:
        if r["status"] == "skipped":
            if r["server"] not in shown_skips:  # one line per skipped peer
                shown_skips.add(r["server"])
                rows.append([r["server"], "(all)", "SKIPPED"] +
                            [""] * (len(head) - 3))
            continue
        if r["status"] != "ok":
            rows.append([r["server"], r["scenario"], r["status"].upper()] +
                        [""] * (len(head) - 3))
            continue
        lat = r["latency_us"]
        rows.append([
            r["server"], r["scenario"], fmt_num(r["throughput"]),
            fmt_num(lat["p50"]), fmt_num(lat["p90"]), fmt_num(lat["p99"]),
            fmt_num(lat["p99.9"]), fmt_num(r["server_cpu_us_per_op"], 1),
            "%.0f%%" % (100 * r["server_cpu_util"]),
            "%.0f%%" % (100 * r["client_cpu_util"]),
            "%.2f" % r["ratio_to_grpc_aio"] if r["ratio_to_grpc_aio"] else "-",
            "%.3f" % r["ratio_to_cpp"] if r["ratio_to_cpp"] else "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = []
    for i, row in enumerate([head] + rows):
        cells = [str(c).ljust(w) if j < 2 else str(c).rjust(w)
                 for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("* req/s for unary scenarios, messages/s for streams; "
                 "CPU us/op = server CPU time (user+sys, all threads) per "
                 "RPC or message;")
    lines.append("  latency is per RPC (per message for bidi); srv CPU / lg "
                 "CPU = server / load generator CPU use in cores;")
    lines.append("  x aio / x C++ = throughput ratio to grpc_aio / cpp in the "
                 "same scenario.")
    notes = []
    noted_skips = set()
    for r in results:
        key = "%s/%s" % (r["server"], r["scenario"])
        if r["status"] == "skipped":
            if r["server"] in noted_skips:
                continue
            noted_skips.add(r["server"])
            key = r["server"]
        if r["status"] != "ok":
            notes.append("%s: %s" % (key, r["error"].splitlines()[0]
                                     if r.get("error") else r["status"]))
            continue
        if r.get("note"):
            notes.append("%s: %s" % (key, r["note"]))
        open_loop = r["loadgen"].get("rate", 0) > 0  # the loadgen spins
        if (r["client_cpu_util"] > 0.9 and r["server_cpu_util"] < 0.9
                and not open_loop):
            notes.append("%s: the load generator was %.0f%% busy and the "
                         "server only %.0f%%: the result may be limited by the "
                         "client" % (key, 100 * r["client_cpu_util"],
                                     100 * r["server_cpu_util"]))
        if r["other_cpu_util"] is not None and r["other_cpu_util"] > 0.15:
            notes.append("%s: other processes used %.0f%% of a CPU during the "
                         "window (noisy machine)" % (
                             key, 100 * r["other_cpu_util"]))
    if notes:
        lines.append("")
        lines.append("notes:")
        lines.extend("  " + n for n in notes)
    return "\n".join(lines)


def write_plots(results, scenarios, servers, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed: no plots", file=sys.stderr)
        return []
    ok = {(r["server"], r["scenario"]): r for r in results
          if r["status"] == "ok"}
    servers = [s for s in servers if any((s, sc.name) in ok for sc in scenarios)]
    scen = [sc for sc in scenarios if any((s, sc.name) in ok for s in servers)]
    if not servers or not scen:
        return []
    written = []
    n = len(servers)
    width = 0.8 / n

    def bars(ax, value_of, ylabel, title, log=False):
        for i, s in enumerate(servers):
            xs, ys = [], []
            for j, sc in enumerate(scen):
                r = ok.get((s, sc.name))
                if r is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(value_of(r))
            ax.bar(xs, ys, width, label=s)
        ax.set_xticks(range(len(scen)))
        ax.set_xticklabels(["%s\n(%s)" % (sc.name, sc.unit) for sc in scen],
                           fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)

    fig, axes = plt.subplots(1, 2, figsize=(max(13, 3 * len(scen)), 5))
    bars(axes[0], lambda r: r["throughput"], "requests or messages per second",
         "Throughput (log scale)", log=True)
    bars(axes[1], lambda r: r["server_cpu_us_per_op"],
         "server CPU us per RPC / message", "Server CPU cost (log scale)",
         log=True)
    fig.tight_layout()
    path = os.path.join(out_dir, "throughput.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, len(scen), figsize=(4 * len(scen) + 1, 4.5),
                             squeeze=False)
    pcts = ["p50", "p90", "p99", "p99.9"]
    for ax, sc in zip(axes[0], scen):
        for i, s in enumerate(servers):
            r = ok.get((s, sc.name))
            if r is None:
                continue
            xs = [k - 0.4 + width * (i + 0.5) for k in range(len(pcts))]
            ax.bar(xs, [max(r["latency_us"][p], 0.1) for p in pcts], width,
                   label=s)
        ax.set_xticks(range(len(pcts)))
        ax.set_xticklabels(pcts)
        ax.set_yscale("log")
        ax.set_ylabel("latency per %s (us, log scale)" % (
            "message" if sc.method == "bidi" else "RPC"))
        ax.set_title(sc.name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "latency.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


# --------------------------------------------------------------------------
# main


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers",
                   help="comma-separated peers among: %s (default: all; with "
                        "--quick: grpc_aio,asyncgrpc). Peers named here must "
                        "run; peers picked by default that cannot run are "
                        "skipped" % ", ".join(PEER_NAMES))
    p.add_argument("--scenarios",
                   help="comma-separated among: %s (default: %s)" % (
                       ", ".join(SCENARIO_BY_NAME), ",".join(DEFAULT_SCENARIOS)))
    p.add_argument("--quick", action="store_true",
                   help="short smoke run of the same code path (< 60 s), "
                        "no speed assertions; exits non-zero on any error")
    p.add_argument("--duration", type=float,
                   help="measured seconds per scenario (default 10; 1 with "
                        "--quick)")
    p.add_argument("--warmup", type=float,
                   help="unmeasured seconds before each measurement "
                        "(default 2; 0.3 with --quick)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each scenario N times (fresh server each time) "
                        "and report the run with the median throughput; "
                        "helps on a noisy machine (default 1)")
    p.add_argument("--bundled-python", default=None, metavar="PYTHON",
                   help="interpreter with asyncgrpc built on the bundled gRPC "
                        "core, for the asyncgrpc_bundled peers (default: "
                        "$ASYNCGRPC_BUNDLED_PYTHON; without it they are skipped)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the Python servers (default: this one)")
    p.add_argument("--out", default=os.path.join(HERE, "out"),
                   help="output directory (default benchmarks/out)")
    p.add_argument("--server-cpus", default="0",
                   help="taskset CPU list for the servers (default 0)")
    p.add_argument("--client-cpus", default="1",
                   help="taskset CPU list for the load generator (default 1)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin processes with taskset")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)

    if args.servers:
        args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
        args.explicit = True
    else:
        args.server_list = (["grpc_aio", "asyncgrpc"] if args.quick
                            else list(PEER_NAMES))
        args.explicit = False
    bad = [s for s in args.server_list if s not in PEER_NAMES]
    if bad or not args.server_list:
        p.error("unknown server(s) %s; choose among %s" % (
            ", ".join(bad), ", ".join(PEER_NAMES)))
    names = ([s.strip() for s in args.scenarios.split(",") if s.strip()]
             if args.scenarios else DEFAULT_SCENARIOS)
    bad = [s for s in names if s not in SCENARIO_BY_NAME]
    if bad or not names:
        p.error("unknown scenario(s) %s; choose among %s" % (
            ", ".join(bad), ", ".join(SCENARIO_BY_NAME)))
    args.scenario_list = [SCENARIO_BY_NAME[n] for n in names]
    if args.duration is None:
        args.duration = 1.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 2.0
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
        p.error("--duration must be > 0, --warmup >= 0, --repeat >= 1")
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    t_begin = time.monotonic()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # also when started in the background with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.makedirs(args.out, exist_ok=True)
    ctx = Context(args)
    os.makedirs(ctx.log_dir, exist_ok=True)
    if not ctx.pinning.enabled and not args.no_pin:
        print("warning: taskset not found: processes are not pinned",
              file=sys.stderr)

    peers = {c.name: c() for c in PEER_CLASSES}
    results = []
    errors = []
    skipped = []
    try:
        print("building the load generator ...", flush=True)
        build_loadgen()
        for name in args.server_list:
            peer = peers[name]
            print("== %s: preparing" % name, flush=True)
            try:
                peer.prepare(ctx)
            except PeerUnavailable as e:
                msg = "%s cannot run: %s" % (name, e)
                if args.explicit:
                    errors.append(msg)
                    status = "error"
                else:
                    skipped.append({"server": name, "reason": str(e)})
                    status = "skipped"
                print("   %s" % msg.splitlines()[0], flush=True)
                for sc in args.scenario_list:
                    results.append({"server": name, "scenario": sc.name,
                                    "status": status, "error": str(e)})
                continue
            for sc in args.scenario_list:
                tag = "%s_%s" % (name, sc.name)
                row = {"server": name, "scenario": sc.name}
                try:
                    res = measure(ctx, peer, sc, tag, args.repeat)
                    row.update(res)
                    row["status"] = "ok"
                    note = peer.scenario_note(sc)
                    if note:
                        row["note"] = note
                    print("   %-14s %12s %-6s p50 %8s us  p99 %8s us  "
                          "%7s us CPU/op" % (
                              sc.name, fmt_num(res["throughput"]), sc.unit,
                              fmt_num(res["latency_us"]["p50"]),
                              fmt_num(res["latency_us"]["p99"]),
                              fmt_num(res["server_cpu_us_per_op"], 1)),
                          flush=True)
                except PeerUnavailable as e:
                    row["status"] = "error" if args.explicit else "skipped"
                    row["error"] = str(e)
                    if args.explicit:
                        errors.append("%s/%s: %s" % (name, sc.name, e))
                    else:
                        skipped.append({"server": name, "reason": str(e)})
                    print("   %-14s %s: %s" % (sc.name, row["status"].upper(),
                                               str(e).splitlines()[0]),
                          flush=True)
                except BenchError as e:
                    row["status"] = "error"
                    row["error"] = str(e)
                    errors.append("%s/%s: %s" % (name, sc.name, e))
                    print("   %-14s ERROR: %s" % (sc.name, e), flush=True)
                results.append(row)
                if row["status"] == "skipped":
                    # it did not start: the other scenarios would not either
                    for rest in args.scenario_list[
                            args.scenario_list.index(sc) + 1:]:
                        results.append({"server": name, "scenario": rest.name,
                                        "status": "skipped",
                                        "error": row["error"]})
                    break
    except BenchError as e:
        errors.append(str(e))
    except KeyboardInterrupt:
        errors.append("interrupted")
        print("\ninterrupted: stopping servers", file=sys.stderr)
    finally:
        ctx.stop_all()

    add_ratios(results)
    table = format_table(results, args.scenario_list)
    print()
    print(table)

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": args.python,
        "quick": args.quick,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeat": args.repeat,
        "server_cpus": args.server_cpus if ctx.pinning.enabled else None,
        "client_cpus": args.client_cpus if ctx.pinning.enabled else None,
        "servers": args.server_list,
        "scenarios": [sc.as_dict() for sc in args.scenario_list],
        "command": [os.path.basename(sys.argv[0])] + (
            argv if argv is not None else sys.argv[1:]),
        "elapsed_s": time.monotonic() - t_begin,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "skipped": skipped,
                   "errors": errors}, f, indent=1)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write("$ python benchmarks/run.py %s\n\n" % " ".join(meta["command"][1:]))
        f.write(table + "\n")
    if not args.no_plots:
        try:
            for path in write_plots(results, args.scenario_list,
                                    args.server_list, args.out):
                print("wrote %s" % path)
        except Exception as e:  # a broken plot is still an error
            errors.append("plotting failed: %r" % e)
    print("wrote %s" % os.path.join(args.out, "results.json"))
    print("elapsed %.0f s" % (time.monotonic() - t_begin))
    if errors:
        print("\nFAILED:", file=sys.stderr)
        for e in errors:
            print("  " + e.replace("\n", "\n    "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
