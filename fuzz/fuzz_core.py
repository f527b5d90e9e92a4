"""Fuzz harness (atheris) for the C surfaces of ``asyncgrpc._core`` that Python reaches.

One asyncgrpc server runs for the whole session on an event loop thread; one grpcio sync
channel to it stays open. Each fuzz input picks a surface and drives it:

* ``unary``: one unary RPC carrying a whole plan (several fuzz items per RPC): fuzzed client
  request metadata (checked against ``context.invocation_metadata()``), a random request
  payload, a list of handler operations (``set_trailing_metadata``, ``send_initial_metadata``,
  ``set_code``, ``set_details``) with arbitrary objects, a final action (return, ``abort`` with
  arbitrary code/details/trailing metadata, raise), a deserializer behaviour and a reply (an odd
  object returned directly, or through a serializer returning odd objects or raising).
* ``server_stream`` / ``client_stream`` / ``bidi``: streaming RPCs whose ``write()``/``read()``
  go through serializers and deserializers that return odd objects or raise.
* ``options``: ``asyncgrpc.server(options=..., maximum_concurrent_rpcs=...)`` constructed and
  closed directly; now and then a valid configuration is started on a port, called once and
  stopped.

A model of the validation rules in ``src/metadata.c``, ``src/byte_buffer.c`` and
``src/server.c`` predicts, for every item, whether it is valid (then the value must round-trip
exactly to the grpcio client, and the RPC must end with the status the handler chose) or not
(then the handler must see TypeError/ValueError, or the RPC ends with the status grpc.aio
defines for that failure). A violated invariant raises ``Violation``; atheris reports it as a
crash with the input. A native crash (abort, ASan report) ends the process.

Inputs that would hit a defect already reported (``KNOWN_DEFECTS``) are skipped (and
counted), so that a long run looks for new defects. ``ASYNCGRPC_FUZZ_SKIP_KNOWN=0`` skips
none of them, ``=D1,D3`` only those listed.

Run: ``.venv/bin/python fuzz/fuzz_core.py -atheris_runs=10000`` (see fuzz/README.md).
Environment: ``ASYNCGRPC_FUZZ_LOOP=uvloop`` serves on uvloop; ``ASYNCGRPC_FUZZ_STATS=FILE``
writes per-surface counters and the resident memory as JSON to FILE every 5,000 inputs and
at the end; ``ASYNCGRPC_FUZZ_RPC_TIMEOUT`` (seconds, default 20) is how long an RPC may take
before it counts as hung; ``ASYNCGRPC_FUZZ_TRACE=1`` prints what each input does first;
``ASYNCGRPC_FUZZ_RECORD=DIR`` writes the last 5,000 inputs to DIR when one fails.
"""
from __future__ import annotations

import array
import asyncio
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from typing import (Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple,
                    Type)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The C cores log the errors the fuzzer provokes on purpose at ERROR; their assertion
# messages (the reason for an abort) are logged at that level too, so keep it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _reexec_with_libstdcxx() -> None:
    """Under a preloaded ASan runtime, preload libstdc++ too (by re-executing).

    atheris (pybind11) reports Python exceptions raised inside its hooks as C++ exceptions.
    gcc's ASan runtime intercepts ``__cxa_throw`` and looks the real one up when it starts,
    before Python has loaded any libstdc++; the first throw then fails an ASan CHECK and
    aborts the process. Preloading libstdc++ after the runtime fixes the lookup.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if "libasan" in preload and "libstdc++" not in preload:
        os.environ["LD_PRELOAD"] = f"{preload} libstdc++.so.6"
        os.execv(sys.executable, sys.orig_argv)


if __name__ == "__main__":
    _reexec_with_libstdcxx()

import atheris  # noqa: E402

with atheris.instrument_imports(include=["asyncgrpc"]):
    import asyncgrpc  # noqa: E402

import grpc  # noqa: E402

_SKIP = os.environ.get("ASYNCGRPC_FUZZ_SKIP_KNOWN", "1")
STATS_FILE = os.environ.get("ASYNCGRPC_FUZZ_STATS")
LOOP_KIND = os.environ.get("ASYNCGRPC_FUZZ_LOOP", "asyncio")
TRACE = os.environ.get("ASYNCGRPC_FUZZ_TRACE") == "1"
# Keep the last RECORD_KEEP inputs and write them to this directory when an input fails, to
# replay a failure that depends on what the connection went through before (in order:
# ``fuzz_core.py DIR/*``).
RECORD_DIR = os.environ.get("ASYNCGRPC_FUZZ_RECORD")
RECORD_KEEP = 5000


def trace(*parts: Any) -> None:
    """With ASYNCGRPC_FUZZ_TRACE=1, print what the input is about to do (crash triage)."""
    if TRACE:
        print("fuzz_core trace:", *(_short(p, 2000) for p in parts), file=sys.stderr, flush=True)

# Inputs shorter than this are stretched (SHAKE-256) to STRETCH_TO bytes, so that even the
# tiny inputs libFuzzer starts from drive whole plans. This matters most under ASan: gcc's
# preloaded runtime answers the coverage callbacks atheris registers, so libFuzzer gets no
# coverage feedback there and keeps mutating short inputs.
STRETCH_BELOW = 64
STRETCH_TO = 1024

# An RPC not done by then counts as a hang (ASYNCGRPC_FUZZ_RPC_TIMEOUT overrides it).
RPC_TIMEOUT = float(os.environ.get("ASYNCGRPC_FUZZ_RPC_TIMEOUT", "20"))
LIVE_RPC_TIMEOUT = 1.0      # fuzzed live options may legitimately stall an RPC
STOP_TIMEOUT = 30.0

# Defects already reported; inputs that would reach them are skipped (counted) by default.
KNOWN_DEFECTS = {
    "D2": "option grpc.experimental.tcp_tx_zerocopy_max_simultaneous_sends with a huge value "
          "makes the core allocate value*320 bytes on the first connection: std::bad_alloc, abort",
}
# Fixed since (their saved inputs run clean, tests/test_fuzz.py): D1 reserved 'grpc-timeout'
# in sent metadata aborted the core; D3 set_trailing_metadata(iterator) read back (); D4 the
# key '-bin' was binary for asyncgrpc but not for the core; D5 'grpc-status' in the headers;
# D6 headers the core indexes in its HPACK table (grpc-tags-bin, grpc-trace-bin, te,
# user-agent, ...) desynchronized the connection's tables.

SKIP_KNOWN = (set(KNOWN_DEFECTS) if _SKIP == "1" else set() if _SKIP == "0"
              else set(_SKIP.split(",")))


def skips(defect: str) -> bool:
    """Are inputs reaching this known defect skipped in this run?"""
    return defect in SKIP_KNOWN


logging.getLogger("asyncgrpc").setLevel(logging.CRITICAL + 1)
logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)


class Violation(AssertionError):
    """An invariant of the server did not hold for this input."""


class SkipInput(Exception):
    """The input would hit a known defect; it is not run."""


def check(cond: bool, what: str, *context: Any) -> None:
    """Raise Violation(what, context) unless ``cond``."""
    if not cond:
        detail = "; ".join(_short(c) for c in context)
        raise Violation(f"{what}: {detail}" if detail else what)


def _short(obj: Any, limit: int = 600) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + f"...<{len(text)} chars>"


# ---------------------------------------------------------------- odd objects

class FuzzError(Exception):
    """Raised on purpose by fuzzed handlers, serializers and deserializers."""


class FuzzBaseError(BaseException):
    """A BaseException that is not an Exception (nor KeyboardInterrupt/SystemExit)."""


class WithBytes:
    """Has ``__bytes__`` but not the buffer protocol."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __bytes__(self) -> bytes:
        return self.data

    def __repr__(self) -> str:
        return f"WithBytes({self.data!r})"


class StrSub(str):
    """A str subclass."""


