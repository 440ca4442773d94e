"""The operator's shared view of what each vLLM pod serves: against a pod that accepts a connection and
never answers (hung: a stuck engine, a frozen node), and against a slow one whose listing is overtaken by
the operator's own loads and by a restart."""

import asyncio
import json
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


async def slow_pod(served: set[str], delay_s: float) -> tuple[asyncio.Server, list[int]]:
    """An HTTP server answering `GET /v1/models` with what `served` held when the request came, `delay_s`
    later (a pod that lists slowly while the operator loads adapters on it); counts the listings."""
    listings: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            listings.append(1)
            snapshot = sorted(served)
            await asyncio.sleep(delay_s)
            body = json.dumps({"object": "list", "data": [{"id": name} for name in snapshot]}).encode()
            head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, listings


def test_an_adapter_loaded_while_the_pod_was_listed_is_not_taken_for_missing():
    async def scenario() -> None:
        served = {"base"}
        server, listings = await slow_pod(served, delay_s=0.5)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        models = PodModels(interval_s=30)
        try:
            listing = asyncio.ensure_future(models.served(url))
            await asyncio.sleep(0.2)  # the pod has taken its snapshot; the operator loads meanwhile
            served.add("ada-v1")
            models.loaded(url, "ada-v1")
            # The pod's answer predates the load; what the operator did itself still counts.
            assert await listing == {"base", "ada-v1"}
            assert await models.served(url) == {"base", "ada-v1"}
            assert len(listings) == 1  # kept for the interval: no second listing, no second load
        finally:
            await models.aclose()
            server.close()

    asyncio.run(scenario())


def test_a_pod_forgotten_while_it_was_listed_is_listed_afresh():
    async def scenario() -> None:
        served = {"base", "ada-v1"}
        server, listings = await slow_pod(served, delay_s=0.5)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        models = PodModels(interval_s=30)
        try:
            before = asyncio.ensure_future(models.served(url))
            await asyncio.sleep(0.2)
            served.discard("ada-v1")  # vLLM restarted: its runtime-loaded adapters are gone
            models.forget(url)
            assert await models.served(url) == {"base"}  # not the answer from before the restart
            await before
            assert await models.served(url) == {"base"}  # and that older answer did not replace it
            assert len(listings) == 2
        finally:
            await models.aclose()
            server.close()

    asyncio.run(scenario())
