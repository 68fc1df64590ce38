"""``infra/k8s``: every manifest against the Kubernetes JSON schemas (kubernetes-validate, strict: no
unknown fields; cert-manager's resources, which it has no schema for, against the fields of
cert-manager.io/v1 they use), and the wiring between them checked against the services' real CLIs and
contracts: mutual TLS and the access policy on, probes on the plaintext health port, NetworkPolicies."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from exitrank.access import AccessPolicy
from exitrank.v1 import ranker_pb2, retriever_pb2

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
# grpc probes are GA from 1.27; check an older supported release and the newest the package knows
VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
SERVICES = {"retriever": retriever_pb2.DESCRIPTOR.services_by_name["Retriever"].full_name,
            "ranker": ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name}


# the cert-manager.io/v1 fields these manifests may use (cert-manager's CRDs: Issuer, Certificate)
CERT_MANAGER = {
    "Issuer": {"selfSigned": dict, "ca": dict},
    "Certificate": {"isCA": bool, "commonName": str, "secretName": str, "duration": str, "renewBefore": str,
                    "dnsNames": list, "usages": list, "privateKey": dict, "issuerRef": dict},
}
USAGES = {"server auth", "client auth", "digital signature", "key encipherment"}


def _check_cert_manager(doc: dict) -> None:
    """Raises ValueError naming the field where ``doc`` strays from cert-manager.io/v1's schema."""
    fields = CERT_MANAGER.get(doc["kind"])
    if doc["apiVersion"] != "cert-manager.io/v1" or fields is None:
        raise ValueError(f"{doc['apiVersion']} {doc['kind']}: not a cert-manager.io/v1 Issuer or Certificate")
    spec = doc["spec"]
    for key, value in spec.items():
        if key not in fields or not isinstance(value, fields[key]):
            raise ValueError(f"{doc['kind']} {doc['metadata']['name']}: spec.{key} unknown or of the wrong type")
    if doc["kind"] == "Issuer" and len(spec) != 1:
        raise ValueError(f"Issuer {doc['metadata']['name']}: exactly one of selfSigned, ca")
    if doc["kind"] == "Certificate":
        if "secretName" not in spec or set(spec["issuerRef"]) - {"name", "kind", "group"}:
            raise ValueError(f"Certificate {doc['metadata']['name']}: secretName and issuerRef{{name, kind, group}}")
        if not set(spec.get("usages", [])) <= USAGES or set(spec.get("privateKey", {})) - {
                "algorithm", "size", "rotationPolicy", "encoding"}:
            raise ValueError(f"Certificate {doc['metadata']['name']}: unknown usages or privateKey fields")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _resources() -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, of everything the base kustomization applies."""
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return {(d["kind"], d["metadata"]["name"]): d for name in listed for d in _docs(K8S / name)}


def _container(kind: str, name: str) -> dict:
    spec = _resources()[(kind, name)]["spec"]
    if kind == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_validates_against_the_kubernetes_schema(path, version):
    docs = _docs(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        if doc["apiVersion"].startswith("cert-manager.io/"):
            _check_cert_manager(doc)
        else:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the path
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "exitrank"


def test_the_validator_catches_mistakes():
    service = _docs(K8S / "retriever.yaml")[1]
    broken = yaml.safe_load(yaml.safe_dump(service))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be int
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {"grpcc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    certificate = next(d for d in _docs(K8S / "certificates.yaml") if d["kind"] == "Certificate")
    for key, value in (("dnsName", ["x"]), ("usages", ["server-auth"]), ("isCA", "yes")):
        wrong = yaml.safe_load(yaml.safe_dump(certificate))
        wrong["spec"][key] = value
        with pytest.raises(ValueError):
            _check_cert_manager(wrong)


def test_kustomizations_list_every_manifest_and_patch_real_resources():
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    top_level = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(base["resources"]) == top_level  # the Secret stays out of git on purpose
    overlay = yaml.safe_load((K8S / "external-redis-cluster" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    resources = _resources()
    for entry in overlay["patches"]:
        patch = yaml.safe_load(entry["patch"])
        assert (patch["kind"], patch["metadata"]["name"]) in resources, patch["metadata"]
        assert patch["metadata"]["namespace"] == base["namespace"]


def _flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_deployments_probe_grpc_health_of_their_service(name):
    resources = _resources()
    container = _container("Deployment", name)
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    (health,) = [p["containerPort"] for p in container["ports"] if p["name"] == "health"]
    # kubelet's gRPC probes speak plaintext only: they ask the health port, the service port is mutual TLS
    assert container["readinessProbe"]["grpc"] == {"port": health, "service": SERVICES[name]}
    assert container["livenessProbe"]["grpc"] == {"port": health}
    assert container["startupProbe"]["grpc"]["port"] == health
    assert _flag(container["args"], "--port") == str(port) and _flag(container["args"], "--health-port") == str(health)
    service = resources[("Service", name)]
    assert service["spec"]["selector"] == resources[("Deployment", name)]["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == port and service["spec"]["ports"][0]["targetPort"] == "grpc"
    grace = resources[("Deployment", name)]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 20  # longer than the services' drain time in the ConfigMaps


def test_ranker_runs_on_gpu_nodes_with_its_configmap(check_ranker_argv):
    resources = _resources()
    pod = resources[("Deployment", "ranker")]["spec"]["template"]["spec"]
    container = _container("Deployment", "ranker")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    settings = resources[("ConfigMap", "exitrank-ranker")]["data"]
    assert container["envFrom"] == [{"configMapRef": {"name": "exitrank-ranker"}}]
    config = check_ranker_argv(container["command"][1:] + container["args"], settings)  # unknown keys raise
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(container["resources"]["requests"]["nvidia.com/gpu"]) == config.model.tensor_parallel
    assert config.model.device == "cuda" and config.server.port == 50052
    host, port = config.retriever.target.split(":")
    assert (host, int(port)) == ("retriever", resources[("Service", "retriever")]["spec"]["ports"][0]["port"])
    assert container["image"] == "exitrank:cuda"


def _environment(container: dict, resources: dict, expand, **fields: str) -> dict[str, str]:
    """The environment the kubelet gives ``container``: envFrom ConfigMaps, then ``env`` in order, each
    ``$(VAR)`` expanded from the variables before it; a Secret key reads as ``secret-<key>``."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(resources[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            assert ref["secretKeyRef"] == {"name": "exitrank-redis", "key": "password"}
            env[var["name"]] = f"secret-{ref['secretKeyRef']['key']}"
        elif "fieldRef" in ref:
            env[var["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = expand(var["value"], env)
    return env


def test_retriever_args_and_redis_url_reach_the_real_cli(check_retriever_argv, expand):
    resources = _resources()
    container = _container("Deployment", "retriever")
    env = _environment(container, resources, expand, **{"metadata.name": "retriever-7d9f-abc"})
    assert env["EXITRANK_REDIS_URL"] == "redis://:secret-password@redis:6379/0"
    redis_service = resources[("Service", "redis")]["spec"]
    assert redis_service["ports"][0]["port"] == 6379 and resources[("StatefulSet", "redis")]
    argv = [expand(a, env) for a in container["args"]]
    config = check_retriever_argv(argv, {"EXITRANK_REDIS_URL": env["EXITRANK_REDIS_URL"]})
    assert config.redis.url == env["EXITRANK_REDIS_URL"] and config.redis.consumer == "retriever-7d9f-abc"
    assert config.server.port == 50051 and config.server.host == "0.0.0.0"
    assert config.server.grace_s < resources[("Deployment", "retriever")]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(config.artifacts.dir.parent) in mounts and config.artifacts.dir.name == "current"  # the release link


def test_external_redis_cluster_overlay_gives_a_cluster_url(expand):
    from retriever_svc.redis_io import is_cluster_url

    overlay = yaml.safe_load((K8S / "external-redis-cluster" / "kustomization.yaml").read_text())
    (values,) = [yaml.safe_load(p["patch"])["data"] for p in overlay["patches"] if "ConfigMap" in p["patch"]]
    env = _container("Deployment", "retriever")["env"]
    template = next(v["value"] for v in env if v["name"] == "EXITRANK_REDIS_URL")
    url = expand(template, {**values, "REDIS_PASSWORD": "pw"})
    assert is_cluster_url(url) and url.startswith("redis+cluster://:pw@")
    assert not is_cluster_url(expand(template, {**_resources()[("ConfigMap", "exitrank-redis")]["data"],
                                                "REDIS_PASSWORD": "pw"}))


def test_refit_cronjob_runs_the_trainer_with_the_redis_secret(console_scripts, trainer_commands, expand):
    resources = _resources()
    cron = resources[("CronJob", "refit")]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"  # two refits never publish over each other
    container = _container("CronJob", "refit")
    assert container["command"] == ["trainer"] and "trainer" in console_scripts
    assert container["args"][:1] == ["refit"] and "--once" in container["args"]
    env = _environment(container, resources, expand)
    assert env["EXITRANK_REDIS_URL"] == "redis://:secret-password@redis:6379/0"
    args = trainer_commands(env)["refit"].parse_args(container["args"][1:])  # the URL from the secret, not argv
    assert args.redis_url == env["EXITRANK_REDIS_URL"] and args.once
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["artifacts"]["mountPath"] == str(args.artifacts) and not mounts["artifacts"].get("readOnly", False)
    for kind, name in (("Deployment", "ranker"), ("Deployment", "retriever")):  # they serve what it publishes
        served = _container(kind, name)["args"]
        assert served[served.index("--artifacts") + 1] == f"{args.artifacts}/current"


def test_secret_example_defines_the_key_every_pod_reads():
    (secret,) = _docs(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "exitrank-redis"
    assert set(secret["stringData"]) == {"password"}
    redis = _container("StatefulSet", "redis")
    assert "$(REDIS_PASSWORD)" in redis["args"] and redis["env"][0]["name"] == "REDIS_PASSWORD"


def _mounts(pod: dict, container: dict) -> dict[str, dict]:
    """mountPath -> the pod volume mounted there."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def _source(mounts: dict[str, dict], path: str) -> tuple[str, str]:
    """(kind, name) of the Secret or ConfigMap whose volume holds ``path``, and the file's key."""
    directory, _, key = path.rpartition("/")
    volume = mounts[directory]
    if "secret" in volume:
        return f"Secret {volume['secret']['secretName']}", key
    return f"ConfigMap {volume['configMap']['name']}", key


def _certificates() -> dict[str, dict]:
    """secretName -> Certificate spec."""
    return {d["spec"]["secretName"]: d["spec"] for d in _docs(K8S / "certificates.yaml") if d["kind"] == "Certificate"}


def test_services_serve_mutual_tls_under_the_access_policy(tmp_path, check_ranker_argv, check_retriever_argv,
                                                           expand):
    resources, certificates = _resources(), _certificates()
    policy_text = resources[("ConfigMap", "exitrank-access-policy")]["data"]["policy.yaml"]
    assert policy_text == (K8S.parent / "access-policy.yaml").read_text()  # compose reads the same policy
    (tmp_path / "policy.yaml").write_text(policy_text)
    policy = AccessPolicy.load(tmp_path / "policy.yaml")  # every RPC name real, every identity recognisable
    configs = {}
    for name in ("retriever", "ranker"):
        pod = resources[("Deployment", name)]["spec"]["template"]["spec"]
        container = _container("Deployment", name)
        if name == "retriever":
            env = _environment(container, resources, expand, **{"metadata.name": "retriever-0"})
            config = configs[name] = check_retriever_argv([expand(a, env) for a in container["args"]],
                                                          {"EXITRANK_REDIS_URL": env["EXITRANK_REDIS_URL"]})
        else:
            config = configs[name] = check_ranker_argv(container["args"], {})
        mounts = _mounts(pod, container)
        secret = _source(mounts, str(config.tls.cert))[0].removeprefix("Secret ")
        assert _source(mounts, str(config.tls.cert)) == (f"Secret {secret}", "tls.crt")
        assert _source(mounts, str(config.tls.key)) == (f"Secret {secret}", "tls.key")
        assert _source(mounts, str(config.tls.client_ca)) == (f"Secret {secret}", "ca.crt")  # mutual TLS
        assert _source(mounts, str(config.auth.policy)) == ("ConfigMap exitrank-access-policy", "policy.yaml")
        assert name in certificates[secret]["dnsNames"] and "server auth" in certificates[secret]["usages"]
        assert config.server.host == "0.0.0.0"
    ranker, retriever_cert = configs["ranker"], certificates["exitrank-retriever-tls"]
    own = _source(_mounts(resources[("Deployment", "ranker")]["spec"]["template"]["spec"], _container("Deployment", "ranker")),
                  str(ranker.retriever.tls_cert))[0].removeprefix("Secret ")
    assert ranker.retriever.tls_ca == ranker.tls.client_ca and ranker.retriever.tls_key.name == "tls.key"
    assert "client auth" in certificates[own]["usages"]
    assert ranker.retriever.target.split(":")[0] in retriever_cert["dnsNames"]  # the name the ranker dials
    # every identity is a certificate cert-manager issues, and the ranker's may call what it needs
    issued = {n: spec for spec in certificates.values() for n in spec.get("dnsNames", [])}
    for identity in policy.identities:
        assert identity.certificate_names and all("client auth" in issued[n]["usages"]
                                                   for n in identity.certificate_names), identity.name
    ranker_identity = policy.by_certificate(certificates[own]["dnsNames"])
    assert ranker_identity.name == "ranker" and all(ranker_identity.may_call(f"/{SERVICES['retriever']}/{m}")
                                                    for m in ("GetContext", "GetItems"))
    assert not ranker_identity.may_call(f"/{SERVICES['retriever']}/UpsertItems")
    feed = policy.by_certificate(certificates["exitrank-feed-server-tls"]["dnsNames"])
    assert feed.may_call(f"/{SERVICES['ranker']}/Rank") and not feed.may_call(f"/{SERVICES['retriever']}/Ingest")


def _ingress_peers(policy: dict, port: str) -> list[dict]:
    """The ``from`` peers of the rules of ``policy`` that admit ``port`` ([{}] for anyone)."""
    return [peer for rule in policy["spec"].get("ingress", []) for peer in rule.get("from", [{}])
            if any(p["port"] == port for p in rule.get("ports", []))]


def test_network_policies_deny_by_default_and_admit_only_the_callers():
    resources = _resources()
    deny = resources[("NetworkPolicy", "default-deny-ingress")]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}  # no rule: nothing admitted
    for name in ("retriever", "ranker", "redis"):
        policy = resources[("NetworkPolicy", name)]
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
    labels = lambda peer: peer.get("podSelector", {}).get("matchLabels")  # noqa: E731
    retriever = _ingress_peers(resources[("NetworkPolicy", "retriever")], "grpc")
    assert [labels(p) for p in retriever] == [{"app.kubernetes.io/name": "ranker"}, {"exitrank.io/client": "ingest"}]
    ranker = _ingress_peers(resources[("NetworkPolicy", "ranker")], "grpc")
    assert [labels(p) for p in ranker] == [{"exitrank.io/client": "feed-server"}]
    redis = _ingress_peers(resources[("NetworkPolicy", "redis")], "redis")
    assert [labels(p) for p in redis] == [{"app.kubernetes.io/name": "retriever"}, {"app.kubernetes.io/name": "refit"}]
    for name in ("retriever", "ranker"):  # the kubelet's probes reach the health port, which serves only health
        assert _ingress_peers(resources[("NetworkPolicy", name)], "health") == [{}]
        named = {p["name"] for p in _container("Deployment", name)["ports"]}
        assert {"grpc", "health"} <= named  # the policies' named ports exist
    assert "redis" in {p["name"] for p in _container("StatefulSet", "redis")["ports"]}
