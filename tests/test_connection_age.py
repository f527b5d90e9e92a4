"""The server options docs/deploy.md recommends so long-lived HTTP/2
connections rebalance: ``grpc.max_connection_age_ms`` with
``grpc.max_connection_age_grace_ms``.

One grpcio channel calls continuously (each call its own value) for several
connection ages: the server closes each connection with GOAWAY when it
reaches its age, the client opens a new one (a new peer address, so a new
pick by any connection-level balancer), and no call fails.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, List, Set

import grpc

import asyncgrpc

from conftest import Recorder, ServerThread

SERVICE = "test.Age"
AGE_MS = 300


def test_max_connection_age_moves_clients_to_new_connections_without_failures(
        server_thread: ServerThread, recorder: Recorder) -> None:
    async def work(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
        recorder.add(context.peer())
        await asyncio.sleep(0.005)
        return request

    server_thread.start(
        lambda s: s.add_registered_method_handlers(
            SERVICE, {"Work": asyncgrpc.unary_unary_rpc_method_handler(work)}),
        options=[("grpc.max_connection_age_ms", AGE_MS),
                 ("grpc.max_connection_age_grace_ms", 5000)])
    failures: List[str] = []
    with grpc.insecure_channel(server_thread.target) as channel:
        method = channel.unary_unary(f"/{SERVICE}/Work")
        i = 0
        # Bounded: until the client has been on 3 connections, at most 15 s.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and i < 20000:
            value = f"call-{i}".encode()
            try:
                if method(value, timeout=10) != value:
                    failures.append(f"wrong reply to {value!r}")
            except grpc.RpcError as err:
                failures.append(f"{value!r}: {err.code().name}: {err.details()}")
            i += 1
            with recorder.lock:
                peers: Set[Any] = set(recorder.items)
            if len(peers) >= 3:
                break
    assert len(peers) >= 3, f"one connection for {i} calls: max_connection_age had no effect"
    assert failures == []
