"""The server-side gRPC interop test cases, run by a grpcio client against
``python -m asyncgrpc.interop`` started as a subprocess.

The server impl is chosen by ``ASYNCGRPC_SERVER_IMPLS`` (comma-separated:
``asyncgrpc``, ``grpc_aio``, or ``all``; default ``asyncgrpc``), so the same
cases check asyncgrpc and, as a reference, grpc.aio::

    ASYNCGRPC_SERVER_IMPLS=all pytest tests/test_interop.py

Compression is checked on the wire: a byte-counting TCP proxy sits between
client and server, since grpcio does not show a client the per-message
compressed flag.
"""
from __future__ import annotations

import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator, List, Optional

import grpc
import pytest
from google.protobuf import message_factory

from asyncgrpc.interop import load_protos

from _proxy import CountingProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS_ENV = "ASYNCGRPC_SERVER_IMPLS"
ALL_IMPLS = ("asyncgrpc", "grpc_aio")


def _impls() -> List[str]:
    names = [n.strip() for n in os.environ.get(IMPLS_ENV, "asyncgrpc").split(",") if n.strip()]
    if names == ["all"]:
        return list(ALL_IMPLS)
    for name in names:
        assert name in ALL_IMPLS, f"{IMPLS_ENV}: unknown impl {name!r}"
    return names


PROTOS = load_protos()
messages = PROTOS.messages_pb2
empty_pb2 = PROTOS.empty_pb2
SERVICES = PROTOS.test_pb2.DESCRIPTOR.services_by_name
TIMEOUT = 10  # seconds, for every RPC expected to succeed

ECHO_INITIAL = ("x-grpc-test-echo-initial", "test_initial_metadata_value")
ECHO_TRAILING = ("x-grpc-test-echo-trailing-bin", b"\xab\xab\xab")


# -- helpers ---------------------------------------------------------------

