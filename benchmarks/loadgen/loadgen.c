/* loadgen: gRPC load generator for the asyncgrpc.bench.Echo service.
 *
 * Written against the gRPC C core API (completion queues and batches); the
 * messages are protobuf-c structures generated from proto/benchmark.proto.
 *
 * Model: W worker threads, each owning one completion queue and a share of
 * the connections (one grpc_channel per connection, each with distinct
 * channel args so that no two share a TCP connection).  Each connection has
 * `--inflight` slots; a slot runs one RPC at a time.  In the closed-loop mode
 * a slot starts its next RPC as soon as the previous one ends; with `--rate`
 * RPCs are started on a fixed schedule and latency is measured from the
 * scheduled (intended) start time, whether or not a slot was free then.
 *
 * Every status is checked and every reply is validated; any failure makes
 * the program print the reason on stderr and exit with status 1.
 *
 * --method hold is not a load: every slot opens one Hold stream, reads its
 * `--stream-messages` replies and then leaves it open; once all are open the
 * program holds them for `--duration` seconds, cancels them all and checks
 * that each ended CANCELLED (a server that ends one on its own fails).  It
 * is how benchmarks/idle_streams.py measures the server memory per idle
 * stream.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <getopt.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "benchmark.pb-c.h"
#include "hist.h"

#define NSEC 1000000000ull
#define MSEC 1000000ull
#define SPIN_NS (3 * MSEC) /* see worker_main */

/* ------------------------------------------------------------------------ */
/* options */

typedef enum { M_UNARY, M_SERVER_STREAM, M_BIDI, M_HOLD, NUM_METHODS } method_t;

static const char *const method_names[NUM_METHODS] = {"unary", "server_stream",
                                                      "bidi", "hold"};
static const char *const method_paths[NUM_METHODS] = {
    "/asyncgrpc.bench.Echo/Unary",
    "/asyncgrpc.bench.Echo/ServerStream",
    "/asyncgrpc.bench.Echo/Bidi",
    "/asyncgrpc.bench.Echo/Hold",
};

typedef struct {
  const char *target;
  method_t method;
  int connections;
  int inflight; /* 0 = default */
  double duration;
  double warmup;
  size_t payload;
  uint32_t stream_messages;
  double rate; /* 0 = closed loop */
  int json;
  int threads; /* 0 = one per CPU in our affinity mask */
  double connect_timeout;
  double drain_timeout;
  uint64_t requests; /* 0 = unlimited */
  int wait_stdin;    /* hold: wait for a line on stdin before opening */
  double open_timeout; /* hold: time allowed to open every stream */
} opts_t;

static opts_t g_opt = {
    .target = "127.0.0.1:50051",
    .method = M_UNARY,
    .connections = 1,
    .inflight = 0,
    .duration = 10.0,
    .warmup = 2.0,
    .payload = 0,
    .stream_messages = 100,
    .rate = 0.0,
    .json = 0,
    .threads = 0,
    .connect_timeout = 10.0,
    .drain_timeout = 10.0,
    .requests = 0,
    .wait_stdin = 0,
    .open_timeout = 60.0,
};

/* ------------------------------------------------------------------------ */
/* time */

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * NSEC + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (uint64_t)ts.tv_sec * NSEC + (uint64_t)ts.tv_nsec;
}

/* gRPC deadline `delta_ns` from now on gRPC's own monotonic clock. */
static gpr_timespec grpc_deadline_in(uint64_t delta_ns) {
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                      gpr_time_from_nanos((int64_t)delta_ns, GPR_TIMESPAN));
}

/* Set once by the main thread before the workers start sending. */
static uint64_t g_t_start;   /* load starts (warmup begins) */
static uint64_t g_t_measure; /* measurement window begins */
static uint64_t g_t_end;     /* measurement window ends, no new RPCs */
static atomic_int g_abort;
static atomic_int g_workers_done;
static atomic_int g_open;    /* hold: streams open (all replies received) */
static atomic_int g_release; /* hold: set by main: cancel every stream */
static pthread_barrier_t g_barrier;

/* ------------------------------------------------------------------------ */
/* per-thread state */

#define NUM_CODES 17
static const char *const code_names[NUM_CODES] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

typedef enum {
  ST_IDLE,
  ST_UNARY,       /* the single unary batch */
  ST_SS_RECV,     /* server stream: waiting for a message */
  ST_BIDI_PING,   /* bidi: one message sent, waiting for its echo */
  ST_BIDI_CLOSE,  /* bidi: half-closed, waiting for end of stream + status */
  ST_STATUS,      /* waiting for the final status only */
  ST_HOLD_RECV,   /* hold: waiting for one of the first replies */
  ST_HOLD_OPEN,   /* hold: all replies in, waiting for the status */
} state_t;

struct worker;
struct conn;

typedef struct slot {
  struct worker *w;
  struct conn *conn;
  grpc_call *call;
  state_t state;
  grpc_byte_buffer *send_bb;
  grpc_byte_buffer *recv_bb;
  grpc_metadata_array init_md;
  grpc_metadata_array trail_md;
  grpc_status_code status;
  grpc_slice details;
  const char *error_string;
  int failed;       /* a batch failed or a reply was wrong */
  int ended_early;  /* bidi, hold: the server closed before we did */
  int cancelled_by_us; /* hold: we cancelled the stream */
  uint64_t t_start; /* start of the RPC (intended start under --rate) */
  uint64_t t_msg;   /* bidi: when the current message was sent */
  uint32_t msgs;    /* replies received in this RPC */
  uint8_t sent_payload[8]; /* first payload bytes of the last request sent */
} slot_t;

typedef struct conn {
  grpc_channel *channel;
  void *method_handle;
  int id;
} conn_t;

typedef struct worker {
  int id;
  pthread_t thread;
  grpc_completion_queue *cq;
  conn_t *conns;
  int nconns;
  slot_t *slots;
  int nslots;
  int active; /* slots with an RPC in progress */
  grpc_slice request;           /* serialized request message */
  uint64_t seq;                 /* requests built (see new_request_buffer) */
  const uint8_t *payload;       /* expected echo payload */
  gpr_timespec call_deadline;   /* absolute deadline for every call */
  int limited;                  /* --requests given */
  uint64_t request_quota;       /* then: RPCs this worker may start */
  uint64_t started;             /* RPCs started */
  /* open loop */
  double interval_ns;
  uint64_t origin_ns;
  int *free_ring;
  int free_head, free_count;
  /* stats */
  hist_t hist;
  hist_t lag; /* open loop: actual start - intended start */
  uint64_t rpcs_window, msgs_window, rpcs_total, msgs_total;
  uint64_t codes[NUM_CODES];
  uint64_t other_codes;
  uint64_t batch_failures;
  uint64_t bad_replies;
  uint64_t failed_rpcs;
  uint64_t finish_ns;
  char first_error[512];
  int setup_failed;
} worker_t;

