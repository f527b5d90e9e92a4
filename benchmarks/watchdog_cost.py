"""What the blocked-loop watchdog costs the event loop.

Spins an asyncio loop that does nothing but turn (10 tasks awaiting
asyncio.sleep(0)) for a few seconds, alternately with the watchdog off and
on (threshold 0.1 s), and reports the median loop turns per second of each
and the difference. A loop that serves RPCs does far more work per turn, so
this is an upper bound of the watchdog's share.

    taskset -c 0 python benchmarks/watchdog_cost.py [--runs 8] [--seconds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from asyncgrpc import _watchdog


async def turns_per_second(seconds: float, watchdog_on: bool) -> float:
    loop = asyncio.get_running_loop()
    watchdog = _watchdog.Watchdog(loop, 0.1 if watchdog_on else None)
    watchdog.start()
    turns = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal turns
        while time.monotonic() < end:
            await asyncio.sleep(0)
            turns += 1
    await asyncio.gather(*[worker() for _ in range(10)])
    watchdog.stop()
    return turns / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    results: dict = {False: [], True: []}
    for _ in range(args.runs):
        for on in (False, True):
            results[on].append(asyncio.run(turns_per_second(args.seconds, on)))
    off, on = statistics.median(results[False]), statistics.median(results[True])
    spread = (max(results[False]) - min(results[False])) / off
    print(f"loop turns/s, median of {args.runs} x {args.seconds:g} s: watchdog off {off:,.0f}, "
          f"on {on:,.0f}; cost {100 * (off - on) / off:.2f}% "
          f"(run-to-run spread {100 * spread:.0f}%)")


if __name__ == "__main__":
    main()