class BytesSub(bytes):
    """A bytes subclass."""


class RaisingIterable:
    """Iterating it raises ValueError (a user error inside the metadata argument)."""

    def __iter__(self) -> Iterator[Any]:
        raise ValueError("iteration refused")

    def __repr__(self) -> str:
        return "RaisingIterable()"


class OneShot:
    """A one-shot iterator over ``items`` (a generator-like argument)."""

    def __init__(self, items: List[Any]) -> None:
        self.items = items

    def make(self) -> Iterator[Any]:
        return iter(list(self.items))

    def __repr__(self) -> str:
        return f"OneShot({self.items!r})"


class Raise:
    """A serializer/deserializer step that raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __repr__(self) -> str:
        return f"Raise({self.exc!r})"


def released_view() -> memoryview:
    view = memoryview(b"gone")
    view.release()
    return view


# ---------------------------------------------------------------- models of the C rules

LEGAL_KEY = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_.")
# Keys the gRPC cores treat specially (parsed, dropped, rewritten or used for routing):
# for these only the status and the absence of a crash are checked, not the round trip.
RESERVED_KEYS = frozenset([
    "content-type", "content-length", "te", "user-agent", "host", "lb-token", "lb-cost-bin",
    "endpoint-load-metrics-bin", "x-endpoint-load-metrics-bin",
])


# The protocol's keys src/metadata.c refuses from a handler (ValueError).
REFUSED_KEYS = frozenset([
    "grpc-status", "grpc-message", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
    "grpc-internal-encoding-request", "grpc-internal-stream-encoding-request",
    "grpc-previous-rpc-attempts", "grpc-retry-pushback-ms", "grpc-tags-bin", "grpc-trace-bin",
    "te", "user-agent",
])


def is_plain_key(key: str) -> bool:
    """True for keys that travel unchanged end to end. ('-bin' alone is a text key for the
    server's core but grpcio's Python layer hands its value to the client as bytes.)"""
    return not key.startswith("grpc-") and key not in RESERVED_KEYS and key != "-bin"


MdModel = Tuple[Optional[Type[BaseException]], Optional[List[Tuple[str, Any]]]]


@atheris.instrument_func
def model_metadata(obj: Any) -> MdModel:
    """What ``src/metadata.c: metadata_from_object`` does with ``obj``: (exception class,
    None) or (None, [(key, value as the client sees it)])."""
    if isinstance(obj, OneShot):
        obj = obj.items
    if obj is None:
        return None, []
    if isinstance(obj, (str, bytes)):
        return TypeError, None
    if isinstance(obj, RaisingIterable):
        return ValueError, None
    try:
        items = list(obj)
    except TypeError:
        return TypeError, None
    out: List[Tuple[str, Any]] = []
    for item in items:
        if isinstance(item, (str, bytes)):
            return TypeError, None
        try:
            pair = list(item)
        except TypeError:
            return TypeError, None
        if len(pair) != 2:
            return TypeError, None
        key, value = pair
        if isinstance(key, str):
            try:
                kb = key.encode("utf-8")
            except UnicodeEncodeError:
                return ValueError, None
        elif isinstance(key, bytes):
            kb = bytes(key)
        else:
            return TypeError, None
        if not kb or not LEGAL_KEY.issuperset(kb):
            return ValueError, None
        if kb.decode("ascii") in REFUSED_KEYS:
            return ValueError, None
        binary = len(kb) > 4 and kb.endswith(b"-bin")
        if isinstance(value, str):
            try:
                vb = value.encode("utf-8")
            except UnicodeEncodeError:
                return ValueError, None
        elif binary:
            try:
                view = memoryview(value)
            except Exception:
                return TypeError, None
            if not view.c_contiguous:
                return TypeError, None
            vb = view.tobytes()
        elif isinstance(value, bytes):
            vb = bytes(value)
        else:
            return TypeError, None
        if not binary and any(c < 0x20 or c > 0x7E for c in vb):
            return ValueError, None
        out.append((kb.decode("ascii"), vb if binary else vb.decode("ascii")))
    return None, out


@atheris.instrument_func
def model_payload(obj: Any) -> Optional[bytes]:
    """What ``src/byte_buffer.c: byte_buffer_from_object`` sends for ``obj``, or None if it
    must fail (the RPC then ends with INTERNAL)."""
    if isinstance(obj, Raise):
        return None
    if type(obj) is bytes:
        return obj
    try:
        view = memoryview(obj)
    except Exception:
        return None
    if not view.c_contiguous:
        return None
    return view.tobytes()


def md_size(pairs: Sequence[Tuple[str, Any]]) -> int:
    """Roughly the header bytes ``pairs`` take (HTTP/2 counts 32 per entry)."""
    return sum(len(k) + 2 * len(v) + 32 for k, v in pairs)


def utf8_or_none(text: Any) -> Optional[str]:
    """``text`` if it is a str the wire can carry (UTF-8 encodable), else None."""
    if not isinstance(text, str):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return str(text)


def known_metadata_defect(pairs: Optional[List[Tuple[str, Any]]], initial: bool) -> None:
    """Skip the input if valid server-sent metadata would reach defect D1, D4, D5 or D6."""
    for key, value in pairs or ():
        if key in ("grpc-tags-bin", "grpc-trace-bin") and skips("D6"):
            raise SkipInput("D6")
        if key == "grpc-timeout" and skips("D1"):
            raise SkipInput("D1")
        if key == "-bin" and skips("D4"):
            raise SkipInput("D4")
        if (initial and key == "grpc-status" and skips("D5")
                and re.fullmatch(r"-0*[1-9][0-9]*", value)):
            raise SkipInput("D5")


# ---------------------------------------------------------------- generators

KEY_WORDS = [
    "a", "x-fuzz", "x-fuzz-bin", "-bin", "bin", "a-bin", "x.y_z-0", "grpc-timeout",
    "grpc-status", "grpc-message", "grpc-encoding", "grpc-accept-encoding",
    "grpc-internal-encoding-request", "grpc-internal-stream-encoding-request",
    "grpc-status-details-bin", "grpc-tags-bin", "grpc-trace-bin", "grpc-server-stats-bin",
    "grpc-previous-rpc-attempts", "grpc-retry-pushback-ms", "grpc-lb-client-stats",
    "content-type", "content-length", "te", "user-agent", "host", "lb-token", "lb-cost-bin",
    "endpoint-load-metrics-bin", "x-endpoint-load-metrics-bin", ":path", ":authority",
    ":status", "Upper", "a b", "a\x00b", "\x00", "é", "\ud800", "-", ".", "_", "grpc-",
    "a-bin\x00", "BIN-bin", "fz-id", "connection", "transfer-encoding", "upgrade",
]
VALUE_WORDS = [
    "", " ", "0", "1", "-1", "1S", "100m", "99999999H", "1n", "abc", "application/grpc",
    "application/grpc+proto", "text/html", "trailers", "gzip", "deflate", "identity",
    "identity,deflate,gzip", "bogus", "99999999999999999999", "13", "-2147483648",
    "%00%ff", " padded ", "\t", "a\x00b", "\x7f", "é", "\ud800",
]
PRINTABLE = bytes(range(0x20, 0x7F))
KEY_ALPHABET = b"abcxyz0189-_."


@atheris.instrument_func
def gen_key(fdp: atheris.FuzzedDataProvider) -> Any:
    """A metadata key: mostly legal, sometimes reserved, illegal or of a wrong type."""
    mode = fdp.ConsumeIntInRange(0, 11)
    if mode <= 3:
        n = fdp.ConsumeIntInRange(1, 12)
        key = bytes(KEY_ALPHABET[b % len(KEY_ALPHABET)] for b in fdp.ConsumeBytes(n)) or b"k"
        text = key.decode()
        return text + "-bin" if fdp.ConsumeBool() else text
    if mode <= 6:
        return fdp.PickValueInList(KEY_WORDS)
    if mode == 7:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 8))
    if mode == 8:
        raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
        return BytesSub(raw) if fdp.ConsumeBool() else raw
    if mode == 9:
        return StrSub(fdp.PickValueInList(KEY_WORDS))
    if mode == 10:
        return "k" * fdp.PickValueInList([255, 256, 1000, 16384, 100000])
    return fdp.PickValueInList([None, 1, 1.5, b"", object(), ("a",)])


@atheris.instrument_func
def gen_value(fdp: atheris.FuzzedDataProvider, key: Any) -> Any:
    """A metadata value: str, bytes, buffers, wrong types, huge, empty, with NUL."""
    mode = fdp.ConsumeIntInRange(0, 15)
    if mode <= 3:
        n = fdp.ConsumeIntInRange(0, 24)
        text = bytes(PRINTABLE[b % len(PRINTABLE)] for b in fdp.ConsumeBytes(n)).decode()
        return text
    if mode <= 5:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
    if mode == 6:
        return fdp.PickValueInList(VALUE_WORDS)
    if mode == 7:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 16))
    if mode == 8:
        return bytearray(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)))
    if mode == 9:
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            return memoryview(data)
        if kind == 1:
            return memoryview(data)[::2]          # not C-contiguous unless short
        if kind == 2:
            return array.array("H", data[: len(data) // 2 * 2])
        return released_view()
    if mode == 10:
        size = fdp.PickValueInList([1000, 8192, 65536, 300000])
        return ("v" * size) if fdp.ConsumeBool() else (b"\x00\xff" * (size // 2))
    if mode == 11:
        return fdp.PickValueInList([None, 0, -1, 1.5, True, object(), ["a"]])
    if mode == 12:
        return WithBytes(fdp.ConsumeBytes(4))
    if mode == 13:
        return StrSub(fdp.PickValueInList(VALUE_WORDS))
    if mode == 14:
        return BytesSub(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)))
    return "a\x00b" if fdp.ConsumeBool() else b"\x00"


@atheris.instrument_func
def gen_pair(fdp: atheris.FuzzedDataProvider) -> Any:
    """A (key, value) item, sometimes malformed."""
    key = gen_key(fdp)
    value = gen_value(fdp, key)
    shape = fdp.ConsumeIntInRange(0, 15)
    if shape <= 10:
        return (key, value)
    if shape == 11:
        return [key, value]
    if shape == 12:
        return (key,)
    if shape == 13:
        return (key, value, value)
    if shape == 14:
        return fdp.PickValueInList(["ab", b"ab", 7, None])
    return {key: value} if isinstance(key, (str, bytes)) else (key, value)


@atheris.instrument_func
def gen_metadata(fdp: atheris.FuzzedDataProvider) -> Any:
    """A metadata argument: a sequence of pairs in some container, or something else."""
    container = fdp.ConsumeIntInRange(0, 15)
    if container == 13:
        return fdp.PickValueInList([None, (), [], "a", b"ab", 5, RaisingIterable(), {}])
    n = fdp.ConsumeIntInRange(0, 4)
    pairs = [gen_pair(fdp) for _ in range(n)]
    if container <= 9:
        return tuple(pairs)
    if container <= 11:
        return list(pairs)
    if container == 12:
        return OneShot(pairs)
    if container == 14:
        return tuple(pairs) * fdp.PickValueInList([2, 10, 100])
    return dict.fromkeys(p for p in pairs if isinstance(p, tuple) and _hashable(p))


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except (TypeError, ValueError):   # unhashable, or a memoryview that cannot hash
        return False
    return True


def realize(obj: Any) -> Any:
    """The object to hand to the API: one-shot iterators are made fresh."""
    return obj.make() if isinstance(obj, OneShot) else obj


@atheris.instrument_func
def gen_client_metadata(fdp: atheris.FuzzedDataProvider) -> List[Tuple[str, Any]]:
    """Request metadata a grpcio client can send: legal keys, printable or binary values,
    sometimes reserved keys."""
    out: List[Tuple[str, Any]] = []
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        if fdp.ConsumeIntInRange(0, 7) == 0:
            key = fdp.PickValueInList(CLIENT_KEY_WORDS)
        else:
            n = fdp.ConsumeIntInRange(1, 12)
            key = bytes(KEY_ALPHABET[b % len(KEY_ALPHABET)]
                        for b in fdp.ConsumeBytes(n)).decode() or "k"
            if fdp.ConsumeBool():
                key += "-bin"
        if key.endswith("-bin"):
            size = fdp.PickValueInList([0, 1, 7, 64, 300, 5000])
            value: Any = fdp.ConsumeBytes(size)
        elif fdp.ConsumeIntInRange(0, 5) == 0:
            value = fdp.PickValueInList(CLIENT_VALUE_WORDS)
        else:
            size = fdp.PickValueInList([0, 1, 7, 64, 300, 5000])
            value = bytes(PRINTABLE[b % len(PRINTABLE)] for b in fdp.ConsumeBytes(size)).decode()
        out.append((key, value))
    return out


def model_key(key: Any) -> Optional[str]:
    """``key`` as a legal metadata key, or None."""
    err, pairs = model_metadata(((key, b"" if str(key).endswith("-bin") else ""),))
    return pairs[0][0] if err is None and pairs else None


# ("-bin" alone is refused by grpcio's client: its binary keys need a name before "-bin")
CLIENT_KEY_WORDS = [k for k in KEY_WORDS if model_key(k) is not None and k not in ("fz-id", "-bin")]
CLIENT_VALUE_WORDS = [v for v in VALUE_WORDS if all(0x20 <= ord(c) <= 0x7E for c in v)]


@atheris.instrument_func
def gen_text(fdp: atheris.FuzzedDataProvider) -> Any:
    """Status details: arbitrary unicode (surrogates too), NUL, huge, wrong types."""
    mode = fdp.ConsumeIntInRange(0, 9)
    if mode <= 4:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64))
    if mode == 5:
        return fdp.PickValueInList(VALUE_WORDS + ["\udcff\udc80", "%", "%%41", "\x00" * 5])
    if mode == 6:
        return "d" * fdp.PickValueInList([1000, 20000, 200000])
    if mode == 7:
        return StrSub(fdp.ConsumeUnicodeNoSurrogates(8))
    if mode == 8:
        return fdp.PickValueInList([None, b"bytes", 5, object()])
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 200))


CODES = list(grpc.StatusCode)


def gen_code(fdp: atheris.FuzzedDataProvider) -> Any:
    """A status code as grpc.StatusCode or asyncgrpc.StatusCode."""
    code = fdp.PickValueInList(CODES)
    return getattr(asyncgrpc.StatusCode, code.name) if fdp.ConsumeBool() else code


def grpc_code(code: Any) -> grpc.StatusCode:
    """The grpc.StatusCode of a code object of either kind."""
    return getattr(grpc.StatusCode, code.name)


@atheris.instrument_func
def gen_reply_object(fdp: atheris.FuzzedDataProvider) -> Any:
    """What a serializer (or a handler without one) returns."""
    mode = fdp.ConsumeIntInRange(0, 15)
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if mode <= 4:
        return data
    if mode == 5:
        return bytearray(data)
    if mode == 6:
        return memoryview(data)
    if mode == 7:
        return memoryview(data)[::fdp.ConsumeIntInRange(1, 3)]
    if mode == 8:
        even = data[: len(data) // 2 * 2] or b"ab"
        if fdp.ConsumeBool():
            return memoryview(even).cast("H")                   # itemsize 2
        return memoryview(even).cast("B", [2, len(even) // 2])  # two-dimensional
    if mode == 9:
        return array.array("d", [1.5] * (len(data) % 5))
    if mode == 10:
        return BytesSub(data)
    if mode == 11:
        return fdp.PickValueInList([None, 0, "text", "", 1.5, object(), [1, 2], released_view()])
    if mode == 12:
        return WithBytes(data)
    if mode == 13:
        size = fdp.PickValueInList([65536, 1 << 20, 3 << 20])
        return b"\xa5" * size
    if mode == 14:
        return Raise(fdp.PickValueInList([FuzzError("ser"), ValueError("ser"),
                                          FuzzBaseError("ser"), TypeError("ser")]))
    return b""


@atheris.instrument_func
def gen_payload(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A request message: random bytes, sometimes empty or big."""
    mode = fdp.ConsumeIntInRange(0, 9)
    if mode == 0:
        return b""
    if mode == 1:
        return fdp.ConsumeBytes(1) * fdp.PickValueInList([4096, 65537, 1 << 20])
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))


