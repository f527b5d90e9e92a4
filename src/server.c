/*
 * server.c: the Server type: a grpc_server, its registered methods, the
 * requests posted to the core, and the loop side of the bridge.
 *
 * Owns: the grpc_server, the Bridge (completion queue + poller thread +
 * eventfd), the MethodEntry table and the RequestSlot array. Every slot is
 * posted to the core as a tag; the slot array is freed only after the queue
 * reported shutdown, i.e. after every slot's tag has come back.
 *
 * Loop side of DESIGN.md section 3: _on_wakeup (the eventfd reader) takes
 * the handed-over event and drains; _drain polls the queue non-blocking,
 * handles up to DRAIN_BUDGET events inline, and re-schedules itself with
 * loop.call_soon until it has seen two empty polls in a row (the second in a
 * later loop iteration), then gives the baton back to the poller.
 */
#include "server.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <grpc/grpc_security.h>

#include "bridge.h"
#include "byte_buffer.h"
#include "call.h"
#include "metrics.h"
#include "utils.h"

#define REQUESTS_PER_METHOD 64   /* outstanding requests per registered method */
#define GENERIC_REQUESTS 8       /* outstanding requests for unknown paths */
#define DRAIN_BUDGET 256         /* events per drain pass before yielding */
/* Drain passes in a row that find the queue empty before the baton goes
 * back to the poller, and whether the polls of those passes always look at
 * the sockets (LOOK_WHEN_IDLE). Measured at one RPC in flight (RESULTS.md,
 * "Speed, round two"): two passes save the futex wake, the eventfd write
 * and read and two thread switches per RPC (strace: 17.7 -> 8.3 syscalls
 * per RPC), but the requests that arrive during the extra passes wait for
 * a poll that looks at the sockets, and throughput went down, not up. */
#ifndef IDLE_PASSES
#define IDLE_PASSES 1
#endif
#ifndef LOOK_WHEN_IDLE
#define LOOK_WHEN_IDLE 0
#endif

static void on_request(Tag *tag, int ok);
static void on_shutdown(Tag *tag, int ok);
static int server_clear(ServerObject *self);
static void force_shutdown(ServerObject *self);

/* ------------------------------------------------------------------ */
/* fork                                                                */

/* Bumped in each forked child. Plain C state shared by every module
 * instance of the process (never a Python object): the fork is per process. */
static unsigned fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static int atfork_error;

static void
on_fork_child(void)
{
    __atomic_add_fetch(&fork_generation, 1, __ATOMIC_RELAXED);
}

static void
install_atfork(void)
{
    atfork_error = pthread_atfork(NULL, NULL, on_fork_child);
}

int
server_register_atfork(void)
{
    int err = pthread_once(&atfork_once, install_atfork);
    return err ? err : atfork_error;
}

unsigned
server_fork_generation(void)
{
    return __atomic_load_n(&fork_generation, __ATOMIC_RELAXED);
}

static int
refuse_if_inert(ServerObject *self)
{
    if (server_inert(self)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this server was created before os.fork(): it is "
                        "inert in the child process; create a new one");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* construction                                                        */

static void
free_channel_args(grpc_channel_args *args)
{
    for (size_t i = 0; i < args->num_args; i++) {
        PyMem_Free(args->args[i].key);
        if (args->args[i].type == GRPC_ARG_STRING) {
            PyMem_Free(args->args[i].value.string);
        }
    }
    PyMem_Free(args->args);
    args->args = NULL;
    args->num_args = 0;
}

static char *
copy_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *c = PyMem_Malloc(n);
    if (c == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(c, s, n);
    return c;
}

/* options: a sequence of (str key, value): int values are integer options,
 * str and bytes values string options, others are accepted and ignored (as
 * grpc.aio's pointer arguments are by the core). SO_REUSEPORT is off
 * unless the caller sets it, so a second server on a port fails loudly
 * instead of silently taking half the connections (CORE_NOTES 11). */
static int
build_channel_args(PyObject *options, grpc_channel_args *out)
{
    out->num_args = 0;
    out->args = NULL;
    PyObject *seq = PySequence_Fast(
        options, "options must be a sequence of (key, value) pairs");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    out->args = PyMem_Calloc((size_t)n + 1, sizeof(grpc_arg));
    if (out->args == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    int reuseport_given = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *key, *value;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyUnicode_Check(key = PyTuple_GET_ITEM(pair, 0))) {
            PyErr_Format(PyExc_TypeError,
                         "each option must be a (str, int | str) tuple, "
                         "got %R", pair);
            goto error;
        }
        value = PyTuple_GET_ITEM(pair, 1);
        const char *k = PyUnicode_AsUTF8(key);
        if (k == NULL) {
            goto error;
        }
        grpc_arg *arg = &out->args[out->num_args];
        if (PyBool_Check(value) || PyLong_Check(value)) {
            int v = as_int(value);
            if (v == -1 && PyErr_Occurred()) {
                goto error;
            }
            arg->type = GRPC_ARG_INTEGER;
            arg->value.integer = v;
        }
        else if (PyUnicode_Check(value) || PyBytes_Check(value)) {
            const char *v;
            Py_ssize_t vlen;
            if (PyBytes_Check(value)) {
                v = PyBytes_AS_STRING(value);
                vlen = PyBytes_GET_SIZE(value);
            }
            else if ((v = PyUnicode_AsUTF8AndSize(value, &vlen)) == NULL) {
                goto error;
            }
            if ((Py_ssize_t)strlen(v) != vlen) {
                PyErr_Format(PyExc_ValueError,
                             "option %R: value contains a NUL byte", key);
                goto error;
            }
            if ((arg->value.string = copy_str(v)) == NULL) {
                goto error;
            }
            arg->type = GRPC_ARG_STRING;
        }
        else {
            /* grpc.aio passes any other object (a float, say) to the core
             * as a pointer argument, which no integer or string option
             * reads: accept it and leave it out, as it has no effect. */
            continue;
        }
        if ((arg->key = copy_str(k)) == NULL) {
            if (arg->type == GRPC_ARG_STRING) {
                PyMem_Free(arg->value.string);
            }
            goto error;
        }
        out->num_args++;
        if (strcmp(k, GRPC_ARG_ALLOW_REUSEPORT) == 0) {
            reuseport_given = 1;
        }
    }
    if (!reuseport_given) {
        grpc_arg *arg = &out->args[out->num_args];
        if ((arg->key = copy_str(GRPC_ARG_ALLOW_REUSEPORT)) == NULL) {
            goto error;
        }
        arg->type = GRPC_ARG_INTEGER;
        arg->value.integer = 0;
        out->num_args++;
    }
    Py_DECREF(seq);
    return 0;
error:
    Py_DECREF(seq);
    free_channel_args(out);
    return -1;
}

