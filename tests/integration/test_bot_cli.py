"""`doppel bot` as a user (or the Helm chart) runs it: a process configured from the environment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
from tests.support.bot_fixtures import (
    BOT_NAMESPACE,
    CHANNEL,
    NAMESPACE,
    SIGNING_SECRET,
    TEAM_ID,
    doppel_body,
    kube_for,
    mention_payload,
    say,
    sign,
)
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID
from tests.support.vllm_fixtures import free_port


async def test_doppel_bot_serves_health_events_and_stops_cleanly(bot_kube, slack_emulator, tmp_path):
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Registering"))
    port = free_port()
    env = {
        **os.environ,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_BOT_TOKEN": ACME_TOKEN,
        "SLACK_API_URL": slack_emulator.base_url,
        "DOPPEL_BOT_NAMESPACE": BOT_NAMESPACE,
        "DOPPEL_TEAM_NAMESPACES": f"{TEAM_ID}={NAMESPACE}",
        "DOPPEL_RESULT_FILE": str(tmp_path / "result.json"),
    }
    command = [sys.executable, "-m", "doppel.cli", "bot", "--port", str(port), "--kube-server", bot_kube[1]]
    log = (tmp_path / "bot.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    ready = await client.get("/readyz")
                    break
                except httpx.TransportError:
                    assert process.poll() is None and time.monotonic() < deadline, (
                        tmp_path / "bot.log"
                    ).read_text()
                    await asyncio.sleep(0.2)
            assert ready.status_code == 200
            assert (await client.get("/healthz")).json() == {"ok": True}
            ts = say(slack_emulator, "U02BOB", f"<@{BOT_USER_ID}> ping")
            body = httpx.Request(
                "POST", "/", json=mention_payload("ping", ts, event_id="EvCli")
            ).content.decode()
            response = await client.post(
                "/slack/events", content=body, headers={"Content-Type": "application/json", **sign(body)}
            )
            assert response.status_code == 200
            for _ in range(200):
                if slack_emulator.posted(CHANNEL):
                    break
                await asyncio.sleep(0.05)
            assert "still training (Registering)" in slack_emulator.posted(CHANNEL)[0]["text"]
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
        log.close()
    assert code == 0
    assert json.loads((tmp_path / "result.json").read_text()) == {"ok": True, "mode": "http"}
    output = (tmp_path / "bot.log").read_text()
    assert ACME_TOKEN not in output and "Traceback" not in output