DESER_MODES = ["identity", "bytearray", "memoryview", "latin1", "none", "raise", "base"]


def apply_deser(mode: str, payload: bytes) -> Any:
    """What the fuzzed deserializer returns for ``payload`` (or raises)."""
    if mode == "identity":
        return payload
    if mode == "bytearray":
        return bytearray(payload)
    if mode == "memoryview":
        return memoryview(payload)
    if mode == "latin1":
        return payload.decode("latin-1")
    if mode == "none":
        return None
    if mode == "raise":
        raise FuzzError("deserializer")
    raise FuzzBaseError("deserializer")


def rss_mb() -> int:
    """This process' resident memory in MiB (to watch for leaks over a long run)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (OSError, ValueError, IndexError):
        return -1


# ---------------------------------------------------------------- the server side

class Token:
    """What handlers return to the serializing methods: the serializer looks it up."""

    __slots__ = ("plan_id", "index")

    def __init__(self, plan_id: int, index: int) -> None:
        self.plan_id = plan_id
        self.index = index


class Plan:
    """Everything one input asks the server to do, and what the handler observed."""

    def __init__(self, plan_id: int) -> None:
        self.id = plan_id
        self.ops: List[Tuple[Any, ...]] = []
        self.final: Tuple[Any, ...] = ("return",)
        self.deser_modes: List[str] = []
        self.ser_outputs: List[Any] = []
        self.reply: Any = b""
        self.echo = False
        self.style = "read"
        self.request: Any = None
        self.obs: List[Tuple[Any, ...]] = []
        self.ran = False
        self.finished = threading.Event()
        self.deser_calls = 0

    def wait_handler(self) -> None:
        """If the handler ran, wait until it returned (its last observations are in)."""
        if self.ran:
            check(self.finished.wait(RPC_TIMEOUT), "the handler never finished", self.obs)


class FuzzServer:
    """The long-lived server on its own loop thread, and the handlers that run plans."""

    def __init__(self) -> None:
        if LOOP_KIND == "uvloop":
            import uvloop
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="fuzz-server", daemon=True)
        self.thread.start()
        self.plan: Optional[Plan] = None
        self.server: Any = None
        self.port = self.call(self._start)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, fn: Callable[[], Any], timeout: float = STOP_TIMEOUT) -> Any:
        """Run the coroutine function ``fn`` on the server loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    async def _start(self) -> int:
        self.server = asyncgrpc.server(
            options=[("grpc.max_metadata_size", 4 << 20)], blocked_loop_threshold=None)
        ser, deser = self.serialize, self.deserialize
        unary, track = self.tracked(self.unary), self.tracked
        methods = {
            "Unary": asyncgrpc.unary_unary_rpc_method_handler(unary, deser, ser),
            "UnaryRaw": asyncgrpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": asyncgrpc.unary_stream_rpc_method_handler(
                track(self.server_stream), None, ser),
            "ClientStream": asyncgrpc.stream_unary_rpc_method_handler(
                track(self.client_stream), deser, None),
            "Bidi": asyncgrpc.stream_stream_rpc_method_handler(track(self.bidi), deser, ser),
        }
        self.server.add_registered_method_handlers("fz.Fuzz", methods)

        class Generic(asyncgrpc.GenericRpcHandler):
            """Serves the same methods under fz.Generic through per-call lookup."""

            def service(self, details: Any) -> Any:
                service, _, method = details.method.rpartition("/")
                return methods.get(method) if service == "/fz.Generic" else None

        self.server.add_generic_rpc_handlers([Generic()])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    # -- (de)serializers -------------------------------------------------
    def serialize(self, token: Any) -> Any:
        plan = self.plan
        assert plan is not None and isinstance(token, Token) and token.plan_id == plan.id, \
            f"serializer got {token!r} for plan {plan and plan.id}"
        out = plan.ser_outputs[token.index]
        if isinstance(out, Raise):
            raise out.exc
        if out is ECHO:
            return plan.request
        return out

    def deserialize(self, payload: bytes) -> Any:
        plan = self.plan
        assert plan is not None
        index = plan.deser_calls
        plan.deser_calls += 1
        mode = plan.deser_modes[index] if index < len(plan.deser_modes) else "identity"
        return apply_deser(mode, payload)

    # -- handlers --------------------------------------------------------
    def tracked(self, body: Callable[..., Any]) -> Callable[..., Any]:
        """The handler registered for ``body``: notes that the plan's handler ran and sets
        ``plan.finished`` when it returns (the client may see the status before that)."""
        async def handler(request: Any, context: Any) -> Any:
            plan = self.plan
            assert plan is not None, "an RPC arrived without a plan"
            plan.ran = True
            try:
                return await body(plan, request, context)
            except asyncio.CancelledError:
                plan.obs.append(("cancelled",))
                raise
            finally:
                plan.finished.set()
        return handler

    async def unary(self, plan: Plan, request: Any, context: Any) -> Any:
        plan.request = request
        obs = plan.obs
        md = context.invocation_metadata()
        obs.append(("invocation", md))
        for op in plan.ops:
            kind = op[0]
            try:
                if kind == "trail":
                    context.set_trailing_metadata(realize(op[1]))
                    obs.append((kind, None, context.trailing_metadata()))
                elif kind == "init":
                    await context.send_initial_metadata(realize(op[1]))
                    obs.append((kind, None))
                elif kind == "details":
                    context.set_details(op[1])
                    obs.append((kind, None, context.details()))
                elif kind == "code":
                    context.set_code(op[1])
                    obs.append((kind, None, context.code()))
            except Exception as exc:   # the fuzzed input was refused: record what was raised
                obs.append((kind, exc))
        final = plan.final
        if final[0] == "abort":
            try:
                await context.abort(final[1], final[2], realize(final[3]))
            except asyncgrpc.AbortError:
                obs.append(("abort", None))
                raise
            except Exception as exc:
                obs.append(("abort", exc))
        elif final[0] == "raise":
            raise final[1]
        return request if plan.reply is ECHO else plan.reply

    async def server_stream(self, plan: Plan, request: Any, context: Any) -> Any:
        plan.request = request
        if plan.style == "generator":
            return self._server_stream_gen(plan)
        for i in range(len(plan.ser_outputs)):
            try:
                await context.write(Token(plan.id, i))
            except (Exception, FuzzBaseError) as exc:
                plan.obs.append(("write", i, exc))
                return None
        plan.obs.append(("writes_done",))
        return None

    async def _server_stream_gen(self, plan: Plan) -> Any:
        for i in range(len(plan.ser_outputs)):
            plan.obs.append(("yield", i))
            yield Token(plan.id, i)
        plan.obs.append(("writes_done",))

    async def client_stream(self, plan: Plan, request_iterator: Any, context: Any) -> Any:
        got: List[Any] = []
        try:
            if plan.style == "read":
                while True:
                    message = await context.read()
                    if message is asyncgrpc.EOF:
                        break
                    got.append(message)
            else:
                async for message in request_iterator:
                    got.append(message)
        except (Exception, FuzzBaseError) as exc:
            plan.obs.append(("read", got, exc))
            return b""
        plan.obs.append(("read", got, None))
        return b"%d" % len(got)

    async def bidi(self, plan: Plan, request_iterator: Any, context: Any) -> Any:
        got: List[Any] = []
        try:
            i = 0
            while True:
                message = await context.read()
                if message is asyncgrpc.EOF:
                    break
                got.append(message)
                plan.request = message
                await context.write(Token(plan.id, i))
                i += 1
        except Exception as exc:
            plan.obs.append(("bidi", got, exc))
            return
        plan.obs.append(("bidi", got, None))


