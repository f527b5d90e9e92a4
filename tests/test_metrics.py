"""RPC metrics (asyncgrpc.enable_metrics, src/metrics.c): counts by method
and final status after a known mix of OK / aborted / cancelled /
deadline-exceeded / unknown-method calls, latency histograms, the in-flight
gauge, methods served through the generic path, metrics off, and the two
exporters (Prometheus scraped over HTTP, OpenTelemetry read with the SDK's
InMemoryMetricReader), plus ``serve --metrics-port`` with two workers.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import urllib.request
from typing import Any, Dict, Iterator, List, Tuple

import grpc
import pytest

import asyncgrpc
from asyncgrpc import StatusCode
from asyncgrpc.metrics import BUCKETS, OTHER, Snapshot

from test_cli import SERVING, Served, free_port

OK, CANCELLED, DEADLINE, NOT_FOUND, UNIMPLEMENTED = 0, 1, 4, 5, 12


def service_name(request: Any) -> str:
    """A service name of this test only: the exporters sum every server of
    the process, so tests must not share names."""
    return "metrics." + "".join(c for c in request.node.name if c.isalnum())


class Mix:
    """Handlers of one service: Echo (OK), NotFound (aborts), Hold (waits
    until released or cancelled), and a recorder of the ids that started."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.started: List[str] = []
        self.lock = threading.Lock()
        self.release: asyncio.Event | None = None

    def path(self, method: str) -> str:
        return f"/{self.service}/{method}"

    def register(self, server: Any) -> None:
        async def echo(request: bytes, context: Any) -> bytes:
            return b"echo:" + request

        async def not_found(request: bytes, context: Any) -> bytes:
            await context.abort(StatusCode.NOT_FOUND, f"no {request.decode()}")
            return b""

        async def hold(request: bytes, context: Any) -> bytes:
            if self.release is None:
                self.release = asyncio.Event()
            with self.lock:
                self.started.append(request.decode())
            await self.release.wait()
            return b"held:" + request

        server.add_generic_rpc_handlers([asyncgrpc.method_handlers_generic_handler(
            self.service, {
                "Echo": asyncgrpc.unary_unary_rpc_method_handler(echo),
                "NotFound": asyncgrpc.unary_unary_rpc_method_handler(not_found),
                "Hold": asyncgrpc.unary_unary_rpc_method_handler(hold),
            })])

    def wait_started(self, rid: str, recorder_timeout: float = 10) -> None:
        import time
        deadline = time.monotonic() + recorder_timeout
        while time.monotonic() < deadline:
            with self.lock:
                if rid in self.started:
                    return
            time.sleep(0.01)
        raise AssertionError(f"{rid} never started")


def snapshot(server_thread: Any) -> Snapshot:
    return server_thread.call(lambda: server_thread.server._metrics.snapshot())


