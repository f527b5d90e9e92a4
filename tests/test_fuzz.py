"""The atheris fuzz harness (fuzz/fuzz_core.py) in short runs, its saved crash inputs, and
direct reproductions of the defects it found that do not abort the process.

The harness checks its invariants itself (see its docstring); a run passes when the process
exits 0 after the requested number of inputs. Under the ASan pass of the suite the
subprocess inherits LD_PRELOAD and runs against the sanitized extension.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import grpc
import pytest

import asyncgrpc

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris); "
                                      "the fuzz harness needs it")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HARNESS = os.path.join(ROOT, "fuzz", "fuzz_core.py")
CRASHES = os.path.join(ROOT, "fuzz", "crashes")
SURFACES = ("unary", "server_stream", "client_stream", "bidi", "options")


def run_harness(args: List[str], tmp_path: os.PathLike, env: Optional[Dict[str, str]] = None,
                timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the harness with libFuzzer ``args``; crash artifacts go to ``tmp_path``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [sys.executable, HARNESS, f"-artifact_prefix={tmp_path}{os.sep}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def tail(text: str, lines: int = 40) -> str:
    """The last lines of a process' output, for assertion messages."""
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.parametrize("loop, runs", [("asyncio", 2000), ("uvloop", 1000)])
def test_short_fuzz_run_finds_no_violation(tmp_path, loop, runs):
    stats_file = tmp_path / "stats.json"
    proc = run_harness([f"-atheris_runs={runs}", "-seed=7"], tmp_path, env={
        "ASYNCGRPC_FUZZ_LOOP": loop, "ASYNCGRPC_FUZZ_STATS": str(stats_file)})
    assert proc.returncode == 0, tail(proc.stderr)
    assert f"done {runs} inputs" in proc.stderr
    if "libasan" in os.environ.get("LD_PRELOAD", ""):      # the suite's ASan pass
        assert "with the ASan runtime preloaded" in proc.stderr
    assert not list(tmp_path.glob("crash-*")), tail(proc.stderr)
    stats = json.loads(stats_file.read_text())
    assert stats["inputs"] == runs and stats["loop"] == loop
    ran = sum(stats.get(s, 0) for s in SURFACES) + sum(
        v for k, v in stats.items() if k.startswith("skipped_known"))
    assert ran == runs, stats
    for surface in SURFACES:        # every surface was driven, not just the cheap ones
        assert stats.get(surface, 0) > 0, stats


# The inputs the fuzzer saved for the defects that abort the whole process. Replayed with
# the harness' known-defect skipping off; each must (once fixed) run clean.
ABORTING = {
    "D2-zerocopy-max-sends-option": "DEFECT D2 (gRPC core, not src/): server(options=[("
                                    "'grpc.experimental.tcp_tx_zerocopy_max_simultaneous_"
                                    "sends', 2**31-1)]) makes the first connection abort the "
                                    "process (allocation of ~687 GB)",
}
FIXED = ["D1-grpc-timeout-initial", "D1-grpc-timeout-trailing"]   # fixed since


@pytest.mark.parametrize("name", FIXED + [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=reason))
    for name, reason in sorted(ABORTING.items())])
def test_saved_crash_input_runs_clean(tmp_path, name):
    proc = run_harness([os.path.join(CRASHES, name)], tmp_path, env={
        "ASYNCGRPC_FUZZ_SKIP_KNOWN": "0", "ASYNCGRPC_FUZZ_RPC_TIMEOUT": "3"})
    assert proc.returncode == 0, tail(proc.stderr)


# ---------------------------------------------------------------- defects, reproduced directly

def serve(server_thread, handler, **server_kwargs: Any) -> str:
    """Serve ``handler`` as the raw unary method /fuzz.Defects/Call; returns the target."""
    server_thread.start(lambda s: s.add_registered_method_handlers(
        "fuzz.Defects", {"Call": asyncgrpc.unary_unary_rpc_method_handler(handler)}),
        **server_kwargs)
    return server_thread.target


def test_trailing_metadata_given_as_iterator_reads_back(server_thread, recorder):
    pairs = [("x-one", "1"), ("x-two-bin", b"\x00\x02")]

    async def handler(request, context):
        context.set_trailing_metadata(iter(pairs))
        recorder.add(context.trailing_metadata())
        return b"ok"
    target = serve(server_thread, handler)
    with grpc.insecure_channel(target) as channel:
        _, call = channel.unary_unary("/fuzz.Defects/Call").with_call(b"", timeout=10)
    assert [tuple(p) for p in call.trailing_metadata()] == pairs     # what the client got
    assert recorder.items == [tuple(pairs)]                          # what the handler reads


