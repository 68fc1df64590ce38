"""The access policy file (exitrank.access): what it resolves RPC names to, how it recognises callers,
and each mistake in it refused at start by name (never a token in the message)."""

from __future__ import annotations

import pytest

from exitrank.access import AccessPolicy, AuthConfig, load_policy, read_token
from exitrank.config_sources import ConfigError

TOKEN = "0123456789abcdef0123456789abcdef"


def _policy(tmp_path, text: str, tokens: dict[str, str] | None = None) -> AccessPolicy:
    for name, token in (tokens or {}).items():
        (tmp_path / name).write_text(token + "\n")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return AccessPolicy.load(path)


POLICY = """
identities:
  feed-server: {certificate_names: [feed.exitrank.svc], allow: [Rank, RankStream]}
  ingest: {token_files: [ingest.token], allow: [Ingest, exitrank.v1.Retriever/UpsertItems]}
  ranker: {certificate_names: [ranker.exitrank.svc, ranker], allow: ["exitrank.v1.Retriever/*"]}
  ops: {certificate_names: [ops], allow: [reflection, health]}
"""


def test_identities_map_to_exactly_the_rpcs_they_list(tmp_path):
    policy = _policy(tmp_path, POLICY, {"ingest.token": TOKEN})
    feed = policy.by_certificate(["something-else", "feed.exitrank.svc"])
    ingest = policy.by_token(TOKEN)
    ranker = policy.by_certificate(["ranker"])
    ops = policy.by_certificate(["ops"])
    assert (feed.name, ingest.name, ranker.name, ops.name) == ("feed-server", "ingest", "ranker", "ops")
    assert feed.may_call("/exitrank.v1.Ranker/Rank") and feed.may_call("/exitrank.v1.Ranker/RankStream")
    assert not feed.may_call("/exitrank.v1.Retriever/GetItems")
    assert ingest.may_call("/exitrank.v1.Retriever/Ingest") and ingest.may_call("/exitrank.v1.Retriever/UpsertItems")
    assert not ingest.may_call("/exitrank.v1.Retriever/GetContext")
    assert all(ranker.may_call(f"/exitrank.v1.Retriever/{m}") for m in ("GetContext", "GetItems", "NearestUsers"))
    assert not ranker.may_call("/exitrank.v1.Ranker/Rank")
    assert ops.may_call("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert ops.may_call("/grpc.health.v1.Health/Check") and not ops.may_call("/exitrank.v1.Ranker/Rank")
    # health is open unless the policy says otherwise; reflection is not
    assert policy.is_open("/grpc.health.v1.Health/Watch")
    assert not policy.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not policy.is_open("/exitrank.v1.Ranker/Rank")
    assert policy.by_certificate(["stranger"]) is None
    assert policy.by_token(TOKEN[:-1] + "0") is None and policy.by_token("") is None


def test_open_methods_are_configurable(tmp_path):
    closed = _policy(tmp_path, "open: []\nidentities: {a: {certificate_names: [a], allow: ['*']}}\n")
    assert not closed.is_open("/grpc.health.v1.Health/Check")
    assert closed.by_certificate(["a"]).may_call("/exitrank.v1.Retriever/Ingest")
    opened = _policy(tmp_path, "open: [health, reflection]\nidentities: {a: {certificate_names: [a]}}\n")
    assert opened.is_open("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not opened.by_certificate(["a"]).may_call("/exitrank.v1.Ranker/Rank")  # allow omitted: nothing


@pytest.mark.parametrize(("text", "field", "phrase"), [
    ("identities: {a: {certificate_names: [a], allow: [Rnak]}}", "identities.a.allow", "'Rnak' is not an RPC"),
    ("identities: {a: {certificate_names: [a], allow: [exitrank.v1.Feed/*]}}", "identities.a.allow", "names no service"),
    ("identities: {a: {allow: [Rank]}}", "identities.a", "nothing could identify it"),
    ("identities: {a: {certificate_names: [a], alow: [Rank]}}", "identities.a", "must be a mapping of"),
    ("identities: {a: {certificate_names: a, allow: [Rank]}}", "identities.a", "must be lists"),
    ("identities: {a: {certificate_names: [x]}, b: {certificate_names: [x]}}", "auth.policy", "two identities"),
    ("open: [Rnak]\nidentities: {}", "auth.policy open", "'Rnak'"),
    ("idents: {}", "auth.policy", "must be a mapping with `identities`"),
    ("identities: {a: {token_files: [short.token], allow: [Rank]}}", "token_files", "at least 16 characters"),
    ("identities: {a: {token_files: [missing.token], allow: [Rank]}}", "token_files", "cannot read the token file"),
    (": : :", "auth.policy", "cannot read the access policy"),
])
def test_mistakes_stop_the_start_naming_the_entry(tmp_path, text, field, phrase):
    with pytest.raises(ConfigError) as caught:
        _policy(tmp_path, text, {"short.token": "abc123"})
    assert field in caught.value.field and phrase in str(caught.value), str(caught.value)
    assert "abc123" not in str(caught.value)  # a token never reaches a message


def test_no_policy_is_none_and_tokens_are_one_word(tmp_path):
    assert load_policy(AuthConfig()) is None
    (tmp_path / "two").write_text("0123456789abcdef 0123456789abcdef")
    with pytest.raises(ConfigError, match="one word"):
        read_token(tmp_path / "two", "retriever.token_file")
    (tmp_path / "ok").write_text(f"  {TOKEN}\n")
    assert read_token(tmp_path / "ok", "retriever.token_file") == TOKEN
    assert load_policy(AuthConfig(policy=str(_write(tmp_path, POLICY.replace("ingest.token", "ok"))))) is not None


def _write(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path