static PyObject *
server_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"options", "maximum_concurrent_rpcs", NULL};
    PyObject *options = NULL;
    Py_ssize_t max_concurrent = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|On:Server", kwlist,
                                     &options, &max_concurrent)) {
        return NULL;
    }
    if (max_concurrent < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "maximum_concurrent_rpcs must be >= 0 (0: no limit)");
        return NULL;
    }
    grpc_channel_args cargs;
    PyObject *empty = NULL;
    if (options == NULL || options == Py_None) {
        options = empty = PyTuple_New(0);
        if (empty == NULL) {
            return NULL;
        }
    }
    int rc = build_channel_args(options, &cargs);
    Py_XDECREF(empty);
    if (rc < 0) {
        return NULL;
    }
    ServerObject *self = (ServerObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        free_channel_args(&cargs);
        return NULL;
    }
    PyObject *module = PyType_GetModule(type);
    self->state = state_from_type(type);
    self->module = Py_NewRef(module);
    /* Counted from here on: dealloc uncounts it on every error path below. */
    self->state->live_servers++;
    self->max_concurrent = max_concurrent;
    self->fork_generation = server_fork_generation();
    self->shutdown_tag.complete = on_shutdown;
    self->bridge.eventfd = -1;
    if (bridge_init(&self->bridge, &self->state->counters) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        free_channel_args(&cargs);
        Py_DECREF(self);
        return NULL;
    }
    self->server = grpc_server_create(&cargs, NULL);
    free_channel_args(&cargs);
    if (self->server == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "grpc_server_create failed");
        Py_DECREF(self);
        return NULL;
    }
    grpc_server_register_completion_queue(self->server, self->bridge.cq, NULL);
    return (PyObject *)self;
}

/* ------------------------------------------------------------------ */
/* requests                                                            */

static grpc_call_error
post_request(ServerObject *self, RequestSlot *slot)
{
    grpc_call_error err;
    if (self->state->inject_post_failures > 0) {
        /* Test hook (_core._inject_post_failures): act as a refusing core. */
        self->state->inject_post_failures--;
        return GRPC_CALL_ERROR;
    }
    if (slot->method != NULL) {
        err = grpc_server_request_registered_call(
            self->server, slot->method->registered, &slot->call,
            &slot->deadline, &slot->metadata,
            /* the core wants no payload pointer for GRPC_SRM_PAYLOAD_NONE */
            slot->method->request_streaming ? NULL : &slot->payload,
            self->bridge.cq, self->bridge.cq, &slot->tag);
    }
    else {
        err = grpc_server_request_call(
            self->server, &slot->call, &slot->details, &slot->metadata,
            self->bridge.cq, self->bridge.cq, &slot->tag);
    }
    if (err == GRPC_CALL_OK) {
        self->slots_outstanding++;
    }
    return err;
}

/* Post `slot` again after its call was taken. If the core refuses, the slot
 * is set aside and retried on the next drain pass (retry_unposted), so a
 * refusal never shrinks the server's capacity for good. */
static void
repost_request(ServerObject *self, RequestSlot *slot)
{
    grpc_call_error err = post_request(self, slot);
    if (err == GRPC_CALL_OK) {
        return;
    }
    slot->unposted = 1;
    self->n_unposted++;
    PyErr_Format(PyExc_RuntimeError,
                 "the gRPC core refused a request slot for %s (error %d); "
                 "retrying on the next drain",
                 slot->method ? slot->method->path : "unregistered methods",
                 (int)err);
    PyErr_WriteUnraisable((PyObject *)self);
}

static void
retry_unposted(ServerObject *self)
{
    if (self->n_unposted == 0 || self->phase != SERVER_STARTED) {
        return;
    }
    for (Py_ssize_t i = 0; i < self->n_slots && self->n_unposted > 0; i++) {
        RequestSlot *slot = &self->slots[i];
        if (slot->unposted && post_request(self, slot) == GRPC_CALL_OK) {
            slot->unposted = 0;
            self->n_unposted--;
        }
    }
}

/* Refuse a new call without creating a Call object for it (the server is
 * being torn down, or the object could not be made): end it with `code`,
 * give it back to the core, and release what its request slot received. */
