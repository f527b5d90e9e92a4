"""``python -m asyncgrpc serve MODULE:ATTR``: serving in one process and with
worker processes sharing a port (SO_REUSEPORT), draining on SIGTERM,
restarting a worker that dies, and refusing a bad MODULE:ATTR or a bad
combination of options with a clear message.

Every server runs in a subprocess started from a temporary directory holding
the service module (so MODULE is imported from the current directory, as a
user's would be); grpcio clients in this process call it. Every wait is
bounded.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Iterator, List, Optional, Sequence, Set

import grpc
import pytest

SERVICE = textwrap.dedent('''
    """A service for tests/test_cli.py: WhoAmI answers b"<request>:<pid>", Slow
    sleeps the seconds given after the id ("id:seconds") and logs when it starts."""
    import asyncio
    import logging
    import os

    import asyncgrpc

    log = logging.getLogger("svc")


    async def who_am_i(request: bytes, context) -> bytes:
        return request + b":" + str(os.getpid()).encode()


    async def slow(request: bytes, context) -> bytes:
        rid, _, seconds = request.partition(b":")
        log.warning("slow started %s", rid.decode())
        await asyncio.sleep(float(seconds))
        return rid + b":done"


    def register(server) -> None:
        server.add_generic_rpc_handlers([asyncgrpc.method_handlers_generic_handler(
            "test.Cli", {
                "WhoAmI": asyncgrpc.unary_unary_rpc_method_handler(who_am_i),
                "Slow": asyncgrpc.unary_unary_rpc_method_handler(slow),
            })])


    async def register_async(server) -> None:
        await asyncio.sleep(0)
        register(server)


    not_callable = 42
''')

SERVING = re.compile(r"asyncgrpc: (worker|process) (\d+) serving on (\S+)")


def free_port() -> int:
    """A port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``python -m asyncgrpc serve ...`` in a subprocess; its stderr is
    collected line by line by a thread."""

    def __init__(self, cwd: str, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncgrpc", "serve", *args], cwd=cwd,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: List[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<EOF>")
            self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> List[re.Match]:
        """The first ``count`` matches of ``pattern`` in stderr (waits)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in map(rx.search, self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or "<EOF>" in self.lines:
                    raise AssertionError(f"no {count} x {pattern!r} in stderr:\n" + "\n".join(self.lines))
                self.cond.wait(left)

    def serving(self, count: int) -> List[re.Match]:
        return self.wait_for(SERVING.pattern, count)

    def worker_pids(self) -> Set[int]:
        return {int(m.group(2)) for m in map(SERVING.search, self.text().splitlines()) if m}

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(5)
        if self.proc.stderr is not None and not self.reader.is_alive():
            self.proc.stderr.close()
        return code

    def close(self) -> None:
        """Stop whatever is left (the test failed), workers included."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.wait(5)
        for pid in self.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def service_dir(tmp_path) -> str:
    (tmp_path / "svc.py").write_text(SERVICE)
    return str(tmp_path)


@pytest.fixture
def serve(service_dir: str) -> Iterator:
    started: List[Served] = []

    def start(*args: str) -> Served:
        s = Served(service_dir, args)
        started.append(s)
        return s
    yield start
    for s in started:
        s.close()


def call(target: str, method: str, request: bytes, timeout: float = 10,
         channel: Optional[grpc.Channel] = None) -> bytes:
    """One unary call of test.Cli/<method> on a channel of its own (its
    own connection: no subchannel shared with other channels)."""
    own = channel is None
    ch = channel or grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        return ch.unary_unary(f"/test.Cli/{method}")(request, timeout=timeout)
    finally:
        if own:
            ch.close()


def pids_answering(target: str, n: int, tag: str) -> Set[int]:
    """Call WhoAmI on ``n`` separate connections, each with its own id;
    check each reply carries its id; return the pids that answered."""
    pids = set()
    for i in range(n):
        rid = f"{tag}-{i}".encode()
        reply = call(target, "WhoAmI", rid)
        got_id, _, pid = reply.rpartition(b":")
        assert got_id == rid
        pids.add(int(pid))
    return pids


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_one_process_serves_and_stops_on_sigterm(serve, loop: str) -> None:
    args = ["svc:register_async", "--bind", "127.0.0.1:0", "--grace", "5"]
    s = serve(*args, *(["--uvloop"] if loop == "uvloop" else []))
    (m,) = s.serving(1)
    assert m.group(1) == "process" and int(m.group(2)) == s.proc.pid
    target = m.group(3)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", target) and not target.endswith(":0")
    assert call(target, "WhoAmI", b"one") == b"one:%d" % s.proc.pid
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait() == 0, s.text()
    assert "stopped" in s.text()


def test_two_workers_share_the_port_and_drain_on_sigterm(serve) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    s = serve("svc:register", "--bind", target, "--workers", "2", "--grace", "10")
    serving = s.serving(2)
    workers = {int(m.group(2)) for m in serving}
    assert len(workers) == 2 and s.proc.pid not in workers
    assert all(m.group(1) == "worker" and m.group(3) == target for m in serving)
    # 40 connections: the kernel spreads them over both workers.
    assert pids_answering(target, 40, "spread") == workers

    # SIGTERM while an RPC is in flight: it completes OK, the supervisor exits 0.
    result: List[object] = []
    ch = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    t = threading.Thread(target=lambda: result.append(
        _call_or_error(ch, b"inflight-1:1.5")))
    t.start()
    try:
        s.wait_for(r"slow started inflight-1")
        s.proc.send_signal(signal.SIGTERM)
        t.join(20)
    finally:
        ch.close()
    assert result == [b"inflight-1:done"], s.text()
    assert s.wait() == 0, s.text()
    assert "not cleanly" not in s.text()
    for pid in workers:
        assert re.search(rf"worker {pid} stopped", s.text())


def _call_or_error(ch: grpc.Channel, request: bytes) -> object:
    try:
        return call("", "Slow", request, timeout=20, channel=ch)
    except grpc.RpcError as exc:
        return exc.code()


def test_killed_worker_is_restarted(serve) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    s = serve("svc:register", "--bind", target, "--workers", "2", "--grace", "2")
    first = {int(m.group(2)) for m in s.serving(2)}
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    s.wait_for(rf"worker {victim} died unexpectedly \(killed by SIGKILL\); restarting")
    (third,) = s.serving(3)[2:]
    new = int(third.group(2))
    assert new not in first
    # Both the survivor and the new worker answer (many connections again).
    assert pids_answering(target, 40, "after") == (first - {victim}) | {new}
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait() == 0, s.text()


@pytest.mark.parametrize("target, message", [
    ("nosuchmodule:register", r"cannot import module 'nosuchmodule'"),
    ("svc:nope", r"module 'svc' has no attribute 'nope'"),
    ("svc:not_callable", r"svc:not_callable is not callable"),
    ("svc", r"'svc' is not MODULE:ATTR"),
])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_target_exits_non_zero_with_a_clear_message(serve, target: str, message: str,
                                                        workers: str) -> None:
    s = serve(target, "--bind", f"127.0.0.1:{free_port()}", "--workers", workers)
    code = s.wait(30)
    assert code != 0
    s.wait_for(message)
    if workers == "2":
        # The supervisor gives up instead of restarting a worker that
        # cannot start.
        s.wait_for(r"failed before serving")
        assert "restarting" not in s.text()


def test_port_zero_with_workers_is_refused(serve) -> None:
    s = serve("svc:register", "--bind", "127.0.0.1:0", "--workers", "2")
    assert s.wait(30) == 2
    s.wait_for(r"port 0 cannot be used with --workers 2")


def test_option_flag_sets_channel_arguments(serve) -> None:
    """--option KEY=VALUE reaches the server's core (an integer as an
    integer): a receive limit of 64 bytes refuses a larger request with
    RESOURCE_EXHAUSTED, in one process and in workers; a malformed option
    exits 2."""
    for workers in ("1", "2"):
        port = "0" if workers == "1" else str(free_port())
        s = serve("svc:register", "--bind", f"127.0.0.1:{port}", "--workers", workers,
                  "--option", "grpc.max_receive_message_length=64")
        target = s.serving(int(workers))[0].group(3)
        assert call(target, "WhoAmI", b"small").startswith(b"small:")
        with pytest.raises(grpc.RpcError) as info:
            call(target, "WhoAmI", b"x" * 100)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait() == 0, s.text()
    bad = serve("svc:register", "--bind", "127.0.0.1:0", "--option", "no-equals-sign")
    assert bad.wait(30) == 2
    bad.wait_for(r"is not KEY=VALUE")


def test_health_and_reflection_flags(serve) -> None:
    """--health serves grpc.health.v1 (SERVING while it runs), --reflection
    lists the registered services and health."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)

    s = serve("svc:register", "--bind", "127.0.0.1:0", "--health", "--reflection")
    (m,) = s.serving(1)
    target = m.group(3)
    with grpc.insecure_channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                     timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert "test.Cli" in services and "grpc.health.v1.Health" in services
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait() == 0, s.text()


def test_readme_greeter_example(tmp_path) -> None:
    """The README's command: examples/greeter/server.py's register() served
    by ``python -m asyncgrpc serve server:register`` from the example's
    directory (a copy, with the stubs generated into it), called with the
    generated grpcio stub."""
    import importlib
    import shutil

    from grpc_tools import protoc

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(root, "examples", "greeter", "server.py"), tmp_path)
    proto_dir = os.path.join(root, "proto")
    assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}",
                        os.path.join(proto_dir, "helloworld.proto")]) == 0
    s = Served(str(tmp_path), ["server:register", "--bind", f"127.0.0.1:{free_port()}",
                               "--workers", "2"])
    try:
        target = s.serving(2)[0].group(3)
        pb2 = importlib.import_module("helloworld_pb2")        # tests/_generated
        pb2_grpc = importlib.import_module("helloworld_pb2_grpc")
        with grpc.insecure_channel(target) as ch:
            reply = pb2_grpc.GreeterStub(ch).SayHello(pb2.HelloRequest(name="cli"), timeout=10)
        assert reply.message == "Hello, cli!"
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait() == 0, s.text()
    finally:
        s.close()
