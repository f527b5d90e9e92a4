/*
 * types.h: the structs shared by the C files of asyncgrpc._core.
 *
 * Ownership in one place:
 *   - ModuleState owns the heap types, the cached Python objects the hot path
 *     needs (interned names, kwnames) and the process-wide counters.
 *   - ServerObject owns the grpc_server, the completion-queue bridge, the
 *     registered methods and the request slots posted to the core.
 *   - CallObject (base of asyncgrpc.ServicerContext) owns one grpc_call and
 *     everything of that RPC; it holds a strong reference to its server, so
 *     the completion queue outlives every call bound to it.
 * A Tag is the first member of everything passed to the core as a tag;
 * the loop thread runs tag->complete(tag, ok) with the GIL held.
 */
#ifndef ASYNCGRPC_TYPES_H
#define ASYNCGRPC_TYPES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>   /* PyMemberDef, T_PYSSIZET, READONLY (3.11) */
#include <pthread.h>
#include <stdint.h>

#include <grpc/grpc.h>
#include <grpc/byte_buffer.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
/* Cores newer than 1.51 declare the credentials API (insecure and SSL
 * server credentials, grpc_ssl_pem_key_cert_pair) in grpc/credentials.h,
 * which grpc/grpc_security.h no longer includes. */
#if defined(__has_include)
#if __has_include(<grpc/credentials.h>)
#include <grpc/credentials.h>
#endif
#endif

/* ---- counters (plain C: the poller thread updates some of them) ---- */
/* Only eventfd_writes is written by poller threads (without the GIL, one
 * per server): it is updated and read with __atomic builtins. The others are
 * written by loop threads holding the GIL. */
typedef struct {
    uint64_t events;            /* completion events handled */
    uint64_t events_inline;     /* ... taken by the loop's own non-blocking polls */
    uint64_t events_via_ring;   /* ... taken by the poller and handed over */
    uint64_t eventfd_writes;    /* poller -> loop wake-ups written */
    uint64_t wakeups;           /* times the loop's reader callback ran */
    uint64_t drains;            /* drain passes on the loop */
    uint64_t baton_to_poller;   /* hand-backs of the queue to the poller */
    uint64_t rpcs_started;
    uint64_t rpcs_finished;
    uint64_t rpcs_rejected;     /* refused by maximum_concurrent_rpcs */
} Counters;

typedef struct {
    PyTypeObject *server_type;
    PyTypeObject *call_type;
    PyTypeObject *ready_type;
    PyObject *ready_none;        /* Ready(None): write() below the mark */
    PyObject *cancelled_error;   /* asyncio.CancelledError */
    PyObject *usage_error;       /* asyncgrpc.UsageError (set by configure()) */
    PyObject *eof;               /* asyncgrpc.EOF (set by configure()) */
    /* interned method names used on the hot path */
    PyObject *str_add_done_callback;
    PyObject *str_add_reader;
    PyObject *str_call_soon;
    PyObject *str_cancel;
    PyObject *str_create_future;
    PyObject *str_create_task;
    PyObject *str_dispatch_generic;
    PyObject *str_done;
    PyObject *str_drain;
    PyObject *str_on_task_done;
    PyObject *str_on_wakeup;
    PyObject *str_remove_reader;
    PyObject *str_report;
    PyObject *str_result;
    PyObject *str_run_done_callbacks;
    PyObject *str_set_exception;
    PyObject *str_set_result;
    PyObject *kwnames_name;      /* ("name",) for create_task(coro, name=...) */
    PyObject *empty_tuple;
    Counters counters;           /* summed over every server of the process */
    int live_servers;
    int grpc_initialized;
    int inject_post_failures;    /* test hook: refuse this many posts */
    unsigned fork_generation;    /* at exec: grpc_init() ran in this process */
} ModuleState;

/* ---- tags ---- */
typedef struct Tag Tag;
typedef void (*TagComplete)(Tag *tag, int ok);
struct Tag {
    TagComplete complete;
};

