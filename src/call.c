/*
 * call.c: one RPC on the server: the grpc_call, its batches and the status.
 *
 * The Call type is the base of asyncgrpc.ServicerContext: the Python
 * subclass adds the friendly methods, this file holds the state and the hot
 * path. A unary RPC here is:
 *   new call (server.c) -> call_start_recv_close -> call_run_handler:
 *   deserialize, behavior(request, context), loop.create_task(coro)
 *   -> task done callback (Call._on_task_done) -> serialize -> one batch
 *   SEND_INITIAL_METADATA + SEND_MESSAGE + SEND_STATUS_FROM_SERVER.
 *
 * Ownership: every batch in flight holds one reference to the Call (taken
 * when the batch starts, dropped in its completion), so a tag never points
 * at freed memory. The grpc_call is unreffed as soon as the RPC is over and
 * no batch is in flight (call_maybe_release), not when Python frees the
 * object, so a context kept alive by user code never holds up shutdown.
 */
#include "call.h"

#include <string.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>

#include "byte_buffer.h"
#include "metadata.h"
#include "metrics.h"
#include "ready.h"
#include "server.h"
#include "utils.h"

static void on_recv_close(Tag *tag, int ok);
static void on_finish(Tag *tag, int ok);
static void on_initial_md_sent(Tag *tag, int ok);
static void on_read(Tag *tag, int ok);
static void on_write(Tag *tag, int ok);
static void drop_write_queue(CallObject *self);
static void settle_write_waiter(CallObject *self, int ok);
static int future_is_done(CallObject *self, PyObject *fut);

/* The write queue's high-water mark: write() returns at once while the
 * messages in flight and queued cost at most this many bytes, and suspends
 * the writer above it until the queue is down to WRITE_LOW_WATER. Each
 * message also counts WRITE_OVERHEAD bytes (its byte buffer, its node), so
 * tiny messages cannot queue without bound. */
#define WRITE_HIGH_WATER ((size_t)64 * 1024)
#define WRITE_LOW_WATER (WRITE_HIGH_WATER / 2)
#define WRITE_OVERHEAD ((size_t)64)

/* ------------------------------------------------------------------ */
/* life cycle                                                          */

CallObject *
call_new(ServerObject *server, MethodEntry *method, PyObject *method_str,
         grpc_call *c, gpr_timespec deadline, grpc_metadata_array *md)
{
    PyTypeObject *cls = (PyTypeObject *)server->context_class;
    CallObject *self = (CallObject *)cls->tp_alloc(cls, 0);
    if (self == NULL) {
        return NULL;
    }
    self->server = (ServerObject *)Py_NewRef((PyObject *)server);
    self->call = c;
    self->method = method;
    self->method_str = Py_NewRef(method_str);
    self->deadline = gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC);
    /* Take the received array; the caller's is left empty for reuse. */
    self->request_md = *md;
    grpc_metadata_array_init(md);
    self->code = GRPC_STATUS_OK;
    self->recv_close_tag.complete = on_recv_close;
    self->finish_tag.complete = on_finish;
    self->initial_md_op.tag.complete = on_initial_md_sent;
    self->read_op.tag.complete = on_read;
    self->write_op.tag.complete = on_write;
    if (method != NULL) {
        self->request_streaming = method->request_streaming != 0;
        self->response_streaming = method->response_streaming != 0;
        self->deserializer = Py_XNewRef(method->deserializer);
    }
    server->state->counters.rpcs_started++;
    return self;
}

/* Convert the request metadata while the call still owns its slices. */
static int
ensure_invocation_md(CallObject *self)
{
    if (self->invocation_md != NULL) {
        return 0;
    }
    if (self->call == NULL) {
        self->invocation_md = Py_NewRef(self->server->state->empty_tuple);
        return 0;
    }
    self->invocation_md = metadata_to_tuple(&self->request_md);
    return self->invocation_md == NULL ? -1 : 0;
}

static PyObject *call_peer(CallObject *self, PyObject *ignored);
static PyObject *call_auth(CallObject *self, PyObject *ignored);

/* Read the peer and the auth context from the grpc_call, to answer peer()
 * and auth_context() after the call is released. */
static int
keep_peer_and_auth(CallObject *self)
{
    if (self->peer_kept == NULL &&
        (self->peer_kept = call_peer(self, NULL)) == NULL) {
        return -1;
    }
    if (self->auth_kept == NULL &&
        (self->auth_kept = call_auth(self, NULL)) == NULL) {
        return -1;
    }
    return 0;
}

/* Give the grpc_call back to the core once nothing can use it any more:
 * the RPC is over (recv-close fired) and no batch is in flight. */
static void
call_maybe_release(CallObject *self)
{
    if (self->call != NULL && server_inert(self->server)) {
        /* A forked child's copy of the call: the core is not ours. */
        self->call = NULL;
        return;
    }
    if (self->call == NULL || self->pending_batches > 0 || !self->terminated) {
        return;
    }
    if (Py_REFCNT(self) > 1) {
        /* Someone besides the caller's batch reference holds the context (a
         * handler still running, a background task, a late done callback):
         * keep what it may still ask for, as grpc.aio does. Nobody else can
         * see it in the common case, which then pays nothing. */
        if (ensure_invocation_md(self) < 0 || keep_peer_and_auth(self) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
    }
    grpc_call_unref(self->call);
    self->call = NULL;
    grpc_metadata_array_destroy(&self->request_md);
    grpc_metadata_array_init(&self->request_md);
    metadata_clear(&self->trailing_md);
    metadata_clear(&self->compression_md);
}

static int
call_traverse(CallObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->server);
    Py_VISIT(self->method_str);
    Py_VISIT(self->invocation_md);
    Py_VISIT(self->peer_kept);
    Py_VISIT(self->auth_kept);
    Py_VISIT(self->task);
    Py_VISIT(self->behavior);
    Py_VISIT(self->deserializer);
    Py_VISIT(self->serializer);
    Py_VISIT(self->code_obj);
    Py_VISIT(self->details);
    Py_VISIT(self->trailing_md_obj);
    Py_VISIT(self->done_callbacks);
    Py_VISIT(self->initial_md_op.future);
    Py_VISIT(self->read_op.future);
    Py_VISIT(self->write_op.future);
    Py_VISIT(self->final_details);
    return 0;
}

static int
call_clear(CallObject *self)
{
    /* `server` is kept until dealloc: the grpc_call and the queue need it. */
    Py_CLEAR(self->method_str);
    Py_CLEAR(self->invocation_md);
    Py_CLEAR(self->peer_kept);
    Py_CLEAR(self->auth_kept);
    Py_CLEAR(self->task);
    Py_CLEAR(self->behavior);
    Py_CLEAR(self->deserializer);
    Py_CLEAR(self->serializer);
    Py_CLEAR(self->code_obj);
    Py_CLEAR(self->details);
    Py_CLEAR(self->trailing_md_obj);
    Py_CLEAR(self->done_callbacks);
    Py_CLEAR(self->initial_md_op.future);
    Py_CLEAR(self->read_op.future);
    Py_CLEAR(self->write_op.future);
    Py_CLEAR(self->final_details);
    return 0;
}