def wait_idle(server_thread: Any, timeout: float = 10) -> Snapshot:
    """The snapshot once no RPC is in flight (the server records an RPC's
    end on its loop, maybe after the client got its status)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(server_thread)
        if snap.in_flight == 0 or time.monotonic() > deadline:
            return snap
        time.sleep(0.02)


def run_mix(server_thread: Any, mix: Mix) -> Dict[int, int]:
    """5 OK, 3 NOT_FOUND, 2 cancelled, 2 deadline exceeded (Hold), 1
    unknown method; each call checks its own outcome. Returns the expected
    counts by code for Echo+NotFound+Hold."""
    with grpc.insecure_channel(server_thread.target) as ch:
        for i in range(5):
            rid = f"ok-{i}".encode()
            assert ch.unary_unary(mix.path("Echo"))(rid, timeout=10) == b"echo:" + rid
        for i in range(3):
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(mix.path("NotFound"))(f"nf-{i}".encode(), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == f"no nf-{i}"
        for i in range(2):
            rid = f"cancel-{i}"
            fut = ch.unary_unary(mix.path("Hold")).future(rid.encode(), timeout=10)
            mix.wait_started(rid)
            assert fut.cancel()
            assert fut.code() == grpc.StatusCode.CANCELLED
        for i in range(2):
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(mix.path("Hold"))(f"late-{i}".encode(), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"/{mix.service}/NoSuchMethod")(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    return {OK: 5, NOT_FOUND: 3, CANCELLED: 2, DEADLINE: 2}


def test_counts_by_method_and_status(server_thread, request) -> None:
    mix = Mix(service_name(request))
    server_thread.start(lambda s: (mix.register(s), asyncgrpc.enable_metrics(s)))
    run_mix(server_thread, mix)
    snap = wait_idle(server_thread)
    assert snap.enabled and snap.in_flight == 0
    echo, nf, hold = (snap.method(mix.path(m)) for m in ("Echo", "NotFound", "Hold"))
    assert (echo.service, echo.method, echo.kind) == (mix.service, "Echo", "unary")
    assert echo.handled == {OK: 5} and echo.started == 5
    assert nf.handled == {NOT_FOUND: 3} and nf.started == 3
    assert hold.handled == {CANCELLED: 2, DEADLINE: 2} and hold.started == 4
    other = snap.method(OTHER)
    assert other.handled == {UNIMPLEMENTED: 1} and other.kind == "unknown"
    assert snap.started == 5 + 3 + 4 + 1
    # Histograms: one entry per call, in the right bucket range.
    for row in (echo, nf, hold, other):
        for code, h in row.latency.items():
            assert h.bounds == BUCKETS and len(h.counts) == len(BUCKETS) + 1
            assert h.count == row.handled[code]
    late = hold.latency[DEADLINE]
    assert late.sum >= 2 * 0.25
    assert sum(late.counts[:BUCKETS.index(0.25)]) == 0      # each took about 0.3 s
    assert echo.total_latency().count == 5 and echo.total_latency().sum < 5 * 1.0
    assert snap.core["rpcs_started"] >= snap.started


def test_in_flight_gauge_during_a_slow_call(server_thread, request) -> None:
    mix = Mix(service_name(request))
    server_thread.start(lambda s: (mix.register(s), asyncgrpc.enable_metrics(s)))
    with grpc.insecure_channel(server_thread.target) as ch:
        fut = ch.unary_unary(mix.path("Hold")).future(b"slow-1", timeout=10)
        mix.wait_started("slow-1")
        snap = snapshot(server_thread)
        assert snap.in_flight == 1
        assert snap.method(mix.path("Hold")).in_flight == 1
        assert snap.method(mix.path("Hold")).handled == {}
        server_thread.loop.call_soon_threadsafe(mix.release.set)
        assert fut.result(timeout=10) == b"held:slow-1"
    snap = wait_idle(server_thread)
    assert snap.in_flight == 0
    assert snap.method(mix.path("Hold")).handled == {OK: 1}


def test_generic_path_methods_get_their_own_row(server_thread, request) -> None:
    """With an interceptor, streaming methods are served through the
    generic path; they still get a row (an opaque generic handler's paths,
    unknown before start, are counted as _OTHER)."""
    service = service_name(request)

    async def numbers(req: bytes, context: Any):
        for i in range(int(req)):
            yield str(i).encode()

    class PassThrough(asyncgrpc.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            return await continuation(details)

    class Opaque(asyncgrpc.GenericRpcHandler):
        def service(self, details):
            if details.method == f"/{service}.Opaque/Echo":
                return asyncgrpc.unary_unary_rpc_method_handler(_echo)
            return None

    def setup(s: Any) -> None:
        s.add_generic_rpc_handlers([asyncgrpc.method_handlers_generic_handler(
            service, {"Numbers": asyncgrpc.unary_stream_rpc_method_handler(numbers)}),
            Opaque()])
        asyncgrpc.enable_metrics(s)
    server_thread.start(setup, interceptors=[PassThrough()])
    with grpc.insecure_channel(server_thread.target) as ch:
        for n in (2, 3):
            got = list(ch.unary_stream(f"/{service}/Numbers")(str(n).encode(), timeout=10))
            assert got == [str(i).encode() for i in range(n)]
        assert ch.unary_unary(f"/{service}.Opaque/Echo")(b"o-1", timeout=10) == b"o-1"
    snap = wait_idle(server_thread)
    numbers_row = snap.method(f"/{service}/Numbers")
    assert numbers_row.handled == {OK: 2} and numbers_row.kind == "server_stream"
    assert snap.method(OTHER).handled == {OK: 1}


async def _echo(request: bytes, context: Any) -> bytes:
    return request


def test_metrics_off_by_default(server_thread, request) -> None:
    mix = Mix(service_name(request))
    server_thread.start(mix.register)
    server = server_thread.server
    with grpc.insecure_channel(server_thread.target) as ch:
        assert ch.unary_unary(mix.path("Echo"))(b"x", timeout=10) == b"echo:x"
    assert server._core.metrics_snapshot() is None
    snap = asyncgrpc.metrics.snapshot(server)
    assert snap.enabled is False and snap.methods == ()
    with pytest.raises(RuntimeError, match="before the server starts"):
        asyncgrpc.enable_metrics(server)


def test_enable_twice_returns_the_same_metrics() -> None:
    server = asyncgrpc.server()
    m = asyncgrpc.enable_metrics(server, opentelemetry=False)
    assert asyncgrpc.enable_metrics(server, opentelemetry=False) is m
    assert m.snapshot().enabled and m.snapshot().methods == ()   # not started yet


def _scrape(port: int) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """name + labels -> value of every sample at http://127.0.0.1:port/metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def prometheus_registry() -> Iterator[Any]:
    prometheus_client = pytest.importorskip("prometheus_client")
    yield prometheus_client.CollectorRegistry()


