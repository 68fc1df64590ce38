"""``ranker-svc``: wiring and lifecycle of the ranker gRPC server (config -> core -> servicer -> server).

The server is where the model runtime is chosen (:func:`build_engine`: ``torch``, ``deepspeed`` or
``onnx`` from ``model.engine``); the core only sees the ``ranker_svc.engine.Engine`` protocol.

    ranker-svc serve --port 50052 --retriever 127.0.0.1:50051 --artifacts artifacts
    ranker-svc serve --port 0 --retriever 127.0.0.1:50051 --artifacts artifacts --dtype float32 \
        --config ranker.yaml                     # YAML sections as in ranker_svc/config.py
    ranker-svc serve ... --engine onnx           # or deepspeed (--tensor-parallel N under `deepspeed --num_gpus N`)
    ranker-svc serve ... --tls-cert s.crt --tls-key s.key --tls-client-ca ca.crt \
        --retriever-tls-ca ca.crt --retriever-tls-cert c.crt --retriever-tls-key c.key --rate-limit 500 \
        --auth-policy policy.yaml --health-port 8081   # who may call what (exitrank.access); probes in plaintext
    EXITRANK_RANKER_BATCHING_MAX_WAIT_MS=5 ranker-svc serve ...   # env overrides (file < env < flags)
    ranker-svc serve ... --metrics-port 9452 --log-format json --tracing otlp   # exitrank.observability

Prints ``ranker listening on HOST:PORT`` once serving (the bound port when ``--port 0``), then
``ranker metrics on http://HOST:PORT/metrics`` when metrics are on. A model trained with
collaborative soft tokens reads the vectors of one LightGCN version: when the retriever cannot give
that version (it serves other embeddings), health is NOT_SERVING with the reason logged, and Rank
fails FAILED_PRECONDITION with the same one message; checked at start and every ``PIN_CHECK_S``.
SIGTERM or SIGINT: health turns NOT_SERVING, in-flight calls get ``server.grace_s`` to finish, then
it exits 0.

A new artifact is served without a restart: ``--artifacts`` may be the symlink ``ROOT/current`` that
``exitrank.artifacts.publish_release`` swaps (or a directory whose manifest changes); every
``--reload-interval-s`` seconds (default 2, 0: off) it is checked, and a new release is verified
and loaded off the serving path, then swapped in between requests (``ranker_svc.reload``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from exitrank.artifacts import MANIFEST, require_artifacts_dir, verify_manifest
from exitrank.observability import config as observability_config
from exitrank.observability import enable_crash_stacks, setup_process
from exitrank.observability.interceptors import ServerTelemetry, with_telemetry
from exitrank.observability.metrics import RankerMetrics
from exitrank.observability.settings import log_settings
from exitrank.ports import check_service_ports
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.artifact import LoadedRanker, load_ranker
from exitrank.access import load_policy
from exitrank.grpc_security import ServerGuard, bind, drain_and_stop, find_guard, server_kwargs, start_health_port
from exitrank.security import load_client_tls, load_server_tls
from ranker_svc.config import DTYPES, ENGINES, RankerConfig, add_security_flags, with_security_flags
from ranker_svc.engine import Engine, TorchEngine, deepspeed_engine, serving_device
from ranker_svc.errors import RankerError
from ranker_svc.model import resolve_dtype
from ranker_svc.ranker import ContextSource, Ranker
from ranker_svc.reload import Release, ReleaseWatcher, ReloadingRanker, read_release
from ranker_svc.retriever_client import RetrieverClient
from ranker_svc.servicer import RankerServicer

log = logging.getLogger("ranker_svc")
SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name
PIN_CHECK_S = 2.0  # how often a soft-token model's embedding version is checked against the retriever


def parse_args(argv: list[str] | None = None) -> RankerConfig:
    parser = argparse.ArgumentParser(prog="ranker-svc", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve exitrank.v1.Ranker")
    serve.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    serve.add_argument("--retriever", required=True, help="retriever HOST:PORT")
    serve.add_argument("--artifacts", type=Path, required=True, help="artifacts dir holding ranker/")
    serve.add_argument("--engine", choices=ENGINES, help="model runtime (default torch)")
    serve.add_argument("--tensor-parallel", type=int, help="GPUs per model for --engine deepspeed")
    serve.add_argument("--num-threads", type=int, help="intra-op threads; 0: the library default")
    serve.add_argument("--max-wait-ms", type=float, help="how long a request waits to share a batch")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--dtype", choices=DTYPES, help="default auto; serve in the calibration dtype")
    serve.add_argument("--config", type=Path, help="YAML file with config sections (env and flags win)")
    serve.add_argument("--reload-interval-s", type=float,
                       help="seconds between checks for a newly published artifact (0: off; default 2)")
    add_security_flags(serve)
    observability_config.add_flags(serve, service="ranker")
    args = parser.parse_args(argv)
    base = RankerConfig.from_dict(yaml.safe_load(args.config.read_text()) or {}) if args.config else RankerConfig()
    base = with_security_flags(base.with_env(), args)
    model = {k: v for k, v in (("engine", args.engine), ("dtype", args.dtype), ("num_threads", args.num_threads),
                               ("tensor_parallel", args.tensor_parallel),
                               ("reload_interval_s", args.reload_interval_s)) if v is not None}
    batching = {} if args.max_wait_ms is None else {"max_wait_ms": args.max_wait_ms}
    return (
        base.with_section("model", artifacts_dir=args.artifacts, **model)
        .with_section("batching", **batching)
        .with_section("server", host=args.host, port=args.port)
        .with_section("retriever", target=args.retriever)
        .with_section("observability", **observability_config.overrides(args))
    )


def build_engine(name: str, loaded: LoadedRanker, *, tensor_parallel: int = 1, device: str = "auto",
                 onnx_dir: Path | None = None, num_threads: int = 0) -> Engine:
    """The engine ``name`` (one of :data:`~ranker_svc.config.ENGINES`) over a loaded artifact.

    Raises:
        ValueError: an unknown engine name.
    """
    if name == "torch":
        return TorchEngine(model=loaded.model.to(serving_device(device)))
    if name == "deepspeed":
        return deepspeed_engine(loaded, tensor_parallel=tensor_parallel, device=device)
    if name == "onnx":
        from ranker_svc.onnx_engine import OnnxEngine  # noqa: PLC0415 - optional (onnxruntime)

        return OnnxEngine.from_loaded(loaded, export_dir=onnx_dir, num_threads=num_threads)
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")


def build_ranker(config: RankerConfig, *, context_source: ContextSource | None = None) -> tuple[Ranker, RetrieverClient | None]:
    """The core with its artifact and context source, the policy overridden by ``config.exits``.

    ``context_source`` None: a :class:`RetrieverClient` to ``retriever.target`` (none when empty).
    An ``artifacts_dir/manifest.json`` is verified first: a ``ranker/`` file that is missing or does
    not match its hash raises ``ManifestError`` naming it (the service exits 2).
    """
    m = config.model
    if (Path(m.artifacts_dir) / MANIFEST).is_file():
        verify_manifest(Path(m.artifacts_dir), subdir="ranker")
    if m.num_threads:
        torch.set_num_threads(m.num_threads)
    dtype = resolve_dtype(m.dtype)
    loaded = load_ranker(m.ranker_dir, dtype=dtype)
    calibrated = loaded.meta.get("policy_dtype")
    if calibrated and calibrated != str(dtype).removeprefix("torch."):
        log.warning("the exit policy was calibrated in %s but the model serves in %s: exits may differ from "
                    "calibration (set model.dtype %s)", calibrated, dtype, calibrated)
    overrides = config.exits.overrides()
    if overrides:
        loaded.policy = dataclasses.replace(loaded.policy, **overrides)
    engine = build_engine(m.engine, loaded, tensor_parallel=m.tensor_parallel, device=m.device,
                          onnx_dir=m.onnx_dir, num_threads=m.num_threads)
    client = None
    if context_source is None and config.retriever.target:
        client = context_source = RetrieverClient(config=config.retriever)
    ranker = Ranker(loaded=loaded, context_source=context_source, batching=config.batching, engine=engine)
    return ranker, client


@dataclass
class RankerServer:
    """A started server: the bound port, its health servicer, and what to close on stop."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    ranker: ReloadingRanker
    client: RetrieverClient | None
    metrics: RankerMetrics | None = None
    watcher: ReleaseWatcher | None = None
    guard: ServerGuard | None = None  # refuses new calls with UNAVAILABLE while draining
    pin_check: asyncio.Task | None = None  # watch_embedding_pin
    health_server: grpc.aio.Server | None = None  # server.health_port: plaintext, health checks only
    health_port: int | None = None  # its bound port

    async def stop(self, grace: float | None) -> None:
        """Health NOT_SERVING, drain in-flight calls for ``grace`` seconds, close the retriever channel."""
        if self.pin_check is not None:
            self.pin_check.cancel()
        if self.watcher is not None:
            await self.watcher.stop()
        await self.health.enter_graceful_shutdown()
        await drain_and_stop(self.server, self.guard, grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.client is not None:
            await self.client.close()
        if self.metrics is not None:
            self.metrics.close()


async def start_server(config: RankerConfig, *, context_source: ContextSource | None = None) -> RankerServer:
    """Builds config -> core -> servicer, adds health and reflection, binds and starts.

    The ports (``PortInUse``), the artifacts directory (``ManifestError`` naming ``trainer fit``) and
    the TLS files (``TLSConfigError``) are checked before the model loads; health and reflection
    share the port, so they are served over TLS too; ``config.limits`` apply to every call.
    Every call gets a request id, metrics (``observability.metrics_port`` set) and a trace span
    (tracing on); the effective config is logged first.
    """
    obs = config.observability
    log_settings(log, config, service="ranker")
    pem = load_server_tls(config.tls)  # the settings' files first, as the retriever does
    load_client_tls(config.retriever.client_tls())
    access = load_policy(config.auth)  # ConfigError naming the entry, before the model loads
    check_service_ports(config.server.host, config.server.port, obs)  # before the model loads
    require_artifacts_dir(config.model.artifacts_dir)
    release = read_release(config.model.artifacts_dir)  # a symlink resolved once: start-up reads one release
    first, client = build_ranker(config.with_section("model", artifacts_dir=release.path), context_source=context_source)
    ranker = ReloadingRanker(first)  # the servicer's core; new releases are swapped in behind it
    metrics = None
    if obs.metrics_port is not None:
        metrics = RankerMetrics(num_layers=ranker.num_layers, pending=lambda: ranker.batcher.pending)
        ranker.attach_observer(metrics)
    telemetry = ServerTelemetry(metrics=metrics, access_log=obs.access_log)
    kwargs = with_telemetry(server_kwargs(config.limits, mutual=config.tls.mutual, access=access), telemetry)
    guard = find_guard(kwargs["interceptors"])
    if metrics is not None and guard is not None:
        guard.on_refusal = metrics.count_refusal
    server = grpc.aio.server(**kwargs)
    ranker_pb2_grpc.add_RankerServicer_to_server(RankerServicer(core=ranker), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = bind(server, f"{config.server.host}:{config.server.port}", pem)
    if metrics is not None:
        metrics.serve(obs.metrics_host or config.server.host, obs.metrics_port)
    health_server = health_port = None
    if config.server.health_port is not None:  # before the main port opens: a busy port stops the start here
        health_server, health_port = await start_health_port(health_servicer, config.server.host,
                                                             config.server.health_port)
        log.info("health checks (only) in plaintext on %s:%d", config.server.host, health_port)
    await server.start()
    serving = await check_embedding_pin(ranker, client, health_servicer, serving=None)
    scorer = first.scorer
    log.info("model %s, %d layers, exit layers %s, policy %s, engine %s, shared context %s",
             scorer.model_version, scorer.num_layers, list(scorer.model.exit_layers), scorer.policy,
             scorer.engine.name, scorer.shared_context)
    watcher = watch_releases(config, ranker, release, client or context_source)
    pin_check = None if client is None else asyncio.create_task(
        watch_embedding_pin(ranker, client, health_servicer, serving=serving))
    return RankerServer(server=server, port=port, health=health_servicer, ranker=ranker, client=client, watcher=watcher,
                        metrics=metrics, guard=guard, pin_check=pin_check, health_server=health_server,
                        health_port=health_port)


async def check_embedding_pin(core: ReloadingRanker, client: RetrieverClient | None,
                              health_servicer: health.aio.HealthServicer, *, serving: bool | None) -> bool:
    """Health SERVING unless the model reads soft tokens of an embedding version the retriever cannot
    give (then NOT_SERVING, the reason logged once); returns whether serving. A retriever that
    cannot be asked counts as no mismatch: ranking goes on without it."""
    version = core.pinned_version
    problem = None if client is None or version is None else await client.pinned_version_problem(version)
    if problem is not None and serving is not False:
        log.error("health NOT_SERVING: %s", problem)
    elif problem is None and serving is False:
        log.info("health SERVING: the retriever serves embedding version %s again", version)
    if serving != (problem is None):
        status = health_pb2.HealthCheckResponse.SERVING if problem is None else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)
    return problem is None


async def watch_embedding_pin(core: ReloadingRanker, client: RetrieverClient,
                              health_servicer: health.aio.HealthServicer, *, serving: bool,
                              interval_s: float = PIN_CHECK_S) -> None:
    """:func:`check_embedding_pin` every ``interval_s``: a retriever that starts serving the model's
    version (or a model retrained on the retriever's) turns health SERVING again, and back."""
    while True:
        await asyncio.sleep(interval_s)
        serving = await check_embedding_pin(core, client, health_servicer, serving=serving)


def watch_releases(config: RankerConfig, core: ReloadingRanker, release: Release, source: ContextSource | None
                   ) -> ReleaseWatcher | None:
    """Starts polling ``model.artifacts_dir`` for new releases (``ranker_svc.reload``); None when
    ``model.reload_interval_s`` is 0. New models load like the first, with the same context source."""
    if not config.model.reload_interval_s:
        return None

    def build(path: Path) -> Ranker:
        return build_ranker(config.with_section("model", artifacts_dir=path), context_source=source)[0]

    watcher = ReleaseWatcher(core=core, artifacts_dir=config.model.artifacts_dir, release=release, build=build,
                             interval_s=config.model.reload_interval_s)
    watcher.start()
    return watcher


async def serve(config: RankerConfig, *, stop: asyncio.Event | None = None) -> None:
    """Serves until ``stop`` is set (default: until SIGTERM/SIGINT), then drains and closes."""
    running = await start_server(config)
    print(f"ranker listening on {config.server.host}:{running.port}", flush=True)
    if running.metrics is not None:
        host = config.observability.metrics_host or config.server.host
        print(f"ranker metrics on http://{host}:{running.metrics.port}/metrics", flush=True)
    stop = stop or _signal_event()
    await stop.wait()
    await running.stop(config.server.grace_s)


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


def main(argv: list[str] | None = None) -> int:
    enable_crash_stacks()  # a native crash leaves every thread's stack in the log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shutdown_tracing = None
    try:
        config = parse_args(argv)
        shutdown_tracing = setup_process(config.observability, service="ranker")
        asyncio.run(serve(config))
    except (RankerError, ValueError, OSError, RuntimeError, yaml.YAMLError) as exc:
        print(f"ranker-svc: {exc}", file=sys.stderr)
        return 2
    finally:
        if shutdown_tracing is not None:
            shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
