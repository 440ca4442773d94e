"""Serving a Prometheus registry over HTTP (prometheus_client's own server, on a thread of its own).

The operator and the bot each keep their metrics in a registry of their own (two operators in one test
process must not share counters) and serve it on a metrics port apart from any API port, so a
NetworkPolicy can open it to Prometheus alone. `DOPPEL_METRICS_PORT=0` turns metrics off: nothing is
served and the instrumentation calls return at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from doppel.errors import BadInput

DEFAULT_PORT = 9090


def port_from_env(env: Mapping[str, str] | None = None, default: int = DEFAULT_PORT) -> int:
    """The metrics port from DOPPEL_METRICS_PORT (0: metrics off)."""
    value = (os.environ if env is None else env).get("DOPPEL_METRICS_PORT", "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) > 65535:
        raise BadInput(f"DOPPEL_METRICS_PORT must be a port number (0: off), got {value!r}")
    return int(value)


class Exporter:
    """`GET /metrics` of one registry, until closed."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr, registry=registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
