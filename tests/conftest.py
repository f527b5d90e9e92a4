"""Test harness: asyncgrpc servers on their own event-loop thread, talked to
by real grpcio clients (sync and aio) from the test's thread.

Every server test runs once on the default asyncio loop and once on uvloop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
from typing import Any, Callable, Iterator, List, Optional

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GENERATED = os.path.join(HERE, "_generated")


def _generate_stubs() -> None:
    """Generate the grpcio stubs of proto/*.proto into tests/_generated."""
    from grpc_tools import protoc

    os.makedirs(GENERATED, exist_ok=True)
    proto_dir = os.path.join(ROOT, "proto")
    for name in ("helloworld.proto",):
        rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={GENERATED}",
                          f"--grpc_python_out={GENERATED}", os.path.join(proto_dir, name)])
        assert rc == 0, f"protoc failed for {name}"


_generate_stubs()
sys.path.insert(0, GENERATED)

LOOP_KINDS = ["asyncio", "uvloop"]


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class ServerThread:
    """An event loop on a thread of its own, serving one asyncgrpc server."""

    def __init__(self, loop_kind: str) -> None:
        self.loop_kind = loop_kind
        self.loop = new_loop(loop_kind)
        self.thread = threading.Thread(target=self._run, name=f"server-{loop_kind}",
                                       daemon=True)
        self.thread.start()
        self.server: Any = None
        self.port: Optional[int] = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run ``fn()`` (a plain function or a coroutine function) on the loop."""
        async def wrapper() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def start(self, setup: Callable[[Any], None], **server_kwargs: Any) -> int:
        """Create a server, let ``setup(server)`` add handlers, bind a free
        port and start; returns the port."""
        import asyncgrpc

        async def go() -> int:
            self.server = asyncgrpc.server(**server_kwargs)
            setup(self.server)
            port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
            return port
        self.port = self.call(go)
        return self.port

    def stop(self, grace: Optional[float] = None) -> None:
        if self.server is not None and self.server._started:
            self.call(lambda: self.server.stop(grace), timeout=60)

    def close(self) -> None:
        try:
            self.stop(None)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.loop.is_running():
                self.loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: Any) -> str:
    return request.param


@pytest.fixture
def server_thread(loop_kind: str) -> Iterator[ServerThread]:
    st = ServerThread(loop_kind)
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def thread_pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=32)
    yield pool
    pool.shutdown(wait=True)


class Recorder:
    """Thread-safe notes from handlers, read by the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: List[Any] = []
        self.event = threading.Event()

    def add(self, item: Any) -> None:
        with self.lock:
            self.items.append(item)
        self.event.set()

    def wait_for(self, predicate: Callable[[List[Any]], bool], timeout: float = 10) -> bool:
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(list(self.items)):
                    return True
            time.sleep(0.01)
        return False


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
