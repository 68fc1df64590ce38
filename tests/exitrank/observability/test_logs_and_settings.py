"""JSON/text log lines with the request id, the masked settings dump, and the observability config
as both services' CLIs build it."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from exitrank.observability.config import ObservabilityConfig
from exitrank.observability.context import outgoing_metadata, request_id_from, request_id_var, rpc_var
from exitrank.observability.logs import ContextFilter, JsonFormatter, TextFormatter
from exitrank.observability.settings import MASK, log_settings, mask_url, masked
from ranker_svc.config import RankerConfig
from ranker_svc.server import parse_args
from retriever_svc.config import RetrieverConfig


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(f"obs-test-{id(stream)}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def _in_call(request_id: str, fn) -> None:
    """Run ``fn`` as the server interceptor runs a handler: with the call's contextvars set."""
    def run() -> None:
        request_id_var.set(request_id)
        rpc_var.set("exitrank.v1.Ranker/Rank")
        fn()

    contextvars.copy_context().run(run)


def test_json_lines_carry_the_request_id_of_the_call():
    logger, stream = _logger(JsonFormatter())
    logger.info("outside any call")
    _in_call("req-1", lambda: logger.warning("slow %s", "retriever", extra={"status": "OK", "duration_ms": 1.5}))
    try:
        raise ValueError("boom")
    except ValueError:
        _in_call("req-2", lambda: logger.exception("failed"))
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(first) == {"time", "level", "logger", "message"} and first["message"] == "outside any call"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second == {**second, "level": "WARNING", "message": "slow retriever", "request_id": "req-1",
                      "rpc": "exitrank.v1.Ranker/Rank", "status": "OK", "duration_ms": 1.5}
    assert third["request_id"] == "req-2" and "ValueError: boom" in third["exception"]
    assert request_id_var.get() is None  # the call's context did not leak


def test_text_lines_append_the_request_id_and_extras():
    logger, stream = _logger(TextFormatter())
    _in_call("req-9", lambda: logger.info("done", extra={"config": {"a": 1}}))
    line = stream.getvalue().strip()
    assert " INFO obs-test-" in line and line.endswith('done request_id=req-9 config={"a": 1}')


def test_request_ids_from_metadata_and_to_outgoing_calls():
    assert request_id_from([("other", "x"), ("x-request-id", "abc-123")]) == "abc-123"
    for bad in ("", "has space", "x" * 129, "semi;colon"):
        made = request_id_from([("x-request-id", bad)])
        assert made != bad and len(made) == 32
    assert request_id_from(None) != request_id_from(None)
    assert outgoing_metadata() == ()
    out: list = []
    _in_call("req-out", lambda: out.append(outgoing_metadata()))
    assert out == [(("x-request-id", "req-out"),)]  # tracing off: no traceparent


def test_urls_and_secrets_are_masked():
    assert mask_url("redis://:hunter2@10.0.0.1:6379/0") == f"redis://:{MASK}@10.0.0.1:6379/0"
    assert mask_url("unix://:pw@/tmp/r/redis.sock?db=0") == f"unix://:{MASK}@/tmp/r/redis.sock?db=0"
    assert mask_url("rediss://user:pw@h:6380/0?ssl_ca_certs=/etc/ca.pem&password=pw2") == \
        f"rediss://user:{MASK}@h:6380/0?ssl_ca_certs=/etc/ca.pem&password={MASK}"
    assert mask_url("redis://user@h:6379") == "redis://user@h:6379"  # no password, nothing to hide
    data = {"api_token": "t0k", "client_secret": "s", "key_path": Path("/etc/tls/server.key"), "blob": b"\x00",
            "pem": "-----BEGIN PRIVATE KEY-----\nMIIE...", "threads": 4, "note": "plain"}
    assert masked(data) == {"api_token": MASK, "client_secret": MASK, "key_path": "/etc/tls/server.key",
                            "blob": MASK, "pem": MASK, "threads": 4, "note": "plain"}