def test_bare_bin_key_with_binary_value_never_leaves_the_rpc_without_status(
        server_thread, recorder):
    async def handler(request, context):
        where = dict(context.invocation_metadata())["x-where"]
        try:
            if where == "trailing":
                context.set_trailing_metadata((("-bin", b"\x01\xff"),))
            else:
                await context.send_initial_metadata((("-bin", b"\x01\xff"),))
        except (TypeError, ValueError) as exc:     # refusing it here is fine too
            recorder.add((where, exc))
        return where.encode()
    target = serve(server_thread, handler)
    outcomes = {}
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/fuzz.Defects/Call")
        futures = {where: call.future(b"", timeout=3, metadata=(("x-where", where),))
                   for where in ("trailing", "initial")}     # both at once: one deadline
        for where, future in futures.items():
            try:
                outcomes[where] = (grpc.StatusCode.OK, future.result())
            except grpc.RpcError as err:
                outcomes[where] = (err.code(), None)
    # Either the metadata is refused in the handler (which then answers), or it is sent:
    # never an RPC left without a status until the client's deadline.
    assert outcomes == {"trailing": (grpc.StatusCode.OK, b"trailing"),
                        "initial": (grpc.StatusCode.OK, b"initial")}


def test_negative_grpc_status_in_initial_metadata_does_not_break_the_rpc(server_thread,
                                                                         recorder):
    async def handler(request, context):
        try:
            await context.send_initial_metadata((("grpc-status", "-1"),))
        except (TypeError, ValueError) as exc:     # refusing the reserved key is fine too
            recorder.add(exc)
        return b"answered"
    target = serve(server_thread, handler)
    with grpc.insecure_channel(target) as channel:
        try:
            outcome = (grpc.StatusCode.OK, channel.unary_unary("/fuzz.Defects/Call")(
                b"", timeout=10))
        except grpc.RpcError as err:
            outcome = (err.code(), err.details())
    assert outcome == (grpc.StatusCode.OK, b"answered")


def load_sequence(name: str) -> List[Tuple[Tuple[Tuple[str, Any], ...], Tuple[Tuple[str, Any], ...],
                                         Optional[grpc.StatusCode]]]:
    """A saved RPC sequence: (initial metadata, trailing metadata, abort code or None) each."""
    def pairs(items: List[List[Any]]) -> Tuple[Tuple[str, Any], ...]:
        return tuple((k, base64.b64decode(v["b64"]) if isinstance(v, dict) else v)
                     for k, v in items)
    with open(os.path.join(CRASHES, name)) as f:
        return [(pairs(r["initial"]), pairs(r["trailing"]),
                 getattr(grpc.StatusCode, r["abort"]) if r["abort"] else None)
                for r in json.load(f)]


def test_reserved_metadata_sequence_keeps_the_connection_usable(server_thread):
    sequence = load_sequence("D6-hpack-desync-sequence.json")
    current: Dict[str, Any] = {}

    async def handler(request, context):
        initial, trailing, code = current["step"]
        # The reserved keys in the sequence are refused with ValueError now
        # (they desynchronized core 1.51's HPACK tables); the rest is sent.
        try:
            if initial:
                await context.send_initial_metadata(initial)
        except ValueError:
            pass
        try:
            if trailing:
                context.set_trailing_metadata(trailing)
        except ValueError:
            pass
        if code is not None:
            await context.abort(code, "step")
        return b"ok"
    big_headers = [("grpc.max_metadata_size", 4 << 20)]      # as in the fuzz run
    target = serve(server_thread, handler, options=big_headers)
    got, wanted = [], []
    with grpc.insecure_channel(target, options=big_headers) as channel:
        call = channel.unary_unary("/fuzz.Defects/Call")
        for step in sequence:
            current["step"] = step
            wanted.append(step[2] or grpc.StatusCode.OK)
            try:
                call(b"", timeout=10)
                got.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                got.append(err.code())
                if err.code() != step[2]:
                    print("step", len(got) - 1, err.code(), err.details())
    assert got == wanted     # every RPC ends with the status its handler chose
