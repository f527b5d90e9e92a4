"""Each handler runs in an asyncio task of its own: ``asyncio.current_task()``
is that task (named after the method), ``asyncio.timeout`` works inside it,
the loop's own task factory is respected, and on Python 3.12+ (where tasks
start eagerly) a handler that suspends still runs to the end."""
from __future__ import annotations

import asyncio
import sys
from typing import Any, List

import grpc
import pytest

import asyncgrpc

from conftest import Recorder, ServerThread

SERVICE = "test.Tasks"


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def _setup(recorder: Recorder):
    async def who(request: bytes, context: Any) -> bytes:
        task = asyncio.current_task()
        recorder.add(("who", task is not None and task.get_name()))
        return request

    async def sleepy(request: bytes, context: Any) -> bytes:
        before = asyncio.current_task()
        await asyncio.sleep(0.01)
        assert asyncio.current_task() is before
        return b"slept:" + request

    async def timed(request: bytes, context: Any) -> bytes:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
        except TimeoutError:
            return b"timed out"
        return b"no timeout"

    async def aborts(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no " + request.decode())

    def setup(server: Any) -> None:
        server.add_registered_method_handlers(SERVICE, {
            name: asyncgrpc.unary_unary_rpc_method_handler(fn)
            for name, fn in (("Who", who), ("Sleepy", sleepy), ("Timed", timed),
                             ("Aborts", aborts))})
    return setup


def test_handler_runs_in_its_own_named_task(server_thread: ServerThread,
                                            recorder: Recorder) -> None:
    server_thread.start(_setup(recorder))
    with grpc.insecure_channel(server_thread.target) as channel:
        for i in range(20):
            own = b"%d" % i
            assert channel.unary_unary(path("Who"))(own, timeout=10) == own
            assert channel.unary_unary(path("Sleepy"))(own, timeout=10) == b"slept:" + own
        assert channel.unary_unary(path("Timed"))(b"", timeout=10) == b"timed out"
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path("Aborts"))(b"you", timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.value.details() == "no you"
    assert recorder.items == [("who", path("Who"))] * 20


def test_the_loops_task_factory_is_used(server_thread: ServerThread,
                                        recorder: Recorder) -> None:
    made: List[asyncio.Task] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    server_thread.call(lambda: asyncio.get_running_loop().set_task_factory(factory))
    server_thread.start(_setup(recorder))
    with grpc.insecure_channel(server_thread.target) as channel:
        assert channel.unary_unary(path("Who"))(b"x", timeout=10) == b"x"
        assert channel.unary_unary(path("Sleepy"))(b"y", timeout=10) == b"slept:y"
    names = [task.get_name() for task in made]   # 3.11 names it after the factory
    assert path("Who") in names and path("Sleepy") in names, names
    assert recorder.items == [("who", path("Who"))]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks need Python 3.12")
def test_handler_tasks_start_eagerly_on_312() -> None:
    """The factory the server gives the C core on 3.12+ runs a task's first
    step at once (a handler that does not suspend is done when its task is
    made); a loop with a task factory of its own keeps it."""
    from asyncgrpc._server import _eager_task_factory

    async def main() -> None:
        loop = asyncio.get_running_loop()
        factory = _eager_task_factory(loop)
        assert factory is not None

        async def quick() -> int:
            return 5
        task = factory(quick(), name="/s/M")
        assert task.done() and task.result() == 5 and task.get_name() == "/s/M"
        loop.set_task_factory(lambda lp, coro, **kw: asyncio.Task(coro, loop=lp, **kw))
        assert _eager_task_factory(loop) is None
    asyncio.run(main())
