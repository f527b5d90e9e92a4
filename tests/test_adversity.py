"""Defects found by adversarial tests (issue 8, section 1), one test each.

Each test here failed before its fix: more calls in flight than request
slots, each checking its own values; a server collected half-stopped; a
read() cut short by a timeout; a context used after its RPC ended; a start()
that fails half-way; KeyboardInterrupt raised where the server runs Python
code; a fork with a running server; counters after a failed creation.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import grpc
import grpc.aio
import pytest

import asyncgrpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SERVICE = "test.Adversity"
SLOTS = asyncgrpc._core.REQUESTS_PER_METHOD


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def run_script(source: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run ``source`` in a fresh interpreter (the tests' sys.path) with a timeout."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE] + sys.path), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------- 1.1: each call its own metadata

def _echo_identity(register: str):
    """A handler answering with what the server saw of *this* call."""
    async def identity(request: bytes, context: asyncgrpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        # Hold every call a moment so that far more calls are in flight than
        # request slots are posted, and the slots get re-posted under load.
        await asyncio.sleep(0.05)
        md_later = dict(context.invocation_metadata())
        return json.dumps({
            "x-id": md.get("x-id"), "x-id-later": md_later.get("x-id"),
            "x-chan": md.get("x-chan"), "x-auth-bin": (md.get("x-auth-bin") or b"").hex(),
            "payload": request.decode() if isinstance(request, bytes) else None,
            "remaining": context.time_remaining(), "peer": context.peer(),
        }).encode()

    async def identity_stream(request_iterator, context):
        first = None
        async for message in request_iterator:
            first = message if first is None else first
        yield await identity(first, context)

    handler = (asyncgrpc.stream_stream_rpc_method_handler(identity_stream)
               if register == "streaming" else asyncgrpc.unary_unary_rpc_method_handler(identity))

    def setup(server) -> None:
        if register == "generic":
            server.add_generic_rpc_handlers([asyncgrpc.method_handlers_generic_handler(
                SERVICE, {"Identity": handler})])
        else:
            server.add_registered_method_handlers(SERVICE, {"Identity": handler})
    return setup


@pytest.mark.parametrize("register", ["registered", "generic", "streaming"])
def test_each_call_gets_its_own_metadata_deadline_peer_and_payload(server_thread, register):
    """Many more concurrent calls than request slots, each with its own
    x-id, binary auth value, deadline and payload, over several connections:
    every reply must describe its own call (1.1: slots were re-posted before
    their metadata was taken, so calls got each other's headers)."""
    n_calls, n_channels = 5 * SLOTS, 2
    server_thread.start(_echo_identity(register), blocked_loop_threshold=None)

    async def main():
        channels = [grpc.aio.insecure_channel(
            server_thread.target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(n_channels)]
        for ch in channels:
            await ch.channel_ready()
        # Block the server's loop while the burst is sent, so that the calls
        # reach the core together when it resumes: far more than the posted
        # slots, the rest wait in the core and are matched at re-posts.
        blocked = asyncio.get_running_loop().run_in_executor(
            None, server_thread.call, lambda: time.sleep(0.4))
        await asyncio.sleep(0.1)
        try:
            async def one(i: int):
                channel = channels[i % n_channels]
                md = (("x-id", f"id-{i}"), ("x-chan", str(i % n_channels)),
                      ("x-auth-bin", i.to_bytes(4, "big") * 8))
                # Deadlines a factor 2 apart: grpcio's client rounds a
                # grpc-timeout up to one it sent before if that is within
                # about 5% (header compression), on grpc.aio servers too.
                timeout = 20.0 * 2 ** (i % 6)
                started = time.monotonic()
                if register == "streaming":
                    call = channel.stream_stream(path("Identity"))(
                        iter([f"payload-{i}".encode()]), metadata=md, timeout=timeout)
                    replies = [r async for r in call]
                    reply = replies[0]
                else:
                    reply = await channel.unary_unary(path("Identity"))(
                        f"payload-{i}".encode(), metadata=md, timeout=timeout)
                return i, json.loads(reply), timeout, time.monotonic() - started
            results = await asyncio.gather(*[one(i) for i in range(n_calls)])
            await blocked
            return results
        finally:
            for ch in channels:
                await ch.close()

    results = asyncio.run(main())
    wrong = []
    peers_by_channel = {}
    for i, seen, timeout, elapsed in results:
        ok = (seen["x-id"] == f"id-{i}" and seen["x-id-later"] == f"id-{i}"
              and seen["x-chan"] == str(i % n_channels)
              and seen["x-auth-bin"] == (i.to_bytes(4, "big") * 8).hex()
              and seen["payload"] == f"payload-{i}"
              and timeout - elapsed - 2.0 <= seen["remaining"] <= timeout * 1.06)
        if not ok:
            wrong.append((i, seen))
        peers_by_channel.setdefault(seen["x-chan"], set()).add(seen["peer"])
    assert not wrong, f"{len(wrong)} of {n_calls} calls saw another call's values: {wrong[:3]}"
    # One connection per channel: its calls share one peer, and channels differ.
    assert all(len(p) == 1 and next(iter(p)) for p in peers_by_channel.values()), peers_by_channel
    assert len({next(iter(p)) for p in peers_by_channel.values()}) == n_channels
