"""A throw-away certificate authority for development and tests (needs ``cryptography``, dev extra).

    python -m tests.support.pki certs/            # ca, server (localhost, 127.0.0.1), client
    python -m tests.support.pki certs/ --host retriever.internal --client feed-server
    python -m tests.support.pki infra/certs --exitrank   # the compose file's: one per workload (below)
    retriever-svc serve ... --tls-cert certs/server.crt --tls-key certs/server.key \
        --tls-client-ca certs/ca.crt
    ranker-svc serve ... --retriever-tls-ca certs/ca.crt \
        --retriever-tls-cert certs/client.crt --retriever-tls-key certs/client.key

Keys are ECDSA P-256, certificates valid for ``days`` (default 1). Server certificates carry the
subjectAltNames gRPC checks (DNS names and IP addresses); client certificates carry the
clientAuth extended key usage, and their subject is the identity the rate limiter counts
against (``exitrank.grpc_security.client_identity``). Never use these for production.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Issued:
    """A written certificate: its PEM files."""

    cert: Path
    key: Path


class DevCA:
    """A self-signed CA in memory whose certificate is written to ``out/<name>.crt``.

    Args:
        out: directory for every file this CA writes (created if missing).
        name: the CA's common name and file stem.
        days: validity of everything it issues.
    """

    def __init__(self, out: str | Path, *, name: str = "ca", days: int = 1) -> None:
        from cryptography import x509  # noqa: PLC0415 - dev-only dependency
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.days = days
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._subject = _name(name)
        builder = self._builder(self._subject, self._key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        builder = builder.add_extension(_key_usage(ca=True), critical=True)
        self._cert = builder.sign(self._key, hashes.SHA256())
        self.issued = self._write(name, self._key, self._cert)

    @property
    def cert(self) -> Path:
        return self.issued.cert

    def server(self, stem: str = "server", *, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
               client: bool = False) -> Issued:
        """A server certificate whose subjectAltNames are ``hosts`` (DNS names or IP addresses); with
        ``client`` also for client authentication (a service that calls another one with it)."""
        from cryptography import x509  # noqa: PLC0415
        from cryptography.x509.oid import ExtendedKeyUsageOID

        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        return self._issue(stem, hosts[0], usages, x509.SubjectAlternativeName(names))

    def client(self, stem: str = "client", *, name: str = "client", dns_names: Sequence[str] = ()) -> Issued:
        """A client certificate with common name ``name`` (its subject: ``CN=<name>,O=exitrank dev``) and,
        as cert-manager issues them, ``dns_names`` as subjectAltNames."""
        from cryptography import x509  # noqa: PLC0415
        from cryptography.x509.oid import ExtendedKeyUsageOID

        alt = x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]) if dns_names else None
        return self._issue(stem, name, [ExtendedKeyUsageOID.CLIENT_AUTH], alt)

    def _issue(self, stem: str, common_name: str, usage, alt_names) -> Issued:
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(_name(common_name), key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(_key_usage(ca=False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        if alt_names is not None:
            builder = builder.add_extension(alt_names, critical=False)
        return self._write(stem, key, builder.sign(self._key, hashes.SHA256()))

    def _builder(self, subject, public_key):
        from cryptography import x509  # noqa: PLC0415

        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self._subject)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=self.days)))

    def _write(self, stem: str, key, cert) -> Issued:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        key_path, cert_path = self.out / f"{stem}.key", self.out / f"{stem}.crt"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert=cert_path, key=key_path)


def _name(common_name: str):
    from cryptography import x509  # noqa: PLC0415
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "exitrank dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool):
    from cryptography import x509  # noqa: PLC0415

    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def issue_exitrank(out: Path, *, days: int = 30) -> list[Path]:
    """The compose file's certificates (infra/compose.yaml), named as the access policy's identities
    (infra/access-policy.yaml): ``retriever`` and ``ranker`` servers (the ranker's also its client
    certificate), ``feed-server`` and ``ingest`` clients, and ``ca.crt``. Keys are left readable by
    the containers' user (0644): a development CA only."""
    ca = DevCA(out, days=days)
    local = ("localhost", "127.0.0.1")
    issued = [ca.server("retriever", hosts=("retriever", "retriever.exitrank.svc", *local)),
              ca.server("ranker", hosts=("ranker", "ranker.exitrank.svc", *local), client=True),
              ca.client("feed-server", name="feed-server", dns_names=["feed-server.exitrank.svc"]),
              ca.client("ingest", name="ingest", dns_names=["ingest.exitrank.svc"])]
    for item in issued:
        item.key.chmod(0o644)  # the containers run as uid 10001
    return [ca.cert] + [path for item in issued for path in (item.cert, item.key)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.pki", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="directory for ca.crt, server.crt/key, client.crt/key")
    parser.add_argument("--host", action="append", help="server name or IP (repeatable; default localhost, 127.0.0.1)")
    parser.add_argument("--client", default="client", help="client certificate common name")
    parser.add_argument("--days", type=int, default=1)
    parser.add_argument("--exitrank", action="store_true", help="the compose file's set: retriever, ranker, "
                        "feed-server, ingest (valid 30 days unless --days)")
    args = parser.parse_args(argv)
    if args.exitrank:
        for path in issue_exitrank(args.out, days=30 if args.days == 1 else args.days):
            print(path)
        return 0
    ca = DevCA(args.out, days=args.days)
    server = ca.server(hosts=args.host or ("localhost", "127.0.0.1"))
    client = ca.client(name=args.client)
    for path in (ca.cert, server.cert, server.key, client.cert, client.key):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