static void
call_dealloc(CallObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    /* No batch is in flight (each holds a reference), so this is safe. */
    if (self->call != NULL && !server_inert(self->server)) {
        grpc_call_unref(self->call);
        self->call = NULL;
    }
    grpc_metadata_array_destroy(&self->request_md);
    metadata_clear(&self->trailing_md);
    metadata_clear(&self->compression_md);
    if (self->read_held != NULL) {
        grpc_byte_buffer_destroy(self->read_held);
    }
    drop_write_queue(self);
    if (self->counted_active && self->server != NULL) {
        self->server->active_calls--;
    }
    metrics_rpc_end(self, GRPC_STATUS_CANCELLED);   /* metrics hook: never ended */
    call_clear(self);
    Py_CLEAR(self->server);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* ------------------------------------------------------------------ */
/* batches                                                             */

/* Start a batch that holds a reference to the call until it completes.
 * Returns 0, or -1 (no exception set) if the core refused it. */
static int
start_batch(CallObject *self, const grpc_op *ops, size_t n, Tag *tag)
{
    if (self->call == NULL || self->server->phase == SERVER_CLOSED) {
        return -1;
    }
    if (server_inert(self->server)) {
        /* In a forked child nothing is sent: the RPC is the parent's. */
        call_maybe_release(self);
        return -1;
    }
    grpc_call_error err = grpc_call_start_batch(self->call, ops, n, tag, NULL);
    if (err != GRPC_CALL_OK) {
        return -1;
    }
    Py_INCREF(self);
    self->pending_batches++;
    return 0;
}

int
call_start_recv_close(CallObject *self)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &self->recv_close_cancelled;
    if (start_batch(self, &op, 1, &self->recv_close_tag) < 0) {
        /* Without it we would never learn that the RPC is over. */
        self->terminated = 1;
        self->server->state->counters.rpcs_finished++;
        self->cancelled = 1;
        return -1;
    }
    return 0;
}

/* Report an error to the Python server (it logs it). Returns the status
 * code the server asks for (hooks._report may return an int), or -1. Never
 * leaves an exception set. */
static int
report(CallObject *self, const char *kind, PyObject *exc)
{
    ModuleState *st = self->server->state;
    PyObject *hooks = self->server->hooks;
    if (is_fatal_exception(exc)) {
        /* Not an error of the RPC, nothing to log. From code the drain or
         * a done callback runs, it must reach the loop; from the handler's
         * task ("handler") or from read()/write() (which raise it in the
         * handler) asyncio's task code propagates it already. */
        if (strcmp(kind, "deserialize") == 0 || strcmp(kind, "serialize") == 0) {
            server_defer_fatal(self->server, exc);
        }
        return -1;
    }
    if (hooks == NULL) {
        return -1;
    }
    PyObject *kind_str = PyUnicode_FromString(kind);
    if (kind_str == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
        return -1;
    }
    PyObject *r = PyObject_CallMethodObjArgs(hooks, st->str_report, kind_str,
                                             (PyObject *)self,
                                             exc ? exc : Py_None, NULL);
    Py_DECREF(kind_str);
    if (r == NULL) {
        PyErr_WriteUnraisable(hooks);
        return -1;
    }
    int code = -1;
    if (PyLong_Check(r)) {
        code = as_int(r);
        if (code < 1 || code > 16) {
            PyErr_Clear();
            code = -1;
        }
    }
    Py_DECREF(r);
    return code;
}

/* Complete a pending asyncio future: with `value`, or with the exception
 * `exc` if that is not NULL. */
static void
complete_future(CallObject *self, PyObject *fut, PyObject *value, PyObject *exc)
{
    ModuleState *st = self->server->state;
    PyObject *r = exc
        ? PyObject_CallMethodOneArg(fut, st->str_set_exception, exc)
        : PyObject_CallMethodOneArg(fut, st->str_set_result, value);
    if (r == NULL) {
        PyErr_WriteUnraisable(fut);
    }
    Py_XDECREF(r);
}

/* Resolve an asyncio future unless it is done (cancelled by its awaiter):
 * with `value`, or with the exception `exc` if that is not NULL. */
static void
resolve_future(CallObject *self, PyObject *fut, PyObject *value, PyObject *exc)
{
    PyObject *done = PyObject_CallMethodNoArgs(fut, self->server->state->str_done);
    if (done == Py_False) {
        complete_future(self, fut, value, exc);
    }
    else if (done == NULL) {
        PyErr_WriteUnraisable(fut);
    }
    Py_XDECREF(done);
}

/* Fill `ops` with SEND_INITIAL_METADATA (unless already sent; it carries
 * the compression request of set_compression()) and, if `message` is not
 * NULL, SEND_MESSAGE with the write `flags`. Returns the number of ops
 * written (at most 2). */
static size_t
add_send_ops(CallObject *self, grpc_op *ops, grpc_byte_buffer *message,
             uint32_t flags)
{
    size_t n = 0;
    if (!self->initial_md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = self->compression_md.count;
        ops[n].data.send_initial_metadata.metadata = self->compression_md.items;
        n++;
    }
    if (message != NULL) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].flags = flags;
        ops[n].data.send_message.send_message = message;
        n++;
    }
    return n;
}

/* Start the final batch: initial metadata (unless sent), an optional
 * message and the status. `message` is consumed. Returns 0, or -1 if it
 * could not start (the RPC is gone); never leaves an exception set. */
static int
start_final(CallObject *self, grpc_status_code code, PyObject *details,
            grpc_byte_buffer *message)
{
    if (self->call == NULL) {
        if (message != NULL) {
            grpc_byte_buffer_destroy(message);
        }
        return -1;
    }
    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    size_t n = add_send_ops(self, ops, message,
                            self->no_compress_next ? GRPC_WRITE_NO_COMPRESS : 0);
    grpc_slice details_slice;
    int have_details = 0;
    if (details != NULL && details != Py_None) {
        Py_ssize_t len;
        const char *s = NULL;
        if (PyUnicode_Check(details)) {
            s = PyUnicode_AsUTF8AndSize(details, &len);
        }
        else if (PyBytes_Check(details)) {
            s = PyBytes_AS_STRING(details);
            len = PyBytes_GET_SIZE(details);
        }
        if (s == NULL) {
            PyErr_Clear();
            s = "";
            len = 0;
        }
        details_slice = grpc_slice_from_copied_buffer(s, (size_t)len);
        have_details = 1;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n].data.send_status_from_server.status_details =
        have_details ? &details_slice : NULL;
    ops[n].data.send_status_from_server.trailing_metadata =
        self->trailing_md.items;
    ops[n].data.send_status_from_server.trailing_metadata_count =
        self->trailing_md.count;
    n++;
    self->finish_payload = message;
    int rc = start_batch(self, ops, n, &self->finish_tag);
    if (have_details) {
        grpc_slice_unref(details_slice);   /* only read during start_batch */
    }
    if (rc < 0) {
        self->finish_payload = NULL;
        if (message != NULL) {
            grpc_byte_buffer_destroy(message);
        }
        if (self->call != NULL && self->server->phase != SERVER_CLOSED &&
            !server_inert(self->server)) {
            /* The core refused the batch (metadata it will not send, say):
             * the client must still get a status, not wait for its
             * deadline. */
            grpc_call_cancel_with_status(
                self->call, GRPC_STATUS_INTERNAL,
                "the server could not send the RPC's status", NULL);
            self->status_sent = 1;
            metrics_rpc_end(self, GRPC_STATUS_INTERNAL);   /* metrics hook */
        }
        return -1;
    }
    self->status_sent = 1;
    self->initial_md_sent = 1;
    metrics_rpc_end(self, (int)code);   /* metrics hook: status sent */
    return 0;
}

