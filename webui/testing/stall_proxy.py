"""A loopback TCP proxy that lets a set number of the server's bytes through and then holds every connection,
for tests that SIGKILL a client (boto3 talking to moto's S3 server, say) at a chosen byte offset of what it
has received: point the client at `proxy.url`, set `budget`, wait for `stalled`, kill, then `reset()`.

    proxy = StallProxy("127.0.0.1", moto_port); proxy.budget = 1_000_000; proxy.stalled.wait(30)
"""
from __future__ import annotations

import socket
import threading


class StallProxy:
    """Forwards 127.0.0.1:`port` to (`host`, `target_port`). `budget = n`: n more server→client bytes, counted
    over all connections, then the proxy stops forwarding and sets `stalled`; None: no limit."""

    def __init__(self, host: str, target_port: int):
        self.target = (host, target_port)
        self.budget: int | None = None
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self._lock:
                        allowed = len(data) if self.budget is None else max(0, min(len(data), self.budget))
                        if self.budget is not None:
                            self.budget -= allowed
                    if allowed < len(data):
                        dst.sendall(data[:allowed])
                        self.stalled.set()
                        return  # hold the connection open, silent, until reset() or stop()
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # one side closed: close the other, as a real connection would
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self) -> None:
        """Drop every connection (the stalled ones included) and lift the limit."""
        with self._lock:
            socks, self._socks = self._socks, []
            self.budget = None
        for s in socks:
            s.close()
        self.stalled.clear()

    def stop(self) -> None:
        self._listener.close()
        self.reset()