def test_prometheus_endpoint(server_thread, request, prometheus_registry) -> None:
    mix = Mix(service_name(request))
    server_thread.start(lambda s: (mix.register(s), asyncgrpc.enable_metrics(s)))
    httpd, thread = asyncgrpc.metrics.start_prometheus_server(
        0, addr="127.0.0.1", registry=prometheus_registry)
    try:
        expected = run_mix(server_thread, mix)
        wait_idle(server_thread)
        with grpc.insecure_channel(server_thread.target) as ch:
            fut = ch.unary_unary(mix.path("Hold")).future(b"scraped-1", timeout=10)
            mix.wait_started("scraped-1")
            samples = _scrape(httpd.server_port)
            server_thread.loop.call_soon_threadsafe(mix.release.set)
            assert fut.result(timeout=10) == b"held:scraped-1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

    def labels(method: str, **more: str) -> Tuple[Tuple[str, str], ...]:
        return tuple(sorted({"grpc_type": "unary", "grpc_service": mix.service,
                             "grpc_method": method, **more}.items()))
    names = {"Echo": [OK], "NotFound": [NOT_FOUND], "Hold": [CANCELLED, DEADLINE]}
    for method, codes in names.items():
        for code in codes:
            name = asyncgrpc.metrics.code_name(code)
            assert samples[("grpc_server_handled_total", labels(method, grpc_code=name))] \
                == expected[code], (method, name)
    assert samples[("grpc_server_started_total", labels("Echo"))] == 5
    assert samples[("grpc_server_started_total", labels("Hold"))] == 5
    assert samples[("grpc_server_in_flight_rpcs", labels("Hold"))] == 1
    assert samples[("grpc_server_in_flight_rpcs", labels("Echo"))] == 0
    assert samples[("grpc_server_handling_seconds_count", labels("Echo"))] == 5
    assert samples[("grpc_server_handling_seconds_bucket", labels("Echo", le="+Inf"))] == 5
    assert samples[("grpc_server_handling_seconds_bucket", labels("Hold", le="0.25"))] == 2
    assert samples[("grpc_server_handling_seconds_count", labels("Hold"))] == 4
    other = tuple(sorted({"grpc_type": "unknown", "grpc_service": OTHER,
                          "grpc_method": OTHER, "grpc_code": "UNIMPLEMENTED"}.items()))
    assert samples[("grpc_server_handled_total", other)] >= 1
    assert samples[("asyncgrpc_core_rpcs_started_total", ())] >= 14
    assert ("asyncgrpc_event_loop_lag_seconds", ()) in samples


def test_opentelemetry_instruments(server_thread, request) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    mix = Mix(service_name(request))
    server_thread.start(lambda s: (mix.register(s),
                                   asyncgrpc.enable_metrics(s, meter_provider=provider)))
    try:
        run_mix(server_thread, mix)
        snap = wait_idle(server_thread)

        def points(name: str) -> Dict[Tuple[Tuple[str, Any], ...], Any]:
            data = reader.get_metrics_data()
            out = {}
            for rm in data.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == name:
                            for p in metric.data.data_points:
                                if p.attributes.get("rpc.service", "") == mix.service:
                                    out[tuple(sorted(p.attributes.items()))] = p
            return out

        def attrs(method: str, code: int | None = None) -> Tuple[Tuple[str, Any], ...]:
            a: Dict[str, Any] = {"rpc.system": "grpc", "rpc.service": mix.service,
                                 "rpc.method": method}
            if code is not None:
                a["rpc.grpc.status_code"] = code
            return tuple(sorted(a.items()))

        handled = points("asyncgrpc.server.rpcs.handled")
        assert handled[attrs("Echo", OK)].value == 5
        assert handled[attrs("NotFound", NOT_FOUND)].value == 3
        assert handled[attrs("Hold", CANCELLED)].value == 2
        assert handled[attrs("Hold", DEADLINE)].value == 2
        duration = points("rpc.server.duration")
        for method, code in (("Echo", OK), ("NotFound", NOT_FOUND), ("Hold", DEADLINE)):
            p = duration[attrs(method, code)]
            h = snap.method(mix.path(method)).latency[code]
            assert p.count == h.count
            assert list(p.explicit_bounds) == list(BUCKETS)
            assert list(p.bucket_counts) == list(h.counts)
            assert p.sum == pytest.approx(h.sum, rel=1e-6, abs=1e-9)
        # A second collection adds only the new RPCs (cumulative totals).
        with grpc.insecure_channel(server_thread.target) as ch:
            assert ch.unary_unary(mix.path("Echo"))(b"again", timeout=10) == b"echo:again"
        wait_idle(server_thread)
        assert points("rpc.server.duration")[attrs("Echo", OK)].count == 6
        assert points("asyncgrpc.server.rpcs.handled")[attrs("Echo", OK)].value == 6
        assert points("asyncgrpc.server.rpcs.in_flight")[attrs("Echo")].value == 0
    finally:
        provider.shutdown()