ECHO = object()   # a serializer output meaning "the request the handler received"


# ---------------------------------------------------------------- the client side

class Fuzzer:
    """Holds the server and the channel; ``one_input`` runs one fuzz input."""

    def __init__(self) -> None:
        self.server = FuzzServer()
        self.target = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.target, options=[
            ("grpc.max_metadata_size", 4 << 20),
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.enable_retries", 0),
        ])
        self.stubs: Dict[str, Any] = {}
        for service in ("fz.Fuzz", "fz.Generic"):
            for method, kind in (("Unary", "unary_unary"), ("UnaryRaw", "unary_unary"),
                                 ("ServerStream", "unary_stream"),
                                 ("ClientStream", "stream_unary"), ("Bidi", "stream_stream")):
                self.stubs[f"/{service}/{method}"] = getattr(self.channel, kind)(
                    f"/{service}/{method}")
        self.next_id = 0
        self.stats: Dict[str, int] = {"inputs": 0}
        self.rss_history: List[Tuple[int, int]] = []
        self.recent: Optional[Deque[bytes]] = deque(maxlen=RECORD_KEEP) if RECORD_DIR else None
        self.started = time.monotonic()
        self.surfaces = [
            ("unary", self.fuzz_unary, 8),
            ("server_stream", self.fuzz_server_stream, 2),
            ("client_stream", self.fuzz_client_stream, 2),
            ("bidi", self.fuzz_bidi, 1),
            ("options", self.fuzz_options, 3),
        ]
        self.weighted = [s for s in self.surfaces for _ in range(s[2])]

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def write_stats(self) -> None:
        if not STATS_FILE:
            return
        rss = rss_mb()
        self.rss_history.append((self.stats["inputs"], rss))
        data = dict(self.stats, seconds=round(time.monotonic() - self.started, 1),
                    loop=LOOP_KIND, skip_known=sorted(SKIP_KNOWN), rss_mb=rss,
                    rss_history=self.rss_history)
        tmp = STATS_FILE + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, STATS_FILE)

    def dump_recent(self) -> None:
        """Write the last inputs (the failing one last) to RECORD_DIR, numbered in order."""
        if self.recent is None or RECORD_DIR is None:
            return
        os.makedirs(RECORD_DIR, exist_ok=True)
        for i, data in enumerate(self.recent):
            with open(os.path.join(RECORD_DIR, f"{i:06d}"), "wb") as f:
                f.write(data)
        print(f"fuzz_core: the last {len(self.recent)} inputs are in {RECORD_DIR}",
              file=sys.stderr, flush=True)

    def one_input(self, data: bytes) -> None:
        if self.recent is not None:
            self.recent.append(data)
        if len(data) < STRETCH_BELOW:
            data = hashlib.shake_256(data).digest(STRETCH_TO)
        fdp = atheris.FuzzedDataProvider(data)
        name, fn, _ = fdp.PickValueInList(self.weighted)
        self.stats["inputs"] += 1
        check(self.server.thread.is_alive(), "the server loop thread died")
        try:
            fn(fdp)
            self.count(name)
        except SkipInput as skip:
            self.count(f"skipped_known_{skip.args[0]}")
        finally:
            self.server.plan = None
        if STATS_FILE and self.stats["inputs"] % 5000 == 0:
            self.write_stats()

    def new_plan(self) -> Plan:
        self.next_id += 1
        plan = Plan(self.next_id)
        return plan

    # -- unary -----------------------------------------------------------
    def fuzz_unary(self, fdp: atheris.FuzzedDataProvider) -> None:
        plan = self.new_plan()
        generic = fdp.ConsumeIntInRange(0, 3) == 0
        raw = fdp.ConsumeBool()
        path = f"/{'fz.Generic' if generic else 'fz.Fuzz'}/{'UnaryRaw' if raw else 'Unary'}"
        client_md = gen_client_metadata(fdp)
        payload = gen_payload(fdp)
        deser = "identity" if raw else fdp.PickValueInList(DESER_MODES)
        plan.deser_modes = [deser]
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            kind = fdp.PickValueInList(["trail", "trail", "init", "init", "details", "code"])
            if kind in ("trail", "init"):
                plan.ops.append((kind, gen_metadata(fdp)))
            elif kind == "details":
                plan.ops.append((kind, gen_text(fdp)))
            else:
                plan.ops.append((kind, gen_code(fdp)))
        final = fdp.ConsumeIntInRange(0, 5)
        if final == 0:
            trailing = gen_metadata(fdp) if fdp.ConsumeBool() else ()
            plan.final = ("abort", gen_code(fdp), gen_text(fdp), trailing)
        elif final == 1:
            plan.final = ("raise", fdp.PickValueInList([FuzzError("handler"),
                                                        FuzzBaseError("handler")]))
        plan.echo = fdp.ConsumeIntInRange(0, 4) == 0
        reply = ECHO if plan.echo else gen_reply_object(fdp)
        if raw:
            plan.reply = reply
        else:
            plan.reply = Token(plan.id, 0)
            plan.ser_outputs = [reply]
        trace("unary", path, client_md, payload[:64], plan.ops, plan.final, plan.deser_modes,
              plan.ser_outputs or plan.reply)
        expect = self.expect_unary(plan, payload, raw)
        self.server.plan = plan
        metadata = [("fz-id", str(plan.id))] + client_md
        began = time.monotonic()
        try:
            response, call = self.stubs[path].with_call(payload, timeout=RPC_TIMEOUT,
                                                        metadata=metadata)
            outcome = (grpc.StatusCode.OK, call.details(), response,
                       call.initial_metadata(), call.trailing_metadata())
        except grpc.RpcError as err:
            outcome = (err.code(), err.details(), None, err.initial_metadata(),
                       err.trailing_metadata())
        plan.wait_handler()
        check(time.monotonic() - began < 0.9 * RPC_TIMEOUT, "the RPC hung until the client's "
              "deadline", outcome[:2], plan.ops, plan.final, plan.obs)
        self.check_unary(plan, expect, outcome, client_md, payload)

    def expect_unary(self, plan: Plan, payload: bytes, raw: bool) -> Dict[str, Any]:
        """Walk the plan with the model: expected handler observations and client outcome."""
        exp: Dict[str, Any] = {"ops": [], "relaxed": False}
        deser = plan.deser_modes[0]
        if deser in ("raise", "base"):
            exp["handler_runs"] = False
            exp["code"] = grpc.StatusCode.INTERNAL
            exp["details"] = "Exception deserializing request!"
            return exp
        exp["handler_runs"] = True
        request = apply_deser(deser, payload)
        init_sent: Optional[List[Tuple[str, Any]]] = None
        trailing: List[Tuple[str, Any]] = []
        code: Optional[grpc.StatusCode] = None
        details: Any = None
        for op in plan.ops:
            kind, arg = op
            if kind in ("trail", "init"):
                err, pairs = model_metadata(arg)
                if kind == "init" and init_sent is not None:
                    err, pairs = asyncgrpc.UsageError, None
                if err is None:
                    known_metadata_defect(pairs, initial=kind == "init")
                    assert pairs is not None
                    if kind == "init":
                        init_sent = pairs
                    else:
                        trailing = pairs
                exp["ops"].append((kind, err, arg))
            elif kind == "details":
                ok = arg is None or isinstance(arg, str)
                exp["ops"].append((kind, None if ok else TypeError, arg))
                if ok:
                    details = arg
            else:
                exp["ops"].append((kind, None, arg))
                code = grpc_code(arg)
        final = plan.final
        exp["abort"] = None
        if final[0] == "abort":
            _, acode, adetails, amd = final
            if not isinstance(adetails, str):
                exp["abort"] = TypeError
            else:
                # abort() passes trailing_metadata on only if it is truthy
                given = isinstance(amd, OneShot) or bool(amd)
                err, pairs = model_metadata(amd) if given else (None, None)
                if err is not None:
                    exp["abort"] = err
                else:
                    if pairs is not None:
                        known_metadata_defect(pairs, initial=False)
                        trailing = pairs
                    exp["abort"] = None
                    c = grpc_code(acode)
                    exp["code"] = grpc.StatusCode.UNKNOWN if c is grpc.StatusCode.OK else c
                    exp["details"] = adetails
            if exp["abort"] is not None:
                final = ("return",)
        if final[0] == "raise":
            exp["code"] = code if code not in (None, grpc.StatusCode.OK) \
                else grpc.StatusCode.UNKNOWN
            exp["details_prefix"] = "Unexpected "
        elif final[0] == "return":
            if code not in (None, grpc.StatusCode.OK):
                exp["code"] = code
                exp["details"] = details
            else:
                obj = request if plan.echo else (plan.ser_outputs[0] if not raw else plan.reply)
                if obj is ECHO:
                    obj = request
                body = model_payload(obj)
                if body is None:
                    exp["code"] = grpc.StatusCode.INTERNAL
                    exp["details"] = "Failed to serialize response!"
                else:
                    exp["code"] = grpc.StatusCode.OK
                    exp["details"] = details
                    exp["response"] = body
        exp["initial"] = init_sent
        exp["trailing"] = trailing
        size = md_size(init_sent or []) + md_size(trailing)
        text = exp.get("details")
        if isinstance(text, str):
            size += 3 * len(text.encode("utf-8", "surrogatepass"))
        exp["relaxed"] = size > (1 << 20)
        return exp

    def check_unary(self, plan: Plan, exp: Dict[str, Any], outcome: Tuple[Any, ...],
                    client_md: List[Tuple[str, Any]], payload: bytes) -> None:
        code, details, response, initial, trailing = outcome
        ctx = (plan.ops, plan.final, plan.deser_modes, plan.ser_outputs if plan.ser_outputs
               else plan.reply, client_md, payload[:64], plan.obs)
        plain_client = all(is_plain_key(k) for k, _ in client_md)
        if not plan.ran:
            if not plain_client:
                return   # grpcio or the core may refuse reserved request keys: any status
            check(not exp["handler_runs"], "handler did not run", code, details, *ctx)
            check(code == exp["code"] and details == exp["details"],
                  "status when the deserializer raises", code, details, *ctx)
            return
        check(exp["handler_runs"], "handler ran though the deserializer raised", *ctx)
        obs = plan.obs
        check(bool(obs) and obs[0][0] == "invocation", "no invocation metadata seen", *ctx)
        seen = obs[0][1]
        check(isinstance(seen, tuple) and all(isinstance(p, tuple) and len(p) == 2
                                              for p in seen), "invocation_metadata shape", seen)
        fz = [v for k, v in seen if k == "fz-id"]
        check(fz == [str(plan.id)], "fz-id of the call", seen, plan.id)
        if plain_client:
            mine = [p for p in seen if p[0] != "user-agent" and p[0] != "fz-id"]
            check(mine == client_md, "request metadata round trip", seen, client_md)
        for key, value in seen:
            check(isinstance(key, str), "invocation key type", seen)
            check(isinstance(value, bytes) if key.endswith("-bin") else isinstance(value, str),
                  "invocation value type", seen)
        ops_seen = obs[1:]
        ops_exp = exp["ops"]
        cancelled = obs[-1] == ("cancelled",)
        if cancelled:
            # only when the client gave up: its header limits (relaxed), never otherwise
            check(exp["relaxed"], "handler cancelled", code, details, *ctx)
            ops_seen = ops_seen[:-1]
        else:
            check(len(ops_seen) >= len(ops_exp), "handler observations", ops_seen, ops_exp,
                  *ctx)
        for (kind, err, arg), got in zip(ops_exp, ops_seen):
            check(got[0] == kind, "operation order", got, kind)
            raised = got[1]
            if err is None:
                check(raised is None, f"{kind} refused a valid input", raised, arg, *ctx)
                if kind == "trail":
                    if isinstance(arg, OneShot):
                        as_given = tuple(arg.items)
                        if skips("D3") and got[2] == () and as_given:
                            as_given = ()   # known defect D3
                    else:
                        as_given = () if arg is None else tuple(arg)
                    check(got[2] == as_given, "trailing_metadata() readback", got[2], arg)
                elif kind in ("details", "code"):
                    check(got[2] is arg, f"{kind}() readback", got[2], arg)
            else:
                check(raised is not None and isinstance(raised, err),
                      f"{kind} must raise {err.__name__}", raised, arg, *ctx)
                if err is not asyncgrpc.UsageError:
                    check(isinstance(raised, (TypeError, ValueError)),
                          f"{kind} raised neither TypeError nor ValueError", raised)
        if cancelled:
            return
        if plan.final[0] == "abort":
            abort_obs = [o for o in ops_seen[len(ops_exp):] if o[0] == "abort"]
            check(len(abort_obs) == 1, "abort observation", ops_seen)
            raised = abort_obs[0][1]
            if exp["abort"] is None:
                check(raised is None, "abort refused valid input", raised, plan.final)
            else:
                check(isinstance(raised, exp["abort"]), "abort must raise "
                      f"{exp['abort'].__name__}", raised, plan.final)
        if exp["relaxed"] and code in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       grpc.StatusCode.INTERNAL):
            return   # the client's header limits, not the server's doing
        if not plain_client:
            # grpcio's client mishandles some reserved keys it sends itself (with a grpc.aio
            # server too: sending grpc-status makes it drop the reply): the RPC completed,
            # and the server side was checked above.
            return
        check(code == exp["code"], "status code", code, exp["code"], details, *ctx)
        if code == grpc.StatusCode.OK:
            pass    # grpcio reports '' as the details of OK (grpc.aio's server too)
        elif "details_prefix" in exp:
            check((details or "").startswith(exp["details_prefix"]), "details", details)
        else:
            want = utf8_or_none(exp.get("details"))
            if want is not None:
                check((details or "") == want, "details round trip", details, want, *ctx)
            elif exp.get("details") is not None:
                check(isinstance(details, str), "details of unencodable text", details)
        if code == grpc.StatusCode.OK:
            check(response == exp["response"], "response payload",
                  response and response[:64], exp["response"][:64], *ctx)
        init_exp = exp["initial"]
        if init_exp is None or all(is_plain_key(k) for k, _ in init_exp):
            got_init = [tuple(p) for p in initial or ()]
            check(got_init == (init_exp or []), "initial metadata round trip", got_init,
                  init_exp, code, details, *ctx)
        trail_exp = exp["trailing"]
        if all(is_plain_key(k) for k, _ in trail_exp):
            got_trail = [tuple(p) for p in trailing or ()]
            check(got_trail == trail_exp, "trailing metadata round trip", got_trail, trail_exp,
                  code, details, *ctx)

    # -- streaming ---------------------------------------------------------
    def fuzz_server_stream(self, fdp: atheris.FuzzedDataProvider) -> None:
        plan = self.new_plan()
        plan.style = "generator" if fdp.ConsumeBool() else "write"
        path = "/fz.Generic/ServerStream" if fdp.ConsumeIntInRange(0, 3) == 0 \
            else "/fz.Fuzz/ServerStream"
        plan.ser_outputs = [gen_reply_object(fdp) for _ in range(fdp.ConsumeIntInRange(0, 5))]
        trace("server_stream", path, plan.style, plan.ser_outputs)
        bodies = [model_payload(o) for o in plan.ser_outputs]
        first_bad = next((i for i, b in enumerate(bodies) if b is None), None)
        good = bodies if first_bad is None else bodies[:first_bad]
        self.server.plan = plan
        got: List[bytes] = []
        code = grpc.StatusCode.OK
        details = None
        call = self.stubs[path](b"", timeout=RPC_TIMEOUT)
        try:
            for message in call:
                got.append(message)
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
        plan.wait_handler()
        ctx = (plan.style, plan.ser_outputs, plan.obs)
        check(plan.ran, "server-stream handler did not run", code, details, *ctx)
        check(got == good, "server-stream messages", [g[:32] for g in got], *ctx)
        if first_bad is None:
            check(code == grpc.StatusCode.OK, "server-stream status", code, details, *ctx)
            check(plan.obs[-1:] == [("writes_done",)], "server-stream handler end", *ctx)
        else:
            check(code == grpc.StatusCode.INTERNAL and details == "Failed to serialize response!",
                  "server-stream status after a bad message", code, details, *ctx)
            if plan.style == "write":
                check(bool(plan.obs) and plan.obs[-1][:2] == ("write", first_bad),
                      "write() of a bad message must raise", *ctx)
                exc = plan.obs[-1][2]
                bad = plan.ser_outputs[first_bad]
                want = type(bad.exc) if isinstance(bad, Raise) else TypeError
                check(type(exc) is want, "write() exception type", exc, bad)

    def fuzz_client_stream(self, fdp: atheris.FuzzedDataProvider) -> None:
        plan = self.new_plan()
        plan.style = "read" if fdp.ConsumeBool() else "iterator"
        path = "/fz.Generic/ClientStream" if fdp.ConsumeIntInRange(0, 3) == 0 \
            else "/fz.Fuzz/ClientStream"
        n = fdp.ConsumeIntInRange(0, 6)
        payloads = [gen_payload(fdp) for _ in range(n)]
        plan.deser_modes = [fdp.PickValueInList(DESER_MODES) if fdp.ConsumeIntInRange(0, 3) == 0
                            else "identity" for _ in range(n)]
        trace("client_stream", path, plan.style, plan.deser_modes, [p[:32] for p in payloads])
        expected: List[Any] = []
        bad: Optional[int] = None
        for i, (mode, p) in enumerate(zip(plan.deser_modes, payloads)):
            try:
                expected.append(apply_deser(mode, p))
            except BaseException:
                bad = i
                break
        self.server.plan = plan
        try:
            response = self.stubs[path](iter(payloads), timeout=RPC_TIMEOUT)
            code, details = grpc.StatusCode.OK, None
        except grpc.RpcError as err:
            response, code, details = None, err.code(), err.details()
        plan.wait_handler()
        ctx = (plan.style, plan.deser_modes, [p[:16] for p in payloads], plan.obs)
        check(plan.ran, "client-stream handler did not run", code, details, *ctx)
        check(len(plan.obs) == 1 and plan.obs[0][0] == "read", "client-stream observations",
              *ctx)
        got, exc = plan.obs[0][1], plan.obs[0][2]
        check(got == expected, "client-stream messages", *ctx)
        if bad is None:
            check(exc is None and code == grpc.StatusCode.OK and response == b"%d" % n,
                  "client-stream status", code, details, response, exc, *ctx)
        else:
            want = FuzzError if plan.deser_modes[bad] == "raise" else FuzzBaseError
            check(type(exc) is want, "read() must raise the deserializer's exception",
                  exc, *ctx)
            check(code == grpc.StatusCode.INTERNAL and
                  details == "Exception deserializing request!",
                  "client-stream status after a bad message", code, details, *ctx)

    def fuzz_bidi(self, fdp: atheris.FuzzedDataProvider) -> None:
        plan = self.new_plan()
        n = fdp.ConsumeIntInRange(0, 5)
        payloads = [gen_payload(fdp) for _ in range(n)]
        plan.deser_modes = ["identity"] * n
        plan.ser_outputs = [ECHO] * n
        trace("bidi", [p[:32] for p in payloads])
        self.server.plan = plan
        got: List[bytes] = []
        code = grpc.StatusCode.OK
        try:
            for message in self.stubs["/fz.Fuzz/Bidi"](iter(payloads), timeout=RPC_TIMEOUT):
                got.append(message)
        except grpc.RpcError as err:
            code = err.code()
        plan.wait_handler()
        check(code == grpc.StatusCode.OK and got == payloads, "bidi echo", code,
              [g[:16] for g in got], [p[:16] for p in payloads], plan.obs)

    # -- options -----------------------------------------------------------
    def fuzz_options(self, fdp: atheris.FuzzedDataProvider) -> None:
        options, valid = gen_options(fdp)
        mcr: Any = None
        mcr_ok = True
        if fdp.ConsumeIntInRange(0, 3) == 0:
            # maximum_concurrent_rpcs: None or an int >= 1 that fits a Py_ssize_t
            mcr = fdp.PickValueInList([1, 2, 1000, 2 ** 31, True, 0, -1, 2 ** 63, 1.5, "3"])
            mcr_ok = mcr is True or (type(mcr) is int and 1 <= mcr < 2 ** 63)
        live = valid and mcr_ok and fdp.ConsumeIntInRange(0, 15) == 0
        trace("options", options, mcr, "live" if live else "not live")
        if live and skips("D2") and reaches_d2(options):
            raise SkipInput("D2")
        try:
            server = asyncgrpc.server(options=options, maximum_concurrent_rpcs=mcr,
                                      blocked_loop_threshold=None)
        except (TypeError, ValueError, OverflowError) as exc:
            check(not (valid and mcr_ok), "valid options refused", exc, options, mcr)
            return
        check(valid and mcr_ok, "invalid options accepted", options, mcr)
        if not live:
            if fdp.ConsumeBool():
                stop = server.stop(None)
                try:
                    stop.send(None)
                except StopIteration:
                    pass
                else:
                    raise Violation("stop() of an unstarted server awaited something")
            del server
            return
        self.count("options_live")
        self.run_live(server)

    def run_live(self, server: Any) -> None:
        """Start ``server`` on the fuzz loop, call it once, stop it."""
        async def up() -> int:
            server.add_registered_method_handlers("fz.Live", {
                "Echo": asyncgrpc.unary_unary_rpc_method_handler(_live_echo)})
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return port
        try:
            port = self.server.call(up)
        except (RuntimeError, ValueError, TypeError):
            # a configuration the core refuses at bind/start time: fine if it says so
            self.count("options_live_refused")
            self.server.call(lambda: server.stop(None))
            return
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    channel.unary_unary("/fz.Live/Echo")(b"ping", timeout=LIVE_RPC_TIMEOUT)
                except grpc.RpcError:
                    pass    # fuzzed options may legitimately make the RPC fail
        finally:
            self.server.call(lambda: server.stop(None))


