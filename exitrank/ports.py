"""Listening ports the services bind: refused, by name, when another process already holds them.

gRPC servers are built with ``grpc.so_reuseport`` off (``exitrank.grpc_security.server_options``):
with it on, Linux lets a second server bind a port a first one listens on, and calls then split
between the two processes. Both services check their ports first (:func:`check_free`), before
they load a model or start Redis, so a busy port costs nothing and says which setting to change;
a bind that still fails (a race) raises the same :class:`PortInUse`.

    check_free("127.0.0.1", 50051, setting=GRPC_PORT_SETTING)
    check_service_ports(config.server.host, config.server.port, config.observability)
"""

from __future__ import annotations

import socket

GRPC_PORT_SETTING = "server.port (--port)"
METRICS_PORT_SETTING = "observability.metrics_port (--metrics-port)"


class PortInUse(RuntimeError):
    """``host:port`` is taken; the message names the setting (``--port``, ``--metrics-port``)."""

    def __init__(self, host: str, port: int, setting: str, detail: str = "") -> None:
        why = f" ({detail})" if detail else ""
        super().__init__(f"{setting}: {host}:{port} is already in use{why}; choose another port "
                         "(0 picks a free one) or stop the process listening there")
        self.host, self.port, self.setting = host, port, setting


def check_free(host: str, port: int, *, setting: str) -> None:
    """Raises :class:`PortInUse` when a process listens on ``host:port`` (port 0: nothing to check).

    The probe binds as servers do (``SO_REUSEADDR``, so a port in TIME_WAIT counts as free, and
    without ``SO_REUSEPORT``) and closes at once. A host that does not resolve is left to the bind.
    """
    if not port:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise PortInUse(host, port, setting, exc.strerror or "") from exc


def check_service_ports(host: str, port: int, observability) -> None:
    """A service's gRPC port and, when metrics are on, its metrics port (an ``ObservabilityConfig``:
    ``metrics_host`` or else ``host``); raises :class:`PortInUse` for the first one taken."""
    check_free(host, port, setting=GRPC_PORT_SETTING)
    if observability.metrics_port is not None:
        check_free(observability.metrics_host or host, observability.metrics_port, setting=METRICS_PORT_SETTING)