static void
refuse_raw_call(grpc_call *c, grpc_metadata_array *md,
                grpc_byte_buffer *payload, grpc_status_code code,
                const char *details)
{
    grpc_call_cancel_with_status(c, code, details, NULL);
    grpc_call_unref(c);
    /* The entries pointed into the call. */
    grpc_metadata_array_destroy(md);
    if (payload != NULL) {
        grpc_byte_buffer_destroy(payload);
    }
}

/* Run the Python side of a generic (unregistered) call. */
static void
dispatch_generic(ServerObject *self, CallObject *call)
{
    PyObject *r = PyObject_CallMethodOneArg(
        self->hooks, self->state->str_dispatch_generic, (PyObject *)call);
    if (r == NULL) {
        server_write_unraisable(self, self->hooks);
        call_finish_status(call, GRPC_STATUS_UNKNOWN,
                           "Error while dispatching the call");
        return;
    }
    Py_DECREF(r);
}

static void
on_request(Tag *tag, int ok)
{
    RequestSlot *slot = (RequestSlot *)tag;
    ServerObject *self = slot->server;
    self->slots_outstanding--;
    /* Take everything the core wrote into the slot before it is posted
     * again: a call already waiting is matched during the re-post, and the
     * core then writes that call's metadata, deadline and payload into the
     * same slot (CORE_NOTES 1). Reading the slot after the re-post handed
     * one call's headers to another. */
    grpc_call *c = slot->call;
    slot->call = NULL;
    grpc_byte_buffer *payload = slot->payload;
    slot->payload = NULL;
    grpc_metadata_array md = slot->metadata;
    grpc_metadata_array_init(&slot->metadata);
    MethodEntry *method = slot->method;
    gpr_timespec deadline = method ? slot->deadline : slot->details.deadline;
    PyObject *method_str = NULL;
    if (method == NULL && ok && c != NULL) {
        method_str = PyUnicode_DecodeUTF8(
            (const char *)GRPC_SLICE_START_PTR(slot->details.method),
            (Py_ssize_t)GRPC_SLICE_LENGTH(slot->details.method), "replace");
    }
    if (method == NULL) {
        grpc_call_details_destroy(&slot->details);
        grpc_call_details_init(&slot->details);
    }
    if (!ok || c == NULL) {
        /* Shutdown: the request is returned unused (CORE_NOTES 8). */
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        grpc_metadata_array_destroy(&md);
        Py_XDECREF(method_str);
        return;
    }
    if (self->phase == SERVER_STARTED) {
        repost_request(self, slot);
    }
    if (self->phase == SERVER_CLOSED || self->hooks == NULL) {
        Py_XDECREF(method_str);
        refuse_raw_call(c, &md, payload, GRPC_STATUS_UNAVAILABLE,
                        "server is shutting down");
        return;
    }
    CallObject *call = NULL;
    if (method != NULL || method_str != NULL) {
        call = call_new(self, method, method ? method->path_str : method_str,
                        c, deadline, &md);
    }
    Py_XDECREF(method_str);
    if (call == NULL) {
        /* No memory for the method name or the Call object. */
        PyErr_WriteUnraisable((PyObject *)self);
        refuse_raw_call(c, &md, payload, GRPC_STATUS_RESOURCE_EXHAUSTED,
                        "out of memory");
        return;
    }
    metrics_rpc_start(call);    /* metrics hook: the call is accepted */
    call_start_recv_close(call);
    if (self->max_concurrent > 0 &&
             self->active_calls >= self->max_concurrent) {
        self->state->counters.rpcs_rejected++;
        call_finish_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED,
                           "Concurrent RPC limit exceeded!");
    }
    else if (!call->terminated) {
        call->counted_active = 1;
        self->active_calls++;
        if (method != NULL) {
            PyObject *bytes = NULL;
            if (payload != NULL) {
                bytes = byte_buffer_to_bytes(payload);
            }
            if (payload != NULL && bytes == NULL) {
                PyErr_WriteUnraisable((PyObject *)call);
                call_finish_status(call, GRPC_STATUS_INTERNAL,
                                   "Could not read the request message");
            }
            else {
                call_run_handler(call, method->behavior, method->deserializer,
                                 method->serializer, bytes);
            }
            Py_XDECREF(bytes);
        }
        else {
            dispatch_generic(self, call);
        }
    }
    if (payload != NULL) {
        grpc_byte_buffer_destroy(payload);
    }
    Py_DECREF(call);
}

/* ------------------------------------------------------------------ */
/* the loop side of the bridge                                         */

int
server_defer_fatal(ServerObject *self, PyObject *exc)
{
    if (!is_fatal_exception(exc)) {
        return 0;
    }
    if (self->deferred_fatal == NULL) {
        self->deferred_fatal = Py_NewRef(exc);
    }
    return 1;
}

void
server_write_unraisable(ServerObject *self, PyObject *obj)
{
    PyObject *exc = take_exception();
    if (server_defer_fatal(self, exc)) {
        Py_DECREF(exc);
        return;
    }
    PyErr_SetRaisedException_compat(exc);
    PyErr_WriteUnraisable(obj);
}

int
server_raise_deferred(ServerObject *self)
{
    PyObject *exc = self->deferred_fatal;
    if (exc == NULL) {
        return 0;
    }
    self->deferred_fatal = NULL;
    PyErr_SetRaisedException_compat(exc);
    return -1;
}

static inline void
dispatch_event(ServerObject *self, grpc_event ev)
{
    Tag *tag = (Tag *)ev.tag;
    tag->complete(tag, ev.success);
    if (PyErr_Occurred()) {     /* handlers report their own errors */
        server_write_unraisable(self, NULL);
    }
}