async def _live_echo(request: bytes, context: Any) -> bytes:
    return request


OPTION_KEYS = [
    "grpc.max_receive_message_length", "grpc.max_send_message_length",
    "grpc.max_metadata_size", "grpc.max_concurrent_streams", "grpc.keepalive_time_ms",
    "grpc.keepalive_timeout_ms", "grpc.keepalive_permit_without_calls",
    "grpc.http2.max_pings_without_data", "grpc.http2.min_ping_interval_without_data_ms",
    "grpc.http2.max_ping_strikes", "grpc.http2.max_frame_size", "grpc.http2.bdp_probe",
    "grpc.http2.hpack_table_size.decoder", "grpc.http2.hpack_table_size.encoder",
    "grpc.http2.lookahead_bytes", "grpc.http2.write_buffer_size",
    "grpc.http2.initial_sequence_number", "grpc.http2.true_binary",
    "grpc.max_connection_idle_ms", "grpc.max_connection_age_ms",
    "grpc.max_connection_age_grace_ms", "grpc.server_handshake_timeout_ms",
    "grpc.so_reuseport", "grpc.expand_wildcard_addrs", "grpc.enable_channelz",
    "grpc.max_channel_trace_event_memory_per_node", "grpc.default_compression_algorithm",
    "grpc.default_compression_level", "grpc.compression_enabled_algorithms_bitset",
    "grpc.per_message_compression", "grpc.per_message_decompression",
    "grpc.primary_user_agent", "grpc.secondary_user_agent", "grpc.optimization_target",
    "grpc.minimal_stack", "grpc.enable_deadline_checking", "grpc.resource_quota",
    "grpc.socket_mutator", "grpc.socket_factory", "grpc.internal.event_engine",
    "grpc.internal.transport", "grpc.internal.security_connector",
    "grpc.internal.server_credentials", "grpc.internal.channelz_channel_node",
    "grpc.experimental.tcp_read_chunk_size", "grpc.experimental.tcp_min_read_chunk_size",
    "grpc.experimental.tcp_max_read_chunk_size", "grpc.experimental.tcp_tx_zerocopy_enabled",
    "grpc.experimental.tcp_tx_zerocopy_send_bytes_threshold",
    "grpc.experimental.tcp_tx_zerocopy_max_simultaneous_sends",
    "grpc.experimental.server_config_change_drain_grace_time_ms", "grpc.service_config",
    "grpc.lb_policy_name", "grpc.default_authority", "grpc.census", "grpc.loadreporting",
    "grpc.channel_pooling_domain", "grpc.tsi.max_frame_size", "", "x", "grpc.",
]
OPTION_INTS = [0, 1, -1, 2, 7, 64, 1024, 4096, 65535, 65536, 1 << 20, (1 << 31) - 1,
               -(1 << 31), 1 << 31, -(1 << 31) - 1, 1 << 64]