def make_stub(channel: grpc.Channel, service: Any) -> SimpleNamespace:
    """grpcio multicallables for each method of a service descriptor (the
    client-side twin of asyncgrpc.add_servicer; no *_pb2_grpc needed)."""
    stub = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        factory = {
            (False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        stub[method.name] = factory(f"/{service.full_name}/{method.name}",
                                    request_serializer=request.SerializeToString,
                                    response_deserializer=response.FromString)
    return SimpleNamespace(**stub)


class Requests:
    """A request iterator the test feeds one message at a time;
    ``close()`` half-closes the stream."""

    _DONE = object()

    def __init__(self) -> None:
        self._queue: "queue.Queue[Any]" = queue.Queue()

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._DONE)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            yield item


def zeros(size: int) -> Any:
    return messages.Payload(body=bytes(size))


def bool_value(value: bool) -> Any:
    return messages.BoolValue(value=value)


def output_request(*sizes: int, payload: int = 0, **kwargs: Any) -> Any:
    return messages.StreamingOutputCallRequest(
        response_parameters=[messages.ResponseParameters(size=s) for s in sizes],
        payload=zeros(payload), **kwargs)


def large_unary_request(**kwargs: Any) -> Any:
    return messages.SimpleRequest(response_size=314159, payload=zeros(271828), **kwargs)


class InteropServer:
    """``python -m asyncgrpc.interop`` in a subprocess, on a port it picks."""

    def __init__(self, impl: str, *extra: str) -> None:
        self.impl = impl
        self.stderr = tempfile.TemporaryFile()
        dev = ["-X", "dev"] if sys.flags.dev_mode else []  # as the suite runs
        cmd = [sys.executable, *dev, "-m", "asyncgrpc.interop", "--port", "0",
               "--host", "127.0.0.1", "--server_impl", impl, *extra]
        self.log = ""
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=self.stderr)
        self.port = self._read_port(deadline=time.monotonic() + 20)

    def _read_port(self, deadline: float) -> int:
        assert self.proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            if not ready:
                self.close()
                raise AssertionError(f"{self.impl} interop server did not start in time:\n"
                                     f"{self.log}")
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                rc = self.close()
                raise AssertionError(f"{self.impl} interop server exited ({rc}):\n{self.log}")
            line += chunk
        assert b"listening on" in line, line
        return int(line.split()[-1])

    def close(self) -> Optional[int]:
        """Stop the server (SIGTERM, then SIGKILL); its stderr ends up in
        ``self.log``. Returns its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self.stderr.closed:
            self.stderr.seek(0)
            self.log = self.stderr.read().decode(errors="replace")[-5000:]
            self.stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


# -- fixtures --------------------------------------------------------------

@pytest.fixture(scope="module", params=_impls())
def server(request: Any) -> Iterator[InteropServer]:
    srv = InteropServer(request.param)
    yield srv
    rc = srv.close()
    assert rc == 0, f"{srv.impl} interop server exited with {rc} on SIGTERM:\n{srv.log}"
    assert "Traceback" not in srv.log, f"{srv.impl} interop server logged:\n{srv.log}"


@pytest.fixture(scope="module")
def channel(server: InteropServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> SimpleNamespace:
    return make_stub(channel, SERVICES["TestService"])


@pytest.fixture
def proxy(server: InteropServer) -> Iterator[SimpleNamespace]:
    """A fresh channel to the server through a byte-counting proxy."""
    counting = CountingProxy(server.port)
    ch = grpc.insecure_channel(f"127.0.0.1:{counting.port}")
    try:
        yield SimpleNamespace(counts=counting, stub=make_stub(ch, SERVICES["TestService"]))
    finally:
        ch.close()
        counting.close()


# -- the interop cases -----------------------------------------------------

def test_empty_unary(stub):
    response = stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT)
    assert isinstance(response, empty_pb2.Empty)
    assert response.ByteSize() == 0


def test_large_unary(stub):
    response = stub.UnaryCall(large_unary_request(), timeout=TIMEOUT)
    assert response.payload.body == bytes(314159)
    assert response.payload.type == messages.COMPRESSABLE


def test_cacheable_unary_answers(stub):
    first = stub.CacheableUnaryCall(messages.SimpleRequest(), timeout=TIMEOUT)
    second = stub.CacheableUnaryCall(messages.SimpleRequest(), timeout=TIMEOUT)
    assert first.payload.body and second.payload.body != first.payload.body


def test_client_streaming(stub):
    sizes = [27182, 8, 1828, 45904]
    response = stub.StreamingInputCall(
        iter([messages.StreamingInputCallRequest(payload=zeros(s)) for s in sizes]),
        timeout=TIMEOUT)
    assert response.aggregated_payload_size == 74922


def test_server_streaming(stub):
    sizes = [31415, 9, 2653, 58979]
    responses = list(stub.StreamingOutputCall(output_request(*sizes), timeout=TIMEOUT))
    assert [len(r.payload.body) for r in responses] == sizes
    assert all(r.payload.body == bytes(len(r.payload.body)) for r in responses)


def test_server_streaming_honours_interval_us(stub):
    request = messages.StreamingOutputCallRequest(response_parameters=[
        messages.ResponseParameters(size=10, interval_us=150_000),
        messages.ResponseParameters(size=20, interval_us=150_000)])
    started = time.monotonic()
    arrivals = []
    for response in stub.StreamingOutputCall(request, timeout=TIMEOUT):
        arrivals.append((time.monotonic() - started, len(response.payload.body)))
    assert [size for _, size in arrivals] == [10, 20]
    assert arrivals[0][0] >= 0.14
    assert arrivals[1][0] - arrivals[0][0] >= 0.14


def test_ping_pong(stub):
    requests = Requests()
    responses = stub.FullDuplexCall(iter(requests), timeout=TIMEOUT)
    try:
        for size, payload in [(31415, 27182), (9, 8), (2653, 1828), (58979, 45904)]:
            requests.send(output_request(size, payload=payload))
            response = next(responses)
            assert len(response.payload.body) == size
    finally:
        requests.close()
    assert list(responses) == []
    assert responses.code() == grpc.StatusCode.OK


def test_half_duplex_answers_after_half_close(stub):
    requests = Requests()
    responses = stub.HalfDuplexCall(iter(requests), timeout=TIMEOUT)
    received: List[Any] = []
    reader = threading.Thread(target=lambda: received.extend(responses), daemon=True)
    reader.start()
    try:
        requests.send(output_request(5, 6))
        requests.send(output_request(7))
        time.sleep(0.3)
        assert received == [], "the server answered before the client half-closed"
    finally:
        requests.close()
    reader.join(TIMEOUT)
    assert [len(r.payload.body) for r in received] == [5, 6, 7]
    assert responses.code() == grpc.StatusCode.OK


def test_empty_stream(stub):
    responses = stub.FullDuplexCall(iter([]), timeout=TIMEOUT)
    assert list(responses) == []
    assert responses.code() == grpc.StatusCode.OK


def _metadata_value(metadata: Any, key: str) -> Any:
    values = [m.value for m in metadata or () if m.key == key]
    assert len(values) == 1, f"{key} in {metadata!r}"
    return values[0]


def test_custom_metadata(stub):
    metadata = (ECHO_INITIAL, ECHO_TRAILING)
    response, call = stub.UnaryCall.with_call(large_unary_request(), metadata=metadata,
                                              timeout=TIMEOUT)
    assert len(response.payload.body) == 314159
    assert _metadata_value(call.initial_metadata(), ECHO_INITIAL[0]) == ECHO_INITIAL[1]
    assert _metadata_value(call.trailing_metadata(), ECHO_TRAILING[0]) == ECHO_TRAILING[1]

    responses = stub.FullDuplexCall(iter([output_request(314159, payload=271828)]),
                                    metadata=metadata, timeout=TIMEOUT)
    assert [len(r.payload.body) for r in responses] == [314159]
    assert _metadata_value(responses.initial_metadata(), ECHO_INITIAL[0]) == ECHO_INITIAL[1]
    assert _metadata_value(responses.trailing_metadata(), ECHO_TRAILING[0]) == ECHO_TRAILING[1]


def _assert_status(stub, code: int, message: str) -> None:
    echo = messages.EchoStatus(code=code, message=message)
    with pytest.raises(grpc.RpcError) as raised:
        stub.UnaryCall(messages.SimpleRequest(response_status=echo), timeout=TIMEOUT)
    assert raised.value.code().value[0] == code
    assert raised.value.details() == message

    responses = stub.FullDuplexCall(
        iter([messages.StreamingOutputCallRequest(response_status=echo)]), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as raised:
        list(responses)
    assert raised.value.code().value[0] == code
    assert raised.value.details() == message


def test_status_code_and_message(stub):
    _assert_status(stub, 2, "test status message")


def test_special_status_message(stub):
    _assert_status(stub, 2, "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n")


def test_status_with_echoed_trailing_metadata(stub):
    echo = messages.EchoStatus(code=9, message="failed precondition, as asked")
    with pytest.raises(grpc.RpcError) as raised:
        stub.UnaryCall(messages.SimpleRequest(response_status=echo),
                       metadata=(ECHO_INITIAL, ECHO_TRAILING), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _metadata_value(raised.value.trailing_metadata(), ECHO_TRAILING[0]) \
        == ECHO_TRAILING[1]


def test_unimplemented_method(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.UnimplementedCall(empty_pb2.Empty(), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_unimplemented_service(channel):
    other = make_stub(channel, SERVICES["UnimplementedService"])
    with pytest.raises(grpc.RpcError) as raised:
        other.UnimplementedCall(empty_pb2.Empty(), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_cancel_after_begin(stub):
    requests = Requests()
    future = stub.StreamingInputCall.future(iter(requests), timeout=TIMEOUT)
    try:
        time.sleep(0.05)
        assert future.cancel()
    finally:
        requests.close()
    assert future.cancelled()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(TIMEOUT)
    # The server is still fine afterwards.
    assert stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT) is not None


def test_cancel_after_first_response(stub):
    requests = Requests()
    responses = stub.FullDuplexCall(iter(requests), timeout=TIMEOUT)
    try:
        requests.send(output_request(31415, payload=27182))
        assert len(next(responses).payload.body) == 31415
        responses.cancel()
    finally:
        requests.close()
    with pytest.raises(grpc.RpcError) as raised:
        list(responses)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT) is not None


def test_timeout_on_sleeping_server(stub):
    requests = Requests()
    responses = stub.FullDuplexCall(iter(requests), timeout=0.001)
    try:
        requests.send(messages.StreamingOutputCallRequest(payload=zeros(27182)))
        with pytest.raises(grpc.RpcError) as raised:
            list(responses)
    finally:
        requests.close()
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT) is not None


# -- compression, checked on the wire --------------------------------------

def test_server_compressed_unary(proxy):
    # Warm the connection up so handshake bytes are not counted.
    proxy.stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT)

    proxy.counts.reset()
    response = proxy.stub.UnaryCall(large_unary_request(response_compressed=bool_value(True)),
                                    timeout=TIMEOUT)
    assert response.payload.body == bytes(314159)
    assert proxy.counts.downstream < 20_000, "the response was not compressed"

    proxy.counts.reset()
    response = proxy.stub.UnaryCall(large_unary_request(response_compressed=bool_value(False)),
                                    timeout=TIMEOUT)
    assert response.payload.body == bytes(314159)
    assert proxy.counts.downstream > 314159, "the response was compressed"


def test_server_compressed_streaming(proxy):
    proxy.stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT)
    proxy.counts.reset()
    request = messages.StreamingOutputCallRequest(response_parameters=[
        messages.ResponseParameters(size=31415, compressed=bool_value(True)),
        messages.ResponseParameters(size=92653, compressed=bool_value(False))])
    responses = list(proxy.stub.StreamingOutputCall(request, timeout=TIMEOUT))
    assert [r.payload.body for r in responses] == [bytes(31415), bytes(92653)]
    # Only the second message went out as is: 92653 bytes plus framing.
    assert 92653 < proxy.counts.downstream < 92653 + 10_000, proxy.counts.downstream


@pytest.mark.skip(reason=(
    "client_compressed_unary's feature probe (an uncompressed request with "
    "expect_compressed=true must fail with INVALID_ARGUMENT) needs the server to "
    "know whether a request arrived compressed. gRPC C core 1.51 offers no public "
    "way: it decompresses before the application sees the message, and with "
    "grpc.per_message_decompression=0 it hands over the compressed bytes without "
    "marking them (checked on this machine). grpc.aio cannot either."))
def test_client_compressed_unary_feature_probe(proxy):
    with pytest.raises(grpc.RpcError) as info:
        proxy.stub.UnaryCall(large_unary_request(expect_compressed=bool_value(True)),
                             timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_compressed_unary(proxy):
    # The compressed requests themselves (the probe is the skipped test above).
    proxy.counts.reset()
    response = proxy.stub.UnaryCall(large_unary_request(expect_compressed=bool_value(True)),
                                    compression=grpc.Compression.Gzip, timeout=TIMEOUT)
    assert len(response.payload.body) == 314159
    assert proxy.counts.upstream < 20_000, "the request was not compressed"

    response = proxy.stub.UnaryCall(large_unary_request(expect_compressed=bool_value(False)),
                                    timeout=TIMEOUT)
    assert len(response.payload.body) == 314159


def test_client_compressed_streaming(proxy):
    proxy.stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT)
    proxy.counts.reset()
    requests = [
        messages.StreamingInputCallRequest(payload=zeros(27182),
                                           expect_compressed=bool_value(True)),
        messages.StreamingInputCallRequest(payload=zeros(45904),
                                           expect_compressed=bool_value(False)),
    ]
    response = proxy.stub.StreamingInputCall(iter(requests), compression=grpc.Compression.Gzip,
                                             timeout=TIMEOUT)
    assert response.aggregated_payload_size == 73086
    assert proxy.counts.upstream < 20_000, "the requests were not compressed"


# -- TLS -------------------------------------------------------------------

def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: Any) -> SimpleNamespace:
    """A throw-away CA and a server certificate for localhost/127.0.0.1."""
    d = str(tmp_path_factory.mktemp("tls"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=asyncgrpc interop test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                "basicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2",
             "-extfile", "server.ext", cwd=d)
    return SimpleNamespace(ca=os.path.join(d, "ca.pem"), cert=os.path.join(d, "server.pem"),
                           key=os.path.join(d, "server.key"))


@pytest.fixture(scope="module", params=_impls())
def tls_server(request: Any, tls_files: SimpleNamespace) -> Iterator[InteropServer]:
    srv = InteropServer(request.param, "--use_tls", "--tls_cert_file", tls_files.cert,
                        "--tls_key_file", tls_files.key)
    yield srv
    srv.close()


def test_large_unary_over_tls(tls_server, tls_files):
    with open(tls_files.ca, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    with grpc.secure_channel(f"localhost:{tls_server.port}", credentials) as ch:
        tls_stub = make_stub(ch, SERVICES["TestService"])
        response = tls_stub.UnaryCall(large_unary_request(), timeout=TIMEOUT)
    assert response.payload.body == bytes(314159)


# -- generation of the *_pb2 modules ------------------------------------------

_LOAD = """
import sys
{prelude}
from asyncgrpc.interop import load_protos, ProtoError
try:
    protos = load_protos()
