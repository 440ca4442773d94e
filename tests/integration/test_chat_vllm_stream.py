"""`doppel chat --vllm-url` against a scripted stand-in for vLLM's OpenAI server: it streams a reply token by
token as vLLM does (and can drop the connection mid-reply), which the real CPU server cannot be made to
do on cue."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner
from tests.support.http_stub import JsonHandler, serving

from doppel.cli import main


class _ScriptedVllm(JsonHandler):
    """/health, /v1/models, adapter loading and chat completions; a streamed reply is `pieces`, one SSE
    event each (after the sampled opening, the first piece, when the request continues it)."""

    protocol_version = "HTTP/1.1"
    pieces: ClassVar[list[str]] = []
    drop_after: ClassVar[int | None] = None  # close the connection after this many streamed pieces
    adapters: ClassVar[dict[str, str]] = {}
    url: ClassVar[str] = ""

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {})
        else:
            data = [{"id": "base", "root": "/m", "parent": None, "max_model_len": 2048}]
            data += [{"id": name, "root": path, "parent": "base"} for name, path in self.adapters.items()]
            self._json(200, {"object": "list", "data": data})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/v1/load_lora_adapter":
            self.adapters[body["lora_name"]] = body["lora_path"]
            return self._json(200, {})
        if self.path == "/v1/unload_lora_adapter":
            self.adapters.pop(body["lora_name"], None)
            return self._json(200, {})
        if not body["stream"]:  # the sampled opening: one token
            choice = {"message": {"content": self.pieces[0]}, "finish_reason": "length"}
            return self._json(200, {"choices": [choice]})
        pieces = self.pieces[1:] if body.get("continue_final_message") else self.pieces
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, piece in enumerate(pieces):
            if self.drop_after is not None and i == self.drop_after:
                self.connection.shutdown(socket.SHUT_RDWR)  # the server goes away mid-reply
                return None
            self._chunk(
                b"data: " + json.dumps({"choices": [{"delta": {"content": piece}}]}).encode() + b"\n\n"
            )
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")
        return None

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


@pytest.fixture
def scripted_vllm() -> Iterator[type[_ScriptedVllm]]:
    _ScriptedVllm.adapters, _ScriptedVllm.drop_after = {}, None
    with serving(_ScriptedVllm) as url:
        _ScriptedVllm.url = url
        yield _ScriptedVllm


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    (tmp_path / "pat").mkdir()
    (tmp_path / "pat" / "adapter_config.json").write_text("{}")
    return tmp_path / "pat"


def chat(server: type[_ScriptedVllm], adapter: Path, *args: str):
    argv = ["chat", "--adapter", str(adapter), "--vllm-url", server.url, "--person", "Pat"]
    return CliRunner().invoke(main, [*argv, *args])


@pytest.mark.parametrize("opening", [[], ["--opening-temperature", "0"]])
def test_a_long_invented_addressee_streamed_token_by_token_is_repaired_whole(scripted_vllm, adapter, opening):
    # The model invents "@Christopher", which vLLM streams as "@", "Christ", "opher": the chat's one other
    # speaker ("You") is whom the reply answers, as `--json` (the reply complete) says too.
    scripted_vllm.pieces = ["@", "Christ", "opher", ", the deploy", " is fine"]
    streamed = chat(scripted_vllm, adapter, *opening, "--once", "any news on the deploy?")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.strip() == "@You, the deploy is fine"
    whole = chat(scripted_vllm, adapter, *opening, "--once", "any news on the deploy?", "--json")
    assert json.loads(whole.stdout)["reply"] == "@You, the deploy is fine"
    assert scripted_vllm.adapters == {}  # unregistered after the chat


def test_a_server_gone_mid_reply_is_one_line_and_exit_2(scripted_vllm, adapter):
    scripted_vllm.pieces = ["Sure", ", the deploy", " is fine", " today"]
    scripted_vllm.drop_after = 2
    result = chat(scripted_vllm, adapter, "--opening-temperature", "0", "--once", "any news?")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert (
        result.stderr.strip() == f"doppel: error: vLLM at {scripted_vllm.url} lost the connection mid-reply"
    )