@atheris.instrument_func
def gen_options(fdp: atheris.FuzzedDataProvider) -> Tuple[Any, bool]:
    """Server options and whether ``src/server.c: build_channel_args`` accepts them."""
    shape = fdp.ConsumeIntInRange(0, 15)
    if shape == 15:
        return fdp.PickValueInList([(None, True), ((), True), ([], True), ("ab", False),
                                    (5, False), ({}, True), (RaisingIterable(), False)])
    out: List[Any] = []
    valid = True
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        kmode = fdp.ConsumeIntInRange(0, 7)
        if kmode <= 4:
            key: Any = fdp.PickValueInList(OPTION_KEYS)
        elif kmode == 5:
            key = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 24))
        elif kmode == 6:
            key = fdp.PickValueInList(OPTION_KEYS) + "\x00tail"
        else:
            key = fdp.PickValueInList([b"grpc.max_metadata_size", None, 3, StrSub("grpc.x")])
        vmode = fdp.ConsumeIntInRange(0, 7)
        if vmode <= 3:
            value: Any = fdp.PickValueInList(OPTION_INTS)
        elif vmode == 4:
            value = fdp.ConsumeIntInRange(-(1 << 40), 1 << 40)
        elif vmode == 5:
            value = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 24))
        elif vmode == 6:
            value = fdp.PickValueInList(["gzip", "", "latency", "throughput", "bogus",
                                         '{"methodConfig": []}', "a\x00b", True, False])
        else:
            value = fdp.PickValueInList([b"bytes", 1.5, None, object(), [1]])
        pshape = fdp.ConsumeIntInRange(0, 9)
        if pshape <= 7:
            item: Any = (key, value)
        elif pshape == 8:
            item = [key, value]
        else:
            item = (key,) if fdp.ConsumeBool() else (key, value, value)
        out.append(item)
        valid = valid and option_item_valid(item)
    if shape >= 13:
        return tuple(out), valid
    return out, valid