/* ---- the completion-queue bridge (bridge.c); no Python objects inside ---- */
enum { BATON_POLLER = 0, BATON_LOOP = 1 };

typedef struct {
    grpc_completion_queue *cq;
    int eventfd;
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* guarded by mu */
    int baton;
    int stop;
    int slot_full;
    grpc_event slot;             /* the one event the poller hands over */
    int queue_shutdown_seen;
    /* loop thread only */
    int pending_empty;           /* drain passes in a row ending on an empty poll */
    unsigned empty_polls;        /* empty non-blocking polls (see bridge_poll) */
    Counters *counters;          /* module-wide, poller writes under mu */
} Bridge;

/* ---- metrics (metrics.c) ---- */
/* Per-server RPC metrics, NULL while off (the default); defined in
 * metrics.h. Touched only with the GIL held: by the loop thread's hooks,
 * and read by metrics_snapshot() from any thread (never the poller). */
struct ServerMetrics;

/* What a call needs for its metrics: when it was accepted (CLOCK_MONOTONIC,
 * in ns; 0 once recorded, or when metrics are off) and its row. */
typedef struct {
    uint64_t start_ns;
    Py_ssize_t row;
} CallMetrics;

/* ---- server ---- */
struct ServerObject;

typedef struct {
    Tag tag;
    struct ServerObject *server;
    struct MethodEntry *method;  /* NULL for a generic (unregistered) request */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array metadata;
    grpc_byte_buffer *payload;
    grpc_call_details details;   /* generic requests only */
    int unposted;                /* the core refused its re-post: retry */
} RequestSlot;

typedef struct MethodEntry {
    char *path;                  /* "/pkg.Service/Method", owned */
    PyObject *path_str;          /* the same, as str (task name) */
    PyObject *behavior;          /* async def (request, context) */
    PyObject *deserializer;      /* callable or None */
    PyObject *serializer;        /* callable or None */
    int request_streaming;
    int response_streaming;
    void *registered;            /* grpc_server_register_method handle */
} MethodEntry;

enum { SERVER_NEW = 0, SERVER_STARTED, SERVER_SHUTTING_DOWN, SERVER_CLOSED };

typedef struct ServerObject {
    PyObject_HEAD
    ModuleState *state;
    PyObject *module;            /* strong ref: keeps state alive */
    grpc_server *server;
    Bridge bridge;
    int phase;
    MethodEntry *methods;
    Py_ssize_t n_methods;
    RequestSlot *slots;          /* all outstanding request slots */
    Py_ssize_t n_slots;
    Py_ssize_t slots_outstanding;
    Py_ssize_t n_unposted;       /* slots waiting for a retried post */
    Py_ssize_t max_concurrent;   /* 0: unlimited */
    Py_ssize_t active_calls;
    Tag shutdown_tag;
    int shutdown_started;        /* grpc_server_shutdown_and_notify called */
    int shutdown_done;           /* ... and its tag fired */
    PyObject *shutdown_future;   /* resolved when the shutdown tag fires */
    PyObject *deferred_fatal;    /* KeyboardInterrupt/SystemExit to raise */
    struct CallObject *deferred_writers; /* calls whose next write waits for
                                          * the drain's next empty poll;
                                          * each holds a reference */
    unsigned fork_generation;    /* server_fork_generation() at creation */
    /* set by start() */
    PyObject *loop;
    PyObject *create_task;       /* bound loop.create_task, or a task factory */
    int eager_tasks;             /* ... that may return a task already done */
    PyObject *call_soon;         /* bound loop.call_soon */
    PyObject *drain_cb;          /* bound self._drain */
    PyObject *context_class;     /* subclass of Call to instantiate */
    PyObject *hooks;             /* Python server: dispatch_generic, handler_error */
    struct ServerMetrics *metrics;   /* NULL: metrics off (metrics.c) */
    PyObject *weakreflist;
} ServerObject;

