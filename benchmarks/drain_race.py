"""How often replies in flight are lost when a server stops with a grace.

50 unary calls (each sleeps 0.5 s in the handler) are in flight on one
connection when the server's stop(grace=10) begins: GOAWAY goes out at once
and the core closes the connection right after the last reply. Counts the
repetitions in which the client lost replies, for asyncgrpc and grpc.aio, with
the client's BDP pings on (grpcio's default) and off. A ping that arrives as
the core closes is unread data, so the kernel resets the connection and
replies still on the way are lost. The bundled core's patch
close-after-peer-read (scripts/core_patches.py) closes only once the client
has acknowledged a PING sent after the last reply.

    python benchmarks/drain_race.py --reps 40
"""
from __future__ import annotations

import argparse
import asyncio
import threading
from typing import List, Tuple

import grpc
import grpc.aio


def _serve(kind: str, loop_kind: str, port_box: List[int], ready: threading.Event,
           stop: threading.Event) -> None:
    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(0.5)
        return request

    async def main() -> None:
        if kind == "asyncgrpc":
            import asyncgrpc
            server = asyncgrpc.server(blocked_loop_threshold=None)
            server.add_registered_method_handlers(
                "t.S", {"Slow": asyncgrpc.unary_unary_rpc_method_handler(slow)})
        else:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                "t.S", {"Slow": grpc.unary_unary_rpc_method_handler(slow)})])
        port_box.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        await server.stop(10)

    if loop_kind == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(main())


def one_rep(kind: str, loop_kind: str, bdp: bool) -> int:
    port_box: List[int] = []
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_serve, args=(kind, loop_kind, port_box, ready, stop))
    thread.start()
    ready.wait(10)

    async def client() -> list:
        options = [] if bdp else [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port_box[0]}",
                                             options=options) as channel:
            method = channel.unary_unary("/t.S/Slow")
            calls = [asyncio.ensure_future(method(str(i).encode(), timeout=30))
                     for i in range(50)]
            await asyncio.sleep(0.2)
            stop.set()
            return await asyncio.gather(*calls, return_exceptions=True)
    results = asyncio.run(client())
    thread.join()
    return sum(isinstance(r, Exception) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--servers", nargs="+", default=["asyncgrpc", "grpc.aio"],
                        choices=["asyncgrpc", "grpc.aio"])
    args = parser.parse_args()
    rows: List[Tuple[str, str, str, int, int]] = []
    for kind in args.servers:
        for loop_kind in ("asyncio", "uvloop"):
            for bdp in (True, False):
                lost = [one_rep(kind, loop_kind, bdp) for _ in range(args.reps)]
                rows.append((kind, loop_kind, "on" if bdp else "off",
                             sum(1 for n in lost if n), sum(lost)))
    import asyncgrpc
    print(f"asyncgrpc on core {asyncgrpc.core_version()} "
          f"(patches: {', '.join(asyncgrpc._core.CORE_PATCHES) or 'none'}), "
          f"grpcio {grpc.__version__}, {args.reps} repetitions of 50 calls in flight")
    print("| server | loop | client BDP pings | reps with lost replies | replies lost |")
    print("|---|---|---|---|---|")
    for kind, loop_kind, bdp, reps, lost in rows:
        print(f"| {kind} | {loop_kind} | {bdp} | {reps} | {lost} |")


if __name__ == "__main__":
    main()
