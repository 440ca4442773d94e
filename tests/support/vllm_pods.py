"""Many vLLM pods on loopback, for counting what the operator asks of them.

`AdapterApiPod` speaks the part of vLLM's HTTP API the operator uses (`/health`, `/v1/models`,
`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) with vLLM's own answer shapes (the same JSON, the same
400 for a name loaded twice, the same 404 for unloading one that is not), keeps the adapters loaded in
memory (lost on `restart()`, as a vLLM pod's runtime-loaded adapters are) and counts the requests by path.
It stands for a vLLM pod where a test needs several and many adapters: the real CPU server takes ~1.5 GB and
half a minute to start, per pod. Tests of what vLLM itself does with adapters use the real server
(vllm_fixtures.VllmServer).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BASE = "doppel-tiny"


class AdapterApiPod:
    def __init__(self, base: str = BASE) -> None:
        self.base = base
        self.loaded: dict[str, str] = {}  # served name -> path
        self.requests: Counter[str] = Counter()  # "GET /v1/models" -> count
        self.listing_bytes = 0
        self._listing: bytes | None = None  # the encoded /v1/models answer, until the adapters change
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AdapterApiPod:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def restart(self) -> None:
        """The pod's vLLM restarted: every adapter loaded at runtime is gone."""
        with self._lock:
            self.loaded.clear()
            self._listing = None

    def count(self, what: str) -> int:
        with self._lock:
            return self.requests[what]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.listing_bytes = 0

    def models(self) -> dict[str, Any]:
        cards = [
            {"id": self.base, "object": "model", "root": self.base, "parent": None, "max_model_len": 512}
        ]
        cards += [
            {"id": name, "object": "model", "root": path, "parent": self.base, "max_model_len": 512}
            for name, path in sorted(self.loaded.items())
        ]
        return {"object": "list", "data": cards}

    def _answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        with self._lock:
            self.requests[f"{method} {path}"] += 1
            if (method, path) == ("GET", "/health"):
                return 200, None
            if (method, path) == ("GET", "/v1/models"):
                if self._listing is None:
                    self._listing = json.dumps(self.models()).encode()
                self.listing_bytes += len(self._listing)
                return 200, self._listing
            name = str(body.get("lora_name") or "")
            if (method, path) == ("POST", "/v1/load_lora_adapter"):
                if name in self.loaded and not body.get("load_inplace"):
                    message = (
                        f"The lora adapter '{name}' has already been loaded. If you want to load the "
                        "adapter in place, set 'load_inplace' to True."
                    )
                    return 400, {"error": {"message": message, "type": "InvalidUserInput", "code": 400}}
                self.loaded[name] = str(body.get("lora_path") or "")
                self._listing = None
                return 200, f"Success: LoRA adapter '{name}' added successfully."
            if (method, path) == ("POST", "/v1/unload_lora_adapter"):
                if self.loaded.pop(name, None) is None:
                    message = f"The lora adapter '{name}' cannot be found."
                    return 404, {"error": {"message": message, "type": "NotFoundError", "code": 404}}
                self._listing = None
                return 200, f"Success: LoRA adapter '{name}' removed successfully."
            return 404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        pod = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves vLLM

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, answer = pod._answer(method, self.path.split("?")[0], json.loads(raw or b"{}"))
                if isinstance(answer, bytes):
                    data = answer
                else:
                    data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