/* End the RPC: the final batch (see start_final), once. While written
 * messages are still in the write queue, it waits for them: on_write
 * starts it when the queue is empty, so a status never overtakes a message
 * the handler wrote. Returns 0 if started or deferred, -1 if the RPC is
 * already over or ending. */
static int
send_final(CallObject *self, grpc_status_code code, PyObject *details,
           grpc_byte_buffer *message)
{
    if (self->status_sent || self->call == NULL) {
        if (message != NULL) {
            grpc_byte_buffer_destroy(message);
        }
        return -1;
    }
    if ((self->write_op.active || self->wq_head != NULL) && !self->terminated) {
        self->final_pending = 1;
        self->final_code = (int)code;
        Py_XSETREF(self->final_details, Py_XNewRef(details));
        self->final_message = message;
        self->status_sent = 1;
        return 0;
    }
    return start_final(self, code, details, message);
}

int
call_finish_status(CallObject *self, grpc_status_code code, const char *details)
{
    PyObject *d = PyUnicode_FromString(details);
    if (d == NULL) {
        PyErr_Clear();
    }
    int rc = send_final(self, code, d, NULL);
    Py_XDECREF(d);
    return rc;
}

static void
on_finish(Tag *tag, int ok)
{
    CallObject *self = CONTAINER_OF(tag, CallObject, finish_tag);
    (void)ok;   /* a failed send means the client is gone: recv-close says so */
    if (self->finish_payload != NULL) {
        grpc_byte_buffer_destroy(self->finish_payload);
        self->finish_payload = NULL;
    }
    self->pending_batches--;
    call_maybe_release(self);
    Py_DECREF(self);
}

static void
on_recv_close(Tag *tag, int ok)
{
    CallObject *self = CONTAINER_OF(tag, CallObject, recv_close_tag);
    ModuleState *st = self->server->state;
    self->pending_batches--;
    self->terminated = 1;
    /* Every call ends here once, whether we sent a status or the client
     * reset it, the transport refused it or the deadline passed. */
    st->counters.rpcs_finished++;
    if (!ok || self->recv_close_cancelled) {
        self->cancelled = 1;
    }
    metrics_rpc_closed(self);   /* metrics hook: over without a status sent */
    if (self->counted_active) {
        self->counted_active = 0;
        self->server->active_calls--;
    }
    if (self->cancelled && self->task != NULL && !self->task_done) {
        PyObject *r = PyObject_CallMethodNoArgs(self->task, st->str_cancel);
        if (r == NULL) {
            PyErr_WriteUnraisable(self->task);
        }
        Py_XDECREF(r);
    }
    if (self->done_callbacks != NULL) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self,
                                                st->str_run_done_callbacks);
        if (r == NULL) {
            server_write_unraisable(self->server, (PyObject *)self);
        }
        Py_XDECREF(r);
    }
    call_maybe_release(self);
    Py_DECREF(self);
}

/* ------------------------------------------------------------------ */
/* running a unary handler                                             */

/* The handler raised `exc` (or the RPC was aborted): send the status. */
static void
finish_with_exception(CallObject *self, PyObject *exc)
{
    ModuleState *st = self->server->state;
    if (self->aborted) {
        send_final(self, (grpc_status_code)self->code, self->details, NULL);
        return;
    }
    if (PyErr_GivenExceptionMatches(exc, st->cancelled_error)) {
        if (!self->terminated) {
            /* Cancelled on our side (server stop) while the client waits. */
            call_finish_status(self, GRPC_STATUS_CANCELLED, "Cancelled");
        }
        return;
    }
    int asked = report(self, "handler", exc);
    grpc_status_code code = self->code != GRPC_STATUS_OK
        ? (grpc_status_code)self->code
        : asked > 0 ? (grpc_status_code)asked : GRPC_STATUS_UNKNOWN;
    PyObject *details = PyUnicode_FromFormat("Unexpected %R: %S",
                                             (PyObject *)Py_TYPE(exc), exc);
    if (details == NULL) {
        PyErr_Clear();
    }
    send_final(self, code, details, NULL);
    Py_XDECREF(details);
}

/* The handler returned `result`: serialize it and send it with OK, unless
 * the handler set a non-OK code (then the message is discarded). */
static void
finish_with_result(CallObject *self, PyObject *result)
{
    if (self->aborted || self->code != GRPC_STATUS_OK ||
        self->response_streaming) {
        /* Streaming handlers have written their messages already. */
        send_final(self, (grpc_status_code)self->code, self->details, NULL);
        return;
    }
    if (self->status_sent || self->call == NULL) {
        return;
    }
    PyObject *raw;
    if (self->serializer != NULL && self->serializer != Py_None) {
        raw = PyObject_CallOneArg(self->serializer, result);
    }
    else {
        raw = Py_NewRef(result);
    }
    grpc_byte_buffer *bb = raw ? byte_buffer_from_object(raw) : NULL;
    Py_XDECREF(raw);
    if (bb == NULL) {
        PyObject *exc = take_exception();
        report(self, "serialize", exc);
        Py_XDECREF(exc);
        call_finish_status(self, GRPC_STATUS_INTERNAL,
                           "Failed to serialize response!");
        return;
    }
    send_final(self, GRPC_STATUS_OK, self->details, bb);
}