static void note_error(worker_t *w, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void note_error(worker_t *w, const char *fmt, ...) {
  if (w->first_error[0]) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(w->first_error, sizeof(w->first_error), fmt, ap);
  va_end(ap);
}

static int in_window(uint64_t t) { return t >= g_t_measure && t < g_t_end; }

/* ------------------------------------------------------------------------ */
/* batches */

static void start_batch(slot_t *s, grpc_op *ops, size_t n) {
  grpc_call_error e = grpc_call_start_batch(s->call, ops, n, s, NULL);
  if (e != GRPC_CALL_OK) {
    /* A programming error on our side: never continue silently. */
    fprintf(stderr, "loadgen: grpc_call_start_batch failed: %d (state %d)\n",
            (int)e, (int)s->state);
    abort();
  }
}

/* A request for slot `s`.  For echo requests the first (up to) 8 payload
 * bytes carry a sequence number unique to this message, so a reply can only
 * be right if it echoes this very request (no caching of one reply); the
 * slot keeps a copy of the payload sent, to check the echo against. */
static grpc_byte_buffer *new_request_buffer(worker_t *w, slot_t *s) {
  if (g_opt.method == M_SERVER_STREAM || g_opt.method == M_HOLD ||
      g_opt.payload == 0) {
    /* the byte buffer takes its own reference to the shared slice */
    return grpc_raw_byte_buffer_create(&w->request, 1);
  }
  size_t len = GRPC_SLICE_LENGTH(w->request);
  grpc_slice slice = grpc_slice_malloc(len);
  uint8_t *p = GRPC_SLICE_START_PTR(slice);
  memcpy(p, GRPC_SLICE_START_PTR(w->request), len);
  uint8_t *payload = p + (len - g_opt.payload); /* payload is the last field */
  uint64_t seq = ++w->seq * (uint64_t)g_opt.threads + (uint64_t)w->id;
  size_t n = g_opt.payload < 8 ? g_opt.payload : 8;
  for (size_t i = 0; i < n; i++) payload[i] ^= (uint8_t)(seq >> (8 * i));
  memcpy(s->sent_payload, payload, n);
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
  grpc_slice_unref(slice);
  return bb;
}

static void op_send_initial_md(grpc_op *op) {
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_SEND_INITIAL_METADATA;
}

static void op_send_message(grpc_op *op, grpc_byte_buffer *bb) {
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_SEND_MESSAGE;
  op->data.send_message.send_message = bb;
}

static void op_close(grpc_op *op) {
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
}

static void op_recv_initial_md(grpc_op *op, slot_t *s) {
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_RECV_INITIAL_METADATA;
  op->data.recv_initial_metadata.recv_initial_metadata = &s->init_md;
}

static void op_recv_message(grpc_op *op, slot_t *s) {
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_RECV_MESSAGE;
  op->data.recv_message.recv_message = &s->recv_bb;
}

static void op_recv_status(grpc_op *op, slot_t *s) {
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op->data.recv_status_on_client.trailing_metadata = &s->trail_md;
  op->data.recv_status_on_client.status = &s->status;
  op->data.recv_status_on_client.status_details = &s->details;
  op->data.recv_status_on_client.error_string = &s->error_string;
}

static void start_rpc(slot_t *s, uint64_t t_start) {
  worker_t *w = s->w;
  s->call = grpc_channel_create_registered_call(
      s->conn->channel, NULL, GRPC_PROPAGATE_DEFAULTS, w->cq,
      s->conn->method_handle, w->call_deadline, NULL);
  s->t_start = t_start;
  s->t_msg = now_ns();
  s->msgs = 0;
  s->failed = 0;
  s->ended_early = 0;
  s->cancelled_by_us = 0;
  s->status = GRPC_STATUS_UNKNOWN;
  s->details = grpc_empty_slice();
  s->error_string = NULL;
  s->init_md.count = 0;
  s->trail_md.count = 0;
  s->recv_bb = NULL;
  s->send_bb = new_request_buffer(w, s);
  w->active++;
  w->started++;

  grpc_op ops[6];
  size_t n = 0;
  switch (g_opt.method) {
    case M_UNARY:
      op_send_initial_md(&ops[n++]);
      op_send_message(&ops[n++], s->send_bb);
      op_close(&ops[n++]);
      op_recv_initial_md(&ops[n++], s);
      op_recv_message(&ops[n++], s);
      op_recv_status(&ops[n++], s);
      s->state = ST_UNARY;
      break;
    case M_SERVER_STREAM:
      op_send_initial_md(&ops[n++]);
      op_send_message(&ops[n++], s->send_bb);
      op_close(&ops[n++]);
      op_recv_initial_md(&ops[n++], s);
      op_recv_message(&ops[n++], s);
      s->state = ST_SS_RECV;
      break;
    case M_BIDI:
      op_send_initial_md(&ops[n++]);
      op_send_message(&ops[n++], s->send_bb);
      op_recv_initial_md(&ops[n++], s);
      op_recv_message(&ops[n++], s);
      s->state = ST_BIDI_PING;
      break;
    case M_HOLD:
      op_send_initial_md(&ops[n++]);
      op_send_message(&ops[n++], s->send_bb);
      op_close(&ops[n++]);
      op_recv_initial_md(&ops[n++], s);
      op_recv_message(&ops[n++], s);
      s->state = ST_HOLD_RECV;
      break;
    case NUM_METHODS:
      abort();
  }
  start_batch(s, ops, n);
}

/* Reads and validates one reply.  expect_echo: the payload must equal ours;
 * otherwise only its size is checked.  Returns 1 if the reply is right. */
static int check_reply(slot_t *s, int expect_echo) {
  worker_t *w = s->w;
  grpc_byte_buffer_reader reader;
  if (!grpc_byte_buffer_reader_init(&reader, s->recv_bb)) {
    note_error(w, "cannot read reply byte buffer");
    return 0;
  }
  grpc_slice data = grpc_byte_buffer_reader_readall(&reader);
  grpc_byte_buffer_reader_destroy(&reader);
  grpc_byte_buffer_destroy(s->recv_bb);
  s->recv_bb = NULL;

  int ok = 1;
  Asyncgrpc__Bench__EchoReply *reply = asyncgrpc__bench__echo_reply__unpack(
      NULL, GRPC_SLICE_LENGTH(data), GRPC_SLICE_START_PTR(data));
  if (reply == NULL) {
    note_error(w, "reply is not a valid EchoReply (%zu bytes)",
               (size_t)GRPC_SLICE_LENGTH(data));
    ok = 0;
  } else {
    if (reply->payload.len != g_opt.payload) {
      note_error(w, "reply payload has %zu bytes, expected %zu",
                 reply->payload.len, g_opt.payload);
      ok = 0;
    } else if (expect_echo && g_opt.payload &&
               (memcmp(reply->payload.data, s->sent_payload,
                       g_opt.payload < 8 ? g_opt.payload : 8) != 0 ||
                (g_opt.payload > 8 &&
                 memcmp(reply->payload.data + 8, w->payload + 8,
                        g_opt.payload - 8) != 0))) {
      note_error(w, "reply payload differs from the request payload");
      ok = 0;
    }
    asyncgrpc__bench__echo_reply__free_unpacked(reply, NULL);
  }
  grpc_slice_unref(data);
  if (!ok) w->bad_replies++;
  return ok;
}

static void slot_free(worker_t *w, slot_t *s) {
  int idx = (int)(s - w->slots);
  w->free_ring[(w->free_head + w->free_count) % w->nslots] = idx;
  w->free_count++;
}

static int may_start(worker_t *w, uint64_t now) {
  if (atomic_load_explicit(&g_abort, memory_order_relaxed)) return 0;
  if (now >= g_t_end) return 0;
  if (w->limited && w->started >= w->request_quota) return 0;
  return 1;
}

/* The RPC is over (status received): account for it and free the slot. */
static void finish_rpc(slot_t *s, uint64_t now) {
  worker_t *w = s->w;
  int ok = !s->failed;
  if ((unsigned)s->status < NUM_CODES) {
    w->codes[s->status]++;
  } else {
    w->other_codes++;
  }
  if (g_opt.method == M_HOLD) {
    /* the only right end: CANCELLED, by us, after all the replies */
    if (!s->cancelled_by_us) {
      note_error(w, "hold stream ended by the server with status %d (%s) "
                 "after %u replies, before the client cancelled it",
                 (int)s->status,
                 (unsigned)s->status < NUM_CODES ? code_names[s->status] : "?",
                 s->msgs);
      ok = 0;
    } else if (s->msgs != g_opt.stream_messages) {
      note_error(w, "hold stream still waiting for reply %u of %u when the "
                 "client cancelled it (not open in time)", s->msgs + 1,
                 g_opt.stream_messages);
      ok = 0;
    } else if (s->status != GRPC_STATUS_CANCELLED) {
      note_error(w, "cancelled hold stream ended with status %d, not CANCELLED",
                 (int)s->status);
      ok = 0;
    }
    if (!ok) w->bad_replies++;
  } else if (s->status != GRPC_STATUS_OK) {
    ok = 0;
    char details[200];
    size_t len = GRPC_SLICE_LENGTH(s->details);
    if (len >= sizeof(details)) len = sizeof(details) - 1;
    memcpy(details, GRPC_SLICE_START_PTR(s->details), len);
    details[len] = 0;
    note_error(w, "%s RPC ended with status %d (%s): \"%s\" %s",
               method_names[g_opt.method], (int)s->status,
               (unsigned)s->status < NUM_CODES ? code_names[s->status] : "?",
               details, s->error_string ? s->error_string : "");
  } else if (s->ended_early) {
    note_error(w, "bidi stream ended by the server after %u messages",
               s->msgs);
    w->bad_replies++;
    ok = 0;
  } else if (g_opt.method == M_SERVER_STREAM &&
             s->msgs != g_opt.stream_messages) {
    note_error(w, "server stream returned %u messages, expected %u", s->msgs,
               g_opt.stream_messages);
    w->bad_replies++;
    ok = 0;
  }
  if (!ok) w->failed_rpcs++;
  w->rpcs_total++;
  if (in_window(now)) {
    w->rpcs_window++;
    if (g_opt.method != M_BIDI && g_opt.method != M_HOLD)
      hist_add(&w->hist, now - s->t_start);
  }

  grpc_call_unref(s->call);
  s->call = NULL;
  grpc_slice_unref(s->details);
  s->details = grpc_empty_slice();
  if (s->error_string) gpr_free((void *)s->error_string);
  s->error_string = NULL;
  if (s->send_bb) grpc_byte_buffer_destroy(s->send_bb);
  s->send_bb = NULL;
  if (s->recv_bb) grpc_byte_buffer_destroy(s->recv_bb);
  s->recv_bb = NULL;
  s->state = ST_IDLE;
  w->active--;

  if (g_opt.rate > 0) {
    slot_free(w, s);
  } else if (may_start(w, now)) {
    start_rpc(s, now);
  }
}

static void wait_status(slot_t *s) {
  grpc_op op;
  op_recv_status(&op, s);
  s->state = ST_STATUS;
  start_batch(s, &op, 1);
}

static void count_message(worker_t *w, uint64_t now) {
  w->msgs_total++;
  if (in_window(now)) w->msgs_window++;
}

static void on_event(slot_t *s, int success) {
  worker_t *w = s->w;
  uint64_t now = now_ns();
  if (!success && s->state != ST_STATUS && s->state != ST_UNARY &&
      s->state != ST_HOLD_OPEN) {
    /* e.g. the call was cancelled or the connection broke: the status
     * batch tells why. */
    s->failed = 1;
    w->batch_failures++;
    note_error(w, "a %s batch failed (state %d)", method_names[g_opt.method],
               (int)s->state);
    if (s->recv_bb) {
      grpc_byte_buffer_destroy(s->recv_bb);
      s->recv_bb = NULL;
    }
    if (s->state == ST_BIDI_CLOSE) {
      finish_rpc(s, now); /* its status op was in the failed batch */
    } else {
      wait_status(s);
    }
    return;
  }
  switch (s->state) {
    case ST_UNARY:
      if (!success) {
        s->failed = 1;
        w->batch_failures++;
        note_error(w, "a unary batch failed");
      } else if (s->status == GRPC_STATUS_OK) {
        if (s->recv_bb == NULL) {
          note_error(w, "unary RPC returned OK without a reply message");
          w->bad_replies++;
          s->failed = 1;
        } else if (!check_reply(s, 1)) {
          s->failed = 1;
        }
      }
      finish_rpc(s, now);
      break;

    case ST_SS_RECV: {
      if (s->recv_bb == NULL) { /* end of stream */
        wait_status(s);
        break;
      }
      if (!check_reply(s, 0)) s->failed = 1;
      s->msgs++;
      count_message(w, now);
      grpc_op op;
      op_recv_message(&op, s);
      start_batch(s, &op, 1);
      break;
    }

    case ST_BIDI_PING: {
      if (s->recv_bb == NULL) { /* server ended the stream early */
        s->ended_early = 1;       /* an error: reported with its status */
        wait_status(s);
        break;
      }
      if (!check_reply(s, 1)) s->failed = 1;
      s->msgs++;
      count_message(w, now);
      if (in_window(now)) hist_add(&w->hist, now - s->t_msg);
      grpc_byte_buffer_destroy(s->send_bb);
      s->send_bb = NULL;
      if (s->failed || !may_start(w, now) ||
          (g_opt.stream_messages && s->msgs >= g_opt.stream_messages)) {
        grpc_op ops[3];
        op_close(&ops[0]);
        op_recv_message(&ops[1], s);
        op_recv_status(&ops[2], s);
        s->state = ST_BIDI_CLOSE;
        start_batch(s, ops, 3);
      } else {
        s->send_bb = new_request_buffer(w, s);
        s->t_msg = now_ns();
        grpc_op ops[2];
        op_send_message(&ops[0], s->send_bb);
        op_recv_message(&ops[1], s);
        start_batch(s, ops, 2);
      }
      break;
    }

    case ST_BIDI_CLOSE:
      if (s->recv_bb != NULL) {
        note_error(w, "bidi stream sent more replies than requests");
        w->bad_replies++;
        s->failed = 1;
      }
      finish_rpc(s, now);
      break;

    case ST_HOLD_RECV: {
      if (s->recv_bb == NULL) { /* the server ended the stream early */
        s->ended_early = 1;       /* an error: reported with its status */
        wait_status(s);
        break;
      }
      if (!check_reply(s, 0)) s->failed = 1;
      s->msgs++;
      count_message(w, now);
      grpc_op op;
      if (s->msgs < g_opt.stream_messages) {
        op_recv_message(&op, s);
      } else {
        /* open: latency is the time to open the stream */
        hist_add(&w->hist, now - s->t_start);
        atomic_fetch_add(&g_open, 1);
        op_recv_status(&op, s);
        s->state = ST_HOLD_OPEN;
      }
      start_batch(s, &op, 1);
      break;
    }

    case ST_HOLD_OPEN:
    case ST_STATUS:
      if (!success) {
        s->failed = 1;
        w->batch_failures++;
        note_error(w, "a status batch failed");
      }
      finish_rpc(s, now);
      break;

    case ST_IDLE:
      fprintf(stderr, "loadgen: event on an idle slot\n");
      abort();
  }
}

/* ------------------------------------------------------------------------ */
/* connections */

static int connect_all(worker_t *w) {
  uint64_t deadline = now_ns() + (uint64_t)(g_opt.connect_timeout * NSEC);
  for (int i = 0; i < w->nconns; i++) {
    conn_t *c = &w->conns[i];
    grpc_connectivity_state st =
        grpc_channel_check_connectivity_state(c->channel, 1);
    while (st != GRPC_CHANNEL_READY) {
      uint64_t now = now_ns();
      if (now >= deadline) {
        note_error(w, "connection %d to %s not ready after %.1f s (state %d)",
                   c->id, g_opt.target, g_opt.connect_timeout, (int)st);
        return 0;
      }
      grpc_channel_watch_connectivity_state(
          c->channel, st, grpc_deadline_in(deadline - now), w->cq, c);
      grpc_event ev = grpc_completion_queue_next(
          w->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
      if (ev.type != GRPC_OP_COMPLETE) {
        note_error(w, "unexpected completion queue event %d", (int)ev.type);
        return 0;
      }
      st = grpc_channel_check_connectivity_state(c->channel, 1);
    }
  }
  return 1;
}

/* ------------------------------------------------------------------------ */
/* worker thread */

static uint64_t intended(worker_t *w, uint64_t seq) {
  return w->origin_ns + (uint64_t)((double)seq * w->interval_ns);
}

static void *worker_main(void *arg) {
  worker_t *w = arg;
  w->cq = grpc_completion_queue_create_for_next(NULL);
  if (!connect_all(w)) w->setup_failed = 1;
  pthread_barrier_wait(&g_barrier); /* connections ready */
  pthread_barrier_wait(&g_barrier); /* start times set */

  if (!atomic_load(&g_abort)) {
    uint64_t span = g_t_end - g_t_start;
    w->call_deadline = grpc_deadline_in(
        span + (uint64_t)((g_opt.drain_timeout + 60.0) * NSEC));
    if (g_opt.rate > 0) {
      /* interleave the workers' schedules */
      w->origin_ns = g_t_start + (uint64_t)(w->interval_ns * w->id /
                                            (g_opt.threads ? g_opt.threads : 1));
      for (int i = 0; i < w->nslots; i++) slot_free(w, &w->slots[i]);
    } else {
      uint64_t now = now_ns();
      for (int i = 0; i < w->nslots && may_start(w, now); i++)
        start_rpc(&w->slots[i], now);
    }
  }

  uint64_t seq = 0;
  int cancelled = 0;
  const uint64_t drain_ns = (uint64_t)(g_opt.drain_timeout * NSEC);
  for (;;) {
    uint64_t now = now_ns();
    int can_start = may_start(w, now);
    if (!can_start && w->active == 0) break;
    if (g_opt.method == M_HOLD) {
      if (!cancelled && atomic_load(&g_release)) {
        for (int i = 0; i < w->nslots; i++)
          if (w->slots[i].call) {
            w->slots[i].cancelled_by_us = 1;
            grpc_call_cancel(w->slots[i].call, NULL);
          }
        cancelled = 1;
      }
    } else if (!can_start && !cancelled && now >= g_t_end + drain_ns) {
      note_error(w, "%d RPCs still running %.1f s after the end; cancelled",
                 w->active, g_opt.drain_timeout);
      for (int i = 0; i < w->nslots; i++)
        if (w->slots[i].call) grpc_call_cancel(w->slots[i].call, NULL);
      cancelled = 1;
    }
    uint64_t wake = now + 100 * MSEC;
    if (g_opt.rate > 0 && can_start) {
      /* start everything that is due and has a free slot */
      while (w->free_count > 0 && intended(w, seq) <= now &&
             may_start(w, now)) {
        int idx = w->free_ring[w->free_head];
        w->free_head = (w->free_head + 1) % w->nslots;
        w->free_count--;
        uint64_t due = intended(w, seq);
        start_rpc(&w->slots[idx], due);
        if (in_window(due)) hist_add(&w->lag, now - due);
        seq++;
      }
      if (w->free_count > 0) {
        uint64_t next = intended(w, seq);
        if (next < wake) wake = next;
      }
    }
    if (can_start && g_t_end < wake) wake = g_t_end;
    uint64_t wait = wake > now ? wake - now : 0;
    if (g_opt.rate > 0 && can_start && w->free_count > 0) {
      /* The completion queue's timeouts are only good to a millisecond or
       * two, so wake up early and poll without blocking for the last stretch
       * before the next scheduled start. */
      wait = wait > SPIN_NS ? wait - SPIN_NS : 0;
    }
    grpc_event ev = grpc_completion_queue_next(
        w->cq, wait ? grpc_deadline_in(wait) : gpr_inf_past(GPR_CLOCK_MONOTONIC),
        NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) continue;
    if (ev.type != GRPC_OP_COMPLETE) {
      fprintf(stderr, "loadgen: unexpected completion queue event %d\n",
              (int)ev.type);
      abort();
    }
    on_event((slot_t *)ev.tag, ev.success);
  }
  w->finish_ns = now_ns();
  atomic_fetch_add(&g_workers_done, 1);
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* command line */

static void usage(FILE *f) {
  fprintf(f,
          "usage: loadgen [options]\n"
          "  --target HOST:PORT      server address (default 127.0.0.1:50051)\n"
          "  --method M              unary | server_stream | bidi | hold\n"
          "                          (default unary; hold: open every stream,\n"
          "                          keep them open --duration s, cancel them)\n"
          "  --connections N         separate TCP connections (default 1)\n"
          "  --inflight N            RPCs/streams in flight per connection\n"
          "                          (default 1; with --rate: the cap, default 100)\n"
          "  --duration S            measured seconds (default 10)\n"
          "  --warmup S              unmeasured seconds before (default 2)\n"
          "  --payload BYTES         payload size of each message (default 0)\n"
          "  --stream-messages N     replies per server_stream RPC, messages per\n"
          "                          bidi stream (0 = one stream for the whole run\n"
          "                          with bidi) (default 100)\n"
          "  --rate QPS              open loop: start RPCs at this total rate;\n"
          "                          latency counts from the intended start\n"
          "  --threads N             worker threads (default: CPUs we may use)\n"
          "  --requests N            stop after starting N RPCs\n"
          "  --connect-timeout S     (default 10)\n"
          "  --drain-timeout S       time allowed to finish RPCs after the end\n"
          "                          before they are cancelled (default 10)\n"
          "  --open-timeout S        hold: time allowed to open every stream\n"
          "                          (default 60)\n"
          "  --wait-stdin            hold: once connected, print 'loadgen:\n"
          "                          connected' and wait for a line on stdin\n"
          "  --json                  print one JSON object instead of text\n");
}

static double parse_double(const char *name, const char *s, double min) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || v < min) {
    fprintf(stderr, "loadgen: bad value for --%s: '%s'\n", name, s);
    exit(2);
  }
  return v;
}

static uint64_t parse_u64(const char *name, const char *s, uint64_t min,
                          uint64_t max) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s || *end || s[0] == '-' || v < min || v > max) {
    fprintf(stderr, "loadgen: bad value for --%s: '%s'\n", name, s);
    exit(2);
  }
  return v;
}