void
server_defer_write(ServerObject *self, CallObject *call)
{
    if (call->write_deferred) {
        return;
    }
    call->write_deferred = 1;
    call->next_deferred_writer = self->deferred_writers;
    self->deferred_writers = (CallObject *)Py_NewRef((PyObject *)call);
}

/* Take the list of calls whose next write waits for the drain's next empty
 * poll, and start those writes (resume) or, when the server is closing and
 * their RPCs are over, just let go of them. Returns 1 if there were any. */
static int
take_deferred_writes(ServerObject *self, int resume)
{
    CallObject *call = self->deferred_writers;
    if (call == NULL) {
        return 0;
    }
    self->deferred_writers = NULL;
    while (call != NULL) {
        CallObject *next = call->next_deferred_writer;
        call->next_deferred_writer = NULL;
        call->write_deferred = 0;
        if (resume) {
            call_resume_write(call);
            if (PyErr_Occurred()) {
                server_write_unraisable(self, (PyObject *)call);
            }
        }
        Py_DECREF(call);
        call = next;
    }
    return 1;
}

static PyObject *
server_drain(ServerObject *self, PyObject *Py_UNUSED(ignored))
{
    Bridge *b = &self->bridge;
    if (self->phase == SERVER_CLOSED || server_inert(self) ||
        !bridge_loop_holds_baton(b)) {
        Py_RETURN_NONE;
    }
    self->state->counters.drains++;
    retry_unposted(self);
    int n = 0;
    while (n < DRAIN_BUDGET && self->deferred_fatal == NULL) {
        /* With LOOK_WHEN_IDLE, in the passes that follow a quiet one (the
         * loop is about to idle) every empty answer looks at the sockets. */
        grpc_event ev = bridge_poll(b, LOOK_WHEN_IDLE && n == 0 && b->pending_empty > 0);
        if (ev.type != GRPC_OP_COMPLETE) {
            /* The queue is empty: now the streams' next messages go. */
            if (take_deferred_writes(self, 1)) {
                continue;
            }
            break;
        }
        self->state->counters.events++;
        dispatch_event(self, ev);
        n++;
    }
    if (n == DRAIN_BUDGET) {
        /* Out of budget with events still coming: the streams' next
         * messages go now rather than wait for a pass that empties the
         * queue, which sustained load may not bring. */
        take_deferred_writes(self, 1);
    }
    if (self->deferred_fatal != NULL) {
        /* Keep the baton and go on in a later iteration (if the loop runs
         * again, e.g. asyncio.run's teardown); raise now. */
        b->pending_empty = 0;
        PyObject *h = PyObject_CallOneArg(self->call_soon, self->drain_cb);
        if (h == NULL) {
            PyErr_Clear();
            bridge_hand_back(b);
        }
        Py_XDECREF(h);
        server_raise_deferred(self);
        return NULL;
    }
    /* Passes in a row that ended on an empty poll. */
    b->pending_empty = n == DRAIN_BUDGET ? 0 : n == 0 ? b->pending_empty + 1 : 1;
    if (b->pending_empty > IDLE_PASSES) {
        bridge_hand_back(b);
        Py_RETURN_NONE;
    }
    /* One empty poll is not enough: gRPC may answer it without looking at
     * the sockets, and the callbacks we just woke may start new batches.
     * Poll again from a later loop iteration. */
    PyObject *h = PyObject_CallOneArg(self->call_soon, self->drain_cb);
    if (h == NULL) {
        /* Could not schedule: give the queue back rather than lose it. */
        bridge_hand_back(b);
        return NULL;
    }
    Py_DECREF(h);
    Py_RETURN_NONE;
}

static PyObject *
server_on_wakeup(ServerObject *self, PyObject *Py_UNUSED(ignored))
{
    Bridge *b = &self->bridge;
    if (self->phase == SERVER_CLOSED) {
        /* A wake-up already queued when close() removed the reader. */
        Py_RETURN_NONE;
    }
    if (server_inert(self)) {
        /* A forked child's copy: the eventfd (and maybe the epoll set) is
         * shared with the parent; reading it would steal its wake-up. */
        Py_RETURN_NONE;
    }
    self->state->counters.wakeups++;
    bridge_ack_wakeup(b);
    grpc_event ev;
    if (bridge_take(b, &ev)) {
        self->state->counters.events++;
        dispatch_event(self, ev);
    }
    /* A KeyboardInterrupt from that event is raised by the drain. */
    return server_drain(self, NULL);
}

/* ------------------------------------------------------------------ */
/* Python API                                                          */

/* Credentials from (root_pem | None, ((key_pem, cert_pem), ...),
 * require_client_auth), or insecure ones for None. NULL with an exception. */