/* Call._on_task_done(task): the done callback of the handler's task. */
static PyObject *
call_on_task_done(CallObject *self, PyObject *task)
{
    ModuleState *st = self->server->state;
    self->task_done = 1;
    PyObject *result = PyObject_CallMethodNoArgs(task, st->str_result);
    if (result == NULL) {
        PyObject *exc = take_exception();
        if (exc != NULL) {
            finish_with_exception(self, exc);
            Py_DECREF(exc);
        }
    }
    else {
        finish_with_result(self, result);
        Py_DECREF(result);
    }
    PyErr_Clear();
    /* Break the context <-> task <-> coroutine cycle now. */
    Py_CLEAR(self->task);
    Py_CLEAR(self->behavior);
    call_maybe_release(self);
    /* A KeyboardInterrupt from the serializer: asyncio re-raises it. */
    if (server_raise_deferred(self->server) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

void
call_run_handler(CallObject *self, PyObject *behavior, PyObject *deserializer,
                 PyObject *serializer, PyObject *payload)
{
    ServerObject *server = self->server;
    ModuleState *st = server->state;
    Py_XSETREF(self->behavior, Py_NewRef(behavior));
    Py_XSETREF(self->serializer, Py_XNewRef(serializer));
    Py_XSETREF(self->deserializer, Py_XNewRef(deserializer));
    if (self->request_streaming) {
        /* The handler reads the requests itself (context.read()). */
        payload = Py_None;
        deserializer = NULL;
    }
    if (payload == NULL) {
        call_finish_status(self, GRPC_STATUS_INTERNAL,
                           "Request message is missing");
        return;
    }
    PyObject *request;
    if (deserializer != NULL && deserializer != Py_None) {
        request = PyObject_CallOneArg(deserializer, payload);
        if (request == NULL) {
            PyObject *exc = take_exception();
            report(self, "deserialize", exc);
            Py_XDECREF(exc);
            call_finish_status(self, GRPC_STATUS_INTERNAL,
                               "Exception deserializing request!");
            return;
        }
    }
    else {
        request = Py_NewRef(payload);
    }
    PyObject *args[2] = {request, (PyObject *)self};
    PyObject *coro = PyObject_Vectorcall(behavior, args, 2, NULL);
    Py_DECREF(request);
    PyObject *task = NULL;
    if (coro != NULL) {
        PyObject *targs[2] = {coro, self->method_str};
        task = PyObject_Vectorcall(server->create_task, targs, 1,
                                   st->kwnames_name);
        Py_DECREF(coro);
    }
    if (task == NULL) {
        /* The behavior raised before it could be awaited (or returned
         * something that is not awaitable): same as a handler exception. */
        PyObject *exc = take_exception();
        self->task_done = 1;
        server_defer_fatal(server, exc);   /* no task to propagate it */
        if (exc != NULL) {
            finish_with_exception(self, exc);
            Py_DECREF(exc);
        }
        return;
    }
    self->task = task;
    if (server->eager_tasks) {
        /* Started eagerly: a handler that did not suspend is done already,
         * and its status goes now rather than from a done callback one
         * loop iteration later. */
        int done = future_is_done(self, task);
        if (done < 0) {
            PyErr_Clear();
        }
        else if (done) {
            PyObject *r = call_on_task_done(self, task);
            if (r == NULL) {
                server_write_unraisable(server, task);
            }
            Py_XDECREF(r);
            return;
        }
    }
    PyObject *cb = PyObject_GetAttr((PyObject *)self, st->str_on_task_done);
    PyObject *r = cb ? PyObject_CallMethodOneArg(task, st->str_add_done_callback,
                                                 cb) : NULL;
    Py_XDECREF(cb);
    if (r == NULL) {
        /* Cannot watch the task: cancel it and fail the RPC. */
        PyErr_WriteUnraisable(task);
        PyObject *c = PyObject_CallMethodNoArgs(task, st->str_cancel);
        Py_XDECREF(c);
        PyErr_Clear();
        call_finish_status(self, GRPC_STATUS_INTERNAL,
                           "Could not schedule the handler");
        return;
    }
    Py_DECREF(r);
}

/* ------------------------------------------------------------------ */
/* reading: context.read(), and the request of a generic unary method  */

/* The value a read() returns for a completed RECV_MESSAGE: the
 * deserialized message, or EOF at the end of the stream (or when the RPC is
 * gone: its task is being cancelled then). On a bad message the RPC ends
 * with INTERNAL, as in grpc.aio, and *exc is the deserializer's exception
 * for read() to raise; returns NULL then. */
static PyObject *
read_result(CallObject *self, int ok, grpc_byte_buffer *bb, PyObject **exc)
{
    *exc = NULL;
    if (!ok || bb == NULL) {
        self->read_eof = 1;
        return Py_NewRef(self->server->state->eof);
    }
    PyObject *value = byte_buffer_to_bytes(bb);
    if (value != NULL && self->deserializer != NULL &&
        self->deserializer != Py_None) {
        Py_SETREF(value, PyObject_CallOneArg(self->deserializer, value));
    }
    if (value == NULL) {
        *exc = take_exception();
        report(self, "read", *exc);
        call_finish_status(self, GRPC_STATUS_INTERNAL,
                           "Exception deserializing request!");
    }
    return value;
}

/* Complete `fut` (known to be pending: new, or checked by the caller) with
 * what read_result() gives for this receive. */
static void
resolve_read(CallObject *self, PyObject *fut, int ok, grpc_byte_buffer *bb)
{
    PyObject *exc;
    PyObject *value = read_result(self, ok, bb, &exc);
    if (value == self->server->state->eof && self->read_anext) {
        /* The future of a request iterator's __anext__(): the end of the
         * stream ends the `async for`. */
        exc = PyObject_CallNoArgs(PyExc_StopAsyncIteration);
        if (exc == NULL) {
            exc = take_exception();
        }
    }
    complete_future(self, fut, value, exc);
    Py_XDECREF(value);
    Py_XDECREF(exc);
}

/* Is `fut` done (a read() whose awaiter was cancelled)? -1 on error. */
static int
future_is_done(CallObject *self, PyObject *fut)
{
    PyObject *done = PyObject_CallMethodNoArgs(fut, self->server->state->str_done);
    if (done == NULL) {
        return -1;
    }
    int over = done == Py_True;
    Py_DECREF(done);
    return over;
}

/* Start a RECV_MESSAGE nobody waits for yet (one message of read-ahead):
 * when the handler's next read() comes, its message has usually arrived and
 * read() returns it without suspending. Nothing is read once the RPC is
 * over or its status is on the way. */
static void
start_read_ahead(CallObject *self)
{
    if (self->read_op.active || self->read_held_set || self->read_eof ||
        self->terminated || self->status_sent) {
        return;
    }
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &self->read_op.recv;
    if (start_batch(self, &op, 1, &self->read_op.tag) == 0) {
        self->read_op.active = 1;
        self->read_ahead = 1;
    }
}

/* Keep a completed receive for the next read(). */
static void
hold_read(CallObject *self, int ok, grpc_byte_buffer *bb)
{
    self->read_held = bb;
    self->read_held_ok = ok != 0;
    self->read_held_set = 1;
}

static void
on_read(Tag *tag, int ok)
{
    CallObject *self = CONTAINER_OF(tag, CallObject, read_op.tag);
    grpc_byte_buffer *bb = self->read_op.recv;
    self->read_op.recv = NULL;
    self->read_op.active = 0;
    self->pending_batches--;
    int ahead = self->read_ahead;
    self->read_ahead = 0;
    if (self->read_op.future != NULL) {
        PyObject *fut = self->read_op.future;
        self->read_op.future = NULL;
        int over = future_is_done(self, fut);
        if (over < 0) {
            PyErr_WriteUnraisable(fut);
        }
        if (over == 1 && !self->terminated) {
            /* Its read() was cancelled (asyncio.wait_for timed out) before
             * the message landed: keep it for the next read(). */
            hold_read(self, ok, bb);
            bb = NULL;
        }
        else if (over == 0) {
            resolve_read(self, fut, ok, bb);
            if (ok && bb != NULL) {
                start_read_ahead(self);
            }
        }
        Py_DECREF(fut);
    }
    else if (ahead) {
        /* Read ahead: the next read() takes it. */
        if (!self->terminated) {
            hold_read(self, ok, bb);
            bb = NULL;
        }
    }
    else if (ok && !self->terminated) {
        PyObject *payload = NULL;
        if (bb != NULL) {
            payload = byte_buffer_to_bytes(bb);
            if (payload == NULL) {
                PyObject *exc = take_exception();
                report(self, "deserialize", exc);
                Py_XDECREF(exc);
                call_finish_status(self, GRPC_STATUS_INTERNAL,
                                   "Could not read the request message");
            }
        }
        if (payload != NULL || bb == NULL) {
            PyObject *behavior = self->behavior;
            PyObject *deserializer = self->deserializer;
            Py_XINCREF(behavior);
            Py_XINCREF(deserializer);
            call_run_handler(self, behavior, deserializer, self->serializer,
                             payload);
            Py_XDECREF(behavior);
            Py_XDECREF(deserializer);
            Py_XDECREF(payload);
        }
    }
    if (bb != NULL) {
        grpc_byte_buffer_destroy(bb);
    }
    call_maybe_release(self);
    Py_DECREF(self);
}

/* Call._run(behavior, deserializer, serializer, request_streaming,
 * response_streaming): run the handler of a generic (unregistered) method;
 * a unary request is read first. */
static PyObject *
call_py_run(CallObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "_run(behavior, deserializer, serializer, "
                        "request_streaming, response_streaming)");
        return NULL;
    }
    if (self->read_op.active || self->task != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the handler already runs");
        return NULL;
    }
    int req = PyObject_IsTrue(args[3]);
    int resp = PyObject_IsTrue(args[4]);
    if (req < 0 || resp < 0) {
        return NULL;
    }
    self->request_streaming = req;
    self->response_streaming = resp;
    if (req) {
        call_run_handler(self, args[0], args[1], args[2], NULL);
        Py_RETURN_TRUE;
    }
    Py_XSETREF(self->behavior, Py_NewRef(args[0]));
    Py_XSETREF(self->deserializer, Py_NewRef(args[1]));
    Py_XSETREF(self->serializer, Py_NewRef(args[2]));
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &self->read_op.recv;
    if (start_batch(self, &op, 1, &self->read_op.tag) < 0) {
        Py_RETURN_FALSE;   /* the RPC is already gone */
    }
    self->read_op.active = 1;
    Py_RETURN_TRUE;
}