static void parse_args(int argc, char **argv) {
  enum {
    O_TARGET = 1000, O_METHOD, O_CONNS, O_INFLIGHT, O_DURATION, O_WARMUP,
    O_PAYLOAD, O_SMSGS, O_RATE, O_JSON, O_THREADS, O_REQUESTS, O_CTIMEOUT,
    O_DTIMEOUT, O_OTIMEOUT, O_WAIT_STDIN, O_HELP,
  };
  static const struct option longopts[] = {
      {"target", required_argument, 0, O_TARGET},
      {"method", required_argument, 0, O_METHOD},
      {"connections", required_argument, 0, O_CONNS},
      {"inflight", required_argument, 0, O_INFLIGHT},
      {"duration", required_argument, 0, O_DURATION},
      {"warmup", required_argument, 0, O_WARMUP},
      {"payload", required_argument, 0, O_PAYLOAD},
      {"stream-messages", required_argument, 0, O_SMSGS},
      {"rate", required_argument, 0, O_RATE},
      {"json", no_argument, 0, O_JSON},
      {"threads", required_argument, 0, O_THREADS},
      {"requests", required_argument, 0, O_REQUESTS},
      {"connect-timeout", required_argument, 0, O_CTIMEOUT},
      {"drain-timeout", required_argument, 0, O_DTIMEOUT},
      {"open-timeout", required_argument, 0, O_OTIMEOUT},
      {"wait-stdin", no_argument, 0, O_WAIT_STDIN},
      {"help", no_argument, 0, O_HELP},
      {0, 0, 0, 0},
  };
  int c;
  while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (c) {
      case O_TARGET: g_opt.target = optarg; break;
      case O_METHOD: {
        int found = 0;
        for (int i = 0; i < NUM_METHODS; i++)
          if (strcmp(optarg, method_names[i]) == 0) {
            g_opt.method = (method_t)i;
            found = 1;
          }
        if (!found) {
          fprintf(stderr, "loadgen: unknown method '%s'\n", optarg);
          exit(2);
        }
        break;
      }
      case O_CONNS: g_opt.connections = (int)parse_u64("connections", optarg, 1, 10000); break;
      case O_INFLIGHT: g_opt.inflight = (int)parse_u64("inflight", optarg, 1, 100000); break;
      case O_DURATION: g_opt.duration = parse_double("duration", optarg, 0.001); break;
      case O_WARMUP: g_opt.warmup = parse_double("warmup", optarg, 0); break;
      case O_PAYLOAD: g_opt.payload = (size_t)parse_u64("payload", optarg, 0, 64u << 20); break;
      case O_SMSGS: g_opt.stream_messages = (uint32_t)parse_u64("stream-messages", optarg, 0, 1u << 30); break;
      case O_RATE: g_opt.rate = parse_double("rate", optarg, 0); break;
      case O_JSON: g_opt.json = 1; break;
      case O_THREADS: g_opt.threads = (int)parse_u64("threads", optarg, 1, 1024); break;
      case O_REQUESTS: g_opt.requests = parse_u64("requests", optarg, 1, UINT64_MAX); break;
      case O_CTIMEOUT: g_opt.connect_timeout = parse_double("connect-timeout", optarg, 0.001); break;
      case O_DTIMEOUT: g_opt.drain_timeout = parse_double("drain-timeout", optarg, 0.001); break;
      case O_OTIMEOUT: g_opt.open_timeout = parse_double("open-timeout", optarg, 0.001); break;
      case O_WAIT_STDIN: g_opt.wait_stdin = 1; break;
      case O_HELP: case 'h': usage(stdout); exit(0);
      default: usage(stderr); exit(2);
    }
  }
  if (optind != argc) {
    fprintf(stderr, "loadgen: unexpected argument '%s'\n", argv[optind]);
    usage(stderr);
    exit(2);
  }
  if (g_opt.rate > 0 && g_opt.method == M_BIDI) {
    fprintf(stderr, "loadgen: --rate is supported for unary, server_stream "
                    "and hold (streams opened per second)\n");
    exit(2);
  }
  if (g_opt.method == M_HOLD && (g_opt.stream_messages == 0 || g_opt.requests)) {
    fprintf(stderr, "loadgen: hold needs --stream-messages >= 1 (the replies "
                    "show that the server holds the stream) and no --requests\n");
    exit(2);
  }
  if (g_opt.inflight == 0) g_opt.inflight = g_opt.rate > 0 ? 100 : 1;
  if (g_opt.threads == 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    g_opt.threads = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    if (g_opt.threads < 1) g_opt.threads = 1;
  }
  if (g_opt.threads > g_opt.connections) g_opt.threads = g_opt.connections;
}

