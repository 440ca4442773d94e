"""What each vLLM pod serves, as every DoppelUser's loop sees it: one `/v1/models` listing per pod per
interval, shared by all of them, through one pooled HTTP client.

Each DoppelUser's loop checks, every resync interval, that every ready pod holds its adapter (a restarted
pod loses the adapters loaded at runtime). Asked per user, that is users x pods listings per interval (of
~280 KB each at a thousand adapters), each on a new connection; here the listing a pod gave is kept for the
interval and concurrent askers share the one in flight, so the operator's requests to vLLM per interval are
at most the number of pods, however many doppels there are. What the operator loads or unloads itself is
written into the kept listing; a pod that restarts or turns ready again (a pod event) is forgotten, so its
next check lists it afresh and the loops put its adapters back at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable

import httpx

from doppel.serve.errors import ServeError, ServerUnavailable
from doppel.serve.vllm import AsyncVllmClient
from doppel.serve.vllm_protocol import RetryPolicy

# vLLM calls from the operator: fail fast, the loop retries on its own schedule.
VLLM_RETRY = RetryPolicy(attempts=2, initial_delay=0.2, max_delay=1.0)
# Loading an adapter reads it from the volume: allow it time; a listing is quick.
TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=30.0)
_UNSEEN = object()
# A pod that failed to answer is asked again after this long (not by every loop at once).
ERROR_TTL_S = 5.0
# A listing answers in well under a second even at a thousand adapters (96 ms measured): a pod that takes
# longer is hung, and every doppel's loop waiting on it would wait the load timeout (120 s) with it.
LIST_TIMEOUT_S = 15.0


class PodModels:
    """The served names of each pod (keyed by its base URL), listed at most once per `interval_s`."""

    def __init__(
        self, interval_s: float, *, connections: int = 64, list_timeout_s: float = LIST_TIMEOUT_S
    ) -> None:
        self.interval_s = interval_s
        self.list_timeout_s = list_timeout_s
        self.connections = connections
        self._http: httpx.AsyncClient | None = None  # made on the operator's loop, at first use
        self._served: dict[str, tuple[float, set[str] | ServeError]] = {}  # url -> (expires, names)
        self._listing: dict[str, asyncio.Future[set[str]]] = {}
        # What the operator loaded (True) or unloaded (False) on a pod while its listing was in flight: the
        # pod may have answered before that change, and its answer must not undo it.
        self._changed: dict[str, dict[str, bool]] = {}
        self._fingerprints: dict[str, Hashable] = {}  # url -> the pod's state at its last event

    def client(self, url: str) -> AsyncVllmClient:
        """A client of the pod at `url` over the shared connection pool."""
        if self._http is None:
            limits = httpx.Limits(
                max_connections=self.connections, max_keepalive_connections=self.connections
            )
            self._http = httpx.AsyncClient(timeout=TIMEOUT, limits=limits)
        return AsyncVllmClient(url, retry=VLLM_RETRY, http=self._http)

    async def served(self, url: str) -> set[str]:
        """The names the pod serves (base model and adapters); raises ServeError if it cannot say."""
        entry = self._served.get(url)
        if entry is not None and time.monotonic() < entry[0]:
            if isinstance(entry[1], ServeError):
                raise entry[1]
            return entry[1]
        listing = self._listing.get(url)
        if listing is None:
            changed: dict[str, bool] = {}
            listing = asyncio.ensure_future(self._list(url, changed))
            self._listing[url], self._changed[url] = listing, changed
            listing.add_done_callback(lambda done: self._listed(url, done))
        return await asyncio.shield(listing)

    async def _list(self, url: str, changed: dict[str, bool]) -> set[str]:
        try:
            try:
                async with asyncio.timeout(self.list_timeout_s):
                    cards = await self.client(url).list_models()
            except TimeoutError:
                raise ServerUnavailable(
                    f"vLLM at {url} did not list its models within {self.list_timeout_s:g} s"
                ) from None
        except ServeError as exc:
            self._keep(url, min(ERROR_TTL_S, self.interval_s), exc)
            raise
        names = {card.id for card in cards}
        names -= {name for name, loaded in changed.items() if not loaded}
        names |= {name for name, loaded in changed.items() if loaded}
        self._keep(url, self.interval_s, names)
        return names

    def _keep(self, url: str, ttl_s: float, answer: set[str] | ServeError) -> None:
        # Unless the pod was forgotten while it was listed: the answer may be from before its restart.
        if self._listing.get(url) is asyncio.current_task():
            self._served[url] = (time.monotonic() + ttl_s, answer)

    def _listed(self, url: str, listing: asyncio.Future[set[str]]) -> None:
        if self._listing.get(url) is listing:
            del self._listing[url], self._changed[url]

    def loaded(self, url: str, name: str) -> None:
        self._note(url, name, loaded=True)

    def unloaded(self, url: str, name: str) -> None:
        self._note(url, name, loaded=False)

    def _note(self, url: str, name: str, *, loaded: bool) -> None:
        if url in self._changed:
            self._changed[url][name] = loaded
        entry = self._served.get(url)
        if entry is not None and not isinstance(entry[1], ServeError):
            (entry[1].add if loaded else entry[1].discard)(name)

    def forget(self, url: str) -> None:
        """The pod changed (restarted, turned ready): list it afresh at its next check."""
        self._served.pop(url, None)
        self._listing.pop(url, None)
        self._changed.pop(url, None)

    def seen(self, url: str, fingerprint: Hashable | None) -> bool:
        """A pod event for `url` (`fingerprint`: what identifies the pod's state, None: it is gone). Returns
        whether its doppels must look at it: a new pod, or one that restarted, turned ready or not, or went
        (its listing is then forgotten). A pod event that changes none of that (a label, an annotation, the
        re-listing of a watch or an operator restart) costs no listing and wakes nobody."""
        before = self._fingerprints.get(url, _UNSEEN)
        if fingerprint is None:
            self._fingerprints.pop(url, None)
        else:
            self._fingerprints[url] = fingerprint
        if before == fingerprint:
            return False
        if before is not _UNSEEN:
            self.forget(url)
        return True

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
