"""TLS ports: server-only TLS and mutual TLS, with the auth context read
from the core. Certificates are made here with openssl, never committed."""
from __future__ import annotations

import os
import subprocess

import grpc
import pytest

import asyncgrpc

from test_unary import add_raw_methods, path


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(d: str, name: str, cn: str, ext: str) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
             cwd=d)
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=asyncgrpc test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _issue(d, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
           "extendedKeyUsage=serverAuth\n")
    _issue(d, "client", "test-client", "subjectAltName=DNS:test-client\n"
           "extendedKeyUsage=clientAuth\n")

    def read(name: str) -> bytes:
        with open(os.path.join(d, name), "rb") as f:
            return f.read()
    return {name: read(name) for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _serve_tls(server_thread, pki, recorder, require_client_auth):
    async def who(request, context):
        recorder.add((context.auth_context(), context.peer_identities(),
                      context.peer_identity_key()))
        return b"secret " + request
    credentials = asyncgrpc.ssl_server_credentials(
        [(pki["server.key"], pki["server.pem"])],
        root_certificates=pki["ca.pem"] if require_client_auth else None,
        require_client_auth=require_client_auth)

    def setup(server):
        add_raw_methods(server, {"Who": who})
        server_thread.tls_port = server.add_secure_port("127.0.0.1:0", credentials)
    server_thread.start(setup)
    return server_thread.tls_port


def test_tls_port_serves_and_reports_ssl(server_thread, pki, recorder):
    port = _serve_tls(server_thread, pki, recorder, require_client_auth=False)
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"])
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        assert channel.unary_unary(path("Who"))(b"hi", timeout=10) == b"secret hi"
    auth, identities, key = recorder.items[0]
    assert auth["transport_security_type"] == [b"ssl"]
    assert identities is None and key is None
    # the plaintext port still answers in plaintext
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary(path("Who"))(b"x", timeout=10) == b"secret x"


def test_mutual_tls_exposes_peer_identities(server_thread, pki, recorder):
    port = _serve_tls(server_thread, pki, recorder, require_client_auth=True)
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"],
                                         private_key=pki["client.key"],
                                         certificate_chain=pki["client.pem"])
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        assert channel.unary_unary(path("Who"))(b"me", timeout=10) == b"secret me"
    auth, identities, key = recorder.items[0]
    assert key is not None and identities
    assert b"test-client" in identities
    # without a client certificate the handshake is refused
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"])
    with grpc.secure_channel(f"localhost:{port}", no_cert) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("Who"))(b"me", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpcio_credentials_are_refused_clearly():
    server = asyncgrpc.server()
    with pytest.raises(TypeError, match="ssl_server_credentials"):
        server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(b"k", b"c")]))
    with pytest.raises(ValueError, match="root_certificates"):
        asyncgrpc.ssl_server_credentials([(b"k", b"c")], require_client_auth=True)
