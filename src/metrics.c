/*
 * metrics.c: per-server RPC metrics: counts by status code, latency
 * histograms and the RPCs in flight (see metrics.h for what is counted and
 * when). The hooks in server.c and call.c call the functions here only
 * when metrics are on.
 */
#include "metrics.h"

#include <string.h>
#include <time.h>

#include "server.h"

/* Upper bounds of the latency buckets, in nanoseconds: the explicit bucket
 * boundaries OpenTelemetry's RPC semantic conventions give for
 * rpc.server.call.duration (0.005 s .. 10 s). Read-only. */
static const uint64_t bounds_ns[METRICS_BOUNDS] = {
    5000000ULL, 10000000ULL, 25000000ULL, 50000000ULL, 75000000ULL,
    100000000ULL, 250000000ULL, 500000000ULL, 750000000ULL, 1000000000ULL,
    2500000000ULL, 5000000000ULL, 7500000000ULL, 10000000000ULL,
};

/* CLOCK_MONOTONIC in ns, or 0 if the clock cannot be read. */
static inline uint64_t
now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        return 0;
    }
    uint64_t t = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    return t != 0 ? t : 1;   /* 0 means "not counted" in CallMetrics */
}

/* ------------------------------------------------------------------ */
/* hooks                                                               */

void
metrics_started(CallObject *call)
{
    ServerObject *server = call->server;
    ServerMetrics *m = server->metrics;
    Py_ssize_t row = m->n_rows - 1;   /* other */
    if (call->method != NULL) {
        Py_ssize_t i = call->method - server->methods;
        if (i >= 0 && i < m->n_registered) {
            row = i;
        }
    }
    else if (call->method_str != NULL && PyDict_GET_SIZE(m->generic_rows) > 0) {
        PyObject *r = PyDict_GetItemWithError(m->generic_rows, call->method_str);
        if (r != NULL) {
            Py_ssize_t i = PyLong_AsSsize_t(r);
            if (i >= 0 && i < m->n_rows) {
                row = i;
            }
        }
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable((PyObject *)server);
        }
    }
    uint64_t t = now_ns();
    if (t == 0) {
        return;   /* no clock: this call is not counted */
    }
    call->metrics.start_ns = t;
    call->metrics.row = row;
    m->rows[row].started++;
    m->started++;
}

void
metrics_ended(CallObject *call, int code)
{
    ServerMetrics *m = call->server->metrics;
    uint64_t start = call->metrics.start_ns;
    call->metrics.start_ns = 0;
    if (m == NULL || call->metrics.row < 0 || call->metrics.row >= m->n_rows) {
        return;
    }
    uint64_t end = now_ns();
    uint64_t d = end > start ? end - start : 0;
    int b = 0;
    while (b < METRICS_BOUNDS && d > bounds_ns[b]) {
        b++;
    }
    if (code < 0 || code >= METRICS_CODES) {
        code = GRPC_STATUS_UNKNOWN;
    }
    MetricsRow *r = &m->rows[call->metrics.row];
    r->buckets[code][b]++;
    r->sum_ns[code] += d;
    m->ended++;
}

void
metrics_closed(CallObject *call)
{
    int code = GRPC_STATUS_UNKNOWN;   /* ended without a status we sent */
    if (call->cancelled) {
        gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
        code = gpr_time_cmp(now, call->deadline) >= 0
            ? GRPC_STATUS_DEADLINE_EXCEEDED : GRPC_STATUS_CANCELLED;
    }
    metrics_ended(call, code);
}

/* ------------------------------------------------------------------ */
/* Python API                                                          */

/* The row names and the generic path -> row map from the registered
 * methods and the other paths in `known` (an iterable of str). */
static int
build_rows(ServerObject *self, PyObject *known, PyObject **names_out,
           PyObject **generic_out)
{
    PyObject *names = PyList_New(0);
    PyObject *generic = PyDict_New();
    PyObject *seen = PySet_New(NULL);
    PyObject *it = NULL, *item = NULL;
    if (names == NULL || generic == NULL || seen == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < self->n_methods; i++) {
        PyObject *path = self->methods[i].path_str;
        if (PyList_Append(names, path) < 0 || PySet_Add(seen, path) < 0) {
            goto error;
        }
    }
    if (known != NULL && (it = PyObject_GetIter(known)) == NULL) {
        goto error;
    }
    while (it != NULL && (item = PyIter_Next(it)) != NULL) {
        if (!PyUnicode_CheckExact(item)) {
            PyErr_Format(PyExc_TypeError,
                         "known paths must be str, not %.100s",
                         Py_TYPE(item)->tp_name);
            goto error;
        }
        int dup = PySet_Contains(seen, item);
        if (dup < 0) {
            goto error;
        }
        if (!dup) {
            PyObject *row = PyLong_FromSsize_t(PyList_GET_SIZE(names));
            int rc = row == NULL ? -1 : PyDict_SetItem(generic, item, row);
            Py_XDECREF(row);
            if (rc < 0 || PyList_Append(names, item) < 0 ||
                PySet_Add(seen, item) < 0) {
                goto error;
            }
        }
        Py_CLEAR(item);
    }
    if (PyErr_Occurred() || PyList_Append(names, Py_None) < 0) {
        goto error;
    }
    Py_XDECREF(it);
    Py_DECREF(seen);
    *names_out = PyList_AsTuple(names);
    Py_DECREF(names);
    if (*names_out == NULL) {
        Py_DECREF(generic);
        return -1;
    }
    *generic_out = generic;
    return 0;
error:
    Py_XDECREF(item);
    Py_XDECREF(it);
    Py_XDECREF(names);
    Py_XDECREF(generic);
    Py_XDECREF(seen);
    return -1;
}

