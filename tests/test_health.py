"""asyncgrpc's built-in grpc.health.v1.Health (asyncgrpc.enable_health,
server(health=True)), checked with grpcio-health-checking's client stubs
(sync and aio): Check, Watch, List, unknown services, NOT_SERVING as soon as
stop() begins (while the drain still runs), and the hand codec against the
generated messages. Also: the server needs neither grpcio nor protobuf."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from typing import Any, List

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import asyncgrpc
from asyncgrpc import health as ag_health
from asyncgrpc.health import ServingStatus

from conftest import ROOT

pb = health_pb2.HealthCheckResponse


def check(target: str, service: str) -> int:
    """The status a sync grpcio client's Check gets for ``service``."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_check_serving_after_start_sync_and_aio_clients(server_thread):
    """server(health=True): "" is SERVING from start on; the same servicer
    comes back from enable_health; unknown services are NOT_FOUND."""
    port = server_thread.start(lambda s: None, health=True)
    servicer = server_thread.call(lambda: asyncgrpc.enable_health(server_thread.server))
    assert isinstance(servicer, ag_health.HealthServicer)
    assert servicer.get("") is ServingStatus.SERVING
    assert check(server_thread.target, "") == pb.SERVING

    async def main() -> List[Any]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            overall = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
            return [overall.status, info.value.code()]
    assert asyncio.run(main()) == [pb.SERVING, grpc.StatusCode.NOT_FOUND]


def test_registered_services_have_no_status_until_set(server_thread):
    """As with grpcio-health-checking: only "" is set automatically; a
    registered service is NOT_FOUND until set(), by member, name or number."""
    holder: List[Any] = []

    def setup(server: Any) -> None:
        server.add_registered_method_handlers("test.Svc", {
            "Ping": asyncgrpc.unary_unary_rpc_method_handler(lambda r, c: r)})
        holder.append(asyncgrpc.enable_health(server))
    server_thread.start(setup)
    servicer = holder[0]
    with pytest.raises(grpc.RpcError) as info:
        check(server_thread.target, "test.Svc")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    servicer.set("test.Svc", "NOT_SERVING")                 # name, from this thread
    assert check(server_thread.target, "test.Svc") == pb.NOT_SERVING
    servicer.set("test.Svc", pb.SERVING)                    # grpcio's enum number
    assert check(server_thread.target, "test.Svc") == pb.SERVING
    servicer.clear("test.Svc")
    with pytest.raises(grpc.RpcError) as info:
        check(server_thread.target, "test.Svc")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ValueError):
        servicer.set("test.Svc", "HEALTHY")