/* ---- call ---- */
typedef struct {
    grpc_metadata *items;
    size_t count;
} SendMetadata;

/* A response message waiting in the call's write queue (call.c). */
typedef struct QueuedWrite {
    struct QueuedWrite *next;
    grpc_byte_buffer *message;
    size_t cost;                 /* bytes counted against the high-water mark */
    uint32_t flags;              /* GRPC_WRITE_NO_COMPRESS or 0 */
} QueuedWrite;

/* A batch started on the call whose completion resolves a future. */
typedef struct {
    Tag tag;
    PyObject *future;            /* asyncio.Future or NULL */
    grpc_byte_buffer *recv;      /* RECV_MESSAGE target */
    grpc_byte_buffer *send;      /* SEND_MESSAGE payload */
    SendMetadata md;             /* metadata kept alive for the batch */
    int active;
} FutureOp;

typedef struct CallObject {
    PyObject_HEAD
    ServerObject *server;        /* strong ref */
    grpc_call *call;             /* NULL once released to the core */
    MethodEntry *method;         /* registered method, or NULL */
    PyObject *method_str;        /* full method path (str) */
    gpr_timespec deadline;       /* GPR_CLOCK_MONOTONIC */
    grpc_metadata_array request_md;  /* entries owned by the call */
    PyObject *invocation_md;     /* tuple, converted lazily */
    PyObject *peer_kept;         /* peer() kept when the call was released */
    PyObject *auth_kept;         /* _auth() tuple kept likewise */
    PyObject *task;
    PyObject *behavior, *deserializer, *serializer;
    /* status and metadata set by the handler */
    int code;
    PyObject *code_obj;          /* the code object the handler gave, or NULL */
    PyObject *details;           /* str or NULL */
    PyObject *trailing_md_obj;   /* tuple as given (validated) */
    SendMetadata trailing_md;
    PyObject *done_callbacks;    /* list or NULL */
    /* batches */
    Tag recv_close_tag;
    int recv_close_cancelled;
    Tag finish_tag;
    FutureOp initial_md_op;
    FutureOp read_op;
    FutureOp write_op;
    SendMetadata compression_md; /* grpc-internal-encoding-request, or empty */
    grpc_byte_buffer *finish_payload;
    grpc_byte_buffer *read_held; /* received, not yet taken by a read() */
    /* the write queue: messages behind the one in flight (write_op) */
    QueuedWrite *wq_head, *wq_tail;
    size_t wq_bytes;             /* cost of the in-flight and queued messages */
    size_t write_cost;           /* cost of the message in flight */
    /* the final batch, deferred until the queue has drained */
    PyObject *final_details;
    grpc_byte_buffer *final_message;
    int final_code;
    struct CallObject *next_deferred_writer;  /* ServerObject.deferred_writers */
    int pending_batches;
    /* flags */
    unsigned initial_md_sent : 1;
    unsigned status_sent : 1;    /* the final batch was started */
    unsigned terminated : 1;     /* recv_close fired: the RPC is over */
    unsigned cancelled : 1;      /* ... and it was cancelled / deadline */
    unsigned aborted : 1;
    unsigned task_done : 1;
    unsigned counted_active : 1;
    unsigned request_streaming : 1;
    unsigned response_streaming : 1;
    unsigned no_compress_next : 1;   /* disable_next_message_compression() */
    unsigned read_held_set : 1;  /* read_held (maybe NULL: end of stream) waits */
    unsigned read_held_ok : 1;   /* ... and the ok of its completion */
    unsigned read_ahead : 1;     /* the RECV in flight has no read() waiting */
    unsigned read_eof : 1;       /* read() has returned EOF */
    unsigned read_anext : 1;     /* read_op.future is an _anext() one */
    unsigned final_pending : 1;  /* final batch waits for the write queue */
    unsigned write_deferred : 1; /* in the server's deferred_writers list */
    CallMetrics metrics;         /* metrics.c; zero while metrics are off */
    PyObject *weakreflist;
} CallObject;

#endif