/* ------------------------------------------------------------------------ */
/* main */

static grpc_slice build_request(const uint8_t *payload) {
  size_t len;
  uint8_t *buf;
  if (g_opt.method == M_SERVER_STREAM || g_opt.method == M_HOLD) {
    Asyncgrpc__Bench__StreamRequest req = ASYNCGRPC__BENCH__STREAM_REQUEST__INIT;
    req.count = g_opt.stream_messages;
    req.payload_size = (uint32_t)g_opt.payload;
    len = asyncgrpc__bench__stream_request__get_packed_size(&req);
    buf = malloc(len ? len : 1);
    asyncgrpc__bench__stream_request__pack(&req, buf);
  } else {
    Asyncgrpc__Bench__EchoRequest req = ASYNCGRPC__BENCH__ECHO_REQUEST__INIT;
    req.payload.len = g_opt.payload;
    req.payload.data = (uint8_t *)payload;
    len = asyncgrpc__bench__echo_request__get_packed_size(&req);
    buf = malloc(len ? len : 1);
    asyncgrpc__bench__echo_request__pack(&req, buf);
  }
  grpc_slice s = grpc_slice_from_copied_buffer((const char *)buf, len);
  free(buf);
  return s;
}

static void sleep_until(uint64_t t) {
  /* in short steps, so that we notice when all workers are done early */
  for (;;) {
    uint64_t now = now_ns();
    if (now >= t) return;
    if (atomic_load(&g_workers_done) == g_opt.threads) return;
    uint64_t step = t - now;
    if (step > 50 * MSEC) step = 50 * MSEC;
    struct timespec ts = {(time_t)(step / NSEC), (long)(step % NSEC)};
    nanosleep(&ts, NULL);
  }
}

