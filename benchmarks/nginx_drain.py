"""Calls lost when a backend behind nginx is stopped while nginx still
routes to it (no ``down`` + reload first).

The set-up of tests/test_nginx.py (our own nginx, ``grpc_pass`` to two
asyncgrpc backends in subprocesses, six client threads calling through
nginx without pause, each call its own value): SIGTERM backend "a"
(``stop(grace=10)``) without taking it out of rotation, wait until it has
exited and "b" answered 200 more calls. Repeated; prints what failed per
drain. The backends run the in-place extension's core
(``asyncgrpc._core.CORE_PATCHES`` says whether asyncgrpc's patches are in).
Needs nginx (``bash scripts/dev.sh`` installs it).

    python benchmarks/nginx_drain.py --drains 12
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import asyncgrpc  # noqa: E402
import test_nginx as tn  # noqa: E402  (tests/test_nginx.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drains", type=int, default=12)
    args = parser.parse_args()
    print(f"backends on core {asyncgrpc.core_version()} "
          f"(patches: {', '.join(asyncgrpc._core.CORE_PATCHES) or 'none'})")
    lossy, total = 0, collections.Counter()
    for n in range(args.drains):
        failures, problems = tn.drain_backend_in_rotation()
        total.update(failures)
        lossy += bool(failures)
        print(f"drain {n}: {dict(failures) or 'nothing lost'}", flush=True)
        if failures:
            print("  nginx: " + "\n  nginx: ".join(problems[-5:]), flush=True)
    print(f"drains that lost calls: {lossy} of {args.drains}; {dict(total) or 'none'}")


if __name__ == "__main__":
    main()
