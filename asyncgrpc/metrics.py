"""RPC metrics of asyncgrpc servers, and their export to OpenTelemetry and
Prometheus.

Off by default. ``asyncgrpc.enable_metrics(server)`` (before ``start()``)
turns them on for that server; the per-RPC work is done in C (src/metrics.c):
per method, the RPCs started, and per final status code a latency histogram
(upper bounds of OpenTelemetry's RPC buckets, 5 ms .. 10 s, then +Inf) with
the sum of the latencies. Latency runs from the moment the server accepts the
call to the moment it hands the final status to the gRPC core (or the RPC
ends without one: cancelled by the client, deadline exceeded, server stop).
Methods the server knows before it starts get a row each; any other path a
client asks for is counted under ``_OTHER``.

A snapshot (:meth:`Metrics.snapshot`) adds the RPCs in flight, the event-loop
lag measured by the server's watchdog and the C core's bridge counters
(:func:`asyncgrpc.stats`).

Exporters, both optional:

* OpenTelemetry (when ``opentelemetry-api`` is importable): instruments on
  the global MeterProvider, or the one given to :func:`enable_metrics`:
  ``rpc.server.duration`` (a Histogram, seconds; see :class:`_OtelExporter`
  for how it is fed), observable counters ``asyncgrpc.server.rpcs.started``
  and ``asyncgrpc.server.rpcs.handled``, ``asyncgrpc.server.rpcs.in_flight``,
  ``asyncgrpc.event_loop.lag`` and ``asyncgrpc.core.<counter>``. Attributes
  follow the RPC semantic conventions: ``rpc.system="grpc"``,
  ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``.
* Prometheus (``prometheus-client``): :func:`start_prometheus_server` serves
  ``grpc_server_started_total``, ``grpc_server_handled_total``,
  ``grpc_server_handling_seconds`` (named as go-grpc-prometheus and
  py-grpc-prometheus do), ``grpc_server_in_flight_rpcs``,
  ``asyncgrpc_event_loop_lag_seconds`` and ``asyncgrpc_core_*``.

Both read every server of the process that has metrics on.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple

from . import _core

if TYPE_CHECKING:
    from ._server import Server

__all__ = [
    "BUCKETS",
    "Histogram",
    "MethodMetrics",
    "Metrics",
    "Snapshot",
    "enable_metrics",
    "snapshot",
    "start_prometheus_server",
]

#: Upper bounds (seconds) of the latency buckets; a last bucket is +Inf.
BUCKETS: Tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                              0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
OTHER = "_OTHER"

_CODE_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
               "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
               "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
               "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


def code_name(code: int) -> str:
    """The name of a gRPC status code number ("OK", "NOT_FOUND", ...)."""
    return _CODE_NAMES[code] if 0 <= code < len(_CODE_NAMES) else str(code)


@dataclass(frozen=True)
class Histogram:
    """Latencies: ``counts[i]`` RPCs took at most ``bounds[i]`` seconds (and
    more than ``bounds[i-1]``); the last count is the +Inf bucket."""

    bounds: Tuple[float, ...]
    counts: Tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> List[int]:
        """Counts of RPCs at most each bound (Prometheus ``le``), +Inf last."""
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out

    def __add__(self, other: "Histogram") -> "Histogram":
        return Histogram(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts)),
                         self.sum + other.sum)


@dataclass(frozen=True)
class MethodMetrics:
    """One method's (or ``_OTHER``'s) counters."""

    path: str                    # "/pkg.Service/Method", or "_OTHER"
    service: str                 # "pkg.Service" ("_OTHER")
    method: str                  # "Method" ("_OTHER")
    kind: str                    # "unary", "client_stream", "server_stream", "bidi_stream", "unknown"
    started: int
    latency: Dict[int, Histogram]    # status code -> latencies of the RPCs that ended with it

    @property
    def handled(self) -> Dict[int, int]:
        """Status code -> RPCs that ended with it."""
        return {code: h.count for code, h in self.latency.items()}

    @property
    def in_flight(self) -> int:
        return self.started - sum(self.handled.values())

    def total_latency(self) -> Histogram:
        """Latencies of all ended RPCs, whatever their status."""
        out = Histogram(BUCKETS, (0,) * (len(BUCKETS) + 1), 0.0)
        for h in self.latency.values():
            out = out + h
        return out


@dataclass(frozen=True)
class Snapshot:
    """What :meth:`Metrics.snapshot` returns."""

    enabled: bool                # False: metrics are off for this server
    started: int = 0
    in_flight: int = 0
    methods: Tuple[MethodMetrics, ...] = ()
    loop_lag_s: Optional[float] = None   # None: no watchdog (not started, or turned off)
    loop_stalls: int = 0
    core: Dict[str, int] = field(default_factory=dict)   # asyncgrpc.stats()

    def method(self, path: str) -> Optional[MethodMetrics]:
        """The row of ``path`` ("/pkg.Service/Method" or "_OTHER")."""
        for m in self.methods:
            if m.path == path:
                return m
        return None

    def handled(self, path: str, code: int) -> int:
        """RPCs of ``path`` that ended with status ``code`` (an int)."""
        m = self.method(path)
        return m.handled.get(int(code), 0) if m is not None else 0


def _split(path: str) -> Tuple[str, str]:
    """("pkg.Service", "Method") from "/pkg.Service/Method"."""
    if path == OTHER:
        return OTHER, OTHER
    service, _, method = path.lstrip("/").rpartition("/")
    return service, method


def _kind(handler: Any) -> str:
    if handler is None:
        return "unknown"
    return {(False, False): "unary", (True, False): "client_stream",
            (False, True): "server_stream", (True, True): "bidi_stream"}[
        (bool(handler.request_streaming), bool(handler.response_streaming))]


def snapshot(server: "Server") -> Snapshot:
    """The metrics of ``server`` (``enabled=False`` if they are off)."""
    raw = server._core.metrics_snapshot()
    if raw is None:
        return Snapshot(enabled=getattr(server, "_metrics", None) is not None,
                        core=dict(_core.stats()))
    methods = []
    for name, started, codes in raw["rows"]:
        path = OTHER if name is None else name
        service, method = _split(path)
        latency = {code: Histogram(raw["bounds"], counts, total)
                   for code, (counts, total) in sorted(codes.items())}
        methods.append(MethodMetrics(path, service, method,
                                     _kind(server._registered.get(path)), started, latency))
    dog = server._watchdog
    lag = dog.lag if dog is not None and dog.enabled else None
    return Snapshot(True, raw["started"], raw["in_flight"], tuple(methods), lag,
                    dog.stalls if dog is not None else 0, dict(_core.stats()))


# Servers with metrics on, for the exporters (which read all of them).
_live: "weakref.WeakSet[Metrics]" = weakref.WeakSet()
_live_lock = threading.Lock()


def _live_metrics() -> List["Metrics"]:
    with _live_lock:
        return list(_live)


class Metrics:
    """The metrics of one server; made by :func:`asyncgrpc.enable_metrics`."""

    def __init__(self, server: "Server") -> None:
        self._server_ref = weakref.ref(server)

    @property
    def server(self) -> Optional["Server"]:
        return self._server_ref()

    def snapshot(self) -> Snapshot:
        """The counters now (all zero before the server started)."""
        server = self._server_ref()
        if server is None:
            return Snapshot(enabled=False)
        return snapshot(server)


def enable_metrics(server: "Server", *, meter_provider: Any = None,
                   opentelemetry: bool = True, otel_duration: bool = True) -> Metrics:
    """Turn RPC metrics on for ``server`` (before ``start()``).

    With ``opentelemetry`` true and ``opentelemetry-api`` importable, the
    instruments are registered on ``meter_provider`` (default: the global
    one, also when the SDK sets it later), once per provider.
    ``otel_duration=False`` leaves out the ``rpc.server.duration``
    histogram, whose feeding costs one ``Histogram.record`` per RPC at
    collection time (see :class:`_OtelExporter`); the first call for a
    provider decides. Returns the server's :class:`Metrics` (the same
    object if called again)."""
    if server._started:
        raise RuntimeError("enable_metrics() must be called before the server starts")
    metrics = getattr(server, "_metrics", None)
    if metrics is None:
        metrics = Metrics(server)
        server._metrics = metrics
        with _live_lock:
            _live.add(metrics)
    if opentelemetry:
        _OtelExporter.attach(meter_provider, otel_duration)
    return metrics


# ---------------------------------------------------------------- OpenTelemetry

class _OtelExporter:
    """OpenTelemetry instruments reading every live :class:`Metrics`.

    The API has no observable histogram. ``rpc.server.duration`` is a real
    Histogram, fed at collection time: the callback of the ``handled``
    counter (run by every collection, before the SDK aggregates) takes the
    new RPCs since the last collection from the C histograms, bucket by
    bucket, and records one value per RPC inside that RPC's bucket. The
    values are chosen so that the sum of the recorded values equals the sum
    of the measured latencies: bucket counts, count and sum are exact, while
    min and max are only as precise as the buckets. The cost is one
    ``Histogram.record`` per RPC (about 6 us with SDK 1.45 on the project's
    machine), paid at collection time on the reader's thread, which holds
    the GIL meanwhile: at high RPC rates, ``enable_metrics(...,
    otel_duration=False)`` leaves the histogram out (the counters stay, and
    the Prometheus exporter serves the histogram at no such cost).
    """

    # provider -> its exporter (weak keys: the exporter does not keep the
    # provider alive; the provider keeps the exporter through its callbacks)
    _by_provider: "weakref.WeakKeyDictionary[Any, _OtelExporter]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def attach(cls, meter_provider: Any = None, duration_histogram: bool = True) -> Optional["_OtelExporter"]:
        try:
            from opentelemetry import metrics as otel_metrics
        except ImportError:
            return None
        provider = meter_provider or otel_metrics.get_meter_provider()
        with cls._lock:
            exporter = cls._by_provider.get(provider)
            if exporter is None:
                exporter = cls(provider, duration_histogram)
                cls._by_provider[provider] = exporter
        return exporter

    def __init__(self, provider: Any, duration_histogram: bool) -> None:
        from opentelemetry.metrics import Observation
        from . import __version__

        self._Observation = Observation
        self._seen: "weakref.WeakKeyDictionary[Metrics, Dict[Tuple[str, int], Tuple[Tuple[int, ...], float]]]" = \
            weakref.WeakKeyDictionary()
        self._record_lock = threading.Lock()
        meter = provider.get_meter("asyncgrpc", __version__)
        self._duration = None
        if duration_histogram:
            try:
                self._duration = meter.create_histogram(
                    "rpc.server.duration", unit="s",
                    description="Measures the duration of inbound RPC",
                    explicit_bucket_boundaries_advisory=list(BUCKETS))
            except TypeError:    # an API before 1.23: no advisory
                self._duration = meter.create_histogram(
                    "rpc.server.duration", unit="s",
                    description="Measures the duration of inbound RPC")
        meter.create_observable_counter(
            "asyncgrpc.server.rpcs.handled", [self._observe_handled], unit="{call}",
            description="RPCs that ended, by final status code")
        meter.create_observable_counter(
            "asyncgrpc.server.rpcs.started", [self._observe_started], unit="{call}",
            description="RPCs the server accepted")
        meter.create_observable_up_down_counter(
            "asyncgrpc.server.rpcs.in_flight", [self._observe_in_flight], unit="{call}",
            description="RPCs accepted and not yet ended")
        meter.create_observable_gauge(
            "asyncgrpc.event_loop.lag", [self._observe_lag], unit="s",
            description="How late the watchdog's last heartbeat ran on the event loop")
        meter.create_observable_counter(
            "asyncgrpc.core.events", [self._core_observer("events")], unit="{event}",
            description="Completion events handled by the bridge (asyncgrpc.stats())")
        meter.create_observable_counter(
            "asyncgrpc.core.eventfd_writes", [self._core_observer("eventfd_writes")],
            unit="{write}", description="Poller-to-loop wake-ups written")
        meter.create_observable_counter(
            "asyncgrpc.core.wakeups", [self._core_observer("wakeups")], unit="{wakeup}",
            description="Times the loop's reader callback ran")

    @staticmethod
    def _attrs(m: MethodMetrics, code: Optional[int] = None) -> Dict[str, Any]:
        attrs: Dict[str, Any] = {"rpc.system": "grpc", "rpc.service": m.service,
                                 "rpc.method": m.method}
        if code is not None:
            attrs["rpc.grpc.status_code"] = code
        return attrs

    def _snapshots(self) -> Iterator[Tuple["Metrics", Snapshot]]:
        for metrics in _live_metrics():
            snap = metrics.snapshot()
            if snap.enabled:
                yield metrics, snap

    def _sum_by_attrs(self, values: Iterable[Tuple[Dict[str, Any], float]]) -> List[Any]:
        """One observation per attribute set (servers of the process summed)."""
        total: Dict[Tuple[Tuple[str, Any], ...], float] = {}
        for attrs, value in values:
            key = tuple(sorted(attrs.items()))
            total[key] = total.get(key, 0) + value
        return [self._Observation(v, dict(k)) for k, v in total.items()]

    def _observe_handled(self, options: Any) -> List[Any]:
        out = []
        for metrics, snap in self._snapshots():
            if self._duration is not None:
                self._record_durations(metrics, snap)
            for m in snap.methods:
                out.extend((self._attrs(m, code), n) for code, n in m.handled.items())
        return self._sum_by_attrs(out)

    def _observe_started(self, options: Any) -> List[Any]:
        return self._sum_by_attrs((self._attrs(m), m.started)
                                  for _, snap in self._snapshots() for m in snap.methods
                                  if m.started)

    def _observe_in_flight(self, options: Any) -> List[Any]:
        return self._sum_by_attrs((self._attrs(m), m.in_flight)
                                  for _, snap in self._snapshots() for m in snap.methods
                                  if m.started)

    def _observe_lag(self, options: Any) -> List[Any]:
        lags = [snap.loop_lag_s for _, snap in self._snapshots() if snap.loop_lag_s is not None]
        return [self._Observation(max(lags))] if lags else []

    def _core_observer(self, key: str) -> Any:
        def observe(options: Any) -> List[Any]:
            return [self._Observation(_core.stats()[key])]
        return observe

    def _record_durations(self, metrics: "Metrics", snap: Snapshot) -> None:
        """Record into rpc.server.duration the RPCs that ended since the
        last collection (see the class docstring)."""
        assert self._duration is not None
        with self._record_lock:
            seen = self._seen.setdefault(metrics, {})
            for m in snap.methods:
                for code, h in m.latency.items():
                    before_counts, before_sum = seen.get((m.path, code), ((0,) * len(h.counts), 0.0))
                    delta = [a - b for a, b in zip(h.counts, before_counts)]
                    if not any(delta):
                        continue
                    seen[(m.path, code)] = (h.counts, h.sum)
                    attrs = self._attrs(m, code)
                    for value, n in _values_for(h.bounds, delta, h.sum - before_sum):
                        for _ in range(n):
                            self._duration.record(value, attrs)


def _values_for(bounds: Tuple[float, ...], counts: List[int], total: float) -> List[Tuple[float, int]]:
    """(value, how many) pairs: ``counts[i]`` values inside bucket i
    (``(bounds[i-1], bounds[i]]``, the last one above ``bounds[-1]``) whose
    sum is ``total`` as far as the buckets allow."""
    lows = (0.0,) + bounds
    finite = list(zip(lows[:-1], bounds, counts[:-1]))
    overflow = counts[-1]
    if overflow:
        # Finite buckets at their middle; the overflow values take the rest.
        out = [((lo + hi) / 2, n) for lo, hi, n in finite if n]
        rest = total - sum(v * n for v, n in out)
        out.append((max(rest / overflow, bounds[-1] * 1.000001), overflow))
        return out
    smin = sum(lo * n for lo, hi, n in finite)
    smax = sum(hi * n for lo, hi, n in finite)
    t = (total - smin) / (smax - smin) if smax > smin else 1.0
    t = min(max(t, 1e-6), 1.0)       # strictly above the lower bound
    return [(lo + t * (hi - lo), n) for lo, hi, n in finite if n]


# ---------------------------------------------------------------- Prometheus

class _PrometheusCollector:
    """A prometheus_client collector reading every live :class:`Metrics`
    at scrape time (names as go-grpc-prometheus / py-grpc-prometheus)."""

    def describe(self) -> List[Any]:
        return []      # no fixed set: read at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        labels = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily("grpc_server_started", "RPCs started on the server.",
                                      labels=labels)
        handled = CounterMetricFamily(
            "grpc_server_handled", "RPCs completed on the server, whatever their status.",
            labels=labels + ["grpc_code"])
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Latency (seconds) of RPCs until the server sent their status.", labels=labels)
        in_flight = GaugeMetricFamily("grpc_server_in_flight_rpcs",
                                      "RPCs started and not yet completed.", labels=labels)
        lag = GaugeMetricFamily("asyncgrpc_event_loop_lag_seconds",
                                "How late the watchdog's last heartbeat ran on the event loop.")
        stalls = CounterMetricFamily("asyncgrpc_event_loop_stalls",
                                     "Event-loop stalls longer than the watchdog threshold.")
        rows: Dict[Tuple[str, str, str], List[Any]] = {}
        lags: List[float] = []
        n_stalls = 0
        for metrics in _live_metrics():
            snap = metrics.snapshot()
            if not snap.enabled:
                continue
            if snap.loop_lag_s is not None:
                lags.append(snap.loop_lag_s)
            n_stalls += snap.loop_stalls
            for m in snap.methods:
                key = (m.kind, m.service, m.method)
                row = rows.setdefault(key, [0, {}, None])
                row[0] += m.started
                for code, n in m.handled.items():
                    row[1][code] = row[1].get(code, 0) + n
                total = m.total_latency()
                row[2] = total if row[2] is None else row[2] + total
        for key, (n_started, by_code, hist) in rows.items():
            if n_started == 0:
                continue
            values = list(key)
            started.add_metric(values, n_started)
            for code, n in sorted(by_code.items()):
                handled.add_metric(values + [code_name(code)], n)
            cumulative = hist.cumulative()
            buckets = [(repr(b), c) for b, c in zip(hist.bounds, cumulative)]
            buckets.append(("+Inf", cumulative[-1]))
            seconds.add_metric(values, buckets, hist.sum)
            in_flight.add_metric(values, n_started - sum(by_code.values()))
        yield from (started, handled, seconds, in_flight)
        if lags:
            lag.add_metric([], max(lags))
            yield lag
        stalls.add_metric([], n_stalls)
        yield stalls
        stats = _core.stats()
        for key, value in sorted(stats.items()):
            if key == "live_servers":
                gauge = GaugeMetricFamily("asyncgrpc_core_live_servers",
                                          "asyncgrpc servers alive in this process.")
                gauge.add_metric([], value)
                yield gauge
            else:
                counter = CounterMetricFamily(f"asyncgrpc_core_{key}",
                                              f"asyncgrpc.stats()['{key}'] (process-wide).")
                counter.add_metric([], value)
                yield counter


_prometheus_registered: "weakref.WeakSet[Any]" = weakref.WeakSet()


def start_prometheus_server(port: int, addr: str = "0.0.0.0", registry: Any = None) -> Any:
    """Serve the metrics of every server with metrics on at
    ``http://addr:port/metrics`` (a daemon thread of prometheus_client).

    ``registry`` defaults to prometheus_client's global REGISTRY (so its
    process and platform collectors are served too); the asyncgrpc collector
    is added to it once. Returns what ``prometheus_client.start_http_server``
    returns (the HTTP server and its thread, in prometheus_client >= 0.17).
    Needs ``prometheus-client``."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise RuntimeError("start_prometheus_server() needs prometheus-client "
                           "(pip install prometheus-client)") from exc
    registry = registry if registry is not None else prometheus_client.REGISTRY
    with _live_lock:
        if registry not in _prometheus_registered:
            registry.register(_PrometheusCollector())
            _prometheus_registered.add(registry)
    return prometheus_client.start_http_server(port, addr=addr, registry=registry)