@atheris.instrument_func
def reaches_d2(options: Any) -> bool:
    """Would these (valid) options reach known defect D2 once a connection comes in?"""
    for key, value in options or ():
        if (key.split("\x00")[0] == "grpc.experimental.tcp_tx_zerocopy_max_simultaneous_sends"
                and isinstance(value, int) and value > 1 << 20):
            return True
    return False


def option_item_valid(item: Any) -> bool:
    """Does ``build_channel_args`` accept this (key, value) item?"""
    if not isinstance(item, tuple) or len(item) != 2:
        return False
    key, value = item
    if not isinstance(key, str) or utf8_or_none(key) is None:
        return False
    if isinstance(value, int):
        return -(1 << 31) <= value < (1 << 31)
    if isinstance(value, str):
        return utf8_or_none(value) is not None and "\x00" not in value
    if isinstance(value, bytes):
        return b"\x00" not in value
    return True     # any other object is accepted and left out, as grpc.aio's pointer args


# ---------------------------------------------------------------- entry point

FUZZER: Optional[Fuzzer] = None
RUNS: Optional[int] = None      # from -atheris_runs=N: this harness ends the run itself

# libFuzzer flags this harness sets unless the command line does: inputs up to 1 KiB from
# the start, no re-runs for libFuzzer's own leak detection (Python's allocations would
# trigger it on almost every input), a per-input timeout well above RPC_TIMEOUT.
DEFAULT_FLAGS = ["-max_len=1024", "-len_control=0", "-detect_leaks=0", "-timeout=300",
                 "-rss_limit_mb=8192"]


