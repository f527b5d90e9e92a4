// Echo server on the gRPC C++ callback API (the "what C++ can do" peer).
//
//   server --port N
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "benchmark.grpc.pb.h"

using asyncgrpc::bench::Echo;
using asyncgrpc::bench::EchoReply;
using asyncgrpc::bench::EchoRequest;
using asyncgrpc::bench::StreamRequest;

namespace {

// Writes `count` replies of `payload_size` bytes, one after the other.
class StreamWriter final : public grpc::ServerWriteReactor<EchoReply> {
 public:
  explicit StreamWriter(const StreamRequest* request)
      : remaining_(request->count()) {
    reply_.set_payload(std::string(request->payload_size(), 'x'));
    Next();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNKNOWN, "write failed"));
      return;
    }
    Next();
  }

  void OnDone() override { delete this; }

 private:
  void Next() {
    if (remaining_ == 0) {
      Finish(grpc::Status::OK);
      return;
    }
    remaining_--;
    StartWrite(&reply_);
  }

  uint32_t remaining_;
  EchoReply reply_;
};

// Writes `count` replies, then holds the stream open without writing until
// the client cancels it (benchmarks/idle_streams.py).  OnCancel and
// OnWriteDone may run on different threads: the mutex makes Finish happen
// once.
class HoldWriter final : public grpc::ServerWriteReactor<EchoReply> {
 public:
  explicit HoldWriter(const StreamRequest* request)
      : remaining_(request->count()) {
    reply_.set_payload(std::string(request->payload_size(), 'x'));
    std::lock_guard<std::mutex> lock(mu_);
    NextLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      FinishLocked(grpc::Status(grpc::StatusCode::UNKNOWN, "write failed"));
      return;
    }
    NextLocked();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    // a write in flight completes with ok == false and finishes then
    if (!writing_) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
    }
  }

  void OnDone() override { delete this; }

 private:
  void NextLocked() {
    if (remaining_ == 0 || cancelled_) {
      if (cancelled_) {
        FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
      }
      return;  // all written: hold until the client cancels
    }
    remaining_--;
    writing_ = true;
    StartWrite(&reply_);
  }

  void FinishLocked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  std::mutex mu_;
  uint32_t remaining_;
  bool writing_ = false;
  bool cancelled_ = false;
  bool finished_ = false;
  EchoReply reply_;
};

// Echoes each request as soon as it is read; ends when the client half-closes.
class BidiEcho final
    : public grpc::ServerBidiReactor<EchoRequest, EchoReply> {
 public:
  BidiEcho() { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // client is done sending
      Finish(grpc::Status::OK);
      return;
    }
    reply_.set_payload(request_.payload());
    StartWrite(&reply_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNKNOWN, "write failed"));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  EchoRequest request_;
  EchoReply reply_;
};

class EchoService final : public Echo::CallbackService {
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* context,
                                  const EchoRequest* request,
                                  EchoReply* reply) override {
    reply->set_payload(request->payload());
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerWriteReactor<EchoReply>* ServerStream(
      grpc::CallbackServerContext*, const StreamRequest* request) override {
    return new StreamWriter(request);
  }

  grpc::ServerWriteReactor<EchoReply>* Hold(
      grpc::CallbackServerContext*, const StreamRequest* request) override {
    return new HoldWriter(request);
  }

  grpc::ServerBidiReactor<EchoRequest, EchoReply>* Bidi(
      grpc::CallbackServerContext*) override {
    return new BidiEcho();
  }
};

int ParsePort(int argc, char** argv) {
  for (int i = 1; i < argc; i++) {
    if (std::strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      return std::atoi(argv[++i]);
    }
    if (std::strncmp(argv[i], "--port=", 7) == 0) {
      return std::atoi(argv[i] + 7);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int port = ParsePort(argc, argv);
  if (port <= 0 || port > 65535) {
    std::fprintf(stderr, "usage: %s --port N\n", argv[0]);
    return 2;
  }
  EchoService service;
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort("127.0.0.1:" + std::to_string(port),
                           grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || bound_port != port) {
    std::fprintf(stderr, "cpp_callback: cannot listen on port %d\n", port);
    return 1;
  }
  std::printf("cpp_callback server listening on port %d\n", port);
  std::fflush(stdout);
  server->Wait();
  return 0;
}
