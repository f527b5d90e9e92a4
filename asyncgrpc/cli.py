"""The command line: ``python -m asyncgrpc serve MODULE:ATTR --bind HOST:PORT``.

``ATTR`` names a callable (plain or ``async``) in ``MODULE`` that receives the
server and registers services on it, e.g.::

    def register(server):
        helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)

``MODULE`` is imported with the current directory on ``sys.path``, as uvicorn
does. With ``--workers N`` (N > 1) the command is a supervisor: it starts N
worker processes (``python -m asyncgrpc serve ... --worker-of PID``), each
creating its own server and binding every ``--bind`` address with
SO_REUSEPORT (the kernel spreads new connections across them; the
supervisor never binds). SIGTERM or SIGINT to the supervisor makes every
worker stop with the grace (a second signal cuts the grace short); a worker
that dies while serving is restarted with a backoff; a worker that fails
before it serves (an import error, a port it cannot bind) stops them all
and the supervisor exits with status 1. Logs go to stderr through the
``asyncgrpc`` logger.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from .executor import _exit_description  # "exit code 3", "killed by SIGKILL"

__all__ = ["DEFAULT_BIND", "DEFAULT_GRACE", "TargetError", "build_parser", "load_target", "main"]

DEFAULT_BIND = "127.0.0.1:50051"
DEFAULT_GRACE = 10.0
#: First restart delay of a worker that died; doubles per quick death, up to RESTART_MAX.
RESTART_DELAY = 0.5
RESTART_MAX = 30.0
#: A worker that served this long before dying restarts after RESTART_DELAY again.
STABLE_AFTER = 30.0
#: The supervisor SIGKILLs workers still alive this long after the grace.
KILL_MARGIN = 5.0

_LOGGER = logging.getLogger("asyncgrpc")


class TargetError(Exception):
    """MODULE:ATTR cannot be loaded (the message says why)."""


class _Formatter(logging.Formatter):
    """``asyncgrpc: message``, with the level for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.name}: {record.levelname}: {text}"
        return f"{record.name}: {text}"


def _setup_logging() -> None:
    """Log INFO and above to stderr unless the application configured logging."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# ----------------------------------------------------------------- arguments

def _bind_address(value: str) -> str:
    """argparse type of --bind: HOST:PORT with a numeric port."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:50051 or [::]:50051)")
    return value


