"""The operator's shared view of what each vLLM pod serves, against a pod that accepts a connection and
never answers (hung: a stuck engine, a frozen node)."""

import asyncio
import time

import pytest

from doppel.operator.podmodels import PodModels
from doppel.serve.errors import ServerUnavailable


async def hung_pod() -> tuple[asyncio.Server, list[int]]:
    """A TCP server that reads requests and never answers; counts the connections it got."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.read()  # until the client gives up

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


def test_a_hung_pod_fails_its_listing_quickly_and_once_for_every_asker():
    async def scenario() -> None:
        server, connections = await hung_pod()
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        models = PodModels(interval_s=30, list_timeout_s=0.5)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(models.served(url) for _ in range(20)), return_exceptions=True)
            took = time.monotonic() - started
            assert all(isinstance(r, ServerUnavailable) for r in results), results
            assert "did not list its models within 0.5 s" in str(results[0])
            # One listing for all twenty loops, given up after the listing timeout, not the 120 s load one.
            assert took < 5 and len(connections) <= 2  # the client's one retry may open a second
            # Asked again at once: the failure is kept for a few seconds, no new request.
            with pytest.raises(ServerUnavailable):
                await models.served(url)
            assert len(connections) <= 2
        finally:
            await models.aclose()
            server.close()

    asyncio.run(scenario())