/* ------------------------------------------------------------------ */
/* initial metadata                                                    */

static void
on_initial_md_sent(Tag *tag, int ok)
{
    CallObject *self = CONTAINER_OF(tag, CallObject, initial_md_op.tag);
    (void)ok;
    self->pending_batches--;
    metadata_clear(&self->initial_md_op.md);
    self->initial_md_op.active = 0;
    PyObject *fut = self->initial_md_op.future;
    self->initial_md_op.future = NULL;
    if (fut != NULL) {
        resolve_future(self, fut, Py_None, NULL);
        Py_DECREF(fut);
    }
    call_maybe_release(self);
    Py_DECREF(self);
}

/* Call._send_initial_metadata(metadata) -> future resolved when sent. */
static PyObject *
call_py_send_initial_metadata(CallObject *self, PyObject *metadata)
{
    ModuleState *st = self->server->state;
    if (self->initial_md_sent) {
        PyErr_SetString(PyExc_RuntimeError,
                        "initial metadata was already sent");
        return NULL;
    }
    if (self->server->loop == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the server is closed");
        return NULL;
    }
    SendMetadata md;
    if (metadata_from_object(metadata, &md) < 0) {
        return NULL;
    }
    if (metadata_append(&md, &self->compression_md) < 0) {
        metadata_clear(&md);
        return NULL;
    }
    PyObject *fut = PyObject_CallMethodNoArgs(self->server->loop,
                                              st->str_create_future);
    if (fut == NULL) {
        metadata_clear(&md);
        return NULL;
    }
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_INITIAL_METADATA;
    op.data.send_initial_metadata.count = md.count;
    op.data.send_initial_metadata.metadata = md.items;
    self->initial_md_op.md = md;
    if (start_batch(self, &op, 1, &self->initial_md_op.tag) < 0) {
        metadata_clear(&self->initial_md_op.md);
        /* The RPC is over; nothing to wait for. */
        PyObject *r = PyObject_CallMethodOneArg(fut, st->str_set_result,
                                                Py_None);
        if (r == NULL) {
            Py_DECREF(fut);
            return NULL;
        }
        Py_DECREF(r);
        return fut;
    }
    self->initial_md_sent = 1;
    self->initial_md_op.active = 1;
    self->initial_md_op.future = Py_NewRef(fut);
    return fut;
}

/* ------------------------------------------------------------------ */
/* streaming: one RECV and one SEND in flight, a write queue behind it  */

/* A new future of the server's loop, or NULL with an exception. */
static PyObject *
new_future(CallObject *self)
{
    if (self->server->loop == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the server is closed");
        return NULL;
    }
    return PyObject_CallMethodNoArgs(self->server->loop,
                                     self->server->state->str_create_future);
}

/* Raise asyncgrpc.UsageError(msg) (RuntimeError before configure()). */
static PyObject *
usage_error(CallObject *self, const char *msg)
{
    PyObject *cls = self->server->state->usage_error;
    PyErr_SetString(cls ? cls : PyExc_RuntimeError, msg);
    return NULL;
}

/* The end of the stream for next_message(): EOF for read(), and for
 * __anext__() StopAsyncIteration raised at once. */
static PyObject *
end_of_stream(CallObject *self, int anext)
{
    if (anext) {
        PyErr_SetNone(PyExc_StopAsyncIteration);
        return NULL;
    }
    return ready_new(self->server->state, self->server->state->eof);
}

/* Call.read() and Call._anext(): an awaitable of the next request message
 * (deserialized). A message that has already arrived (read ahead) comes
 * back as a Ready, without suspending; otherwise the awaitable is a future
 * resolved when it lands. At the end of the stream, read() gives EOF and
 * _anext() (a request iterator's __anext__) raises StopAsyncIteration. */
static PyObject *
next_message(CallObject *self, int anext)
{
    ModuleState *st = self->server->state;
    if (!self->request_streaming) {
        return usage_error(self, "read() is only for request-streaming RPCs");
    }
    if (self->read_held_set) {
        grpc_byte_buffer *bb = self->read_held;
        int ok = self->read_held_ok;
        self->read_held = NULL;
        self->read_held_set = 0;
        PyObject *exc;
        PyObject *value = read_result(self, ok, bb, &exc);
        if (bb != NULL) {
            grpc_byte_buffer_destroy(bb);
        }
        if (value == NULL) {
            /* A bad message: the RPC ended with INTERNAL, read() raises. */
            if (exc == NULL) {
                PyErr_SetString(PyExc_RuntimeError, "could not read the message");
                return NULL;
            }
            PyErr_SetRaisedException_compat(exc);
            return NULL;
        }
        if (self->read_eof) {
            Py_DECREF(value);
            return end_of_stream(self, anext);
        }
        start_read_ahead(self);
        Py_SETREF(value, ready_new(st, value));
        return value;
    }
    if (self->read_eof) {
        /* After the end of the stream, read() keeps returning EOF. */
        return end_of_stream(self, anext);
    }
    if (self->read_op.active) {
        PyObject *prev = self->read_op.future;
        if (prev == NULL) {
            /* The read-ahead is on its way: wait for it. */
            PyObject *fut = new_future(self);
            if (fut == NULL) {
                return NULL;
            }
            self->read_ahead = 0;
            self->read_anext = anext != 0;
            self->read_op.future = Py_NewRef(fut);
            return fut;
        }
        int prev_over = future_is_done(self, prev);
        if (prev_over < 0) {
            return NULL;
        }
        if (prev_over) {
            /* The previous read() was cancelled (asyncio.wait_for timed
             * out, say) while its message was on the way: this read() gets
             * that message, so none is lost. */
            PyObject *fut = new_future(self);
            if (fut == NULL) {
                return NULL;
            }
            Py_SETREF(self->read_op.future, Py_NewRef(fut));
            self->read_anext = anext != 0;
            return fut;
        }
        PyErr_SetString(PyExc_RuntimeError,
                        "another read() is already in progress");
        return NULL;
    }
    PyObject *fut = new_future(self);
    if (fut == NULL) {
        return NULL;
    }
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &self->read_op.recv;
    if (start_batch(self, &op, 1, &self->read_op.tag) < 0) {
        /* the RPC is over */
        Py_DECREF(fut);
        self->read_eof = 1;
        return end_of_stream(self, anext);
    }
    self->read_op.active = 1;
    self->read_anext = anext != 0;
    self->read_op.future = Py_NewRef(fut);
    return fut;
}

static PyObject *
call_py_read(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    return next_message(self, 0);
}

static PyObject *
call_py_anext(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    return next_message(self, 1);
}