static grpc_server_credentials *
make_server_credentials(PyObject *spec)
{
    if (spec == NULL || spec == Py_None) {
        return grpc_insecure_server_credentials_create();
    }
    PyObject *root, *pairs;
    int require_client_auth;
    if (!PyArg_ParseTuple(spec, "OOp;credentials must be (root_certificates, "
                          "((private_key, certificate_chain), ...), "
                          "require_client_auth)",
                          &root, &pairs, &require_client_auth)) {
        return NULL;
    }
    if (root != Py_None && !PyBytes_Check(root)) {
        PyErr_SetString(PyExc_TypeError, "root certificates must be PEM bytes");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(pairs, "key/certificate pairs must be a "
                                           "sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n == 0) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError,
                        "at least one (private_key, certificate_chain) pair is "
                        "needed");
        return NULL;
    }
    grpc_ssl_pem_key_cert_pair *kc = PyMem_Calloc((size_t)n, sizeof(*kc));
    if (kc == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyMem_Free(kc);
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError,
                            "each pair must be (private_key: bytes, "
                            "certificate_chain: bytes) in PEM");
            return NULL;
        }
        /* The bytes objects live in `seq` until the credentials are made;
         * the core copies what it needs. */
        kc[i].private_key = PyBytes_AS_STRING(PyTuple_GET_ITEM(pair, 0));
        kc[i].cert_chain = PyBytes_AS_STRING(PyTuple_GET_ITEM(pair, 1));
    }
    grpc_server_credentials *creds = grpc_ssl_server_credentials_create_ex(
        root == Py_None ? NULL : PyBytes_AS_STRING(root), kc, (size_t)n,
        require_client_auth
            ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
            : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
    PyMem_Free(kc);
    Py_DECREF(seq);
    if (creds == NULL) {
        PyErr_SetString(PyExc_ValueError, "invalid TLS credentials");
    }
    return creds;
}

/* add_http2_port(address, credentials=None) -> port */
static PyObject *
server_add_http2_port(ServerObject *self, PyObject *const *args,
                      Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "add_http2_port(address: str, credentials=None)");
        return NULL;
    }
    if (self->phase != SERVER_NEW) {
        PyErr_SetString(PyExc_RuntimeError,
                        "ports must be added before the server starts");
        return NULL;
    }
    if (refuse_if_inert(self) < 0) {
        return NULL;
    }
    const char *addr = PyUnicode_AsUTF8(args[0]);
    if (addr == NULL) {
        return NULL;
    }
    grpc_server_credentials *creds =
        make_server_credentials(nargs == 2 ? args[1] : NULL);
    if (creds == NULL) {
        return NULL;
    }
    int port = grpc_server_add_http2_port(self->server, addr, creds);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        PyErr_Format(PyExc_RuntimeError,
                     "Failed to bind to address %s; set GRPC_VERBOSITY=debug "
                     "environment variable to see detailed error message.",
                     addr);
        return NULL;
    }
    return PyLong_FromLong(port);
}

/* register_method(path, behavior, deserializer, serializer,
 * request_streaming, response_streaming): registered with the core, so a
 * unary request arrives together with the call. */
static PyObject *
server_register_method(ServerObject *self, PyObject *const *args,
                       Py_ssize_t nargs)
{
    if (nargs != 6 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "register_method(path: str, behavior, deserializer, "
                        "serializer, request_streaming, response_streaming)");
        return NULL;
    }
    int request_streaming = PyObject_IsTrue(args[4]);
    int response_streaming = PyObject_IsTrue(args[5]);
    if (request_streaming < 0 || response_streaming < 0) {
        return NULL;
    }
    if (self->phase != SERVER_NEW) {
        PyErr_SetString(PyExc_RuntimeError,
                        "methods must be registered before the server starts");
        return NULL;
    }
    const char *path = PyUnicode_AsUTF8(args[0]);
    if (path == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->n_methods; i++) {
        if (strcmp(self->methods[i].path, path) == 0) {
            PyErr_Format(PyExc_ValueError, "method %R is already registered",
                         args[0]);
            return NULL;
        }
    }
    MethodEntry *grown = PyMem_Realloc(
        self->methods, sizeof(MethodEntry) * (size_t)(self->n_methods + 1));
    if (grown == NULL) {
        return PyErr_NoMemory();
    }
    self->methods = grown;
    MethodEntry *m = &self->methods[self->n_methods];
    memset(m, 0, sizeof(*m));
    if ((m->path = copy_str(path)) == NULL) {
        return NULL;
    }
    m->path_str = Py_NewRef(args[0]);
    m->behavior = Py_NewRef(args[1]);
    m->deserializer = Py_NewRef(args[2]);
    m->serializer = Py_NewRef(args[3]);
    m->request_streaming = request_streaming;
    m->response_streaming = response_streaming;
    self->n_methods++;
    Py_RETURN_NONE;
}

