"""Prometheus metrics of the two services, each server with its own registry (no global state).

Served on ``http://HOST:PORT/metrics`` by :meth:`ServiceMetrics.serve` when
``observability.metrics_port`` is set. Every service (recorded by the server interceptor):

    grpc_server_started_total{grpc_service, grpc_method, grpc_type}
    grpc_server_handling_seconds{grpc_service, grpc_method, grpc_type, grpc_code}  histogram
    exitrank_server_refused_total{grpc_service, grpc_method, reason}   calls the guard refused before the
                                                service saw them (exitrank.grpc_security.ServerGuard):
                                                unauthenticated, permission_denied, rate_limit, concurrency,
                                                oversized, malformed, draining
    process_*, python_gc_*, python_info                                        (the usual collectors)

The names and labels are go-grpc-prometheus's, so existing gRPC dashboards and alerts apply.
The ranker (:class:`RankerMetrics`, fed by the core through its ``RankObserver`` hook):

    exitrank_ranker_exit_layer                  histogram, one observation per scored candidate
                                                (buckets le=1..L: the layer that answered)
    exitrank_ranker_candidates_per_request      histogram
    exitrank_ranker_retrieval_seconds           histogram, context + titles inside Rank
    exitrank_ranker_inference_seconds           histogram, batch wait + model work inside Rank
    exitrank_ranker_batch_requests / _batch_rows / _batch_seconds
                                                histograms per micro-batch (one model pass group)
    exitrank_ranker_ranked_without_retrieval_total   requests whose prompt had no neighbours
    exitrank_ranker_pending_requests            gauge, queued or running in the batcher

The retriever (:class:`RetrieverMetrics`, read from the core when scraped):

    exitrank_retriever_index_users              users in the served FAISS index
    exitrank_retriever_stream_lag               ingest entries not yet delivered to the group
    exitrank_retriever_stream_pending           delivered but not yet applied and acknowledged
    exitrank_retriever_embedding_version_age_seconds   since the served version was published
    exitrank_retriever_embedding_version_info{version}
    exitrank_retriever_stream_applied_total     entries this process applied
    exitrank_retriever_redis_round_trips_total  pipelines sent to Redis by this process
    exitrank_retriever_stats_up                 1 when the last scrape could read the stats

Hot-path cost: one histogram observation per call and per batch; the exit layers of a request
are counted in a plain list (one increment per candidate), not by per-candidate observations.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from exitrank.ports import METRICS_PORT_SETTING, PortInUse

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CANDIDATE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class RpcMetrics:
    """The started counter and per-status latency histograms of one method (children cached)."""

    __slots__ = ("started", "_histogram", "_labels", "_by_code")

    def __init__(self, metrics: ServiceMetrics, method: str, rpc_type: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self._labels = (service, name, rpc_type)
        self.started = metrics.rpc_started.labels(*self._labels)
        self._histogram = metrics.rpc_seconds
        self._by_code: dict[str, Any] = {}

    def observe(self, code: str, seconds: float) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._histogram.labels(*self._labels, code)
        child.observe(seconds)


class ServiceMetrics:
    """One server's registry: the gRPC server metrics, process collectors, and the HTTP endpoint.

    Args:
        service: ``ranker`` or ``retriever`` (documentation only; series carry no service label,
            as each process is scraped as its own target).
    """

    def __init__(self, *, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.rpc_started = Counter("grpc_server_started", "RPCs started on the server.",
                                   ("grpc_service", "grpc_method", "grpc_type"), registry=self.registry)
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from the start of an RPC to its end, by status code.",
            ("grpc_service", "grpc_method", "grpc_type", "grpc_code"), buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self.refused = Counter("exitrank_server_refused", "Calls the server's guard refused before the service saw "
                               "them, by reason.", ("grpc_service", "grpc_method", "reason"), registry=self.registry)
        self._http: Any = None
        self.port: int | None = None

    def count_refusal(self, method: str, reason: str) -> None:
        """One call refused by the guard (its ``on_refusal`` hook); methods and reasons are few and known."""
        service, _, name = method.lstrip("/").rpartition("/")
        self.refused.labels(service, name, reason).inc()

    def rpc(self, method: str, rpc_type: str) -> RpcMetrics:
        return RpcMetrics(self, method, rpc_type)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread (port 0: a free one); the bound port.

        Raises:
            PortInUse: the port is taken (naming ``--metrics-port``).
        """
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise PortInUse(host, port, METRICS_PORT_SETTING, exc.strerror or str(exc)) from exc
        self.port = int(self._http.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _LayerHistogram:
    """A histogram of exit layers 1..L kept as counts per layer (an increment per candidate)."""

    def __init__(self, name: str, documentation: str, num_layers: int) -> None:
        self.name, self.documentation = name, documentation
        self._counts = [0] * (num_layers + 1)
        self._sum = 0
        self._lock = threading.Lock()

    def observe_all(self, layers: Iterable[int]) -> None:
        top = len(self._counts) - 1
        with self._lock:
            counts = self._counts
            for layer in layers:
                counts[layer if 0 <= layer <= top else top] += 1
                self._sum += layer

    def describe(self) -> list:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> list:
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, buckets = counts[0], []
        for layer in range(1, len(counts)):
            cumulative += counts[layer]
            buckets.append((floatToGoString(layer), cumulative))
        buckets.append(("+Inf", cumulative))
        family.add_metric([], buckets, sum_value=total)
        return [family]


class RankerMetrics(ServiceMetrics):
    """The ranker's metrics; implements the core's ``RankObserver`` (``ranker_svc.ranker``).

    Args:
        num_layers: the model's depth (the exit-layer buckets are 1..num_layers).
        pending: reads the requests queued or running in the micro-batcher (scrape time).
    """

    def __init__(self, *, num_layers: int, pending: Callable[[], int] | None = None) -> None:
        super().__init__(service="ranker")
        reg = self.registry
        self.exit_layer = _LayerHistogram("exitrank_ranker_exit_layer",
                                          "Layer whose exit head answered, per scored candidate.", num_layers)
        reg.register(self.exit_layer)
        self.candidates = Histogram("exitrank_ranker_candidates_per_request", "Candidates per ranked request.",
                                    buckets=CANDIDATE_BUCKETS, registry=reg)
        self.retrieval_seconds = Histogram("exitrank_ranker_retrieval_seconds",
                                           "Context and title look-ups inside Rank.", buckets=LATENCY_BUCKETS,
                                           registry=reg)
        self.inference_seconds = Histogram("exitrank_ranker_inference_seconds",
                                           "Batch wait and model work inside Rank.", buckets=LATENCY_BUCKETS,
                                           registry=reg)
        self.batch_requests = Histogram("exitrank_ranker_batch_requests", "Requests scored together per batch.",
                                        buckets=REQUEST_BUCKETS, registry=reg)
        self.batch_rows = Histogram("exitrank_ranker_batch_rows", "Candidate rows per batch.",
                                    buckets=ROW_BUCKETS, registry=reg)
        self.batch_seconds = Histogram("exitrank_ranker_batch_seconds", "Model time per batch.",
                                       buckets=LATENCY_BUCKETS, registry=reg)
        self.without_retrieval = Counter("exitrank_ranker_ranked_without_retrieval",
                                         "Requests ranked without retrieved neighbours (unknown user or "
                                         "retriever unavailable).", registry=reg)
        if pending is not None:
            Gauge("exitrank_ranker_pending_requests", "Requests queued or running in the micro-batcher.",
                  registry=reg).set_function(pending)

    def observe_rank(self, result: Any) -> None:
        """One served request (an ``exitrank.types.RankResult``)."""
        scores = result.scores
        self.exit_layer.observe_all([s.exit_layer for s in scores])
        self.candidates.observe(len(scores))
        timings = result.timings_ms
        self.retrieval_seconds.observe(timings.get("retrieval", 0.0) / 1e3)
        self.inference_seconds.observe(timings.get("inference", 0.0) / 1e3)
        if not result.retrieval_used:
            self.without_retrieval.inc()

    def observe_batch(self, *, requests: int, rows: int, seconds: float) -> None:
        """One micro-batch run by the model."""
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)


