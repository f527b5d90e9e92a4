"""asyncgrpc behind nginx (``grpc_pass``), the L7 proxy of docs/deploy.md.

Our own nginx process (config in a temp dir, foreground, 127.0.0.1, a free
port, HTTP/2 cleartext) proxies to an upstream of two asyncgrpc backends
(tests/_nginx_backend.py subprocesses; every reply names its backend).
Checked: RPCs of all four kinds pass through with their metadata, and an
aborted call's status code, details and trailing metadata arrive; and
while clients send continuously through nginx, one backend drained by
SIGTERM (``server.stop(grace)``) loses no RPC, streams open on it included.
Skipped only when nginx is not installed (``bash scripts/dev.sh`` installs it).
"""
from __future__ import annotations

import collections
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Counter, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest

import asyncgrpc._core

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND = os.path.join(HERE, "_nginx_backend.py")
SERVICE = "test.Nginx"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (bash scripts/dev.sh installs the Debian "
                          "package nginx)")

# The part of the config that makes a drain lossless; docs/deploy.md explains
# each line. Kept here verbatim so the doc and the test say the same thing.
LOCATION = """
            grpc_pass grpc://backend;
            grpc_next_upstream error timeout non_idempotent;
            grpc_next_upstream_tries 3;
            grpc_connect_timeout 2s;
"""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """tests/_nginx_backend.py NAME in a subprocess, on a port it picked."""

    def __init__(self, name: str, grace: float = 10.0) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile()
        dev = ["-X", "dev"] if sys.flags.dev_mode else []
        self.proc = subprocess.Popen([sys.executable, *dev, BACKEND, name, str(grace)],
                                     stdout=subprocess.PIPE, stderr=self.stderr)
        line = self.read_line(20)
        assert line.startswith("listening on "), (line, self.log())
        self.port = int(line.split()[-1])

    def read_line(self, timeout: float) -> str:
        """The next line the backend prints ("" at EOF or timeout)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                break
            line += chunk
        return line.decode().strip()

    def log(self) -> str:
        if self.stderr.closed:
            return ""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-5000:]

    def close(self) -> Optional[int]:
        """Stop the backend if it still runs; its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()
        return self.proc.returncode


