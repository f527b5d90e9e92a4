"""A small blocking raw HTTP/2 client (on the ``h2`` package) for sending
malformed gRPC traffic that no real gRPC client would produce.

One :class:`H2Client` is one TCP connection. Streams are opened with whatever
headers the test wants (nothing is validated or normalised on the way out),
DATA frames carry a gRPC length-prefixed message or raw bytes, and
:meth:`H2Client.response` reads events until the stream ends (trailers),
is reset, or the connection goes away, with a timeout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hyperframe.frame

HeaderList = Sequence[Tuple[Union[str, bytes], Union[str, bytes]]]


def grpc_frame(payload: bytes, *, compressed: bool = False,
               length: Optional[int] = None) -> bytes:
    """A gRPC length-prefixed message: flag byte, 4-byte big-endian length
    (``length`` overrides the real one, to lie about it), payload."""
    return struct.pack(">BI", 1 if compressed else 0,
                       len(payload) if length is None else length) + payload


def _b(value: Union[str, bytes]) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


@dataclasses.dataclass
class Response:
    """What came back on one stream."""

    headers: List[Tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    data: bytes = b""
    trailers: List[Tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    ended: bool = False                  # END_STREAM received
    reset_code: Optional[int] = None     # RST_STREAM error code, if reset
    goaway_code: Optional[int] = None    # GOAWAY error code, if the connection went away
    closed: bool = False                 # the socket was closed by the server
    timed_out: bool = False              # nothing final arrived in time

    @property
    def finished(self) -> bool:
        """Whether the stream came to an end of any kind (not a timeout)."""
        return self.ended or self.reset_code is not None or \
            self.goaway_code is not None or self.closed

    def _get(self, name: bytes) -> Optional[bytes]:
        # A trailers-only response carries the status in its headers.
        for key, value in list(self.trailers) + list(self.headers):
            if key == name:
                return value
        return None

    @property
    def grpc_status(self) -> Optional[int]:
        """The ``grpc-status`` of the trailers (or trailers-only headers)."""
        value = self._get(b"grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> Optional[str]:
        """The ``grpc-message``, percent-decoded."""
        value = self._get(b"grpc-message")
        if value is None:
            return None
        from urllib.parse import unquote_to_bytes
        return unquote_to_bytes(value).decode("utf-8", "replace")

    def messages(self) -> List[bytes]:
        """The gRPC messages of the response DATA (uncompressed only)."""
        out, buf = [], self.data
        while len(buf) >= 5:
            _flag, n = struct.unpack(">BI", buf[:5])
            out.append(buf[5:5 + n])
            buf = buf[5 + n:]
        return out

    def __repr__(self) -> str:
        return (f"Response(status={self.grpc_status}, message={self.grpc_message!r}, "
                f"reset={self.reset_code}, goaway={self.goaway_code}, closed={self.closed}, "
                f"timed_out={self.timed_out}, headers={self.headers}, data={self.data[:64]!r})")


class H2Client:
    """One raw HTTP/2 client connection over a blocking socket."""

    def __init__(self, host: str, port: int, *, preface: bool = True,
                 wait_settings: bool = True, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.authority = f"{host}:{port}"
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.responses: Dict[int, Response] = {}
        self.goaway_code: Optional[int] = None
        self.closed = False
        # A protocol error h2 found in the server's frames (the connection is
        # then given up), and frames that came for streams already ended.
        self.protocol_error: Optional[Exception] = None
        self.send_error: Optional[OSError] = None
        self.late_frames: List[Tuple[int, int, Optional[List[Tuple[bytes, bytes]]]]] = []
        self._inbuf = b""
        self._hold = False
        self._late_block: Optional[Tuple[int, List[bytes]]] = None
        self._settings_received = False
        if preface:
            self.conn.initiate_connection()
            self.flush()
            if wait_settings:
                # Let the server's settings (e.g. its header list limit) take
                # effect before the first stream, as a real client would.
                deadline = time.monotonic() + timeout
                while not self._settings_received and self._read_once(deadline):
                    pass

    # -- sending -------------------------------------------------------
    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold back writes inside the block; send them in one go at its end."""
        self._hold = True
        try:
            yield
        finally:
            self._hold = False
            self.flush()

    def flush(self) -> None:
        """Write what h2 has queued; a peer that already closed is noted."""
        if self._hold:
            return
        data = self.conn.data_to_send()
        if data and not self.closed and self.send_error is None:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                # The server closed the connection: what it sent before
                # can still be read.
                self.send_error = exc

    def send_bytes(self, data: bytes) -> None:
        """Write bytes to the socket as they are, bypassing h2."""
        self.sock.sendall(data)

    def open_stream(self, path: str, *, content_type: Optional[str] = "application/grpc",
                    te: Optional[str] = "trailers", extra: HeaderList = (),
                    end_stream: bool = False) -> int:
        """Send HEADERS for a POST to ``path``; ``None`` leaves a header out.
        ``extra`` headers go last, unchecked. Returns the stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        headers: List[Tuple[bytes, bytes]] = [
            (b":method", b"POST"), (b":scheme", b"http"),
            (b":path", _b(path)), (b":authority", _b(self.authority))]
        if content_type is not None:
            headers.append((b"content-type", _b(content_type)))
        if te is not None:
            headers.append((b"te", _b(te)))
        headers.extend((_b(k), _b(v)) for k, v in extra)
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.responses[stream_id] = Response()
        self.flush()
        return stream_id

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send raw bytes as DATA (split to the peer's frame size)."""
        step = self.conn.max_outbound_frame_size
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        for i, chunk in enumerate(chunks):
            while self.conn.local_flow_control_window(stream_id) < len(chunk):
                self._read_once(time.monotonic() + 5)
            self.conn.send_data(stream_id, chunk,
                                end_stream=end_stream and i == len(chunks) - 1)
        self.flush()

    def send_message(self, stream_id: int, payload: bytes, *, compressed: bool = False,
                     length: Optional[int] = None, end_stream: bool = False) -> None:
        """Send one gRPC length-prefixed message as DATA."""
        self.send_data(stream_id, grpc_frame(payload, compressed=compressed, length=length),
                       end_stream=end_stream)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: an empty DATA frame with END_STREAM."""
        self.conn.end_stream(stream_id)
        self.flush()

    def reset(self, stream_id: int,
              error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Send RST_STREAM."""
        self.conn.reset_stream(stream_id, error_code)
        self.flush()

    def unary(self, path: str, payload: bytes, *, extra: HeaderList = (),
              timeout: float = 5.0, **kwargs: object) -> Response:
        """Open a stream, send one message with END_STREAM, wait for the end."""
        sid = self.open_stream(path, extra=extra, **kwargs)  # type: ignore[arg-type]
        self.send_message(sid, payload, end_stream=True)
        return self.response(sid, timeout)

    # -- receiving -----------------------------------------------------
    def _read_once(self, deadline: float) -> bool:
        """Read one chunk from the socket and handle its events; False when
        the deadline passed without data."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.closed:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            data = b""
        if not data:
            self._mark_closed()
            return True
        self._inbuf += data
        while len(self._inbuf) >= 9 and not self.closed:
            length = int.from_bytes(self._inbuf[:3], "big")
            if len(self._inbuf) < 9 + length:
                break
            raw, self._inbuf = self._inbuf[:9 + length], self._inbuf[9 + length:]
            if self._late_frame(raw):
                continue
            try:
                events = self.conn.receive_data(raw)
            except h2.exceptions.ProtocolError as exc:
                self.protocol_error = exc
                self.flush()
                self._mark_closed()
                break
            for event in events:
                self._handle(event)
        self.flush()
        return True

    def _late_frame(self, raw: bytes) -> bool:
        """Keep frames for a stream that already ended (END_STREAM or
        RST_STREAM received) away from h2, which would fail the whole
        connection on them; note them in ``late_frames`` and keep the HPACK
        decoder in step with their header blocks."""
        frame_type, flags = raw[3], raw[4]
        stream_id = int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF
        if self._late_block is not None:          # CONTINUATION of a late block
            self._late_block[1].append(raw)
            if flags & 0x4:
                self._decode_late_block()
            return True
        r = self.responses.get(stream_id) if stream_id else None
        if r is None or not (r.ended or r.reset_code is not None):
            return False
        if frame_type == 0x1:                     # HEADERS
            self._late_block = (stream_id, [raw])
            if flags & 0x4:
                self._decode_late_block()
        else:
            self.late_frames.append((frame_type, stream_id, None))
        return True

    def _decode_late_block(self) -> None:
        assert self._late_block is not None
        stream_id, raws = self._late_block
        self._late_block = None
        block = b""
        for raw in raws:
            frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(raw[:9]))
            frame.parse_body(memoryview(raw[9:9 + length]))
            block += frame.data
        headers = self.conn.decoder.decode(block, raw=True)
        self.late_frames.append((0x1, stream_id, headers))

    def _mark_closed(self) -> None:
        self.closed = True
        for r in self.responses.values():
            if not r.finished:
                r.closed = True

    def _handle(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        r = self.responses.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and r is not None:
            r.headers.extend(event.headers)
        elif isinstance(event, h2.events.TrailersReceived) and r is not None:
            r.trailers.extend(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            if r is not None:
                r.data += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and r is not None:
            r.ended = True
        elif isinstance(event, h2.events.StreamReset) and r is not None:
            r.reset_code = int(event.error_code)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_received = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_code = int(event.error_code)
            last = event.last_stream_id or 0
            for stream_id, resp in self.responses.items():
                if not resp.finished and stream_id > last:
                    resp.goaway_code = self.goaway_code

    def response(self, stream_id: int, timeout: float = 5.0) -> Response:
        """Read until ``stream_id`` ends (END_STREAM, RST_STREAM, GOAWAY or
        socket close) or ``timeout`` seconds pass (then ``timed_out``)."""
        r = self.responses[stream_id]
        deadline = time.monotonic() + timeout
        while not r.finished:
            if not self._read_once(deadline):
                if self.closed and not r.finished:
                    r.closed = True
                    break
                r.timed_out = True
                break
        return r

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Read (answering pings) until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._read_once(deadline)
        return self.closed

    def close(self) -> None:
        """Close the socket (no GOAWAY)."""
        self.closed = True
        self.sock.close()

    def __enter__(self) -> "H2Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