/* enable_metrics(known_paths=()): turn metrics on; after every
 * register_method() and before start(). `known_paths` names the other
 * paths the server serves through the generic path, each given a row. */
PyObject *
metrics_py_enable(ServerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "enable_metrics(known_paths=())");
        return NULL;
    }
    if (self->phase != SERVER_NEW) {
        PyErr_SetString(PyExc_RuntimeError,
                        "metrics must be enabled before the server starts");
        return NULL;
    }
    if (self->metrics != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "metrics are already enabled");
        return NULL;
    }
    PyObject *names, *generic;
    if (build_rows(self, nargs == 1 ? args[0] : NULL, &names, &generic) < 0) {
        return NULL;
    }
    Py_ssize_t n_rows = PyTuple_GET_SIZE(names);
    ServerMetrics *m = PyMem_Calloc(
        1, sizeof(ServerMetrics) + (size_t)n_rows * sizeof(MetricsRow));
    if (m == NULL) {
        Py_DECREF(names);
        Py_DECREF(generic);
        return PyErr_NoMemory();
    }
    m->n_registered = self->n_methods;
    m->n_rows = n_rows;
    m->names = names;
    m->generic_rows = generic;
    self->metrics = m;
    Py_RETURN_NONE;
}

/* {code: (bucket counts tuple, sum in seconds)} for the codes seen. */
static PyObject *
row_to_dict(const MetricsRow *r)
{
    PyObject *d = PyDict_New();
    if (d == NULL) {
        return NULL;
    }
    for (int code = 0; code < METRICS_CODES; code++) {
        uint64_t total = 0;
        for (int b = 0; b < METRICS_BUCKETS; b++) {
            total += r->buckets[code][b];
        }
        if (total == 0) {
            continue;
        }
        PyObject *counts = PyTuple_New(METRICS_BUCKETS);
        if (counts == NULL) {
            goto error;
        }
        for (int b = 0; b < METRICS_BUCKETS; b++) {
            PyObject *n = PyLong_FromUnsignedLongLong(
                (unsigned long long)r->buckets[code][b]);
            if (n == NULL) {
                Py_DECREF(counts);
                goto error;
            }
            PyTuple_SET_ITEM(counts, b, n);
        }
        PyObject *key = PyLong_FromLong(code);
        PyObject *value = key ? Py_BuildValue("(Nd)", counts,
                                              (double)r->sum_ns[code] / 1e9)
                              : NULL;
        if (value == NULL) {
            Py_XDECREF(key);
            if (key == NULL) {
                Py_DECREF(counts);
            }
            goto error;
        }
        int rc = PyDict_SetItem(d, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0) {
            goto error;
        }
    }
    return d;
error:
    Py_DECREF(d);
    return NULL;
}

/* metrics_snapshot() -> None (off) or {"started", "in_flight", "bounds",
 * "rows": ((path or None, started, {code: (bucket counts, sum_s)}), ...)}:
 * one row per registered method, then the known generic paths, then
 * "other" (None). Bucket counts are per bucket (not cumulative), the last
 * one is +Inf; sums are in seconds. */
PyObject *
metrics_py_snapshot(ServerObject *self, PyObject *Py_UNUSED(ignored))
{
    ServerMetrics *m = self->metrics;
    if (m == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *bounds = PyTuple_New(METRICS_BOUNDS);
    PyObject *rows = bounds ? PyTuple_New(m->n_rows) : NULL;
    if (rows == NULL) {
        Py_XDECREF(bounds);
        return NULL;
    }
    for (int b = 0; b < METRICS_BOUNDS; b++) {
        PyObject *f = PyFloat_FromDouble((double)bounds_ns[b] / 1e9);
        if (f == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(bounds, b, f);
    }
    for (Py_ssize_t i = 0; i < m->n_rows; i++) {
        PyObject *codes = row_to_dict(&m->rows[i]);
        PyObject *row = codes ? Py_BuildValue(
            "(OKN)", PyTuple_GET_ITEM(m->names, i),
            (unsigned long long)m->rows[i].started, codes) : NULL;
        if (row == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(rows, i, row);
    }
    return Py_BuildValue("{sKsKsNsN}",
                         "started", (unsigned long long)m->started,
                         "in_flight", (unsigned long long)(m->started - m->ended),
                         "bounds", bounds, "rows", rows);
error:
    Py_DECREF(bounds);
    Py_DECREF(rows);
    return NULL;
}

void
metrics_free(ServerObject *self)
{
    ServerMetrics *m = self->metrics;
    if (m == NULL) {
        return;
    }
    self->metrics = NULL;
    Py_XDECREF(m->names);
    Py_XDECREF(m->generic_rows);
    PyMem_Free(m);
}