/* start(loop, context_class, hooks) */
static PyObject *
server_start(ServerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ModuleState *st = self->state;
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "start(loop, context_class, hooks[, task_factory])");
        return NULL;
    }
    if (self->phase != SERVER_NEW) {
        PyErr_SetString(PyExc_RuntimeError, "the server was already started");
        return NULL;
    }
    if (refuse_if_inert(self) < 0) {
        return NULL;
    }
    PyObject *loop = args[0], *context_class = args[1], *hooks = args[2];
    if (!PyType_Check(context_class) ||
        !PyType_IsSubtype((PyTypeObject *)context_class, st->call_type)) {
        PyErr_SetString(PyExc_TypeError,
                        "context_class must be a subclass of _core.Call");
        return NULL;
    }
    /* task_factory(coro, name=...) makes each handler's task: on Python
     * 3.12+ the Python server passes one that starts the task eagerly. */
    PyObject *create_task = (nargs == 4 && args[3] != Py_None)
        ? Py_NewRef(args[3]) : PyObject_GetAttr(loop, st->str_create_task);
    PyObject *call_soon = create_task ? PyObject_GetAttr(loop, st->str_call_soon)
                                      : NULL;
    PyObject *drain_cb = call_soon ? PyObject_GetAttr((PyObject *)self,
                                                      st->str_drain) : NULL;
    PyObject *wakeup_cb = drain_cb ? PyObject_GetAttr((PyObject *)self,
                                                      st->str_on_wakeup) : NULL;
    if (wakeup_cb == NULL) {
        Py_XDECREF(create_task);
        Py_XDECREF(call_soon);
        Py_XDECREF(drain_cb);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->n_methods; i++) {
        MethodEntry *m = &self->methods[i];
        m->registered = grpc_server_register_method(
            self->server, m->path, NULL,
            m->request_streaming ? GRPC_SRM_PAYLOAD_NONE
                                 : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
            0);
        if (m->registered == NULL) {
            PyErr_Format(PyExc_RuntimeError, "cannot register method %s",
                         m->path);
            goto error;
        }
    }
    Py_ssize_t n_slots = self->n_methods * REQUESTS_PER_METHOD + GENERIC_REQUESTS;
    self->slots = PyMem_Calloc((size_t)n_slots, sizeof(RequestSlot));
    if (self->slots == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    self->n_slots = n_slots;
    for (Py_ssize_t i = 0; i < n_slots; i++) {
        RequestSlot *slot = &self->slots[i];
        slot->tag.complete = on_request;
        slot->server = self;
        slot->method = (i < self->n_methods * REQUESTS_PER_METHOD)
            ? &self->methods[i / REQUESTS_PER_METHOD] : NULL;
        grpc_metadata_array_init(&slot->metadata);
        grpc_call_details_init(&slot->details);
    }
    /* Python-side state first: events may arrive as soon as we start. */
    self->loop = Py_NewRef(loop);
    self->create_task = create_task;
    self->eager_tasks = nargs == 4 && args[3] != Py_None;
    self->call_soon = call_soon;
    self->drain_cb = drain_cb;
    self->context_class = Py_NewRef(context_class);
    self->hooks = Py_NewRef(hooks);
    create_task = call_soon = drain_cb = NULL;

    grpc_server_start(self->server);
    self->phase = SERVER_STARTED;
    for (Py_ssize_t i = 0; i < n_slots; i++) {
        if (post_request(self, &self->slots[i]) != GRPC_CALL_OK) {
            PyErr_SetString(PyExc_RuntimeError, "cannot post a request");
            goto error;
        }
    }
    int err = bridge_start(&self->bridge);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    PyObject *fd = PyLong_FromLong(self->bridge.eventfd);
    if (fd == NULL) {
        goto error;
    }
    PyObject *r = PyObject_CallMethodObjArgs(loop, st->str_add_reader, fd,
                                             wakeup_cb, NULL);
    Py_DECREF(fd);
    if (r == NULL) {
        goto error;
    }
    Py_DECREF(r);
    Py_DECREF(wakeup_cb);
    Py_RETURN_NONE;
error:
    Py_XDECREF(create_task);
    Py_XDECREF(call_soon);
    Py_XDECREF(drain_cb);
    Py_DECREF(wakeup_cb);
    {
        /* Nothing half-started may stay behind: a started core keeps the
         * port bound and would take connections nobody answers. Shut it
         * down and release it now (keeping the exception across the pump,
         * whose event handlers must not see it); the server is closed. */
        PyObject *exc = take_exception();
        force_shutdown(self);
        server_clear(self);
        PyErr_SetRaisedException_compat(exc);
    }
    return NULL;
}

static void
on_shutdown(Tag *tag, int ok)
{
    ServerObject *self = CONTAINER_OF(tag, ServerObject, shutdown_tag);
    (void)ok;
    PyObject *fut = self->shutdown_future;
    self->shutdown_future = NULL;
    self->shutdown_done = 1;
    if (fut != NULL) {
        PyObject *done = PyObject_CallMethodNoArgs(fut, self->state->str_done);
        if (done == Py_False) {
            PyObject *r = PyObject_CallMethodOneArg(
                fut, self->state->str_set_result, Py_None);
            Py_XDECREF(r);
        }
        Py_XDECREF(done);
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(fut);
        }
        Py_DECREF(fut);
    }
}

/* shutdown() -> future: stop accepting RPCs; the future resolves when every
 * call has ended. */
static PyObject *
server_shutdown(ServerObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->phase == SERVER_NEW || self->phase == SERVER_CLOSED) {
        PyErr_SetString(PyExc_RuntimeError, "the server is not running");
        return NULL;
    }
    if (server_inert(self) && !self->shutdown_done) {
        /* A forked child's copy: nothing to shut down here (the parent's
         * server goes on); report it done at once. */
        Py_CLEAR(self->shutdown_future);
        self->shutdown_started = 1;
        self->shutdown_done = 1;
        self->phase = SERVER_SHUTTING_DOWN;
    }
    if (self->shutdown_future == NULL && !self->shutdown_done) {
        self->shutdown_future = PyObject_CallMethodNoArgs(
            self->loop, self->state->str_create_future);
        if (self->shutdown_future == NULL) {
            return NULL;
        }
        if (!self->shutdown_started) {
            self->shutdown_started = 1;
            self->phase = SERVER_SHUTTING_DOWN;
            grpc_server_shutdown_and_notify(self->server, self->bridge.cq,
                                            &self->shutdown_tag);
        }
    }
    if (self->shutdown_future != NULL) {
        return Py_NewRef(self->shutdown_future);
    }
    /* Already done: an already-resolved future. */
    PyObject *fut = PyObject_CallMethodNoArgs(self->loop,
                                              self->state->str_create_future);
    if (fut == NULL) {
        return NULL;
    }
    PyObject *r = PyObject_CallMethodOneArg(fut, self->state->str_set_result,
                                            Py_None);
    if (r == NULL) {
        Py_DECREF(fut);
        return NULL;
    }
    Py_DECREF(r);
    return fut;
}