class _RetrieverStats:
    """Reads the retriever's stats on its event loop when scraped (from the HTTP thread)."""

    GAUGES = (
        ("index_users", "exitrank_retriever_index_users", "Users in the served FAISS index."),
        ("stream_lag", "exitrank_retriever_stream_lag",
         "Ingest stream entries not yet delivered to the consumer group."),
        ("stream_pending", "exitrank_retriever_stream_pending",
         "Ingest stream entries delivered to a consumer but not yet applied and acknowledged."),
        ("embedding_version_age_seconds", "exitrank_retriever_embedding_version_age_seconds",
         "Seconds since the served embedding version was published."),
    )
    COUNTERS = (
        ("stream_applied", "exitrank_retriever_stream_applied", "Ingest entries this process applied."),
        ("redis_round_trips", "exitrank_retriever_redis_round_trips", "Pipelines this process sent to Redis."),
    )

    def __init__(self, stats: Callable[[], Awaitable[Mapping[str, Any]]], loop: asyncio.AbstractEventLoop,
                 timeout_s: float) -> None:
        self._stats, self._loop, self._timeout_s = stats, loop, timeout_s

    def describe(self) -> list:
        return self._families(None, samples=False)

    def collect(self) -> list:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        stats: Mapping[str, Any] | None = None
        if running is not self._loop:  # on the loop itself waiting would deadlock
            try:
                stats = asyncio.run_coroutine_threadsafe(self._stats(), self._loop).result(self._timeout_s)
            except Exception as exc:  # noqa: BLE001 - a failed scrape must not break the endpoint
                log.warning("retriever stats unavailable for /metrics: %r", exc)
        return self._families(stats)

    def _families(self, stats: Mapping[str, Any] | None, *, samples: bool = True) -> list:
        values = stats or {}
        out: list = []
        for key, name, doc in self.GAUGES:
            family = GaugeMetricFamily(name, doc)
            if values.get(key) is not None:
                family.add_metric([], float(values[key]))
            out.append(family)
        for key, name, doc in self.COUNTERS:
            family = CounterMetricFamily(name, doc)
            if values.get(key) is not None:
                family.add_metric([], float(values[key]))
            out.append(family)
        info = GaugeMetricFamily("exitrank_retriever_embedding_version_info",
                                 "The served embedding version (value 1).", labels=["version"])
        if values.get("embedding_version"):
            info.add_metric([str(values["embedding_version"])], 1.0)
        up = GaugeMetricFamily("exitrank_retriever_stats_up", "1 when this scrape read the retriever's stats.")
        if samples:
            up.add_metric([], 0.0 if stats is None else 1.0)
        return [*out, info, up]


class RetrieverMetrics(ServiceMetrics):
    """The retriever's metrics.

    Args:
        stats: an async function returning the keys of ``_RetrieverStats`` (index_users,
            embedding_version, embedding_version_age_seconds, stream_lag, stream_pending,
            stream_applied, redis_round_trips); absent or None keys are left out.
        loop: the event loop ``stats`` runs on (the service's).
        timeout_s: how long a scrape waits for the stats.
    """

    def __init__(self, *, stats: Callable[[], Awaitable[Mapping[str, Any]]],
                 loop: asyncio.AbstractEventLoop, timeout_s: float = 2.0) -> None:
        super().__init__(service="retriever")
        self.registry.register(_RetrieverStats(stats, loop, timeout_s))