def test_watch_sends_current_status_then_only_changes(server_thread):
    """Watch: the status now, then each change; setting the same status
    again sends nothing; an unknown service streams SERVICE_UNKNOWN first.
    Each watch checks its own service's sequence."""
    holder: List[Any] = []
    server_thread.start(lambda s: holder.append(asyncgrpc.enable_health(s)))
    servicer = holder[0]
    servicer.set("a", ServingStatus.SERVING)

    async def main() -> List[List[int]]:
        async with grpc.aio.insecure_channel(server_thread.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch_a = stub.Watch(health_pb2.HealthCheckRequest(service="a"), timeout=10)
            watch_b = stub.Watch(health_pb2.HealthCheckRequest(service="b"), timeout=10)
            seen_a = [(await watch_a.read()).status]
            seen_b = [(await watch_b.read()).status]
            # set from the loop thread and from another thread
            server_thread.call(lambda: servicer.set("a", ServingStatus.NOT_SERVING))
            seen_a.append((await watch_a.read()).status)
            servicer.set("a", ServingStatus.NOT_SERVING)       # unchanged: not sent
            servicer.set("b", "SERVING")
            seen_b.append((await watch_b.read()).status)
            server_thread.call(lambda: servicer.set("a", ServingStatus.SERVING))
            seen_a.append((await watch_a.read()).status)
            watch_a.cancel()
            watch_b.cancel()
            return [seen_a, seen_b]
    seen_a, seen_b = asyncio.run(main())
    assert seen_a == [pb.SERVING, pb.NOT_SERVING, pb.SERVING]
    assert seen_b == [pb.SERVICE_UNKNOWN, pb.SERVING]
    # the cancelled watches are forgotten by the servicer once the server
    # learns of the cancellations
    async def forgotten() -> bool:
        for _ in range(1000):
            if not servicer._watchers:
                return True
            await asyncio.sleep(0.01)
        return False
    assert server_thread.call(forgotten), servicer._watchers


def test_list_returns_every_status(server_thread):
    holder: List[Any] = []
    server_thread.start(lambda s: holder.append(asyncgrpc.enable_health(s)))
    holder[0].set("x.Y", "NOT_SERVING")
    with grpc.insecure_channel(server_thread.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(),
                                                         timeout=10)
    assert {k: v.status for k, v in reply.statuses.items()} == {
        "": pb.SERVING, "x.Y": pb.NOT_SERVING}


def test_not_serving_as_soon_as_stop_begins_while_draining(server_thread):
    """stop(5) with an RPC in flight: a Watch opened before gets
    NOT_SERVING (and then ends with UNAVAILABLE instead of holding the
    drain) while the slow RPC is still running; later set() is ignored; the
    slow RPC still completes."""
    holder: List[Any] = []
    started = threading.Event()
    release: List[asyncio.Event] = []

    async def slow(request: bytes, context: Any) -> bytes:
        started.set()
        await release[0].wait()
        return b"done:" + request

    def setup(server: Any) -> None:
        release.append(asyncio.Event())
        server.add_registered_method_handlers("test.Slow", {
            "Wait": asyncgrpc.unary_unary_rpc_method_handler(slow)})
        holder.append(asyncgrpc.enable_health(server))
    server_thread.start(setup)
    servicer = holder[0]
    servicer.set("test.Slow", "SERVING")
    with grpc.insecure_channel(server_thread.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
        assert next(watch).status == pb.SERVING
        slow_call = channel.unary_unary("/test.Slow/Wait").future(b"id-7", timeout=20)
        assert started.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(server_thread.server.stop(5),
                                                    server_thread.loop)
        assert next(watch).status == pb.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # the drain is still going on: the slow RPC holds it
        assert not slow_call.done() and not stopping.done()
        assert servicer.get("") is ServingStatus.NOT_SERVING
        assert servicer.get("test.Slow") is ServingStatus.NOT_SERVING
        assert servicer.shutting_down
        servicer.set("", "SERVING")                             # ignored now
        assert servicer.get("") is ServingStatus.NOT_SERVING
        server_thread.loop.call_soon_threadsafe(release[0].set)
        assert slow_call.result(10) == b"done:id-7"
        stopping.result(10)


def test_stop_callbacks_run_first_once_and_errors_are_logged(server_thread, caplog):
    """Server.add_stop_callback: run synchronously at the start of stop()
    (before the core shuts down), once, even if one raises."""
    calls: List[str] = []

    def setup(server: Any) -> None:
        def first() -> None:
            calls.append(f"first:{server._core.phase}")
            raise RuntimeError("boom")
        server.add_stop_callback(first)
        server.add_stop_callback(lambda: calls.append("second"))
    server_thread.start(setup)
    server_thread.stop(1)
    server_thread.call(lambda: server_thread.server.stop(None))
    assert calls == ["first:started", "second"]
    assert "stop callback" in caplog.text and "boom" in caplog.text


def test_malformed_request_is_internal_and_server_goes_on(server_thread):
    """A request that is not a HealthCheckRequest (truncated field, bad
    UTF-8) ends that call with INTERNAL, as an undecodable request does for
    any method; the next Check works."""
    server_thread.start(lambda s: None, health=True)
    with grpc.insecure_channel(server_thread.target) as channel:
        raw = channel.unary_unary("/grpc.health.v1.Health/Check")
        for bad in (b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x0b"):
            with pytest.raises(grpc.RpcError) as info:
                raw(bad, timeout=10)
            assert info.value.code() == grpc.StatusCode.INTERNAL, bad
        assert raw(b"", timeout=10) == b"\x08\x01"               # "" -> SERVING
    with pytest.raises(ValueError):
        ag_health.decode_request(b"\x0a\x05ab")


@pytest.mark.parametrize("service", ["", "a.B", "grüße/ünïcode", "x" * 300])
def test_codec_matches_generated_messages(service):
    request = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert ag_health.decode_request(request) == service
    assert ag_health.encode_request(service) == request
    for status in ServingStatus:
        data = pb(status=int(status)).SerializeToString()
        assert ag_health.encode_response(status) == data
        assert ag_health.decode_response(data) is status
    # unknown fields are skipped
    assert ag_health.decode_request(b"\x10\x05" + request + b"\x1d\x00\x00\x00\x00") == service


_NO_GRPC_SERVER = r"""
import asyncio, sys

for name in ("grpc", "grpc_health", "grpc_reflection", "google"):
    sys.modules[name] = None        # import fails, find_spec() says None
import asyncgrpc

async def main():
    server = asyncgrpc.server(health=True)
    servicer = asyncgrpc.enable_health(server)
    servicer.set("svc", "NOT_SERVING")
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.stop(None)
    print("imported:", sorted(m for m, mod in sys.modules.items()
                              if mod is not None and m.split(".")[0] in ("grpc", "google")))
asyncio.run(main())
"""


def test_served_without_grpcio_or_protobuf_importable():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", _NO_GRPC_SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read() if proc.poll() is not None else line
        target = f"127.0.0.1:{int(line)}"
        assert check(target, "") == pb.SERVING
        assert check(target, "svc") == pb.NOT_SERVING
        out, err = proc.communicate("\n", timeout=20)
        assert proc.returncode == 0, err
        assert out.strip() == "imported: []"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