static PyObject *
server_cancel_all_calls(ServerObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->shutdown_started || self->phase == SERVER_CLOSED) {
        PyErr_SetString(PyExc_RuntimeError,
                        "cancel_all_calls() needs shutdown() first");
        return NULL;
    }
    if (server_inert(self)) {
        Py_RETURN_NONE;
    }
    grpc_server_cancel_all_calls(self->server);
    Py_RETURN_NONE;
}

/* With the poller joined (or never started), handle events on this thread
 * until `*done` is set: by the shutdown tag (shutdown_done) or by the queue
 * reporting its own shutdown (queue_shutdown_seen). */
static void
pump_queue_until(ServerObject *self, const int *done)
{
    Bridge *b = &self->bridge;
    grpc_event ev;
    if (bridge_take(b, &ev)) {
        dispatch_event(self, ev);
    }
    while (!*done) {
        ev = grpc_completion_queue_next(
            b->cq, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                gpr_time_from_millis(100, GPR_TIMESPAN)),
            NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) {
            b->queue_shutdown_seen = 1;
        }
        else if (ev.type == GRPC_OP_COMPLETE) {
            dispatch_event(self, ev);
        }
    }
}

/* Tear down the core objects (the shutdown tag has fired, or the server
 * never started). Safe to call twice. */
static void
close_core(ServerObject *self)
{
    if (self->server != NULL) {
        grpc_server_destroy(self->server);
        self->server = NULL;
    }
    if (self->bridge.cq != NULL) {
        grpc_completion_queue_shutdown(self->bridge.cq);
        Py_BEGIN_ALLOW_THREADS
        bridge_stop_and_join(&self->bridge);
        Py_END_ALLOW_THREADS
        pump_queue_until(self, &self->bridge.queue_shutdown_seen);
        bridge_destroy(&self->bridge);
    }
}

/* Shut the core down from here without the loop (never started, the
 * Python server was dropped without stop(), or stop() was cut short between
 * the shutdown tag and close()): no Python object sees a call. */
static void
force_shutdown(ServerObject *self)
{
    if (self->server == NULL) {
        return;
    }
    self->phase = SERVER_CLOSED;
    Py_CLEAR(self->shutdown_future);
    if (!self->shutdown_done) {
        if (!self->shutdown_started) {
            self->shutdown_started = 1;
            grpc_server_shutdown_and_notify(self->server, self->bridge.cq,
                                            &self->shutdown_tag);
        }
        grpc_server_cancel_all_calls(self->server);
        /* The shutdown tag is still to come, so a poller blocked in cq_next
         * returns with it (or with another event) and then sees `stop`. */
        Py_BEGIN_ALLOW_THREADS
        bridge_stop_and_join(&self->bridge);
        Py_END_ALLOW_THREADS
        pump_queue_until(self, &self->shutdown_done);
    }
    /* Once the tag has fired no event may ever come: joining a poller
     * blocked in cq_next now would wait forever. close_core shuts the queue
     * down first, which wakes it with GRPC_QUEUE_SHUTDOWN. */
    close_core(self);
}

/* Stop watching the eventfd if the loop still runs (the Python server was
 * dropped without close()); errors are ignored, e.g. a closed loop. */
static void
forget_reader(ServerObject *self)
{
    if (self->loop == NULL || self->bridge.eventfd < 0) {
        return;
    }
    PyObject *saved = take_exception();
    PyObject *fd = PyLong_FromLong(self->bridge.eventfd);
    PyObject *r = fd ? PyObject_CallMethodOneArg(
                           self->loop, self->state->str_remove_reader, fd)
                     : NULL;
    Py_XDECREF(fd);
    Py_XDECREF(r);
    PyErr_Clear();
    if (saved != NULL) {
        PyErr_SetRaisedException_compat(saved);
    }
}

/* In a forked child: let go of the core objects without calling into the
 * core (its threads did not survive the fork, and the sockets and the
 * eventfd's wake-ups belong to the parent). Closing our copy of the
 * eventfd is all; the rest is left to the child's exit on purpose. The
 * loop's reader is not removed either: the epoll set may be the parent's. */
static void
abandon_core(ServerObject *self)
{
    self->phase = SERVER_CLOSED;
    self->server = NULL;
    self->bridge.cq = NULL;
    self->bridge.thread_started = 0;
    if (self->bridge.eventfd >= 0) {
        close(self->bridge.eventfd);
        self->bridge.eventfd = -1;
    }
    Py_CLEAR(self->shutdown_future);
}

/* close(): after the shutdown future resolved: destroy the server, stop the
 * poller, release the queue and the eventfd. */
static PyObject *
server_close(ServerObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->phase == SERVER_CLOSED) {
        Py_RETURN_NONE;
    }
    if (server_inert(self)) {
        abandon_core(self);
        server_clear(self);
        Py_RETURN_NONE;
    }
    if (self->phase != SERVER_NEW && !self->shutdown_done) {
        PyErr_SetString(PyExc_RuntimeError,
                        "close() needs the shutdown future to be done");
        return NULL;
    }
    forget_reader(self);
    if (self->phase == SERVER_NEW) {
        force_shutdown(self);
    }
    else {
        self->phase = SERVER_CLOSED;
        close_core(self);
    }
    /* Nothing will be dispatched any more: drop the loop and the Python
     * server now, which also breaks the hooks <-> server cycle. */
    server_clear(self);
    Py_RETURN_NONE;
}

static PyObject *
server_get_active_calls(ServerObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->active_calls);
}

