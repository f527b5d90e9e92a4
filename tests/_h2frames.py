"""A frame-by-frame HTTP/2 client for tests that must order frames exactly.

:class:`tests._h2client.H2Client` runs h2's state machine, which answers
PINGs by itself and stops sending once a GOAWAY arrives. The drain tests
need what a real client does in a race: send a request after the server's
first GOAWAY has arrived but before its PING is acknowledged, or send a PING
after the last reply. This client reads and writes single frames and does
nothing on its own except acknowledge SETTINGS and (unless told not to)
PINGs.
"""
from __future__ import annotations

import dataclasses
import socket
import struct
import time
from typing import List, Optional, Tuple

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


@dataclasses.dataclass
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes
    headers: Optional[List[Tuple[str, str]]] = None   # HEADERS, decoded

    @property
    def goaway_last_stream(self) -> int:
        return struct.unpack(">I", self.payload[:4])[0] & 0x7FFFFFFF


class FrameClient:
    """One TCP connection speaking HTTP/2 frames to a gRPC server."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.authority = f"{host}:{port}"
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.next_stream = 1
        self.inbuf = b""
        self.eof = False           # the server closed the connection (FIN)
        self.reset = False         # ... or reset it
        # PINGs are acknowledged on arrival unless a test holds them back
        # (the core sends one PING at a time: one left unanswered holds
        # back the next, e.g. the one of a graceful GOAWAY).
        self.auto_ack_pings = True
        self.sock.sendall(PREFACE + self._frame(SETTINGS, 0, 0, b""))

    @staticmethod
    def _frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
            struct.pack(">I", stream_id) + payload

    def send(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        self.sock.sendall(self._frame(ftype, flags, stream_id, payload))

    def request(self, path: str, message: bytes) -> int:
        """Send a whole unary request (HEADERS, then DATA with END_STREAM)
        in one write; returns its stream id."""
        sid = self.next_stream
        self.next_stream += 2
        block = self.encoder.encode([
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", self.authority), ("content-type", "application/grpc"),
            ("te", "trailers")])
        body = struct.pack(">BI", 0, len(message)) + message
        self.sock.sendall(self._frame(HEADERS, END_HEADERS, sid, block) +
                          self._frame(DATA, END_STREAM, sid, body))
        return sid

    def ping(self, opaque: bytes = b"clientpg", ack: bool = False) -> None:
        self.send(PING, ACK if ack else 0, 0, opaque)

    def read_frame(self, timeout: float = 5.0) -> Optional[Frame]:
        """The next frame (SETTINGS are acknowledged here and returned too),
        or None once the connection ended or nothing came in time."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.inbuf) >= 9:
                length = int.from_bytes(self.inbuf[:3], "big")
                if len(self.inbuf) >= 9 + length:
                    head, self.inbuf = self.inbuf[:9 + length], self.inbuf[9 + length:]
                    frame = Frame(head[3], head[4],
                                  int.from_bytes(head[5:9], "big") & 0x7FFFFFFF,
                                  head[9:])
                    if frame.type == SETTINGS and not frame.flags & ACK:
                        self.send(SETTINGS, ACK, 0, b"")
                    elif frame.type == PING and not frame.flags & ACK and self.auto_ack_pings:
                        self.ping(frame.payload, ack=True)
                    elif frame.type == HEADERS:
                        # Every block is decoded, in order: HPACK's table
                        # depends on all of them. (The gRPC core sends no
                        # padding, priority or CONTINUATION here.)
                        frame.headers = [
                            (k if isinstance(k, str) else k.decode(),
                             v if isinstance(v, str) else v.decode())
                            for k, v in self.decoder.decode(frame.payload)]
                    return frame
            if self.eof or self.reset:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                self.reset = True
                continue
            if not data:
                self.eof = True
                continue
            self.inbuf += data

    def read_until(self, want, timeout: float = 5.0) -> Tuple[Optional[Frame], List[Frame]]:
        """Read frames until ``want(frame)`` holds: (that frame, every frame
        read before it), or (None, all read) when the connection ended or
        the time ran out."""
        deadline = time.monotonic() + timeout
        seen: List[Frame] = []
        while True:
            frame = self.read_frame(max(0.0, deadline - time.monotonic()))
            if frame is None:
                return None, seen
            if want(frame):
                return frame, seen
            seen.append(frame)

    def close(self) -> None:
        self.sock.close()
