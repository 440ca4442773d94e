"""A loopback TCP proxy in front of a vLLM server that passes a streamed reply up to its first piece of text
and holds back the rest: what a client sees of a server that dies just after it began to answer, however
fast the server generates.

Without it, a test that kills the server "mid-reply" races the server: the tiny model writes its whole
reply in well under a second, and a client descheduled for that long finds all of it, `[DONE]` included,
in its socket buffer when it reads on after the kill.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading

# The first SSE event of a chat completion stream that carries text: `"content":"` and then not a quote.
_FIRST_TEXT = re.compile(rb'"content":\s*"[^"]')


class ReplyCutProxy:
    """Forwards 127.0.0.1:`port` to `target_port`. A response that streams text is passed up to the end of
    its first text event; the rest is dropped, and the client's connection closes when the server's does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ReplyCutProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
        received, sent, cut = b"", 0, False
        try:
            with contextlib.suppress(OSError):
                while data := upstream.recv(65536):
                    if cut:
                        continue  # held back: it dies with the server
                    received += data
                    until = len(received)
                    match = _FIRST_TEXT.search(received, max(0, sent - 64))
                    if match is not None:
                        end = received.find(b"\n\n", match.end())
                        if end < 0:
                            until = max(sent, match.start())  # the event is not whole yet
                        else:
                            until = end + 2
                            if received[until : until + 2] == b"\r\n":  # the end of its HTTP chunk
                                until += 2
                            cut = True
                            self.cuts += 1
                    client.sendall(received[sent:until])
                    sent = until
        finally:
            # shutdown, not only close: the other thread's recv on `client` keeps the connection open
            # after a close, and the client would wait out its read timeout instead of seeing the cut.
            for side in (client, upstream):
                with contextlib.suppress(OSError):
                    side.shutdown(socket.SHUT_RDWR)
                side.close()

    @staticmethod
    def _requests(client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                upstream.sendall(data)