static void json_latency(const char *name, uint64_t ns, int last) {
  printf("\"%s\": %.1f%s", name, (double)ns / 1000.0, last ? "" : ", ");
}

int main(int argc, char **argv) {
  parse_args(argc, argv);
  grpc_init();

  /* payload: pseudo-random bytes, so an echo of zeros or garbage is caught */
  uint8_t *payload = malloc(g_opt.payload ? g_opt.payload : 1);
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < g_opt.payload; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    payload[i] = (uint8_t)x;
  }

  int nw = g_opt.threads;
  worker_t *workers = calloc((size_t)nw, sizeof(worker_t));
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  for (int i = 0; i < nw; i++) {
    worker_t *w = &workers[i];
    w->id = i;
    w->payload = payload;
    w->request = build_request(payload);
    hist_init(&w->hist);
    hist_init(&w->lag);
    for (int c = i; c < g_opt.connections; c += nw) w->nconns++;
    w->conns = calloc((size_t)w->nconns, sizeof(conn_t));
    w->nslots = w->nconns * g_opt.inflight;
    w->slots = calloc((size_t)w->nslots, sizeof(slot_t));
    w->free_ring = calloc((size_t)w->nslots, sizeof(int));
    if (g_opt.rate > 0) w->interval_ns = (double)NSEC * nw / g_opt.rate;
    if (g_opt.requests) {
      w->limited = 1;
      w->request_quota = g_opt.requests / (uint64_t)nw +
                         ((uint64_t)i < g_opt.requests % (uint64_t)nw ? 1 : 0);
    } else if (g_opt.method == M_HOLD) {
      w->limited = 1; /* one stream per slot */
      w->request_quota = (uint64_t)w->nslots;
    }
    for (int k = 0; k < w->nconns; k++) {
      conn_t *c = &w->conns[k];
      c->id = i + k * nw;
      /* Distinct args per channel: a channel never shares its subchannel
       * (and thus its TCP connection) with another one. */
      grpc_arg args[6];
      memset(args, 0, sizeof(args));
      args[0].type = GRPC_ARG_INTEGER;
      args[0].key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL;
      args[0].value.integer = 1;
      args[1].type = GRPC_ARG_INTEGER;
      args[1].key = "asyncgrpc.loadgen.channel_id";
      args[1].value.integer = c->id;
      args[2].type = GRPC_ARG_INTEGER;
      args[2].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
      args[2].value.integer = -1;
      /* A lean client: no retry buffering, no optional filters. */
      args[3].type = GRPC_ARG_INTEGER;
      args[3].key = GRPC_ARG_ENABLE_RETRIES;
      args[3].value.integer = 0;
      args[4].type = GRPC_ARG_INTEGER;
      args[4].key = GRPC_ARG_MINIMAL_STACK;
      args[4].value.integer = 1;
      args[5].type = GRPC_ARG_INTEGER;
      args[5].key = GRPC_ARG_ENABLE_CHANNELZ;
      args[5].value.integer = 0;
      grpc_channel_args cargs = {6, args};
      c->channel = grpc_channel_create(g_opt.target, creds, &cargs);
      c->method_handle = grpc_channel_register_call(
          c->channel, method_paths[g_opt.method], NULL, NULL);
    }
    for (int k = 0; k < w->nslots; k++) {
      slot_t *s = &w->slots[k];
      s->w = w;
      s->conn = &w->conns[k % w->nconns];
      grpc_metadata_array_init(&s->init_md);
      grpc_metadata_array_init(&s->trail_md);
      s->details = grpc_empty_slice();
    }
  }
  grpc_channel_credentials_release(creds);

  pthread_barrier_init(&g_barrier, NULL, (unsigned)nw + 1);
  for (int i = 0; i < nw; i++)
    pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]);

  pthread_barrier_wait(&g_barrier); /* all connections ready (or failed) */
  int setup_ok = 1;
  for (int i = 0; i < nw; i++)
    if (workers[i].setup_failed) {
      fprintf(stderr, "loadgen: FAILED: %s\n", workers[i].first_error);
      setup_ok = 0;
    }
  if (!setup_ok) atomic_store(&g_abort, 1);
  const int hold = g_opt.method == M_HOLD;
  const int total_streams = g_opt.connections * g_opt.inflight;
  if (hold && setup_ok) {
    fprintf(stderr, "loadgen: connected\n");
    fflush(stderr);
    if (g_opt.wait_stdin) {
      char line[64];
      if (fgets(line, sizeof(line), stdin) == NULL) { /* EOF: go on */ }
    }
  }
  g_t_start = now_ns();
  if (hold) {
    /* every stream starts now; the "window" spans the whole run */
    g_t_measure = g_t_start;
    g_t_end = g_t_start + (uint64_t)((g_opt.open_timeout + g_opt.duration +
                                      g_opt.drain_timeout) * NSEC);
  } else {
    g_t_measure = g_t_start + (uint64_t)(g_opt.warmup * NSEC);
    g_t_end = g_t_measure + (uint64_t)(g_opt.duration * NSEC);
  }
  pthread_barrier_wait(&g_barrier);

  uint64_t cpu0 = 0, cpu1 = 0, t_win_end = g_t_end;
  double open_s = -1; /* hold: seconds to open every stream */
  if (hold && setup_ok) {
    cpu0 = cpu_ns();
    uint64_t open_deadline = g_t_start + (uint64_t)(g_opt.open_timeout * NSEC);
    while (atomic_load(&g_open) < total_streams && now_ns() < open_deadline &&
           atomic_load(&g_workers_done) < g_opt.threads) {
      struct timespec ts = {0, 5 * (long)MSEC};
      nanosleep(&ts, NULL);
    }
    int n_open = atomic_load(&g_open);
    if (n_open == total_streams) {
      open_s = (double)(now_ns() - g_t_start) / NSEC;
      fprintf(stderr, "loadgen: streams open %d\n", n_open);
      fflush(stderr);
      sleep_until(now_ns() + (uint64_t)(g_opt.duration * NSEC));
    } else {
      fprintf(stderr, "loadgen: only %d of %d streams open after %.1f s\n",
              n_open, total_streams, (double)(now_ns() - g_t_start) / NSEC);
    }
    fprintf(stderr, "loadgen: releasing\n");
    fflush(stderr);
    atomic_store(&g_release, 1);
    cpu1 = cpu_ns();
    t_win_end = now_ns();
  } else if (setup_ok) {
    sleep_until(g_t_measure);
    cpu0 = cpu_ns();
    fprintf(stderr, "loadgen: window start\n");
    fflush(stderr);
    sleep_until(g_t_end);
    cpu1 = cpu_ns();
    t_win_end = now_ns();
    if (t_win_end > g_t_end) t_win_end = g_t_end;
    fprintf(stderr, "loadgen: window end\n");
    fflush(stderr);
  }
  for (int i = 0; i < nw; i++) pthread_join(workers[i].thread, NULL);
  if (!setup_ok) return 1;

  /* merge */
  hist_t *hist = malloc(sizeof(hist_t));
  hist_t *lag = malloc(sizeof(hist_t));
  hist_init(hist);
  hist_init(lag);
  uint64_t rpcs_w = 0, msgs_w = 0, rpcs_t = 0, msgs_t = 0, codes[NUM_CODES] = {0};
  uint64_t other = 0, batch_fail = 0, bad = 0, failed = 0;
  const char *first_error = NULL;
  for (int i = 0; i < nw; i++) {
    worker_t *w = &workers[i];
    hist_merge(hist, &w->hist);
    hist_merge(lag, &w->lag);
    rpcs_w += w->rpcs_window;
    msgs_w += w->msgs_window;
    rpcs_t += w->rpcs_total;
    msgs_t += w->msgs_total;
    for (int k = 0; k < NUM_CODES; k++) codes[k] += w->codes[k];
    other += w->other_codes;
    batch_fail += w->batch_failures;
    bad += w->bad_replies;
    failed += w->failed_rpcs;
    if (!first_error && w->first_error[0]) first_error = w->first_error;
  }
  double window_s = (double)(t_win_end - g_t_measure) / NSEC;
  if (window_s <= 0) window_s = 1e-9;
  double qps = rpcs_w / window_s;
  double mps = msgs_w / window_s;
  double client_cpu = (double)(cpu1 - cpu0) / NSEC / window_s;
  uint64_t errors = failed + other;
  int ok = errors == 0 && first_error == NULL && rpcs_t > 0 &&
           (g_opt.requests ? 1 : rpcs_w + msgs_w > 0);
  if (hold && open_s < 0) {
    ok = 0;
    if (!first_error) first_error = "not every stream opened in time";
  }
  uint64_t p50 = hist_quantile(hist, 0.50), p90 = hist_quantile(hist, 0.90),
           p99 = hist_quantile(hist, 0.99), p999 = hist_quantile(hist, 0.999);
  double mean = hist->n ? hist->sum / (double)hist->n : 0;

  if (g_opt.json) {
    printf("{\"target\": \"%s\", \"method\": \"%s\", \"connections\": %d, "
           "\"inflight\": %d, \"threads\": %d, \"payload\": %zu, "
           "\"stream_messages\": %u, \"rate\": %.3f, \"warmup_s\": %.3f, "
           "\"duration_s\": %.6f, ",
           g_opt.target, method_names[g_opt.method], g_opt.connections,
           g_opt.inflight, nw, g_opt.payload, g_opt.stream_messages,
           g_opt.rate, g_opt.warmup, window_s);
    printf("\"rpcs\": %llu, \"messages\": %llu, \"rpcs_per_s\": %.3f, "
           "\"msgs_per_s\": %.3f, \"rpcs_total\": %llu, \"messages_total\": %llu, ",
           (unsigned long long)rpcs_w, (unsigned long long)msgs_w, qps, mps,
           (unsigned long long)rpcs_t, (unsigned long long)msgs_t);
    if (hold)
      printf("\"streams\": %d, \"streams_open\": %d, \"open_s\": %.3f, ",
             total_streams, atomic_load(&g_open), open_s);
    printf("\"latency_of\": \"%s\", \"latency_samples\": %llu, \"latency_us\": {",
           g_opt.method == M_BIDI ? "message" : hold ? "open" : "rpc",
           (unsigned long long)hist->n);
    json_latency("p50", p50, 0);
    json_latency("p90", p90, 0);
    json_latency("p99", p99, 0);
    json_latency("p99.9", p999, 0);
    json_latency("max", hist->max, 0);
    printf("\"mean\": %.1f}, ", mean / 1000.0);
    if (g_opt.rate > 0)
      printf("\"start_lag_us\": {\"p50\": %.1f, \"p99\": %.1f, \"max\": %.1f}, ",
             hist_quantile(lag, 0.5) / 1e3, hist_quantile(lag, 0.99) / 1e3,
             lag->max / 1e3);
    printf("\"status_counts\": {");
    int first = 1;
    for (int k = 0; k < NUM_CODES; k++)
      if (codes[k]) {
        printf("%s\"%s\": %llu", first ? "" : ", ", code_names[k],
               (unsigned long long)codes[k]);
        first = 0;
      }
    if (other)
      printf("%s\"OTHER\": %llu", first ? "" : ", ", (unsigned long long)other);
    printf("}, \"failed_rpcs\": %llu, \"bad_replies\": %llu, "
           "\"batch_failures\": %llu, \"client_cpu\": %.4f, \"ok\": %s",
           (unsigned long long)failed, (unsigned long long)bad,
           (unsigned long long)batch_fail, client_cpu, ok ? "true" : "false");
    if (first_error) {
      printf(", \"first_error\": \"");
      for (const char *p = first_error; *p; p++) {
        if (*p == '"' || *p == '\\') putchar('\\');
        putchar((unsigned char)*p >= 0x20 ? *p : ' ');
      }
      printf("\"");
    }
    printf("}\n");
  } else {
    printf("target %s  method %s  connections %d  inflight %d  threads %d  "
           "payload %zu B",
           g_opt.target, method_names[g_opt.method], g_opt.connections,
           g_opt.inflight, nw, g_opt.payload);
    if (g_opt.method != M_UNARY) printf("  stream-messages %u", g_opt.stream_messages);
    if (g_opt.rate > 0) printf("  rate %.1f/s (open loop)", g_opt.rate);
    if (hold)
      printf("\n%.2f s from the first stream to the release\n", window_s);
    else
      printf("\nwindow %.2f s after %.2f s warmup\n", window_s, g_opt.warmup);
    printf("rpcs %llu  (%.1f/s)", (unsigned long long)rpcs_w, qps);
    if (g_opt.method != M_UNARY)
      printf("  messages %llu  (%.1f/s)", (unsigned long long)msgs_w, mps);
    if (hold)
      printf("\nstreams open %d of %d, all open after %.3f s",
             atomic_load(&g_open), total_streams, open_s);
    printf("\nlatency per %s (us): p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  "
           "max %.1f  mean %.1f\n",
           g_opt.method == M_BIDI ? "message" : hold ? "stream open" : "rpc", p50 / 1e3, p90 / 1e3,
           p99 / 1e3, p999 / 1e3, hist->max / 1e3, mean / 1e3);
    if (g_opt.rate > 0)
      printf("start lag behind schedule (us): p50 %.1f  p99 %.1f  max %.1f\n",
             hist_quantile(lag, 0.5) / 1e3, hist_quantile(lag, 0.99) / 1e3,
             lag->max / 1e3);
    printf("status (all %llu rpcs):", (unsigned long long)rpcs_t);
    for (int k = 0; k < NUM_CODES; k++)
      if (codes[k])
        printf(" %s=%llu", code_names[k], (unsigned long long)codes[k]);
    if (other) printf(" OTHER=%llu", (unsigned long long)other);
    printf("\nbad replies %llu  failed batches %llu  client cpu %.0f%% of a core\n",
           (unsigned long long)bad, (unsigned long long)batch_fail,
           client_cpu * 100);
  }
  fflush(stdout);

  if (!ok) {
    fprintf(stderr,
            "loadgen: FAILED: %llu of %llu RPCs failed (%llu bad replies, "
            "%llu failed batches)%s%s\n",
            (unsigned long long)errors, (unsigned long long)rpcs_t,
            (unsigned long long)bad, (unsigned long long)batch_fail,
            first_error ? "; first error: " : "",
            first_error ? first_error : "; no RPC completed");
  }

  for (int i = 0; i < nw; i++) {
    worker_t *w = &workers[i];
    for (int k = 0; k < w->nconns; k++) grpc_channel_destroy(w->conns[k].channel);
    grpc_completion_queue_shutdown(w->cq);
    while (grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC),
                                      NULL).type != GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(w->cq);
    for (int k = 0; k < w->nslots; k++) {
      grpc_metadata_array_destroy(&w->slots[k].init_md);
      grpc_metadata_array_destroy(&w->slots[k].trail_md);
    }
    grpc_slice_unref(w->request);
    free(w->slots);
    free(w->conns);
    free(w->free_ring);
  }
  free(workers);
  free(hist);
  free(lag);
  free(payload);
  grpc_shutdown();
  return ok ? 0 : 1;
}