except ProtoError as exc:
    print("ProtoError:", exc)
else:
    service = protos.test_pb2.DESCRIPTOR.services_by_name["TestService"]
    print(protos.directory, len(service.methods))
"""

_NO_GRPC_TOOLS = """
class NoGrpcTools:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc_tools" or name.startswith("grpc_tools."):
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, NoGrpcTools())
"""


def _load_in_subprocess(cache: str, prelude: str = "") -> "subprocess.Popen[str]":
    return subprocess.Popen([sys.executable, "-c", _LOAD.format(prelude=prelude)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "ASYNCGRPC_INTEROP_CACHE": cache})


def test_pb2_generated_once_into_the_cache(tmp_path):
    # Two processes racing on an empty cache both succeed and share one copy.
    procs = [_load_in_subprocess(str(tmp_path)) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    directories = {out.split()[0] for out, _ in outputs}
    assert len(directories) == 1 and all(out.split()[1] == "8" for out, _ in outputs)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert len(generated) == 1, generated  # no staging directories left behind
    assert sorted(p.name for p in (tmp_path / generated[0]).glob("*.py")) == [
        "__init__.py", "empty_pb2.py", "messages_pb2.py", "test_pb2.py"]


def test_pb2_generation_names_grpcio_tools_when_missing(tmp_path):
    proc = _load_in_subprocess(str(tmp_path), _NO_GRPC_TOOLS)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("ProtoError:") and "pip install grpcio-tools" in out, out