/* Start SEND_MESSAGE of `bb` (consumed) as the write in flight, with the
 * initial metadata if not sent yet. 0, or -1 if the RPC is gone. */
static int
start_write(CallObject *self, grpc_byte_buffer *bb, uint32_t flags, size_t cost)
{
    grpc_op ops[2];
    memset(ops, 0, sizeof(ops));
    size_t n = add_send_ops(self, ops, bb, flags);
    self->write_op.send = bb;
    if (start_batch(self, ops, n, &self->write_op.tag) < 0) {
        self->write_op.send = NULL;
        grpc_byte_buffer_destroy(bb);
        return -1;
    }
    self->initial_md_sent = 1;
    self->write_op.active = 1;
    self->write_cost = cost;
    return 0;
}

/* Start the next queued message. While more wait behind it, it goes with
 * GRPC_WRITE_BUFFER_HINT: the transport completes it without writing to
 * the socket (up to its write buffer size) and sends the run of messages in
 * fewer frames and writes when the last one, without the hint, comes. */
static int
start_next_write(CallObject *self)
{
    QueuedWrite *node = self->wq_head;
    self->wq_head = node->next;
    if (self->wq_head == NULL) {
        self->wq_tail = NULL;
    }
    uint32_t flags = node->flags;
    if (self->wq_head != NULL) {
        flags |= GRPC_WRITE_BUFFER_HINT;
    }
    int rc = start_write(self, node->message, flags, node->cost);
    PyMem_Free(node);
    return rc;
}

/* Drop what the write queue holds, and a deferred final batch: the RPC is
 * over, nothing more can be sent. */
static void
drop_write_queue(CallObject *self)
{
    QueuedWrite *node = self->wq_head;
    while (node != NULL) {
        QueuedWrite *next = node->next;
        grpc_byte_buffer_destroy(node->message);
        PyMem_Free(node);
        node = next;
    }
    self->wq_head = self->wq_tail = NULL;
    self->wq_bytes = self->write_op.active ? self->write_cost : 0;
    if (self->final_pending) {
        self->final_pending = 0;
        if (self->final_message != NULL) {
            grpc_byte_buffer_destroy(self->final_message);
            self->final_message = NULL;
        }
        Py_CLEAR(self->final_details);
    }
}

static void
on_write(Tag *tag, int ok)
{
    CallObject *self = CONTAINER_OF(tag, CallObject, write_op.tag);
    self->pending_batches--;
    self->write_op.active = 0;
    if (self->write_op.send != NULL) {
        grpc_byte_buffer_destroy(self->write_op.send);
        self->write_op.send = NULL;
    }
    self->wq_bytes -= self->write_cost;
    self->write_cost = 0;
    if (ok && self->wq_head != NULL) {
        /* The next message goes at the drain's next empty poll. */
        server_defer_write(self->server, self);
    }
    if (!ok) {
        /* The RPC is over (cancel, deadline, client gone). */
        drop_write_queue(self);
    }
    else if (self->wq_head == NULL && self->final_pending) {
        /* The queue has drained: the status the handler ended with. */
        PyObject *details = self->final_details;
        grpc_byte_buffer *message = self->final_message;
        self->final_details = NULL;
        self->final_message = NULL;
        self->final_pending = 0;
        start_final(self, (grpc_status_code)self->final_code, details, message);
        Py_XDECREF(details);
    }
    settle_write_waiter(self, ok);
    call_maybe_release(self);
    Py_DECREF(self);
}

void
call_resume_write(CallObject *self)
{
    if (self->write_op.active || self->wq_head == NULL) {
        return;
    }
    int ok = !self->terminated && start_next_write(self) == 0;
    if (!ok) {
        drop_write_queue(self);
        settle_write_waiter(self, 0);
        call_maybe_release(self);
    }
}

/* Wake a writer waiting above the high-water mark: once the queue is down
 * to the low-water mark, or with CancelledError if the RPC is over. */
static void
settle_write_waiter(CallObject *self, int ok)
{
    PyObject *fut = self->write_op.future;
    if (fut != NULL && (!ok || self->wq_bytes <= WRITE_LOW_WATER)) {
        self->write_op.future = NULL;
        if (ok) {
            resolve_future(self, fut, Py_None, NULL);
        }
        else {
            /* The writer's await raises CancelledError, like its task is
             * about to. */
            PyObject *r = PyObject_CallMethodNoArgs(fut,
                                                    self->server->state->str_cancel);
            if (r == NULL) {
                PyErr_WriteUnraisable(fut);
            }
            Py_XDECREF(r);
        }
        Py_DECREF(fut);
    }
}

/* A cancelled future: what write() returns once the RPC is gone (awaiting
 * it raises CancelledError, like the handler's task is about to). */
static PyObject *
cancelled_future(CallObject *self)
{
    PyObject *fut = new_future(self);
    if (fut == NULL) {
        return NULL;
    }
    PyObject *r = PyObject_CallMethodNoArgs(fut, self->server->state->str_cancel);
    if (r == NULL) {
        Py_DECREF(fut);
        return NULL;
    }
    Py_DECREF(r);
    return fut;
}

/* Call.write(message) -> awaitable. The message joins the call's write
 * queue; while the queue holds at most WRITE_HIGH_WATER bytes, the
 * awaitable is a Ready and the writer goes on without suspending; above
 * it, a future resolved once the transport has taken the queue down to
 * WRITE_LOW_WATER (that is the back-pressure). CancelledError if the RPC
 * is gone. */
static PyObject *
call_py_write(CallObject *self, PyObject *message)
{
    ModuleState *st = self->server->state;
    if (!self->response_streaming) {
        return usage_error(self, "write() is only for response-streaming RPCs");
    }
    if (self->status_sent) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the RPC has already sent its status");
        return NULL;
    }
    if (self->write_op.future != NULL) {
        int over = future_is_done(self, self->write_op.future);
        if (over < 0) {
            return NULL;
        }
        if (!over) {
            PyErr_SetString(PyExc_RuntimeError,
                            "another write() is already in progress");
            return NULL;
        }
        /* Its writer stopped waiting (cancelled); the message is queued. */
        Py_CLEAR(self->write_op.future);
    }
    PyObject *data = (self->serializer != NULL && self->serializer != Py_None)
        ? PyObject_CallOneArg(self->serializer, message)
        : Py_NewRef(message);
    grpc_byte_buffer *bb = data ? byte_buffer_from_object(data) : NULL;
    Py_XDECREF(data);
    if (bb == NULL) {
        /* As grpc.aio: the RPC ends with INTERNAL and write() raises. */
        PyObject *exc = take_exception();
        report(self, "write", exc);
        call_finish_status(self, GRPC_STATUS_INTERNAL,
                           "Failed to serialize response!");
        PyErr_SetRaisedException_compat(exc);
        return NULL;
    }
    if (self->terminated || self->call == NULL) {
        grpc_byte_buffer_destroy(bb);
        return cancelled_future(self);
    }
    uint32_t flags = self->no_compress_next ? GRPC_WRITE_NO_COMPRESS : 0;
    size_t cost = grpc_byte_buffer_length(bb) + WRITE_OVERHEAD;
    if (!self->write_op.active && self->wq_head == NULL) {
        if (start_write(self, bb, flags, cost) < 0) {
            return cancelled_future(self);
        }
    }
    else {
        QueuedWrite *node = PyMem_Malloc(sizeof(*node));
        if (node == NULL) {
            grpc_byte_buffer_destroy(bb);
            return PyErr_NoMemory();
        }
        node->next = NULL;
        node->message = bb;
        node->cost = cost;
        node->flags = flags;
        if (self->wq_tail != NULL) {
            self->wq_tail->next = node;
        }
        else {
            self->wq_head = node;
        }
        self->wq_tail = node;
    }
    self->no_compress_next = 0;
    self->wq_bytes += cost;
    if (self->wq_bytes <= WRITE_HIGH_WATER) {
        return Py_NewRef(st->ready_none);
    }
    PyObject *fut = new_future(self);
    if (fut == NULL) {
        return NULL;
    }
    self->write_op.future = Py_NewRef(fut);
    return fut;
}

