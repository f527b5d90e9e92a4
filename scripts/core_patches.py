"""asyncgrpc's changes to the bundled gRPC core (scripts/build_core.py).

Each patch replaces one exact piece of one source file of the pinned grpcio
sdist; applying fails loudly when that piece is not found exactly once (a new
grpcio version must be looked at again, not patched blindly). Only ``.cc``
files are patched, never headers, so a patch changes one object file and the
rest of the cached build is reused. The patched sources are written beside
the build (``<build dir>/patched/``); the unpacked sdist stays as it came.

What the patches fix (tests/test_drain.py tests each; docs/deploy.md, "What
a server does when it stops", and benchmarks/RESULTS.md, "Stopping with a
grace", have the measurements):

``close-after-peer-read``
    A server that has sent its final GOAWAY closes the connection the moment
    its last stream ends. A frame the client sends in that instant (a BDP
    ping answering the last reply, a WINDOW_UPDATE) then arrives at a socket
    that is shut down or closed with unread data, so the kernel answers with
    a reset, and the client can lose replies it had not read yet. Instead the
    server sends a PING after its last frame and closes when the client
    acknowledges it: the client has then read everything before the PING.
    A client that closes first, or a ping timeout, still ends the connection.
    The server's ping throttle is lifted once GOAWAY is sent, so that PING
    goes out at once.

``serve-calls-until-goaway``
    The server's shutdown sends GOAWAY, and the core then cancelled every
    call whose headers arrived after that (the client had sent it before the
    GOAWAY reached it), although the GOAWAY's last stream id tells the client
    such calls are processed: the client saw CANCELLED. Now the requested
    calls stay posted until the last connection is gone, so those calls are
    served; one that finds no requested call left is refused with
    RST_STREAM(REFUSED_STREAM) (the client sees UNAVAILABLE, which a retry
    policy may retry), and so are calls still waiting for one.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Dict, List


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    path: str      # relative to the sdist root
    old: str
    new: str


CHTTP2 = "src/core/ext/transport/chttp2/transport/chttp2_transport.cc"
WRITING = "src/core/ext/transport/chttp2/transport/writing.cc"
SERVER = "src/core/server/server.cc"

_CLOSE_AFTER_PEER_READ = """\
// asyncgrpc patch close-after-peer-read (scripts/core_patches.py): a server
// that has sent its final GOAWAY and has no stream left closes once the peer
// has acknowledged a PING sent after its last frame, not at once: a frame the
// peer sends meanwhile would otherwise reach a closed socket, whose reset can
// destroy replies the peer has not read yet.
namespace {
class CloseAfterPeerRead {
 public:
  static void Start(grpc_chttp2_transport* t, grpc_error_handle error) {
    if (t->is_client) {
      close_transport_locked(t, std::move(error));
      return;
    }
    auto* self = new CloseAfterPeerRead(t, std::move(error));
    send_ping_locked(t, nullptr,
                     GRPC_CLOSURE_INIT(&self->on_ack_, OnAck, self, nullptr));
    grpc_chttp2_initiate_write(t, GRPC_CHTTP2_INITIATE_WRITE_APPLICATION_PING);
  }

 private:
  CloseAfterPeerRead(grpc_chttp2_transport* t, grpc_error_handle error)
      : t_(t->Ref()), error_(std::move(error)) {}

  // Runs on the ack, or with an error when the pings are cancelled because
  // the transport closed some other way (then closing again does nothing).
  static void OnAck(void* arg, grpc_error_handle /*error*/) {
    auto* self = static_cast<CloseAfterPeerRead*>(arg);
    self->t_->combiner->Run(
        GRPC_CLOSURE_INIT(&self->on_ack_, OnAckLocked, self, nullptr),
        absl::OkStatus());
  }

  static void OnAckLocked(void* arg, grpc_error_handle /*error*/) {
    auto* self = static_cast<CloseAfterPeerRead*>(arg);
    close_transport_locked(self->t_.get(), self->error_);
    delete self;
  }

  const grpc_core::RefCountedPtr<grpc_chttp2_transport> t_;
  const grpc_error_handle error_;
  grpc_closure on_ack_;
};
}  // namespace