def finish(code: int) -> None:
    """Write the counters, print a summary and leave the process at once."""
    if FUZZER is not None:
        FUZZER.write_stats()
        stats = dict(FUZZER.stats)
        seconds = time.monotonic() - FUZZER.started
        skipped = {k: v for k, v in stats.items() if k.startswith("skipped_known")}
        print(f"fuzz_core: done {stats['inputs']} inputs in {seconds:.0f} s "
              f"({stats['inputs'] / max(seconds, 1e-9):.0f}/s), no violation; "
              f"skipped as known defects: {skipped or 'none'}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: libFuzzer's and atheris' own exit paths throw C++ exceptions through
    # pybind11, which the ASan runtime (preloaded into a Python that has no libstdc++ at
    # start-up) cannot intercept; and the gRPC threads need no orderly shutdown.
    os._exit(code)


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    """atheris entry point: run one input against the long-lived server."""
    global FUZZER
    if FUZZER is None:
        FUZZER = Fuzzer()
        asan = "libasan" in os.environ.get("LD_PRELOAD", "")
        print(f"fuzz_core: serving {asyncgrpc.__file__} on {LOOP_KIND} at {FUZZER.target}"
              f"{' with the ASan runtime preloaded' if asan else ''}; "
              f"skipping known defects {sorted(SKIP_KNOWN) or 'none'}", file=sys.stderr,
              flush=True)
    try:
        FUZZER.one_input(data)
    except BaseException:
        # Print it here: under ASan atheris cannot (see finish()); then let atheris and
        # libFuzzer record the crash and the input.
        import traceback
        print("\n=== fuzz_core: invariant violated or harness error ===", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        FUZZER.dump_recent()
        raise
    if RUNS is not None and FUZZER.stats["inputs"] >= RUNS:
        finish(0)


def main() -> None:
    """Set up atheris with the command line (libFuzzer flags) and fuzz."""
    global RUNS
    argv = list(sys.argv)
    for arg in argv[1:]:
        if arg.startswith("-atheris_runs="):
            RUNS = int(arg.split("=", 1)[1])
    given = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
    argv[1:1] = [f for f in DEFAULT_FLAGS if f.split("=", 1)[0] not in given]
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    finish(0)   # replaying files: libFuzzer returns here after the last one


if __name__ == "__main__":
    main()