static PyObject *
server_get_phase(ServerObject *self, void *Py_UNUSED(closure))
{
    static const char *names[] = {"new", "started", "shutting_down", "closed"};
    return PyUnicode_FromString(names[self->phase]);
}

static int
server_traverse(ServerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    for (Py_ssize_t i = 0; i < self->n_methods; i++) {
        Py_VISIT(self->methods[i].path_str);
        Py_VISIT(self->methods[i].behavior);
        Py_VISIT(self->methods[i].deserializer);
        Py_VISIT(self->methods[i].serializer);
    }
    Py_VISIT(self->shutdown_future);
    Py_VISIT(self->deferred_fatal);
    for (CallObject *c = self->deferred_writers; c != NULL;
         c = c->next_deferred_writer) {
        Py_VISIT((PyObject *)c);
    }
    Py_VISIT(self->loop);
    Py_VISIT(self->create_task);
    Py_VISIT(self->call_soon);
    Py_VISIT(self->drain_cb);
    Py_VISIT(self->context_class);
    Py_VISIT(self->hooks);
    return 0;
}

static int
server_clear(ServerObject *self)
{
    /* Only references that do not keep the core alive; the method table
     * (behaviors) stays until dealloc because live requests point at it. */
    Py_CLEAR(self->loop);
    Py_CLEAR(self->create_task);
    Py_CLEAR(self->call_soon);
    Py_CLEAR(self->drain_cb);
    Py_CLEAR(self->hooks);
    take_deferred_writes(self, 0);
    return 0;
}

static void
server_dealloc(ServerObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    /* No Call object is alive here (each holds a reference to us), so a
     * forced shutdown touches no Python object but our own futures. */
    Py_CLEAR(self->hooks);
    if (server_inert(self)) {
        abandon_core(self);
    }
    if (self->phase != SERVER_CLOSED) {
        forget_reader(self);
    }
    force_shutdown(self);
    if (self->bridge.cq != NULL || self->bridge.eventfd >= 0) {
        bridge_destroy(&self->bridge);
    }
    if (self->slots != NULL) {
        for (Py_ssize_t i = 0; i < self->n_slots; i++) {
            grpc_metadata_array_destroy(&self->slots[i].metadata);
            grpc_call_details_destroy(&self->slots[i].details);
        }
        PyMem_Free(self->slots);
    }
    for (Py_ssize_t i = 0; i < self->n_methods; i++) {
        MethodEntry *m = &self->methods[i];
        PyMem_Free(m->path);
        Py_XDECREF(m->path_str);
        Py_XDECREF(m->behavior);
        Py_XDECREF(m->deserializer);
        Py_XDECREF(m->serializer);
    }
    PyMem_Free(self->methods);
    Py_CLEAR(self->shutdown_future);
    Py_CLEAR(self->context_class);
    Py_CLEAR(self->deferred_fatal);
    metrics_free(self);         /* metrics hook */
    server_clear(self);
    if (self->state != NULL && self->module != NULL) {
        self->state->live_servers--;
    }
    Py_CLEAR(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef server_methods[] = {
    {"add_http2_port", (PyCFunction)(void (*)(void))server_add_http2_port,
     METH_FASTCALL, "add_http2_port(address, credentials=None): bind an "
     "HTTP/2 port (TLS with credentials); returns the port number."},
    {"register_method", (PyCFunction)(void (*)(void))server_register_method,
     METH_FASTCALL, "Register a method (any kind) before start()."},
    {"start", (PyCFunction)(void (*)(void))server_start, METH_FASTCALL,
     "start(loop, context_class, hooks): serve on this asyncio loop."},
    {"shutdown", (PyCFunction)server_shutdown, METH_NOARGS,
     "Stop accepting RPCs; returns a future done when every call ended."},
    {"cancel_all_calls", (PyCFunction)server_cancel_all_calls, METH_NOARGS,
     "Cancel every call in flight (after shutdown())."},
    {"close", (PyCFunction)server_close, METH_NOARGS,
     "Release the core server, the poller thread and the eventfd."},
    /* metrics (metrics.c) */
    {"enable_metrics", (PyCFunction)(void (*)(void))metrics_py_enable,
     METH_FASTCALL, "enable_metrics(known_paths=()): count RPCs by method "
     "and status (after register_method(), before start())."},
    {"metrics_snapshot", (PyCFunction)metrics_py_snapshot, METH_NOARGS,
     "The RPC metrics: None while off, else a dict (see _core.pyi)."},
    {"_on_wakeup", (PyCFunction)server_on_wakeup, METH_NOARGS, NULL},
    {"_drain", (PyCFunction)server_drain, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef server_getset[] = {
    {"active_calls", (getter)server_get_active_calls, NULL,
     "RPCs accepted and not yet terminated.", NULL},
    {"phase", (getter)server_get_phase, NULL,
     "'new', 'started', 'shutting_down' or 'closed'.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef server_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(ServerObject, weakreflist),
     READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot server_slots[] = {
    {Py_tp_doc, "Server(options=(), maximum_concurrent_rpcs=0): a gRPC core "
                "server driven by an asyncio loop."},
    {Py_tp_new, server_new},
    {Py_tp_dealloc, server_dealloc},
    {Py_tp_traverse, server_traverse},
    {Py_tp_clear, server_clear},
    {Py_tp_methods, server_methods},
    {Py_tp_getset, server_getset},
    {Py_tp_members, server_members},
    {0, NULL},
};

PyType_Spec server_spec = {
    .name = "asyncgrpc._core.Server",
    .basicsize = sizeof(ServerObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = server_slots,
};