def _channel_option(value: str) -> Tuple[str, Union[int, str]]:
    """argparse type of --option: KEY=VALUE, the value an int if it is one."""
    key, sep, raw = value.partition("=")
    if not sep or not key or "\0" in value:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not KEY=VALUE (e.g. grpc.max_connection_age_ms=300000)")
    try:
        return key, int(raw)
    except ValueError:
        return key, raw


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def _with_port(address: str, port: int) -> str:
    return f"{address.rpartition(':')[0]}:{port}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m asyncgrpc``."""
    parser = argparse.ArgumentParser(
        prog="python -m asyncgrpc",
        description="Run asyncgrpc servers from the command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="serve the services MODULE:ATTR registers",
        description="Serve the services that the callable MODULE:ATTR registers on a new "
                    "asyncgrpc server (it receives the server; it may be async). MODULE is "
                    "imported with the current directory on sys.path.")
    serve.set_defaults(subparser=serve)    # for _check_args' messages
    serve.add_argument("target", metavar="MODULE:ATTR",
                       help="e.g. server:register, or pkg.module:add_services")
    serve.add_argument("--bind", action="append", type=_bind_address, metavar="HOST:PORT",
                       help=f"address to listen on, without TLS; repeat for more "
                            f"(default {DEFAULT_BIND}; port 0 picks one, with one worker only)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes sharing the ports with SO_REUSEPORT (Linux); "
                            "1 (the default) serves in this process")
    serve.add_argument("--uvloop", action="store_true", help="run on uvloop (must be installed)")
    serve.add_argument("--health", action="store_true",
                       help="serve grpc.health.v1.Health (asyncgrpc.enable_health)")
    serve.add_argument("--reflection", action="store_true",
                       help="serve gRPC server reflection (asyncgrpc.enable_reflection)")
    serve.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, seconds the RPCs in flight get to finish "
                            f"before they are cancelled (default {DEFAULT_GRACE:g}); a second "
                            "signal cancels them at once")
    serve.add_argument("--option", action="append", type=_channel_option, default=[],
                       metavar="KEY=VALUE", dest="options",
                       help="a gRPC core channel argument of the server, e.g. "
                            "grpc.max_connection_age_ms=300000 (integers are passed as "
                            "integers); repeat for more")
    serve.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                       help="turn RPC metrics on and serve them for Prometheus at "
                            "http://ADDR:PORT/metrics; with N workers, worker k (0..N-1) "
                            "serves PORT+k (needs prometheus-client)")
    serve.add_argument("--metrics-addr", default="0.0.0.0", metavar="ADDR",
                       help="address of the metrics endpoint (default 0.0.0.0)")
    # Set by the supervisor for its workers.
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work, with a clear message (exit status 2)."""
    serve: argparse.ArgumentParser = args.subparser
    if not args.bind:
        args.bind = [DEFAULT_BIND]
    if args.workers < 1:
        serve.error("--workers must be at least 1")
    if args.grace < 0:
        serve.error("--grace must be >= 0")
    if args.workers > 1:
        zero = [a for a in args.bind if _port_of(a) == 0]
        if zero:
            serve.error(f"--bind {zero[0]}: port 0 cannot be used with --workers "
                        f"{args.workers}: each worker would get a different port; "
                        "give a fixed port")
        if args.metrics_port == 0:
            serve.error("--metrics-port 0 cannot be used with several workers; give a fixed port")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535 - args.workers:
        serve.error("--metrics-port out of range")


# -------------------------------------------------------------------- target

def load_target(spec: str) -> Callable[[Any], Any]:
    """The callable named by ``MODULE:ATTR`` (ATTR may be dotted), importing
    MODULE with the current directory first on sys.path. Raises TargetError
    when the module or the attribute is missing; other exceptions raised
    while the module is imported propagate."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"{spec!r} is not MODULE:ATTR (e.g. server:register)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name
                                     or module_name.startswith(exc.name + ".")):
            raise TargetError(f"cannot import module {module_name!r} (from {cwd}): "
                              f"{exc}") from None
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise TargetError(f"{spec} is not callable (it is {type(obj).__name__}); it must be "
                          "a function that receives the server")
    return obj


# ------------------------------------------------------------------- serving

