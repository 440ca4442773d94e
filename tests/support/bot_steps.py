"""What a bot test does between its requests: wait for something to hold (`until`, `until_async`), configure
the bot as an OAuth app (`oauth_config`), install it in a workspace through OAuth as a person would
(`install`), read the token a Secret holds (`secret_token`)."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from dataclasses import replace
from typing import Any

from kubernetes import client as k8s

from doppel.bot.config import BotConfig
from doppel.bot.kube import api_client
from tests.support.bot_fixtures import CLIENT_ID, CLIENT_SECRET, OAuthSlackEmulator, bot_config


async def until(check: Any, timeout: float = 20.0) -> Any:
    """`check()` once it is truthy (fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return found


async def until_async(get: Any, ok: Any, timeout: float = 20.0) -> Any:
    """`await get()` once `ok` holds for it (fails after `timeout`, with what it last was)."""
    deadline = time.monotonic() + timeout
    while not ok(found := await get()):
        assert time.monotonic() < deadline, f"timed out: {found}"
        await asyncio.sleep(0.05)
    return found


def oauth_config(**changes: Any) -> BotConfig:
    """The test bot as a multi-workspace OAuth app (no bot token of its own), with `changes`."""
    return replace(bot_config(), bot_token=None, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **changes)


async def install(bot: Any, emulator: OAuthSlackEmulator, team_id: str, **grid: Any) -> str:
    """A person of `team_id` clicks Add to Slack, then Allow; returns the token Slack issued."""
    page = await bot.http.get("/slack/install")
    state = re.search(r"state=([^&\"'\s]+)", page.text).group(1)
    done = await bot.http.get(
        "/slack/oauth_redirect",
        params={"code": emulator.grant(team_id, **grid), "state": state},
        headers={"Cookie": f"slack-app-oauth-state={state}"},
    )
    assert done.status_code == 200, done.text
    return emulator.issued[-1]


def secret_token(url: str, namespace: str, name: str) -> str | None:
    """The token in a Secret (a sync call: run it off the loop that serves kmock)."""
    try:
        secret = k8s.CoreV1Api(api_client(url)).read_namespaced_secret(name, namespace)
    except k8s.ApiException as exc:
        assert exc.status == 404
        return None
    if secret.string_data:
        return secret.string_data["token"]
    return base64.b64decode(secret.data["token"]).decode()