class Nginx:
    """Our own nginx in the foreground, config and logs in a temp dir."""

    def __init__(self, backends: List[Backend], location: str = LOCATION) -> None:
        self.backends = backends
        self.location = location
        self.dir = tempfile.mkdtemp(prefix="asyncgrpc-nginx-")
        self.error_log = os.path.join(self.dir, "error.log")
        for attempt in range(3):  # the free port may be taken in between
            self.port = _free_port()
            self._write_config()
            self.proc = subprocess.Popen(
                [NGINX, "-p", self.dir, "-c", os.path.join(self.dir, "nginx.conf"),
                 "-e", self.error_log,
                 "-g", f"daemon off; pid {self.dir}/nginx.pid; error_log {self.error_log} info;"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_listening(10):
                return
            self.proc.kill()
            self.proc.wait(10)
        raise AssertionError(f"nginx did not start:\n{self.log()[-5000:]}")

    def _write_config(self, down: Tuple[str, ...] = ()) -> None:
        servers = "\n".join(
            f"            server 127.0.0.1:{b.port}{' down' if b.name in down else ''};"
            for b in self.backends)
        temp = "\n".join(f"        {kind}_temp_path {self.dir}/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # Running as root, nginx would switch its workers to "nobody", who
        # cannot write our temp dir: keep them as the current user.
        user = "user root;" if os.geteuid() == 0 else ""
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(f"""
{user}
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
        access_log {self.dir}/access.log;
{temp}
        upstream backend {{
{servers}
            keepalive 16;
        }}
        server {{
            listen 127.0.0.1:{self.port} http2;
            http2_max_concurrent_streams 1000;
            location / {{
{self.location}
            }}
        }}
}}
""")

    def take_out(self, name: str, timeout: float = 10) -> None:
        """Mark backend ``name`` ``down`` and reload; returns once the old
        worker has begun its graceful shutdown (from then on new requests
        go to the new worker, which does not use ``name``; requests the old
        worker already has run to completion)."""
        before = self.log().count("gracefully shutting down")
        self._write_config(down=(name,))
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log().count("gracefully shutting down") == before:
            assert time.monotonic() < deadline, f"nginx did not reload:\n{self.log()[-3000:]}"
            assert self.proc.poll() is None, self.log()[-3000:]
            time.sleep(0.02)

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def log(self) -> str:
        try:
            with open(self.error_log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def problems(self) -> List[str]:
        """The error log's lines above notice level."""
        return [line for line in self.log().splitlines()
                if any(f"[{level}]" in line for level in ("warn", "error", "crit", "alert"))]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _stop_all(backends: List[Backend]) -> None:
    for b in backends:
        b.close()


@pytest.fixture(scope="module")
def proxied() -> Iterator[Tuple[Nginx, List[Backend]]]:
    """nginx in front of backends "a" and "b", shared by the RPC-kind tests."""
    backends = [Backend("a"), Backend("b")]
    try:
        nginx = Nginx(backends)
    except BaseException:
        _stop_all(backends)
        raise
    yield nginx, backends
    nginx.close()
    _stop_all(backends)


@pytest.fixture(scope="module")
def channel(proxied: Tuple[Nginx, List[Backend]]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(proxied[0].target) as ch:
        yield ch


def _meta() -> Tuple[str, Tuple[Tuple[str, str], ...]]:
    ident = uuid.uuid4().hex
    return ident, (("x-id", ident),)


def _split(reply: bytes) -> Tuple[str, bytes]:
    """(backend name, rest) of a reply ``NAME:rest``."""
    name, _, rest = reply.partition(b":")
    return name.decode(), rest


# -- every kind of RPC through nginx -----------------------------------------

def test_unary_with_metadata_through_nginx(channel: grpc.Channel) -> None:
    method = channel.unary_unary(f"/{SERVICE}/Unary")
    seen = set()
    for i in range(4):  # round robin: both backends answer
        ident, meta = _meta()
        reply, call = method.with_call(ident.encode(), metadata=meta, timeout=10)
        name, rest = _split(reply)
        assert rest == ident.encode()
        initial = dict(call.initial_metadata())
        assert initial["x-id"] == ident and initial["x-backend"] == name
        assert ("x-id", ident) in call.trailing_metadata()
        assert call.code() == grpc.StatusCode.OK
        seen.add(name)
    assert seen == {"a", "b"}


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
def test_abort_status_details_and_trailers_through_nginx(channel: grpc.Channel,
                                                         code: grpc.StatusCode) -> None:
    ident, meta = _meta()
    details = f"no such thing {ident} ünïcode"
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Unary")(f"abort:{code.name}:{details}".encode(),
                                                 metadata=meta, timeout=10)
    err = info.value
    assert err.code() == code
    assert err.details() == details
    assert ("x-id", ident) in err.trailing_metadata()
    assert ("x-id", ident) in err.initial_metadata()


def test_unimplemented_method_through_nginx(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Missing")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_server_streaming_through_nginx(channel: grpc.Channel) -> None:
    ident, meta = _meta()
    call = channel.unary_stream(f"/{SERVICE}/Count")(ident.encode(), metadata=meta, timeout=10)
    replies = [_split(r) for r in call]
    names = {n for n, _ in replies}
    assert len(names) == 1
    assert [rest for _, rest in replies] == [f"{ident}:{i}".encode() for i in range(3)]
    assert call.code() == grpc.StatusCode.OK
    assert ("x-id", ident) in call.trailing_metadata()


def test_client_streaming_through_nginx(channel: grpc.Channel) -> None:
    ident, meta = _meta()
    parts = [f"{ident}-{i}".encode() for i in range(5)]
    reply, call = channel.stream_unary(f"/{SERVICE}/Join").with_call(
        iter(parts), metadata=meta, timeout=10)
    assert _split(reply)[1] == b",".join(parts)
    assert ("x-id", ident) in call.trailing_metadata()


def test_bidi_streaming_through_nginx(channel: grpc.Channel) -> None:
    """Each reply comes back before the next request is sent (a real
    ping-pong through the proxy, not a buffered batch)."""
    ident, meta = _meta()
    outbox: "collections.deque[bytes]" = collections.deque()
    sent = threading.Semaphore(0)

    def requests() -> Iterator[bytes]:
        for i in range(5):
            sent.acquire()
            yield outbox.popleft()

    call = channel.stream_stream(f"/{SERVICE}/Echo")(requests(), metadata=meta, timeout=10)
    names = set()
    for i in range(5):
        outbox.append(f"{ident}-{i}".encode())
        sent.release()
        name, rest = _split(next(call))
        assert rest == f"{ident}-{i}".encode()
        names.add(name)
    assert len(names) == 1
    with pytest.raises(StopIteration):
        next(call)
    assert call.code() == grpc.StatusCode.OK
    assert ("x-id", ident) in call.trailing_metadata()


# -- drain one backend while clients send ------------------------------------

class Traffic:
    """Client threads calling through nginx until told to stop; each call
    sends its own id and checks its own reply."""

    def __init__(self, channel: grpc.Channel, threads: int = 6) -> None:
        self.unary = channel.unary_unary(f"/{SERVICE}/Unary")
        self.slow = channel.unary_unary(f"/{SERVICE}/Slow")
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.answered: Counter[str] = collections.Counter()   # backend -> calls
        self.failures: List[str] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        i = 0
        while not self.done.is_set() and i < 5000:   # bounded
            value = f"{k}-{i}".encode()
            method = self.slow if i % 2 else self.unary
            try:
                name, rest = _split(method(value, timeout=10))
                outcome = name if rest == value else f"wrong reply {rest!r} to {value!r}"
            except grpc.RpcError as err:
                outcome = f"{err.code().name}: {err.details()}"
            with self.cond:
                if outcome in ("a", "b"):
                    self.answered[outcome] += 1
                else:
                    self.failures.append(outcome)
                self.cond.notify_all()
            i += 1

    def wait_for(self, name: str, count: int, timeout: float = 15) -> bool:
        """Until backend ``name`` has answered ``count`` calls in all."""
        with self.cond:
            return self.cond.wait_for(lambda: self.answered[name] >= count, timeout)

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(30)


def test_draining_one_backend_through_nginx_loses_nothing() -> None:
    """The drain of docs/deploy.md: take backend "a" out of nginx's rotation
    (``down`` + reload), then SIGTERM it (``stop(grace)``). Calls flow all the
    time; bidi streams opened on "a" before go on exchanging messages while
    it drains and end OK; no call fails; "a" exits 0 and answers no more."""
    with _two_backends_behind_nginx() as (nginx, a):
        with grpc.insecure_channel(nginx.target) as channel:
            echo = channel.stream_stream(f"/{SERVICE}/Echo")
            streams = [_OpenStream(echo, f"s{k}") for k in range(4)]
            on_a = [s for s in streams if s.backend == "a"]
            traffic = Traffic(channel)
            try:
                assert traffic.wait_for("a", 20) and traffic.wait_for("b", 20), traffic.failures
                nginx.take_out("a")
                a.proc.send_signal(signal.SIGTERM)
                assert a.read_line(10) == "draining", a.log()
                for s in streams:
                    s.exchange(3)      # the streams on "a" go on while it drains
                for s in streams:
                    s.finish()
                assert a.read_line(20) == "stopped", a.log()
                assert a.proc.wait(10) == 0, a.log()
                with traffic.lock:
                    answered_a, answered_b = traffic.answered["a"], traffic.answered["b"]
                assert traffic.wait_for("b", answered_b + 100), traffic.failures
                assert traffic.answered["a"] == answered_a, "a answered after it stopped"
            finally:
                traffic.stop()
        assert on_a, "no stream was on backend a"
        for s in streams:
            assert s.errors == [], (s.name, s.backend, s.errors)
        assert traffic.failures == [], (collections.Counter(traffic.failures), nginx.problems())


# What nginx answers when it sent a request on a connection the backend
# accepted at the very instant its listener closed, before the core served
# it (nginx does not wait for the server's SETTINGS): the core drops such a
# connection, nginx cannot know whether the request ran and does not resend
# it. Measured on the bundled core: 3 of 85 drains, one call each
# (benchmarks/RESULTS.md); a direct grpcio client never sends on a
# connection before the server's SETTINGS.
LISTENER_RACE = "UNAVAILABLE: Received http2 header with status: 502"


@pytest.mark.skipif(
    "serve-calls-until-goaway" not in asyncgrpc._core.CORE_PATCHES,
    reason="a core without asyncgrpc's patches (a system libgrpc) loses calls here: "
           "5 of 12 drains lost 1-2 calls (CANCELLED) in benchmarks/RESULTS.md; "
           "docs/deploy.md says to take the backend out of rotation first")
def test_draining_without_taking_the_backend_out_first_cancels_nothing() -> None:
    """With the bundled core, SIGTERM a backend while nginx still routes to
    it, 5 times: requests nginx sent on a pooled connection just before the
    GOAWAY are served (the system core cancelled them: CANCELLED, which nginx
    passes on), and connections close without a reset. The one loss left
    is the listener race above."""
    for drain in range(5):
        failures, problems = drain_backend_in_rotation()
        lost = {k: v for k, v in failures.items() if k != LISTENER_RACE}
        assert not lost, (drain, failures, problems)


@contextlib.contextmanager
def _two_backends_behind_nginx() -> Iterator[Tuple["Nginx", Backend]]:
    """nginx in front of backends "a" and "b"; yields nginx and "a"."""
    backends = [Backend("a", grace=10.0), Backend("b", grace=10.0)]
    try:
        nginx = Nginx(backends)
    except BaseException:
        _stop_all(backends)
        raise
    try:
        yield nginx, backends[0]
    finally:
        nginx.close()
        _stop_all(backends)


def drain_backend_in_rotation() -> Tuple[Counter[str], List[str]]:
    """SIGTERM backend "a" while nginx still routes to it and clients call
    without pause; once it exited and "b" answered 100 more calls: what the
    calls that failed got, and nginx's complaints.
    (benchmarks/nginx_drain.py repeats it.)"""
    with _two_backends_behind_nginx() as (nginx, a):
        with grpc.insecure_channel(nginx.target) as channel:
            traffic = Traffic(channel)
            try:
                assert traffic.wait_for("a", 20) and traffic.wait_for("b", 20), \
                    traffic.failures
                a.proc.send_signal(signal.SIGTERM)
                assert a.read_line(10) == "draining", a.log()
                assert a.read_line(20) == "stopped", a.log()
                assert a.proc.wait(10) == 0, a.log()
                with traffic.lock:
                    answered_b = traffic.answered["b"]
                assert traffic.wait_for("b", answered_b + 100), traffic.failures
            finally:
                traffic.stop()
        return collections.Counter(traffic.failures), nginx.problems()


class _OpenStream:
    """A bidi stream through nginx kept open by the test; ``exchange(n)``
    sends n messages and checks each echo; errors are collected."""

    def __init__(self, method: Any, name: str) -> None:
        self.name = name
        self.outbox: "collections.deque[Optional[bytes]]" = collections.deque()
        self.ready = threading.Semaphore(0)
        self.errors: List[str] = []
        self.count = 0
        self.call = method(self._requests(), timeout=30)
        self.backend = self._send_one() or "?"

    def _requests(self) -> Iterator[bytes]:
        while True:
            self.ready.acquire()
            item = self.outbox.popleft()
            if item is None:
                return
            yield item

    def _send_one(self) -> Optional[str]:
        value = f"{self.name}-{self.count}".encode()
        self.count += 1
        self.outbox.append(value)
        self.ready.release()
        try:
            name, rest = _split(next(self.call))
        except (grpc.RpcError, StopIteration) as err:
            self.errors.append(repr(err))
            return None
        if rest != value:
            self.errors.append(f"wrong echo {rest!r} for {value!r}")
        return name

    def exchange(self, n: int) -> None:
        for _ in range(n):
            if self.errors:
                return
            name = self._send_one()
            if name is not None and name != self.backend:
                self.errors.append(f"moved from {self.backend} to {name}")

    def finish(self) -> None:
        self.outbox.append(None)
        self.ready.release()
        try:
            for extra in self.call:
                self.errors.append(f"unexpected message {extra!r}")
            if self.call.code() != grpc.StatusCode.OK:
                self.errors.append(f"status {self.call.code()}")
        except grpc.RpcError as err:
            self.errors.append(f"{err.code().name}: {err.details()}")