def test_opentelemetry_without_the_duration_histogram(server_thread, request) -> None:
    """otel_duration=False: the counters only (no per-RPC record at
    collection time)."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    mix = Mix(service_name(request))
    server_thread.start(lambda s: (mix.register(s), asyncgrpc.enable_metrics(
        s, meter_provider=provider, otel_duration=False)))
    try:
        with grpc.insecure_channel(server_thread.target) as ch:
            assert ch.unary_unary(mix.path("Echo"))(b"d-1", timeout=10) == b"echo:d-1"
        wait_idle(server_thread)
        names = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for p in metric.data.data_points:
                        if p.attributes.get("rpc.service") == mix.service:
                            names[metric.name] = p
        assert "rpc.server.duration" not in names
        assert names["asyncgrpc.server.rpcs.handled"].value == 1
    finally:
        provider.shutdown()


def test_values_for_keeps_buckets_and_sum() -> None:
    """The values recorded into the OTel histogram stay in their buckets
    and add up to the measured sum."""
    from asyncgrpc.metrics import _values_for

    counts = [3, 0, 2] + [0] * (len(BUCKETS) - 3) + [0]
    values = _values_for(BUCKETS, counts, 3 * 0.004 + 2 * 0.02)
    assert sum(v * n for v, n in values) == pytest.approx(0.052)
    assert [(n, 0 < v <= 0.005 or 0.01 < v <= 0.025) for v, n in values] == [(3, True), (2, True)]
    with_overflow = [1] + [0] * (len(BUCKETS) - 1) + [2]
    values = _values_for(BUCKETS, with_overflow, 0.001 + 12 + 30)
    assert values[-1][1] == 2 and values[-1][0] > 10
    assert sum(v * n for v, n in values) == pytest.approx(42.001)


def _two_free_ports() -> int:
    """P such that P and P+1 are free."""
    for _ in range(50):
        p = free_port()
        if p >= 65535:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two consecutive free ports")


SERVICE_FILE = '''
import os
import asyncgrpc


async def who(request, context):
    return request + b":" + str(os.getpid()).encode()


def register(server):
    server.add_generic_rpc_handlers([asyncgrpc.method_handlers_generic_handler(
        "test.CliMetrics", {"Who": asyncgrpc.unary_unary_rpc_method_handler(who)})])
'''


def test_cli_metrics_port_with_two_workers(tmp_path) -> None:
    pytest.importorskip("prometheus_client")
    (tmp_path / "svcm.py").write_text(SERVICE_FILE)
    port, mport = free_port(), _two_free_ports()
    target = f"127.0.0.1:{port}"
    s = Served(str(tmp_path), ["svcm:register", "--bind", target, "--workers", "2",
                               "--metrics-port", str(mport), "--metrics-addr", "127.0.0.1"])
    try:
        serving = s.serving(2)
        workers = {int(m.group(2)) for m in serving}
        s.wait_for(r"metrics on http://127\.0\.0\.1:\d+/metrics", 2)
        by_pid: Dict[int, int] = {}
        for i in range(30):
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                rid = f"m-{i}".encode()
                got_id, _, pid = ch.unary_unary("/test.CliMetrics/Who")(rid, timeout=10).rpartition(b":")
                assert got_id == rid
                by_pid[int(pid)] = by_pid.get(int(pid), 0) + 1
        assert set(by_pid) == workers
        key = ("grpc_server_handled_total", tuple(sorted({
            "grpc_type": "unary", "grpc_service": "test.CliMetrics", "grpc_method": "Who",
            "grpc_code": "OK"}.items())))
        # Worker k serves mport + k; together they saw every call, each its own.
        seen = sorted(_scrape(p).get(key, 0) for p in (mport, mport + 1))
        assert seen == sorted(by_pid.values())
        s.proc.send_signal(__import__("signal").SIGTERM)
        assert s.wait() == 0, s.text()
    finally:
        s.close()