// Callback from the grpc_endpoint after bytes have been written by calling
// sendmsg
static void write_action_end_locked(
"""

PATCHES: List[Patch] = [
    Patch(
        "close-after-peer-read", CHTTP2,
        old="""\
// Callback from the grpc_endpoint after bytes have been written by calling
// sendmsg
static void write_action_end_locked(
""",
        new=_CLOSE_AFTER_PEER_READ),
    Patch(
        "close-after-peer-read", CHTTP2,
        old="""\
    if (t->stream_map.empty()) {
      close_transport_locked(t.get(), GRPC_ERROR_CREATE("goaway sent"));
    }
""",
        new="""\
    if (t->stream_map.empty()) {
      CloseAfterPeerRead::Start(t.get(), GRPC_ERROR_CREATE("goaway sent"));
    }
"""),
    Patch(
        "close-after-peer-read", CHTTP2,
        old="""\
    if (t->sent_goaway_state == GRPC_CHTTP2_FINAL_GOAWAY_SENT) {
      close_transport_locked(
          t, GRPC_ERROR_CREATE_REFERENCING(
                 "Last stream closed after sending GOAWAY", &error, 1));
    }
""",
        new="""\
    if (t->sent_goaway_state == GRPC_CHTTP2_FINAL_GOAWAY_SENT) {
      CloseAfterPeerRead::Start(
          t, GRPC_ERROR_CREATE_REFERENCING(
                 "Last stream closed after sending GOAWAY", &error, 1));
    }
"""),
    Patch(
        "close-after-peer-read", WRITING,
        old="""\
  if (t->sent_goaway_state != GRPC_CHTTP2_GRACEFUL_GOAWAY) {
""",
        new="""\
  // asyncgrpc patch close-after-peer-read: no throttle once GOAWAY is sent
  // (the PING that ends the connection goes out at once).
  if (t->sent_goaway_state == GRPC_CHTTP2_NO_GOAWAY_SEND) {
"""),
    Patch(
        "serve-calls-until-goaway", SERVER,
        old="""\
void Server::CallData::KillZombie() {
  GRPC_CLOSURE_INIT(&kill_zombie_closure_, KillZombieClosure, call_,
                    grpc_schedule_on_exec_ctx);
""",
        new="""\
// asyncgrpc patch serve-calls-until-goaway (scripts/core_patches.py): a
// call dropped because the server is shutting down was never started, so
// the client is told so with RST_STREAM(REFUSED_STREAM) and may retry it
// elsewhere. (An Unknown error with an HTTP/2 code makes chttp2 send exactly
// that code, not trailers with a status; on a call already cancelled the
// second cancel does nothing.)
namespace {
void RefuseZombieClosure(void* call, grpc_error_handle /*error*/) {
  grpc_call* c = static_cast<grpc_call*>(call);
  Call::FromC(c)->CancelWithError(grpc_error_set_int(
      absl::UnknownError("server shutting down: stream refused"),
      StatusIntProperty::kHttp2Error, 0x7 /* REFUSED_STREAM */));
  grpc_call_unref(c);
}
}  // namespace

void Server::CallData::KillZombie() {
  GRPC_CLOSURE_INIT(&kill_zombie_closure_,
                    server_->ShutdownCalled() ? RefuseZombieClosure
                                              : KillZombieClosure,
                    call_, grpc_schedule_on_exec_ctx);
"""),
    Patch(
        "serve-calls-until-goaway", SERVER,
        old="""\
void Server::CallData::StartNewRpc(grpc_call_element* elem) {
  if (server_->ShutdownCalled()) {
    state_.store(CallState::ZOMBIED, std::memory_order_relaxed);
    KillZombie();
    return;
  }
""",
        new="""\
void Server::CallData::StartNewRpc(grpc_call_element* elem) {
  // asyncgrpc patch serve-calls-until-goaway: a call arriving after shutdown
  // began is matched like any other (MatchOrQueue refuses it if no requested
  // call is left).
"""),
    Patch(
        "serve-calls-until-goaway", SERVER,
        old="""\
  if (!error.ok() || server->ShutdownCalled()) {
    calld->state_.store(CallState::ZOMBIED, std::memory_order_relaxed);
""",
        new="""\
  if (!error.ok()) {  // asyncgrpc patch serve-calls-until-goaway
    calld->state_.store(CallState::ZOMBIED, std::memory_order_relaxed);
"""),
    Patch(
        "serve-calls-until-goaway", SERVER,
        old="""\
      if (rc == nullptr) {
        if (IsOptimization04Enabled() &&
""",
        new="""\
      if (rc == nullptr) {
        if (server_->ShutdownCalled()) {
          // asyncgrpc patch serve-calls-until-goaway: no request comes any
          // more, so the call is refused rather than left waiting.
          calld->SetState(CallData::CallState::ZOMBIED);
          calld->KillZombie();
          return;
        }
        if (IsOptimization04Enabled() &&
"""),
    Patch(
        "serve-calls-until-goaway", SERVER,
        old="""\
    removing_connections.swap(connections_);
    // Collect all unregistered then registered calls.
    {
      MutexLock lock(mu_call_);
      KillPendingWorkLocked(GRPC_ERROR_CREATE("Server Shutdown"));
    }
    ShutdownUnrefOnShutdownCall();
""",
        new="""\
    removing_connections.swap(connections_);
    // asyncgrpc patch serve-calls-until-goaway: the requested calls stay
    // posted (MaybeFinishShutdown fails them once no connection is left).
    ShutdownUnrefOnShutdownCall();
"""),
    Patch(
        "serve-calls-until-goaway", SERVER,
        old="""\
  if (!ShutdownReady() || shutdown_published_) {
    return;
  }
  {
    MutexLock lock(mu_call_);
    KillPendingWorkLocked(GRPC_ERROR_CREATE("Server Shutdown"));
  }
""",
        new="""\
  if (!ShutdownReady() || shutdown_published_) {
    return;
  }
  {
    MutexLock lock(mu_call_);
    if (channels_.empty() && connections_open_ == 0) {
      KillPendingWorkLocked(GRPC_ERROR_CREATE("Server Shutdown"));
    } else if (started_) {
      // asyncgrpc patch serve-calls-until-goaway: while connections remain,
      // a call their client started before it saw the GOAWAY is served by a
      // requested call still posted; calls waiting for one are refused.
      unregistered_request_matcher_->ZombifyPending();
      for (auto& rm : registered_methods_) {
        rm.second->matcher->ZombifyPending();
      }
    }
  }
"""),
]


def names() -> List[str]:
    """The patch names, in order, each once."""
    return list(dict.fromkeys(p.name for p in PATCHES))


def patched_sources(src: Path) -> Dict[str, str]:
    """The patched text of each patched source file, keyed by its path
    relative to the sdist root ``src``."""
    texts: Dict[str, str] = {}
    for patch in PATCHES:
        text = texts.get(patch.path)
        if text is None:
            text = (src / patch.path).read_text()
        count = text.count(patch.old)
        if count != 1:
            raise SystemExit(
                f"error: core patch {patch.name!r} expects its text once in "
                f"{patch.path}, found it {count} times "
                "(scripts/core_patches.py is out of date for this grpcio)")
        texts[patch.path] = text.replace(patch.old, patch.new)
    return texts


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]
