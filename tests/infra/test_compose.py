"""``infra/compose.yaml`` and the Dockerfiles: they parse, and every command, port and health check they
name is real (console scripts from pyproject.toml, flags the services' CLIs accept, matching ports).
Docker itself is not run here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
ROOT = INFRA.parent
_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _compose() -> dict:
    """compose.yaml with ``${VAR:-default}`` replaced by its default, as compose does without the variable."""
    return yaml.safe_load(_DEFAULT.sub(lambda m: m.group(2), (INFRA / "compose.yaml").read_text()))


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_compose_runs_redis_retriever_ranker_and_refit():
    services = _compose()["services"]
    assert {"redis", "retriever", "ranker", "ranker-cuda", "refit"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    assert services["refit"]["profiles"] == ["refit"] and services["ranker-cuda"]["profiles"] == ["gpu"]
    gpu = services["ranker-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]


def test_compose_commands_parse_with_the_real_clis(console_scripts, check_retriever_argv, check_ranker_argv,
                                                   trainer_commands):
    services = _compose()["services"]
    retriever = services["retriever"]["command"]
    assert retriever[0] in console_scripts
    config = check_retriever_argv(retriever[1:])
    assert config.redis.url == "redis://:change-me@redis:6379/0"
    assert f"{config.server.port}:{config.server.port}" in services["retriever"]["ports"]
    redis_command = services["redis"]["command"]
    assert _flag(redis_command, "--requirepass") == "change-me" and _flag(redis_command, "--appendonly") == "yes"
    for name in ("ranker", "ranker-cuda"):
        command, env = services[name]["command"], services[name].get("environment", {})
        assert command[0] in console_scripts
        ranker = check_ranker_argv(command[1:], env)
        assert ranker.retriever.target == f"retriever:{config.server.port}"
        assert any(p.endswith(f":{ranker.server.port}") for p in services[name]["ports"])
    refit = services["refit"]["command"]
    assert refit[:2] == ["trainer", "refit"] and "--once" in refit and _flag(refit, "--artifacts") == "/artifacts"
    assert "../artifacts:/artifacts" in services["refit"]["volumes"]  # writable: it publishes releases there
    for name in ("retriever", "ranker", "ranker-cuda"):  # the services read the release the refit publishes
        assert _flag(services[name]["command"], "--artifacts") == "/artifacts/current"
    assert services["refit"]["environment"]["EXITRANK_REDIS_URL"] == config.redis.url
    args = trainer_commands(services["refit"]["environment"])["refit"].parse_args(refit[2:])
    assert args.redis_url == config.redis.url and str(args.artifacts) == "/artifacts" and args.once


@pytest.mark.parametrize("name, service", [("retriever", "exitrank.v1.Retriever"), ("ranker", "exitrank.v1.Ranker"),
                                           ("ranker-cuda", "exitrank.v1.Ranker")])
def test_compose_health_checks_probe_the_service_port(name, service):
    from exitrank.client.__main__ import build_parser

    spec = _compose()["services"][name]
    test = spec["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "exitrank.client"]
    args = build_parser().parse_args(test[4:])
    assert args.command == "health" and args.service == service
    # the plaintext port that answers health checks only: the service's own port is mutual TLS
    assert args.target == f"127.0.0.1:{_flag(spec['command'], '--health-port')}"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_cmd_names_a_console_script_and_copies_real_paths(dockerfile, console_scripts, check_retriever_argv,
                                                                     check_ranker_argv):
    steps = _instructions(INFRA / dockerfile)
    (cmd,) = [json.loads(args) for op, args in steps if op == "CMD"]
    assert cmd[0] in console_scripts and not [op for op, _ in steps if op == "ENTRYPOINT"]
    config = (check_retriever_argv if cmd[0] == "retriever-svc" else check_ranker_argv)(cmd[1:], {})
    exposed = {int(p) for op, args in steps if op == "EXPOSE" for p in args.split()}
    assert config.server.port in exposed and config.server.host == "0.0.0.0"
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile} copies missing {source}"
    assert ("USER", "10001") in steps  # the services never run as root
    ignore = (INFRA / f"{dockerfile}.dockerignore").read_text().split()
    assert {".venv", ".git", "artifacts", "data", "runs"} <= set(ignore)


def test_cuda_image_builds_on_cuda_and_keeps_the_venv_path():
    steps = _instructions(INFRA / "Dockerfile.cuda")
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG")
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "ubuntu" in args["CUDA_IMAGE"]
    froms = [a for op, a in steps if op == "FROM"]
    assert froms == ["${CUDA_IMAGE} AS build", "${CUDA_IMAGE}"]
    copies = [a for op, a in steps if op == "COPY" and a.startswith("--from=build")]
    assert copies == ["--from=build /opt/venv /opt/venv", "--from=build /app /app"]
    assert any(op == "RUN" and "scripts/install.sh /opt/venv" in a for op, a in steps)
    assert not any("whl/cpu" in a for _, a in steps)  # the CPU-only torch index would drop CUDA


def test_compose_services_serve_mutual_tls_under_the_access_policy(tmp_path, check_retriever_argv,
                                                                   check_ranker_argv):
    from exitrank.access import AccessPolicy
    from tests.support.pki import issue_exitrank

    services = _compose()["services"]
    policy = AccessPolicy.load(INFRA / "access-policy.yaml")
    issued = {p.name for p in issue_exitrank(tmp_path)}  # what `python -m tests.support.pki infra/certs --exitrank` writes
    for name in ("retriever", "ranker", "ranker-cuda"):
        command = services[name]["command"]
        mounts = dict(v.split(":")[:2] for v in services[name]["volumes"])
        assert mounts["./certs"] == "/etc/exitrank/tls" and mounts["./access-policy.yaml"] == "/etc/exitrank/policy.yaml"
        config = (check_retriever_argv(command[1:]) if name == "retriever"
                  else check_ranker_argv(command[1:], services[name].get("environment", {})))
        assert config.tls.mutual and config.auth.policy.as_posix() == "/etc/exitrank/policy.yaml"
        files = [config.tls.cert, config.tls.key, config.tls.client_ca]
        if name != "retriever":
            files += [config.retriever.tls_ca, config.retriever.tls_cert, config.retriever.tls_key]
            assert config.retriever.tls_cert == config.tls.cert  # the ranker's own certificate, identity ranker
        assert all(f.parent.as_posix() == "/etc/exitrank/tls" and f.name in issued for f in files), files
    assert {"feed-server.crt", "ingest.crt"} <= issued and {i.name for i in policy.identities} == {
        "feed-server", "ingest", "ranker"}
