"""Defects found by adversarial tests (issue 8, section 1), one test each.

Each test here failed before its fix: more calls in flight than request
slots, each checking its own values; a server collected half-stopped; a
read() cut short by a timeout; a context used after its RPC ended; a start()
that fails half-way; KeyboardInterrupt raised where the server runs Python
code; a fork with a running server; counters after a failed creation.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import grpc
import grpc.aio
import pytest

import asyncgrpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SERVICE = "test.Adversity"
SLOTS = asyncgrpc._core.REQUESTS_PER_METHOD


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def run_script(source: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run ``source`` in a fresh interpreter (the tests' sys.path) with a timeout."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE] + sys.path), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------- 1.1: each call its own metadata

def _echo_identity(register: str):
    """A handler answering with what the server saw of *this* call."""
    async def identity(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        # Hold every call a moment so that far more calls are in flight than
        # request slots are posted, and the slots get re-posted under load.
        await asyncio.sleep(0.05)
        md_later = dict(context.invocation_metadata())
        return json.dumps({
            "x-id": md.get("x-id"), "x-id-later": md_later.get("x-id"),
            "x-chan": md.get("x-chan"), "x-auth-bin": (md.get("x-auth-bin") or b"").hex(),
            "payload": request.decode() if isinstance(request, bytes) else None,
            "remaining": context.time_remaining(), "peer": context.peer(),
        }).encode()

    async def identity_stream(request_iterator, context):
        first = None
        async for message in request_iterator:
            first = message if first is None else first
        yield await identity(first, context)

    handler = (asyncgrpc.stream_stream_rpc_method_handler(identity_stream)
               if register == "streaming" else asyncgrpc.unary_unary_rpc_method_handler(identity))

    def setup(server) -> None:
        if register == "generic":
            server.add_generic_rpc_handlers([asyncgrpc.method_handlers_generic_handler(
                SERVICE, {"Identity": handler})])
        else:
            server.add_registered_method_handlers(SERVICE, {"Identity": handler})
    return setup


@pytest.mark.parametrize("register", ["registered", "generic", "streaming"])
def test_each_call_gets_its_own_metadata_deadline_peer_and_payload(server_thread, register):
    """Many more concurrent calls than request slots, each with its own
    x-id, binary auth value, deadline and payload, over several connections:
    every reply must describe its own call (1.1: slots were re-posted before
    their metadata was taken, so calls got each other's headers)."""
    n_calls, n_channels = 5 * SLOTS, 2
    server_thread.start(_echo_identity(register), blocked_loop_threshold=None)

    async def main():
        channels = [grpc.aio.insecure_channel(
            server_thread.target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(n_channels)]
        for ch in channels:
            await ch.channel_ready()
        # Block the server's loop while the burst is sent, so that the calls
        # reach the core together when it resumes: far more than the posted
        # slots, the rest wait in the core and are matched at re-posts.
        blocked = asyncio.get_running_loop().run_in_executor(
            None, server_thread.call, lambda: time.sleep(0.4))
        await asyncio.sleep(0.1)
        try:
            async def one(i: int):
                channel = channels[i % n_channels]
                md = (("x-id", f"id-{i}"), ("x-chan", str(i % n_channels)),
                      ("x-auth-bin", i.to_bytes(4, "big") * 8))
                # Deadlines a factor 2 apart: grpcio's client rounds a
                # grpc-timeout up to one it sent before if that is within
                # about 5% (header compression), on grpc.aio servers too.
                timeout = 20.0 * 2 ** (i % 6)
                started = time.monotonic()
                if register == "streaming":
                    call = channel.stream_stream(path("Identity"))(
                        iter([f"payload-{i}".encode()]), metadata=md, timeout=timeout)
                    replies = [r async for r in call]
                    reply = replies[0]
                else:
                    reply = await channel.unary_unary(path("Identity"))(
                        f"payload-{i}".encode(), metadata=md, timeout=timeout)
                return i, json.loads(reply), timeout, time.monotonic() - started
            results = await asyncio.gather(*[one(i) for i in range(n_calls)])
            await blocked
            return results
        finally:
            for ch in channels:
                await ch.close()

    results = asyncio.run(main())
    wrong = []
    peers_by_channel = {}
    for i, seen, timeout, elapsed in results:
        ok = (seen["x-id"] == f"id-{i}" and seen["x-id-later"] == f"id-{i}"
              and seen["x-chan"] == str(i % n_channels)
              and seen["x-auth-bin"] == (i.to_bytes(4, "big") * 8).hex()
              and seen["payload"] == f"payload-{i}"
              and timeout - elapsed - 2.0 <= seen["remaining"] <= timeout * 1.06)
        if not ok:
            wrong.append((i, seen))
        peers_by_channel.setdefault(seen["x-chan"], set()).add(seen["peer"])
    assert not wrong, f"{len(wrong)} of {n_calls} calls saw another call's values: {wrong[:3]}"
    # One connection per channel: its calls share one peer, and channels differ.
    assert all(len(p) == 1 and next(iter(p)) for p in peers_by_channel.values()), peers_by_channel
    assert len({next(iter(p)) for p in peers_by_channel.values()}) == n_channels


# ------------------------------------------------- 1.2: collecting a half-stopped server

HALF_STOPPED = """
import asyncio, gc, sys, grpc, grpc.aio, asyncgrpc

async def slow(request, context):
    await asyncio.sleep(30)
    return b"late"

async def main(mode):
    server = asyncgrpc.server(blocked_loop_threshold=None)
    server.add_registered_method_handlers(
        "t.S", {"Slow": asyncgrpc.unary_unary_rpc_method_handler(slow)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if mode == "tag-fired":
        # The shutdown tag fires, then the server is dropped without close().
        await server._core.shutdown()
        assert server._core.phase == "shutting_down"
    else:
        # stop(grace) is still waiting for an RPC when asyncio.run() tears
        # the loop down: the stop task and the RPC's task are cancelled, the
        # loop closed, the server collected.
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary("/t.S/Slow")(b"", timeout=20)
        while not server._core.active_calls:
            await asyncio.sleep(0.01)
        asyncio.ensure_future(server.stop(5.0))
        await asyncio.sleep(0.1)
        assert server._core.phase == "shutting_down"
    return server

mode = sys.argv[1]
server = asyncio.run(main(mode))
del server
gc.collect()
print("collected", flush=True)
"""


@pytest.mark.parametrize("mode", ["tag-fired", "stop-cancelled"])
def test_collecting_a_half_stopped_server_does_not_hang(mode):
    proc = subprocess.run([sys.executable, "-X", "dev", "-c", HALF_STOPPED, mode],
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "collected" in proc.stdout


# ------------------------------------------------- 1.5: a start() that fails half-way

class _RefusingLoop(asyncio.SelectorEventLoop):
    """A loop whose add_reader fails: start() fails after the core started."""

    def add_reader(self, fd, callback, *args):  # type: ignore[override]
        raise RuntimeError("add_reader refused by the test")


def _port_accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_failed_start_releases_the_port_and_stop_works():
    async def greet(request, context):
        return b"hi"

    async def main() -> int:
        server = asyncgrpc.server(blocked_loop_threshold=None)
        server.add_registered_method_handlers(
            "t.S", {"Greet": asyncgrpc.unary_unary_rpc_method_handler(greet)})
        port = server.add_insecure_port("127.0.0.1:0")
        with pytest.raises(RuntimeError, match="add_reader refused"):
            await server.start()
        # Nothing was left listening, and stop() (as a finally: block would
        # call it) is clean.
        assert not _port_accepts(port)
        await server.stop(None)
        await server.stop(1.0)
        return port

    loop = _RefusingLoop()
    try:
        port = loop.run_until_complete(main())
    finally:
        loop.close()

    # The port is free again: a new server binds it (SO_REUSEPORT is off,
    # so a leftover listener would make this fail) and serves.
    async def again() -> bytes:
        server = asyncgrpc.server(blocked_loop_threshold=None)
        server.add_registered_method_handlers(
            "t.S", {"Greet": asyncgrpc.unary_unary_rpc_method_handler(greet)})
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await channel.unary_unary("/t.S/Greet")(b"", timeout=10)
        finally:
            await server.stop(None)
    assert asyncio.run(again()) == b"hi"


# ------------------------------------------------- 1.8: counters and refused re-posts

def test_live_servers_not_negative_after_eventfd_failure():
    proc = run_script("""
        import gc, os, resource, asyncgrpc
        base = asyncgrpc.stats()["live_servers"]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for _ in range(3):
            try:
                asyncgrpc.server(blocked_loop_threshold=None)
            except OSError as exc:
                assert "Too many open files" in str(exc), exc
            else:
                raise AssertionError("server() succeeded without a free fd")
        for fd in held:
            os.close(fd)
        assert asyncgrpc.stats()["live_servers"] == base, asyncgrpc.stats()
        s = asyncgrpc.server(blocked_loop_threshold=None)
        assert asyncgrpc.stats()["live_servers"] == base + 1
        del s
        gc.collect()
        assert asyncgrpc.stats()["live_servers"] == base
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_refused_repost_is_reported_and_retried(server_thread):
    """If the core refuses to take a request slot back, the error names it
    and the slot is retried: every slot of the method refused once must not
    leave the method unable to take calls."""
    unraisable = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(u.exc_value)

    async def echo(request, context):
        return request

    try:
        server_thread.start(lambda s: s.add_registered_method_handlers(
            SERVICE, {"Echo": asyncgrpc.unary_unary_rpc_method_handler(echo)}))
        with grpc.insecure_channel(server_thread.target) as channel:
            echo_call = channel.unary_unary(path("Echo"))
            assert echo_call(b"warm", timeout=10) == b"warm"
            asyncgrpc._core._inject_post_failures(SLOTS + 8)
            for i in range(3 * SLOTS):
                assert echo_call(str(i).encode(), timeout=10) == str(i).encode()
    finally:
        asyncgrpc._core._inject_post_failures(0)
        sys.unraisablehook = old_hook
    assert unraisable and all(isinstance(e, RuntimeError) for e in unraisable), unraisable
    assert "refused a request slot for /test.Adversity/Echo" in str(unraisable[0])


# ------------------------------------------------- 1.3: read() after a cancelled read()

@pytest.mark.parametrize("kind", ["stream_unary", "stream_stream"])
def test_read_with_timeout_loses_no_message(server_thread, kind):
    """The heartbeat pattern: read with a timeout in a loop, do other work
    on timeout. A message that lands after a read() was cancelled and before
    the next read() must be returned by that next read()."""
    n = 5
    timeouts = []

    async def heartbeat(request, context):
        got = []
        while True:
            try:
                message = await asyncio.wait_for(context.read(), 0.03)
            except asyncio.TimeoutError:
                timeouts.append(1)
                await asyncio.sleep(0.1)     # "send a heartbeat", meanwhile a message lands
                continue
            if message is asyncgrpc.EOF:
                break
            got.append(message)
        return b",".join(got)

    async def heartbeat_stream(request, context):
        yield await heartbeat(request, context)

    handler = (asyncgrpc.stream_unary_rpc_method_handler(heartbeat) if kind == "stream_unary"
               else asyncgrpc.stream_stream_rpc_method_handler(heartbeat_stream))
    server_thread.start(lambda s: s.add_registered_method_handlers(SERVICE, {"Beat": handler}))

    def requests():
        for i in range(n):
            time.sleep(0.07)
            yield f"m{i}".encode()

    with grpc.insecure_channel(server_thread.target) as channel:
        if kind == "stream_unary":
            reply = channel.stream_unary(path("Beat"))(requests(), timeout=20)
        else:
            reply = b"".join(channel.stream_stream(path("Beat"))(requests(), timeout=20))
    assert reply == b",".join(f"m{i}".encode() for i in range(n))
    assert timeouts, "the reads never timed out: the test did not exercise the race"


# ------------------------------------------------- 1.4: the context after the RPC ended

def test_context_keeps_its_values_after_the_rpc_ended(server_thread, recorder):
    """Code still holding the context after the handler finished (a
    background task, a done callback added late) sees the same metadata,
    peer and auth context as the handler did, as with grpc.aio."""
    background = set()

    def snapshot(context):
        return (dict(context.invocation_metadata()), context.peer(), context.auth_context())

    async def later(context):
        while not context.done():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)         # well after the call was released
        recorder.add(("task", snapshot(context)))
        context.add_done_callback(lambda ctx: recorder.add(("callback", snapshot(ctx))))

    async def handler(request, context):
        recorder.add(("handler", snapshot(context)))
        task = asyncio.ensure_future(later(context))
        background.add(task)
        task.add_done_callback(background.discard)
        return request

    server_thread.start(lambda s: s.add_registered_method_handlers(
        SERVICE, {"Keep": asyncgrpc.unary_unary_rpc_method_handler(handler)}))
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary(path("Keep"))(
            b"x", timeout=10, metadata=(("x-id", "kept-1"), ("x-blob-bin", b"\x00\x01"))) == b"x"
    assert recorder.wait_for(lambda items: len(items) == 3)
    seen = dict(recorder.items)
    md, peer, auth = seen["handler"]
    assert md["x-id"] == "kept-1" and md["x-blob-bin"] == b"\x00\x01"
    assert peer.startswith("ipv4:127.0.0.1:")
    assert auth.get("transport_security_type") == [b"insecure"]
    assert seen["task"] == seen["handler"]
    assert seen["callback"] == seen["handler"]


# ------------------------------------------------- 1.6: KeyboardInterrupt and SystemExit

INTERRUPT = """
import asyncio, sys, threading, grpc, asyncgrpc

where, exc_name, loop_kind = sys.argv[1:4]
EXC = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[exc_name]
seen = {}

def boom(*args):
    raise EXC("from " + where)

async def echo(request, context):
    return request

def handler():
    if where == "deserializer":
        return asyncgrpc.unary_unary_rpc_method_handler(echo, request_deserializer=boom)
    if where == "serializer":
        return asyncgrpc.unary_unary_rpc_method_handler(echo, response_serializer=boom)
    return asyncgrpc.unary_unary_rpc_method_handler(echo)

class Generic(asyncgrpc.GenericRpcHandler):
    def service(self, details):
        if where == "service":
            boom()
        return None

async def main():
    server = asyncgrpc.server(blocked_loop_threshold=None)
    if where == "service":
        server.add_generic_rpc_handlers([Generic()])
    else:
        server.add_registered_method_handlers("t.S", {"M": handler()})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    def client():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                channel.unary_unary("/t.S/M")(b"x", timeout=10)
                seen["code"] = "OK"
            except grpc.RpcError as err:
                seen["code"] = err.code().name
    thread = threading.Thread(target=client)
    thread.start()
    try:
        await server.wait_for_termination(20)
        print("not interrupted", flush=True)
    finally:
        thread.join(10)
        print("client saw", seen.get("code"), flush=True)
        await server.stop(None)

if loop_kind == "uvloop":
    import uvloop
    uvloop.install()
try:
    asyncio.run(main())
except EXC as exc:
    print("propagated", type(exc).__name__, exc, flush=True)
"""


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("where, exc_name, status", [
    ("deserializer", "KeyboardInterrupt", "INTERNAL"),
    ("serializer", "KeyboardInterrupt", "INTERNAL"),
    ("service", "KeyboardInterrupt", "UNKNOWN"),
    ("serializer", "SystemExit", "INTERNAL"),
])
def test_keyboard_interrupt_and_system_exit_propagate(loop_kind, where, exc_name, status):
    """Raised by code the server runs for an RPC (not the handler's own
    task), they end that RPC with a status and then stop the loop, as they
    would from task code: Ctrl-C under load is not lost."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPT, where, exc_name, loop_kind],
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=60)
    out = proc.stdout
    assert f"propagated {exc_name} from {where}" in out, (out, proc.stderr[-3000:])
    assert f"client saw {status}" in out, (out, proc.stderr[-3000:])
    assert "not interrupted" not in out


# ------------------------------------------------- 1.7: os.fork() with a running server

FORK = r"""
import asyncio, gc, json, os, sys, time, asyncgrpc

parent = os.getpid()

async def whoami(request, context):
    return f"{request.decode()}:{os.getpid()}".encode()

async def fork_here(request, context):
    pid = os.fork()
    if pid == 0:
        # The child goes on running the loop a while, finishes this handler
        # (its reply must go nowhere), then stops and drops its copy of the
        # server and exits. It leaves by os._exit: asyncio's own teardown
        # would unregister the loop's self-pipe from the epoll set it shares
        # with the parent (asyncio's limit after fork, not the server's).
        # (asyncio forgets the running loop in a child: use the one we know.)
        the_loop.call_later(0.5, lambda: the_loop.create_task(child_exit()))
        return b"from-child"
    children.append(pid)
    await asyncio.sleep(0.2)
    return b"from-parent"

async def child_exit():
    global the_server
    await the_server.stop(None)
    await the_server.stop(1.0)
    the_server = None
    gc.collect()
    print("child exits", flush=True)
    os._exit(0)

children = []

# The client runs in a process of its own: a grpcio channel in the forking
# process would be copied into the child too, and grpcio's core aborts there.
CLIENT = "\n".join([
    "import json, sys, time, grpc",
    "with grpc.insecure_channel(sys.argv[1]) as channel:",
    "    out = {'fork': channel.unary_unary('/t.S/Fork')(b'', timeout=10).decode(),",
    "           'replies': [], 'errors': []}",
    "    who = channel.unary_unary('/t.S/Who')",
    "    end, i = time.monotonic() + 1.5, 0",
    "    while time.monotonic() < end:",
    "        try:",
    "            out['replies'].append([str(i), who(str(i).encode(), timeout=5).decode()])",
    "        except grpc.RpcError as err:",
    "            out['errors'].append([i, err.code().name])",
    "        i += 1",
    "print(json.dumps(out))",
])

async def main():
    global the_server, the_loop
    the_loop = asyncio.get_running_loop()
    the_server = server = asyncgrpc.server(blocked_loop_threshold=None)
    server.add_registered_method_handlers("t.S", {
        "Who": asyncgrpc.unary_unary_rpc_method_handler(whoami),
        "Fork": asyncgrpc.unary_unary_rpc_method_handler(fork_here)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE)
    out, _ = await client.communicate()
    await server.stop(None)
    the_server = None
    return json.loads(out)

result = asyncio.run(main())
status = None
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    pid, code = os.waitpid(children[0], os.WNOHANG)
    if pid:
        status = os.waitstatus_to_exitcode(code)
        break
    time.sleep(0.05)
else:
    os.kill(children[0], 9)
print("child status", status, flush=True)
assert result["fork"] == "from-parent", result["fork"]
wrong = [r for r in result["replies"] if r[1] != f"{r[0]}:{parent}"]
print("replies", len(result["replies"]), "wrong", len(wrong), "errors", len(result["errors"]),
      flush=True)
"""


def test_fork_with_a_running_server_leaves_the_child_inert():
    proc = subprocess.run([sys.executable, "-c", FORK], env=dict(os.environ, PYTHONPATH=ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    out = proc.stdout
    assert proc.returncode == 0, (out, proc.stderr[-3000:])
    assert "child exits" in out and "child status 0" in out, (out, proc.stderr[-3000:])
    assert " wrong 0 errors 0" in out, (out, proc.stderr[-3000:])
