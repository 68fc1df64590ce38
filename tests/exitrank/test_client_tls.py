"""The client's ``credentials`` against a real ``retriever-svc`` serving mutual TLS with a per-client rate
limit (certificates from the dev CA, ``tests.support.pki``)."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from exitrank.client import Item, Overloaded, RetrieverClient, Unavailable
from tests.support.pki import DevCA


@pytest.fixture(scope="module")
def mtls_retriever(live_stack, spawn_service, tmp_path_factory):
    """(address, credentials of a trusted client, of a client without a certificate)."""
    root = tmp_path_factory.mktemp("mtls")
    ca = DevCA(root / "pki")
    server, client = ca.server(), ca.client(name="feed-server")
    address = spawn_service(
        "retriever-svc", "serve", "--port", "0", "--artifacts", str(live_stack.artifacts),
        "--data-dir", str(root / "data"),
        "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(ca.cert),
        "--rate-limit", "1", "--rate-burst", "3", ready="retriever listening on ")
    trusted = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes(),
                                           private_key=client.key.read_bytes(),
                                           certificate_chain=client.cert.read_bytes())
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
    return SimpleNamespace(address=address, trusted=trusted, anonymous=anonymous)


def test_mutual_tls_through_the_credentials_argument(mtls_retriever):
    with RetrieverClient(mtls_retriever.address, timeout=10, credentials=mtls_retriever.trusted) as retriever:
        assert retriever.upsert_items([Item("tls-item", "Sent over mutual TLS")]).accepted == 1
        found = retriever.get_items(["tls-item", "nope"])
        assert [i.title for i in found.items] == ["Sent over mutual TLS"] and found.missing_item_ids == ("nope",)
    for credentials in (None, mtls_retriever.anonymous):  # plaintext, and TLS without a client certificate
        with RetrieverClient(mtls_retriever.address, timeout=3, retries=1, credentials=credentials) as retriever:
            with pytest.raises(Unavailable):
                retriever.get_items(["sunny-river"])


def test_a_rate_limited_call_is_not_retried(mtls_retriever):
    with RetrieverClient(mtls_retriever.address, timeout=10, retries=5,
                         credentials=mtls_retriever.trusted) as retriever:
        with pytest.raises(Overloaded) as info:
            for _ in range(20):  # a burst of 3, then 1 per second
                retriever.get_items(["sunny-river"])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.attempts == 1