def test_retriever_settings_are_logged_with_the_redis_password_masked(tmp_path, caplog):
    config = RetrieverConfig.from_args([
        "serve", "--port", "0", "--artifacts", str(tmp_path), "--redis-prefix", "p1",
        "--redis-url", "rediss+cluster://admin:s3cr3t-pw@10.0.0.5:7000/0", "--redis-tls-ca", "/etc/redis-ca.pem",
        "--tls-cert", "/etc/tls/server.crt", "--tls-key", "/etc/tls/server.key", "--metrics-port", "9451",
        "--log-format", "json", "--tracing", "otlp", "--access-log", "all"])
    with caplog.at_level(logging.INFO, logger="obs-settings"):
        settings = log_settings(logging.getLogger("obs-settings"), config, service="retriever")
    (record,) = caplog.records
    assert record.config == settings and record.getMessage() == "retriever effective config"
    assert "s3cr3t-pw" not in json.dumps(settings)
    assert settings["redis"]["url"] == f"rediss+cluster://admin:{MASK}@10.0.0.5:7000/0"
    assert settings["redis"]["prefix"] == "p1" and settings["redis"]["tls_ca"] == "/etc/redis-ca.pem"
    assert settings["tls"]["key"] == "/etc/tls/server.key"  # a key's path is fine to show
    assert settings["observability"] == {
        "metrics_port": 9451, "metrics_host": None, "log_format": "json", "log_level": "INFO", "access_log": "all",
        "tracing": "otlp", "tracing_file": None, "service_name": ""}
    assert settings["index"]["ef_search"] == 128 and settings["artifacts"]["dir"] == str(tmp_path)


def test_ranker_settings_cover_every_section(tmp_path):
    config = parse_args(["serve", "--port", "0", "--retriever", "h:1", "--artifacts", str(tmp_path),
                         "--metrics-port", "0", "--log-format", "json", "--tracing", "console",
                         "--tracing-file", str(tmp_path / "spans.jsonl"), "--log-level", "debug"])
    settings = masked(config)
    assert set(settings) == {f for f in RankerConfig.__dataclass_fields__}
    assert settings["observability"]["tracing_file"] == str(tmp_path / "spans.jsonl")
    assert settings["observability"]["log_level"] == "DEBUG" and settings["observability"]["metrics_port"] == 0
    assert settings["retriever"]["target"] == "h:1" and settings["model"]["artifacts_dir"] == str(tmp_path)
    json.dumps(settings)  # plain JSON values only


def test_observability_config_is_checked_and_read_from_env_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="observability.log_format"):
        ObservabilityConfig(log_format="xml")
    with pytest.raises(ValueError, match="observability.metrics_port"):
        ObservabilityConfig(metrics_port=70000)
    with pytest.raises(ValueError, match="observability.tracing"):
        ObservabilityConfig(tracing="jaeger")
    config = RankerConfig().with_env({"EXITRANK_RANKER_OBSERVABILITY_METRICS_PORT": "9452",
                                      "EXITRANK_RANKER_OBSERVABILITY_ACCESS_LOG": "off"})
    assert config.observability.metrics_port == 9452 and config.observability.access_log == "off"
    path = tmp_path / "ranker.yaml"
    path.write_text("observability: {log_format: json, tracing_file: spans.jsonl}\n")
    config = parse_args(["serve", "--port", "1", "--retriever", "h:1", "--artifacts", "a", "--config", str(path)])
    assert config.observability.log_format == "json" and config.observability.tracing_file == Path("spans.jsonl")
    assert config.observability.metrics_port is None  # metrics stay off unless asked for
    assert RetrieverConfig.from_args(["serve", "--port", "1", "--artifacts", "a"]).observability == ObservabilityConfig()


def test_core_modules_import_no_grpc_and_tracing_off_imports_no_opentelemetry():
    code = """
import sys
import ranker_svc.ranker, ranker_svc.batching, exitrank.observability, exitrank.observability.metrics
import exitrank.observability.context, exitrank.observability.logs
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'opentelemetry'))
assert not bad, bad
import retriever_svc.index, retriever_svc.store, retriever_svc.consumer  # redis-py imports opentelemetry itself
bad = sorted(m for m in sys.modules if m.split('.')[0] == 'grpc')
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