/* Call._set_compression(name or None): the algorithm of this call's
 * responses ("gzip", "deflate", "identity"), sent with the initial metadata
 * as the core's internal request header. */
static PyObject *
call_py_set_compression(CallObject *self, PyObject *name)
{
    if (self->initial_md_sent) {
        PyErr_SetString(PyExc_RuntimeError,
                        "set_compression() must come before the initial "
                        "metadata is sent");
        return NULL;
    }
    metadata_clear(&self->compression_md);
    if (name == Py_None) {
        Py_RETURN_NONE;
    }
    PyObject *pairs = Py_BuildValue("((sO))", "grpc-internal-encoding-request",
                                    name);
    if (pairs == NULL) {
        return NULL;
    }
    int rc = metadata_from_trusted(pairs, &self->compression_md);
    Py_DECREF(pairs);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
call_py_disable_next_compression(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    self->no_compress_next = 1;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* status set by the handler                                           */

/* Call._set_code(code_int, code_obj) */
static PyObject *
call_py_set_code(CallObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_set_code(code, code_object)");
        return NULL;
    }
    int code = as_int(args[0]);
    if (code == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (code < 0 || code > 16) {
        PyErr_Format(PyExc_ValueError, "invalid status code %d", code);
        return NULL;
    }
    self->code = code;
    Py_XSETREF(self->code_obj, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

/* Call._set_trailing_metadata(metadata): validate now, send at the end. */
static PyObject *
call_py_set_trailing_metadata(CallObject *self, PyObject *metadata)
{
    /* Validate (and read back) one tuple: an iterator is consumed once. */
    PyObject *as_tuple;
    if (metadata == Py_None) {
        as_tuple = Py_NewRef(self->server->state->empty_tuple);
    }
    else if (PyUnicode_Check(metadata) || PyBytes_Check(metadata)) {
        as_tuple = Py_NewRef(metadata);   /* metadata_from_object refuses it */
    }
    else if ((as_tuple = PySequence_Tuple(metadata)) == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_SetString(PyExc_TypeError,
                            "metadata must be a sequence of (key, value) pairs");
        }
        return NULL;
    }
    SendMetadata md;
    if (metadata_from_object(as_tuple, &md) < 0) {
        Py_DECREF(as_tuple);
        return NULL;
    }
    if (self->status_sent) {
        /* The batch may still read the old array: keep it. */
        metadata_clear(&md);
        Py_DECREF(as_tuple);
        PyErr_SetString(PyExc_RuntimeError,
                        "the RPC has already sent its status");
        return NULL;
    }
    metadata_clear(&self->trailing_md);
    self->trailing_md = md;
    Py_XSETREF(self->trailing_md_obj, as_tuple);
    Py_RETURN_NONE;
}

/* Call._abort(code_int, code_obj, details, trailing_metadata_or_None) */
static PyObject *
call_py_abort(CallObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "_abort(code, code_object, details, trailing_metadata)");
        return NULL;
    }
    if (args[3] != Py_None) {
        PyObject *r = call_py_set_trailing_metadata(self, args[3]);
        if (r == NULL) {
            return NULL;
        }
        Py_DECREF(r);
    }
    PyObject *r = call_py_set_code(self, args, 2);
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_XSETREF(self->details, Py_NewRef(args[2]));
    self->aborted = 1;
    /* Send now, as grpc.aio does: the client learns at once even if the
     * handler swallows the AbortError and goes on. */
    send_final(self, (grpc_status_code)self->code, self->details, NULL);
    Py_RETURN_NONE;
}

/* Call._finish(code_int, details): end the RPC now with a status. */
static PyObject *
call_py_finish(CallObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_finish(code, details: str)");
        return NULL;
    }
    int code = as_int(args[0]);
    if (code == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (send_final(self, (grpc_status_code)code, args[1], NULL) < 0) {
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* ------------------------------------------------------------------ */
/* public read-only facts                                              */

static PyObject *
call_invocation_metadata(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    if (ensure_invocation_md(self) < 0) {
        return NULL;
    }
    return Py_NewRef(self->invocation_md);
}

static PyObject *
call_peer(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->call == NULL || server_inert(self->server)) {
        return self->peer_kept ? Py_NewRef(self->peer_kept)
                               : PyUnicode_FromString("");
    }
    char *peer = grpc_call_get_peer(self->call);
    if (peer == NULL) {
        return PyUnicode_FromString("");
    }
    PyObject *s = PyUnicode_DecodeUTF8(peer, (Py_ssize_t)strlen(peer),
                                       "replace");
    gpr_free(peer);
    return s;
}

/* Call._auth() -> (properties: dict[str, list[bytes]], identity key or
 * None, identities: list[bytes] or None), read from the core. */
static PyObject *
call_auth(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->call == NULL && self->auth_kept != NULL) {
        /* A fresh dict each time: callers may change what they get. */
        PyObject *props = PyDict_Copy(PyTuple_GET_ITEM(self->auth_kept, 0));
        return props ? Py_BuildValue("(NOO)", props,
                                     PyTuple_GET_ITEM(self->auth_kept, 1),
                                     PyTuple_GET_ITEM(self->auth_kept, 2))
                     : NULL;
    }
    PyObject *props = PyDict_New();
    if (props == NULL) {
        return NULL;
    }
    if (self->call == NULL || server_inert(self->server)) {
        return Py_BuildValue("(NOO)", props, Py_None, Py_None);
    }
    grpc_auth_context *ctx = grpc_call_auth_context(self->call);
    if (ctx == NULL) {
        return Py_BuildValue("(NOO)", props, Py_None, Py_None);
    }
    PyObject *identities = Py_NewRef(Py_None);
    PyObject *key = Py_NewRef(Py_None);
    grpc_auth_property_iterator it = grpc_auth_context_property_iterator(ctx);
    const grpc_auth_property *p;
    while ((p = grpc_auth_property_iterator_next(&it)) != NULL) {
        PyObject *value = PyBytes_FromStringAndSize(p->value,
                                                    (Py_ssize_t)p->value_length);
        PyObject *list = value ? PyDict_GetItemString(props, p->name) : NULL;
        int rc = -1;
        if (value != NULL && list != NULL) {
            rc = PyList_Append(list, value);
        }
        else if (value != NULL) {
            PyObject *fresh = PyList_New(1);
            if (fresh != NULL) {
                PyList_SET_ITEM(fresh, 0, Py_NewRef(value));
                rc = PyDict_SetItemString(props, p->name, fresh);
                Py_DECREF(fresh);
            }
        }
        Py_XDECREF(value);
        if (rc < 0) {
            goto error;
        }
    }
    const char *id_name = grpc_auth_context_peer_identity_property_name(ctx);
    if (id_name != NULL && grpc_auth_context_peer_is_authenticated(ctx)) {
        Py_SETREF(key, PyUnicode_FromString(id_name));
        PyObject *ids = PyDict_GetItemString(props, id_name);
        Py_SETREF(identities, ids ? PySequence_List(ids) : Py_NewRef(Py_None));
        if (key == NULL || identities == NULL) {
            goto error;
        }
    }
    grpc_auth_context_release(ctx);
    return Py_BuildValue("(NNN)", props, key, identities);
error:
    grpc_auth_context_release(ctx);
    Py_DECREF(props);
    Py_XDECREF(key);
    Py_XDECREF(identities);
    return NULL;
}

static PyObject *
call_time_remaining(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    double s = seconds_until(self->deadline);
    if (s == Py_HUGE_VAL) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(s > 0 ? s : 0.0);
}

static PyObject *
call_cancelled(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->cancelled);
}

