"""``retriever-svc``: builds the retriever process from its config and runs it until a signal.

    retriever-svc serve --port 50051 --artifacts artifacts/
    retriever-svc serve --port 0 --artifacts artifacts/ --data-dir /var/lib/retriever
    retriever-svc serve --port 50051 --artifacts artifacts/ --redis-url redis://:pw@127.0.0.1:6379/0

Start: the ports and the artifacts directory are checked (a busy port, or a missing directory with
the embedded Redis, exits 2 naming it before anything starts: :func:`check_artifacts`); Redis (an
embedded redis-server unless ``--redis-url``, its data kept under ``--data-dir``, default
``~/.local/state/exitrank/retriever``, across restarts, its password in a 0600 file beside its
socket that other CLIs read: ``exitrank.redis_server``), the store, the
core; publish ``ARTIFACTS/gcn`` when present and not older than Redis's current version, else restore
that version (``releases.py``); the stream consumer task; the replica follower task (peers' fold-ins,
newly published versions, a moved ``ROOT/current`` link); the
index maintainer task (index rebuilds off the event loop: ``maintenance.py``); the
gRPC server with health checking and reflection (over TLS, mutual TLS with ``--tls-client-ca``,
under ``limits``: message sizes, per-client rate and concurrency; with ``auth.policy`` only the RPCs
each caller's identity may call; ``exitrank.grpc_security``; ``server.health_port``: a plaintext port
answering health checks only). Then one line,
``retriever listening on HOST:PORT``, goes to stdout (port 0 prints the bound port), then
``retriever metrics on http://HOST:PORT/metrics`` with ``--metrics-port`` (``exitrank.observability``:
request ids, ``--log-format json``, ``--tracing``; the effective config is logged at start).

Health is SERVING while the retriever can answer (from its in-memory index, NearestUsers also
while Redis is down, or from Redis) and ingested events can be applied: NOT_SERVING at once when it
has neither index nor Redis, and once Redis has refused writes (full disk, ``maxmemory``) or the
stream consumer has failed for ``readiness.STALL_S``; polled every ``READINESS_POLL_S``
(:func:`watch_readiness`, ``readiness.py``). An artifact
directory with a ``manifest.json`` is verified first: a ``gcn/`` file that is missing or does not
match its hash stops the start (exit 2, the file named, as a bad config or any other start failure:
the ranker's statuses).

Lifecycle, the ranker's shape: :func:`start_server` builds and starts everything and returns a
:class:`RetrieverServer`; its ``stop(grace)`` (on SIGTERM/SIGINT) turns health NOT_SERVING, refuses
new calls (and received ones not yet begun) with UNAVAILABLE, drains in-flight calls
(``grpc_security.drain_and_stop``), lets the consumer finish its batch, stops the follower and the
metrics endpoint, and closes Redis; ``main`` then stops the embedded redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import grpc
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from exitrank.artifacts import ManifestError, require_artifacts_dir
from exitrank.access import AuthConfig, load_policy
from exitrank.grpc_security import ServerGuard, bind, drain_and_stop, find_guard, server_kwargs, start_health_port
from exitrank.observability import enable_crash_stacks, setup_process
from exitrank.observability.interceptors import ServerTelemetry, with_telemetry
from exitrank.observability.metrics import RetrieverMetrics
from exitrank.observability.settings import log_settings
from exitrank.ports import check_service_ports
from exitrank.redis_server import EmbeddedRedis, RedisServerError
from exitrank.security import Limits, ServerTLS, load_server_tls
from exitrank.v1 import retriever_pb2, retriever_pb2_grpc
from retriever_svc.background import BackgroundLoop
from retriever_svc.config import RetrieverConfig, ServerConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.errors import RetrievalError
from retriever_svc.index import Retriever
from retriever_svc.maintenance import IndexMaintainer
from retriever_svc.readiness import Readiness
from retriever_svc.releases import ReleaseWatch, adopt_artifacts
from retriever_svc.replicas import ReplicaFollower
from retriever_svc.servicer import RetrieverCore, RetrieverServicer
from retriever_svc.store import RedisStore

log = logging.getLogger("retriever_svc")
SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["Retriever"].full_name
READINESS_POLL_S = 0.5


@dataclass
class RetrieverServer:
    """A started server: the bound port, its health servicer, and what ``stop`` closes after the calls.

    ``start_grpc`` fills the gRPC part (a core served as it is); ``start_server`` adds the process's
    background loops (stream consumer, replica follower, index maintainer), the readiness watch, metrics
    and the store.
    """

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    guard: ServerGuard | None = None  # refuses new calls with UNAVAILABLE while draining
    background: tuple[BackgroundLoop, ...] = ()  # stopped in order once the calls have drained
    readiness: asyncio.Task | None = None
    metrics: RetrieverMetrics | None = None
    store: RedisStore | None = None  # closed last
    health_server: grpc.aio.Server | None = None  # server.health_port: plaintext, health checks only
    health_port: int | None = None  # its bound port

    async def stop(self, grace: float | None) -> None:
        """Health NOT_SERVING, drain in-flight calls for ``grace`` seconds, then stop the loops, close Redis."""
        if self.readiness is not None:
            self.readiness.cancel()
        await self.health.enter_graceful_shutdown()
        await drain_and_stop(self.server, self.guard, grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        for background in self.background:
            await background.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.store is not None:
            await self.store.close()


async def start_grpc(
    core: RetrieverCore, config: ServerConfig, *, tls: ServerTLS | None = None,
    limits: Limits | None = None, telemetry: ServerTelemetry | None = None, auth: AuthConfig | None = None,
    metrics: RetrieverMetrics | None = None,
) -> RetrieverServer:
    """A started grpc.aio server for ``core`` with health checking and reflection, and its port.

    ``tls`` None: plaintext; ``limits`` None: ``Limits()`` (message sizes only, no rate limit);
    ``telemetry`` None: request ids only (no metrics, access lines for server faults); ``auth`` None:
    no access policy (every caller may call every RPC); ``metrics``: counts the guard's refusals.
    """
    tls, limits = tls or ServerTLS(), limits or Limits()
    pem = load_server_tls(tls)
    access = load_policy(auth or AuthConfig())
    kwargs = with_telemetry(server_kwargs(limits, mutual=tls.mutual, access=access), telemetry or ServerTelemetry())
    guard = find_guard(kwargs["interceptors"])
    if metrics is not None and guard is not None:
        guard.on_refusal = metrics.count_refusal
    server = grpc.aio.server(**kwargs)
    retriever_pb2_grpc.add_RetrieverServicer_to_server(
        RetrieverServicer(core=core, batch=config.ingest_batch, max_reply_bytes=limits.max_send_bytes), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = bind(server, f"{config.host}:{config.port}", pem)
    health_server = health_port = None
    if config.health_port is not None:  # before the main port opens: a busy port stops the start here
        health_server, health_port = await start_health_port(health_servicer, config.host, config.health_port)
        log.info("health checks (only) in plaintext on %s:%d", config.host, health_port)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RetrieverServer(server=server, port=port, health=health_servicer, guard=guard, health_server=health_server,
                           health_port=health_port)


async def watch_readiness(readiness: Readiness, health_servicer: health.aio.HealthServicer,
                          *, interval_s: float = READINESS_POLL_S) -> None:
    """Keep health SERVING while ``readiness`` says so (``readiness.py``: something can answer, and
    ingested events can be applied), NOT_SERVING otherwise, with the reason in the log."""
    serving = True
    while True:
        await asyncio.sleep(interval_s)
        ready, reason = await readiness.check()
        if ready != serving:
            serving = ready
            log.warning("health %s: %s", "SERVING" if ready else "NOT_SERVING",
                        "events are applied and Redis answers again" if ready else reason)
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)


def build_metrics(retriever: Retriever, consumer: StreamConsumer | None) -> RetrieverMetrics:
    """The retriever's metrics, reading the core's stats (and the consumer's count) when scraped;
    call on the event loop the core runs on."""

    async def stats() -> dict:
        out = await retriever.stats()
        if consumer is not None:
            out["stream_applied"] = consumer.applied
        return out

    return RetrieverMetrics(stats=stats, loop=asyncio.get_running_loop())


async def start_server(config: RetrieverConfig, redis_url: str) -> RetrieverServer:
    """Builds config -> store -> core (embeddings published or restored) -> consumer and follower ->
    gRPC server, and starts them; what was started is stopped again when a later step fails."""
    obs = config.observability
    log_settings(log, config, service="retriever")
    faiss.omp_set_num_threads(config.index.faiss_threads)
    store = RedisStore.from_url(redis_url, prefix=config.redis.prefix, group=config.redis.group,
                                timeout_s=config.redis.timeout_s, tls=config.redis.tls())
    async with contextlib.AsyncExitStack() as undo:
        undo.push_async_callback(store.close)
        await store.ping()
        retriever = Retriever(store=store, config=config.index, replica=config.redis.consumer)
        version = await adopt_artifacts(retriever, config.artifacts.dir)
        await retriever.refresh_catalog()
        consumer = StreamConsumer(retriever=retriever, store=store, config=config.redis)
        follower = ReplicaFollower(retriever=retriever, store=store, redis=config.redis, index=config.index,
                                   release=ReleaseWatch(retriever=retriever, artifacts=config.artifacts.dir))
        maintainer = IndexMaintainer(retriever=retriever, config=config.index)
        for background in (consumer, follower, maintainer):
            background.start()
            undo.push_async_callback(background.stop)
        metrics = None if obs.metrics_port is None else build_metrics(retriever, consumer)
        if metrics is not None:
            undo.callback(metrics.close)
            metrics.serve(obs.metrics_host or config.server.host, obs.metrics_port)
        telemetry = ServerTelemetry(metrics=metrics, access_log=obs.access_log)
        running = await start_grpc(retriever, config.server, tls=config.tls, limits=config.limits,
                                   telemetry=telemetry, auth=config.auth, metrics=metrics)
        undo.pop_all()  # started: from here on ``running.stop`` owns them
    running.background, running.metrics, running.store = (consumer, follower, maintainer), metrics, store
    readiness = Readiness(retriever=retriever, store=store, consumer=consumer)
    running.readiness = asyncio.create_task(watch_readiness(readiness, running.health))
    log.info("embedding version %s", version or "(none)")
    return running


async def serve(config: RetrieverConfig, redis_url: str, *, stop: asyncio.Event | None = None) -> None:
    """Serves on ``redis_url`` until ``stop`` is set (default: until SIGTERM/SIGINT), then drains and closes."""
    running = await start_server(config, redis_url)
    try:
        stop = stop or _signal_event()
        print(f"retriever listening on {config.server.host}:{running.port}", flush=True)
        if running.metrics is not None:
            host = config.observability.metrics_host or config.server.host
            print(f"retriever metrics on http://{host}:{running.metrics.port}/metrics", flush=True)
        await stop.wait()
        log.info("stopping: draining calls for up to %.1fs", config.server.grace_s)
    finally:
        await running.stop(config.server.grace_s)


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


def main(argv: Sequence[str] | None = None) -> int:
    """The ``retriever-svc`` console script; returns the exit status."""
    enable_crash_stacks()  # a native crash leaves every thread's stack in the log
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = RetrieverConfig.from_args(argv)
        load_server_tls(config.tls)  # refuse bad TLS files before starting anything
        load_policy(config.auth)  # and a bad access policy, naming its entry
        config.redis.tls()
    except (ValueError, OSError, yaml.YAMLError) as exc:  # a bad flag, variable, file or TLS file: named
        print(f"retriever-svc: {exc}", file=sys.stderr)
        return 2
    shutdown_tracing = setup_process(config.observability, service="retriever")
    embedded: EmbeddedRedis | None = None
    # until serve() installs its handlers, a signal still unwinds through the finally below
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        check_artifacts(config)  # before Redis: a wrong path costs nothing
        check_service_ports(config.server.host, config.server.port, config.observability)
        redis_url = config.redis.url
        if redis_url is None:
            embedded = EmbeddedRedis(config.redis.embedded_dir()).start().supervise()
            redis_url = embedded.url
            log.info("embedded redis-server (pid %s) keeps its data in %s across restarts (--data-dir); other "
                     "processes of this user reach it with --redis-url %s (password read from %s, mode 0600)",
                     embedded.pid, embedded.data_dir, embedded.socket_url, embedded.credentials_path)
        asyncio.run(serve(config, redis_url))
        return 0
    except (RetrievalError, RedisServerError, RuntimeError) as exc:  # the ranker's start failures exit 2 too
        log.error("retriever-svc failed: %s", exc)
        return 2
    finally:
        shutdown_tracing()
        if embedded is not None:
            embedded.stop()


def check_artifacts(config: RetrieverConfig) -> None:
    """A missing ``--artifacts`` directory stops a retriever with its own (embedded) Redis, which
    nothing else could give embeddings: ``ManifestError`` naming the path and ``trainer fit``. With a
    shared ``--redis-url`` it is one warning: a replica, or a retriever started before the first
    release (``ROOT/current``), serves the embeddings Redis holds or will be given (``trainer
    publish``, ``trainer refit``)."""
    try:
        require_artifacts_dir(config.artifacts.dir)
    except ManifestError as exc:
        if config.redis.url is None:
            raise
        log.warning("%s; until then this replica serves the embeddings its Redis holds", exc)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
