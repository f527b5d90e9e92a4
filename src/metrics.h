/*
 * metrics.h: per-server RPC metrics (off by default).
 *
 * When on (Server.enable_metrics() before start), every RPC the server
 * accepts is counted in one row: one per registered method, one per other
 * path the Python server named as known (methods served through the generic
 * path, e.g. streaming methods behind interceptors), and a last "other" row
 * for everything else (unknown paths a client made up). Each row holds, per
 * status code (0..16), a latency histogram with the OpenTelemetry RPC
 * buckets (seconds) and the sum of the latencies. Latency runs from the
 * moment the call is accepted (server.c on_request) to the moment its final
 * status is handed to the core (call.c send_final), or to the moment the
 * RPC ended without one (cancelled by the client, deadline exceeded, server
 * stop: call.c on_recv_close).
 *
 * Plain C, touched only with the GIL held (the hooks run in event handlers
 * on the loop thread; the Python API may be called from any thread, e.g. a
 * Prometheus scrape; the poller thread never touches it), so no atomics.
 * When metrics are off a hook costs one pointer test (start) or one
 * integer test (end).
 */
#ifndef ASYNCGRPC_METRICS_H
#define ASYNCGRPC_METRICS_H

#include "types.h"

#define METRICS_CODES 17          /* gRPC status codes 0..16 */
#define METRICS_BOUNDS 14         /* finite upper bounds of the histogram */
#define METRICS_BUCKETS (METRICS_BOUNDS + 1)   /* ... plus +Inf */

typedef struct {
    uint64_t started;            /* RPCs of this row counted so far */
    uint64_t buckets[METRICS_CODES][METRICS_BUCKETS];
    uint64_t sum_ns[METRICS_CODES];
} MetricsRow;

typedef struct ServerMetrics {
    uint64_t started;            /* RPCs counted */
    uint64_t ended;              /* ... and recorded with a status */
    Py_ssize_t n_registered;     /* rows [0, n_registered): server->methods[i] */
    Py_ssize_t n_rows;           /* all rows, the last one is "other" */
    /* Only str and int inside, so they can be in no reference cycle and are
     * not visited by the server's tp_traverse. */
    PyObject *names;             /* tuple: the path of each row, None for other */
    PyObject *generic_rows;      /* dict: path (str) -> row (int) */
    MetricsRow rows[];
} ServerMetrics;

/* Slow paths of the hooks below (metrics on). */
void metrics_started(CallObject *call);
void metrics_ended(CallObject *call, int code);
void metrics_closed(CallObject *call);

/* Hook: the server accepted `call` (server.c on_request). */
static inline void
metrics_rpc_start(CallObject *call)
{
    if (call->server->metrics != NULL) {
        metrics_started(call);
    }
}

/* Hook: the final status `code` was handed to the core (call.c send_final),
 * or the call object goes away without one (call_dealloc). Only the first
 * end of a call is recorded. */
static inline void
metrics_rpc_end(CallObject *call, int code)
{
    if (call->metrics.start_ns != 0) {
        metrics_ended(call, code);
    }
}

/* Hook: the RPC is over (call.c on_recv_close, after `cancelled` is set).
 * Records CANCELLED or DEADLINE_EXCEEDED if no status was recorded. */
static inline void
metrics_rpc_closed(CallObject *call)
{
    if (call->metrics.start_ns != 0) {
        metrics_closed(call);
    }
}

/* Server.enable_metrics(known_paths=()) and Server.metrics_snapshot(),
 * listed in server.c's method table. */
PyObject *metrics_py_enable(ServerObject *self, PyObject *const *args,
                            Py_ssize_t nargs);
PyObject *metrics_py_snapshot(ServerObject *self, PyObject *ignored);

/* Release the server's metrics (server_dealloc). */
void metrics_free(ServerObject *self);

#endif