static PyObject *
call_done(CallObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->terminated);
}

static PyObject *
get_code(CallObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->code);
}

static PyObject *
get_obj(PyObject *obj)
{
    return obj ? Py_NewRef(obj) : Py_NewRef(Py_None);
}

static PyObject *
get_code_obj(CallObject *self, void *Py_UNUSED(c)) { return get_obj(self->code_obj); }
static PyObject *
get_details(CallObject *self, void *Py_UNUSED(c)) { return get_obj(self->details); }
static PyObject *
get_trailing(CallObject *self, void *Py_UNUSED(c)) { return get_obj(self->trailing_md_obj); }
static PyObject *
get_method(CallObject *self, void *Py_UNUSED(c)) { return get_obj(self->method_str); }
static PyObject *
get_done_callbacks(CallObject *self, void *Py_UNUSED(c)) { return get_obj(self->done_callbacks); }

static PyObject *
get_deserializer(CallObject *self, void *Py_UNUSED(c)) { return get_obj(self->deserializer); }
static PyObject *
get_serializer(CallObject *self, void *Py_UNUSED(c)) { return get_obj(self->serializer); }

static int
set_details(CallObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value != NULL && value != Py_None && !PyUnicode_Check(value)) {
        PyErr_Format(PyExc_TypeError, "details must be str, not %.100s",
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    Py_XSETREF(self->details, Py_XNewRef(value));
    return 0;
}

static int
set_done_callbacks(CallObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value != NULL && value != Py_None && !PyList_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "_done_callbacks must be a list");
        return -1;
    }
    Py_XSETREF(self->done_callbacks,
               (value == Py_None) ? NULL : Py_XNewRef(value));
    return 0;
}

static PyObject *
get_flag(CallObject *self, void *closure)
{
    const char *which = (const char *)closure;
    int v = 0;
    if (strcmp(which, "aborted") == 0) {
        v = self->aborted;
    }
    else if (strcmp(which, "initial_metadata_sent") == 0) {
        v = self->initial_md_sent;
    }
    else if (strcmp(which, "status_sent") == 0) {
        v = self->status_sent;
    }
    else if (strcmp(which, "request_streaming") == 0) {
        v = self->request_streaming;
    }
    else if (strcmp(which, "response_streaming") == 0) {
        v = self->response_streaming;
    }
    return PyBool_FromLong(v);
}

static PyMethodDef call_methods[] = {
    {"invocation_metadata", (PyCFunction)call_invocation_metadata, METH_NOARGS,
     "The request metadata: a tuple of (key, value) pairs."},
    {"peer", (PyCFunction)call_peer, METH_NOARGS,
     "The client's address, e.g. 'ipv4:127.0.0.1:50000'."},
    {"time_remaining", (PyCFunction)call_time_remaining, METH_NOARGS,
     "Seconds left until the deadline, or None if there is none."},
    {"cancelled", (PyCFunction)call_cancelled, METH_NOARGS,
     "True if the RPC was cancelled by the client or by its deadline."},
    {"done", (PyCFunction)call_done, METH_NOARGS,
     "True once the RPC has terminated."},
    {"_auth", (PyCFunction)call_auth, METH_NOARGS, NULL},
    {"_on_task_done", (PyCFunction)call_on_task_done, METH_O, NULL},
    {"_run", (PyCFunction)(void (*)(void))call_py_run, METH_FASTCALL, NULL},
    {"read", (PyCFunction)call_py_read, METH_NOARGS,
     "read(): awaitable of the next request message, or asyncgrpc.EOF after "
     "the client half-closed (request-streaming RPCs)."},
    {"_anext", (PyCFunction)call_py_anext, METH_NOARGS,
     "_anext(): read() for a request iterator's __anext__: at the end of "
     "the stream it raises StopAsyncIteration (or its future does)."},
    {"write", (PyCFunction)call_py_write, METH_O,
     "write(message): awaitable, done once the transport has taken the "
     "message (response-streaming RPCs)."},
    {"_set_compression", (PyCFunction)call_py_set_compression, METH_O, NULL},
    {"_disable_next_compression", (PyCFunction)call_py_disable_next_compression,
     METH_NOARGS, NULL},
    {"_send_initial_metadata", (PyCFunction)call_py_send_initial_metadata,
     METH_O, NULL},
    {"_set_code", (PyCFunction)(void (*)(void))call_py_set_code,
     METH_FASTCALL, NULL},
    {"_set_trailing_metadata", (PyCFunction)call_py_set_trailing_metadata,
     METH_O, NULL},
    {"_abort", (PyCFunction)(void (*)(void))call_py_abort, METH_FASTCALL,
     NULL},
    {"_finish", (PyCFunction)(void (*)(void))call_py_finish, METH_FASTCALL,
     NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef call_getset[] = {
    {"_code", (getter)get_code, NULL, NULL, NULL},
    {"_code_obj", (getter)get_code_obj, NULL, NULL, NULL},
    {"_details", (getter)get_details, (setter)set_details, NULL, NULL},
    {"_trailing_metadata", (getter)get_trailing, NULL, NULL, NULL},
    {"_method", (getter)get_method, NULL, NULL, NULL},
    {"_done_callbacks", (getter)get_done_callbacks, (setter)set_done_callbacks,
     NULL, NULL},
    {"_aborted", (getter)get_flag, NULL, NULL, "aborted"},
    {"_initial_metadata_sent", (getter)get_flag, NULL, NULL,
     "initial_metadata_sent"},
    {"_status_sent", (getter)get_flag, NULL, NULL, "status_sent"},
    {"_request_streaming", (getter)get_flag, NULL, NULL, "request_streaming"},
    {"_response_streaming", (getter)get_flag, NULL, NULL, "response_streaming"},
    {"_deserializer", (getter)get_deserializer, NULL, NULL, NULL},
    {"_serializer", (getter)get_serializer, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef call_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(CallObject, weakreflist),
     READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *
call_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    PyErr_Format(PyExc_TypeError,
                 "%.100s objects are created by the server", type->tp_name);
    return NULL;
}

static PyType_Slot call_slots[] = {
    {Py_tp_doc, "One RPC on the server (base of asyncgrpc.ServicerContext)."},
    {Py_tp_new, call_tp_new},
    {Py_tp_dealloc, call_dealloc},
    {Py_tp_traverse, call_traverse},
    {Py_tp_clear, call_clear},
    {Py_tp_methods, call_methods},
    {Py_tp_getset, call_getset},
    {Py_tp_members, call_members},
    {0, NULL},
};

PyType_Spec call_spec = {
    .name = "asyncgrpc._core.Call",
    .basicsize = sizeof(CallObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = call_slots,
};
