"""A byte-counting TCP proxy on loopback, shared by the tests that check
compression on the wire (a grpcio client cannot see whether a message
arrived compressed)."""
from __future__ import annotations

import socket
import threading
from typing import List

__all__ = ["CountingProxy"]


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts the bytes each way, to see
    whether messages were compressed on the wire."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.lock = threading.Lock()
        self.upstream = 0  # client -> server
        self.downstream = 0  # server -> client
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: List[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, "upstream"),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "downstream"),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> None:
        with self.lock:
            self.upstream = self.downstream = 0

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for sock in self.sockets:
            sock.close()