class _StopSignals:
    """SIGTERM/SIGINT on the loop: the first starts the drain, a later one
    cuts the grace short."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.count = 0
        self.event = asyncio.Event()
        self.again = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self.count += 1
        (self.event if self.count == 1 else self.again).set()

    def remove(self, ignore: bool) -> None:
        """Take the handlers away; with ``ignore``, later signals are
        ignored (a worker that has stopped exits cleanly, whatever its
        supervisor sends meanwhile)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.remove_signal_handler(sig)
            if ignore:
                signal.signal(sig, signal.SIG_IGN)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Set ``stop`` when the supervisor ``parent`` is gone (we were re-parented)."""
    while not stop.is_set():
        if os.getppid() != parent:
            _LOGGER.warning("worker %d: the supervisor (pid %d) is gone; stopping",
                            os.getpid(), parent)
            stop.set()
            return
        await asyncio.sleep(0.5)


async def _serve(args: argparse.Namespace, target: Callable[[Any], Any]) -> int:
    """Create the server, let ``target`` register services, bind, start,
    serve until a signal, then stop with the grace."""
    import asyncgrpc

    worker = args.worker_of is not None
    who = f"worker {os.getpid()}" if worker else f"process {os.getpid()}"
    # SO_REUSEPORT only for workers: a lone server keeps the core's default
    # here (off), so a second server on its port fails instead of sharing it.
    options = [("grpc.so_reuseport", 1)] if worker else []
    server = asyncgrpc.server(options=[*options, *args.options])
    result = target(server)
    if inspect.isawaitable(result):
        await result
    for flag, name in ((args.health, "enable_health"), (args.reflection, "enable_reflection")):
        if flag:
            enable = getattr(asyncgrpc, name, None)
            if enable is None:
                raise TargetError(f"this asyncgrpc has no {name}()")
            enable(server)
    if args.metrics_port is not None:
        asyncgrpc.enable_metrics(server)
    bound = []
    for address in args.bind:
        port = server.add_insecure_port(address)
        bound.append(_with_port(address, port))
    signals = _StopSignals(asyncio.get_running_loop())
    await server.start()
    try:
        if args.metrics_port is not None:
            from .metrics import start_prometheus_server

            metrics_port = args.metrics_port + args.worker_index
            http, _ = start_prometheus_server(metrics_port, addr=args.metrics_addr)
            _LOGGER.info("%s metrics on http://%s:%d/metrics", who,
                         args.metrics_addr, http.server_port)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"1")
            os.close(args.ready_fd)
        for address in bound:
            _LOGGER.info("%s serving on %s", who, address)
        watcher = (asyncio.ensure_future(_watch_parent(args.worker_of, signals.event))
                   if worker else None)
        await signals.event.wait()
        if watcher is not None:
            watcher.cancel()
        _LOGGER.info("%s stopping: RPCs in flight get %g s", who, args.grace)
        stop = asyncio.ensure_future(server.stop(args.grace))
        again = asyncio.ensure_future(signals.again.wait())
        await asyncio.wait({stop, again}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.done():
            _LOGGER.info("%s: second signal, cancelling the RPCs in flight", who)
            await server.stop(None)
        await stop
        again.cancel()
    finally:
        signals.remove(ignore=worker)
        if server._started and server._terminated is not None and not server._terminated.is_set():
            await server.stop(None)
    _LOGGER.info("%s stopped", who)
    return 0


def _run(args: argparse.Namespace) -> int:
    """Serve in this process (one server, or one worker of a supervisor)."""
    try:
        target = load_target(args.target)
    except TargetError as exc:
        _LOGGER.error("%s", exc)
        return 1
    except Exception:
        _LOGGER.exception("importing %s failed", args.target.partition(":")[0])
        return 1
    loop_factory = None
    if args.uvloop:
        import uvloop       # checked in main()
        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(args, target))
    except TargetError as exc:
        _LOGGER.error("%s", exc)
        return 1
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        _LOGGER.exception("serving %s failed", args.target)
        return 1


# ---------------------------------------------------------------- supervisor

@dataclass
class _Worker:
    index: int
    proc: Optional[subprocess.Popen] = None
    ready_fd: Optional[int] = None      # read end of the ready pipe while starting
    ready: bool = False
    started_at: float = 0.0
    restart_at: Optional[float] = None  # monotonic time of a pending restart
    quick_deaths: int = 0


class Supervisor:
    """Runs ``--workers N`` worker processes and keeps them running."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.args = args
        self.argv = list(argv)
        self.workers = [_Worker(i) for i in range(args.workers)]
        self.stopping = False
        self.signals = 0
        self.kill_at: Optional[float] = None
        self.exit_code = 0

    def _spawn(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        cmd = [sys.executable, *subprocess._args_from_interpreter_flags(),  # -X dev, -W ...
               "-m", "asyncgrpc", *self.argv, "--worker-of", str(os.getpid()),
               "--worker-index", str(w.index), "--ready-fd", str(wfd)]
        try:
            # A process group of its own: a terminal's Ctrl-C reaches the
            # supervisor only, which then stops the workers once.
            w.proc = subprocess.Popen(cmd, pass_fds=(wfd,), process_group=0)
        finally:
            os.close(wfd)
        w.ready_fd = r
        w.ready = False
        w.started_at = time.monotonic()
        w.restart_at = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1

    @staticmethod
    def _on_child(signum: int, frame: Any) -> None:
        """SIGCHLD: nothing to do here; the wake-up fd ends the select."""

    def _begin_stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            _LOGGER.info("%s: stopping %d workers (grace %g s)", why, len(self.workers),
                         self.args.grace)
            self.kill_at = time.monotonic() + self.args.grace + KILL_MARGIN
        for w in self.workers:
            w.restart_at = None
            if w.proc is not None and w.proc.poll() is None:
                try:
                    w.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _close_ready(self, w: _Worker) -> None:
        if w.ready_fd is not None:
            os.close(w.ready_fd)
            w.ready_fd = None

    def _reap(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None:
                continue
            code = w.proc.poll()
            if code is None:
                continue
            pid, w.proc = w.proc.pid, None
            if w.ready_fd is not None:
                self._read_ready(w.ready_fd)   # it may have said ready, then died
            if self.stopping:
                if not w.ready:
                    if code not in (0, -signal.SIGTERM):   # not just stopped while starting
                        _LOGGER.error("worker %d failed before serving (%s)", pid,
                                      _exit_description(code))
                        self.exit_code = 1
                    continue
                if code != 0:
                    _LOGGER.warning("worker %d ended with %s", pid, _exit_description(code))
                    self.exit_code = 1
                continue
            if not w.ready:
                _LOGGER.error("worker %d failed before serving (%s); see its error above. "
                              "Stopping.", pid, _exit_description(code))
                self.exit_code = 1
                self._begin_stop("a worker could not start")
                continue
            if now - w.started_at >= STABLE_AFTER:
                w.quick_deaths = 0
            delay = min(RESTART_DELAY * 2 ** w.quick_deaths, RESTART_MAX)
            w.quick_deaths += 1
            w.restart_at = now + delay
            _LOGGER.warning("worker %d died unexpectedly (%s); restarting it in %g s",
                            pid, _exit_description(code), delay)

    def _read_ready(self, fd: int) -> None:
        for w in self.workers:
            if w.ready_fd == fd:
                data = os.read(fd, 16)
                if data:
                    w.ready = True
                self._close_ready(w)   # EOF: it died; _reap says so

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old = {sig: signal.signal(sig, self._on_signal)
               for sig in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child)
        try:
            _LOGGER.info("supervisor %d starting %d workers", os.getpid(), len(self.workers))
            for w in self.workers:
                self._spawn(w)
            handled_signals = 0
            while True:
                if self.signals > handled_signals:
                    handled_signals = self.signals
                    self._begin_stop("signal received" if not self.stopping
                                     else "signal received again")
                self._reap()
                now = time.monotonic()
                for w in self.workers:
                    if w.restart_at is not None and w.restart_at <= now and not self.stopping:
                        self._spawn(w)
                alive = [w for w in self.workers if w.proc is not None]
                if self.stopping and not alive:
                    break
                if self.stopping and self.kill_at is not None and now >= self.kill_at:
                    for w in alive:
                        _LOGGER.error("worker %d did not stop within the grace; killing it",
                                      w.proc.pid)  # type: ignore[union-attr]
                        w.proc.kill()  # type: ignore[union-attr]
                    self.exit_code = 1
                    self.kill_at = None
                deadlines = [w.restart_at for w in self.workers if w.restart_at is not None]
                if self.stopping and self.kill_at is not None:
                    deadlines.append(self.kill_at)
                timeout = max(0.0, min(deadlines) - now) if deadlines else 1.0
                fds = [wake_r] + [w.ready_fd for w in self.workers if w.ready_fd is not None]
                readable, _, _ = select.select(fds, [], [], min(timeout, 1.0))
                for fd in readable:
                    if fd == wake_r:
                        try:
                            while os.read(wake_r, 512):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._read_ready(fd)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
            for w in self.workers:
                self._close_ready(w)
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
        _LOGGER.info("supervisor %d: all workers stopped%s", os.getpid(),
                     "" if self.exit_code == 0 else " (not cleanly)")
        return self.exit_code


# ---------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args)
    _setup_logging()
    if args.uvloop:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            _LOGGER.error("--uvloop: uvloop is not installed (pip install uvloop)")
            return 2
    if args.worker_of is not None or args.workers == 1:
        return _run(args)
    if sys.platform != "linux":
        _LOGGER.warning("--workers relies on SO_REUSEPORT spreading connections, "
                        "which this platform may not do")
    return Supervisor(args, argv).run()
