/*
 * waiter.c: the Waiter type, a reusable awaitable for streaming messages.
 *
 * context.read() and context.write() return the call's Waiter instead of a
 * new asyncio.Future per message: one object per call and direction, reset
 * for each message, so a stream allocates nothing of ours per message.
 *
 * It speaks the protocol asyncio.Task uses for "Future-compatible" objects:
 * `await` yields the Waiter itself with _asyncio_future_blocking set; the
 * task registers its wake-up with add_done_callback(fn, context=ctx); when
 * the batch completes, waiter_set_result()/waiter_set_exception() schedule
 * the callbacks with loop.call_soon; the task then calls result() and
 * resumes the coroutine, whose next iteration returns the value. cancel()
 * (the task being cancelled) ends the wait with CancelledError. It also has
 * the rest of the Future API (done, cancelled, exception, get_loop,
 * remove_done_callback) for asyncio.wait_for, gather and friends.
 *
 * A Waiter is reset (waiter_reset) only when its previous operation has
 * completed, so at most one operation is ever attached to it.
 */
#include "waiter.h"

#include "utils.h"

enum { WAITER_IDLE = 0, WAITER_PENDING, WAITER_DONE, WAITER_CANCELLED };

struct WaiterObject {
    PyObject_HEAD
    PyObject *loop;
    int state;
    int blocking;               /* _asyncio_future_blocking */
    PyObject *result;           /* when DONE without exception */
    PyObject *exception;        /* when DONE with an exception */
    PyObject *callbacks;        /* list of (fn, context) tuples, or NULL */
    PyObject *cancel_msg;
};

static int
waiter_traverse(WaiterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->loop);
    Py_VISIT(self->result);
    Py_VISIT(self->exception);
    Py_VISIT(self->callbacks);
    Py_VISIT(self->cancel_msg);
    return 0;
}

static int
waiter_clear(WaiterObject *self)
{
    Py_CLEAR(self->loop);
    Py_CLEAR(self->result);
    Py_CLEAR(self->exception);
    Py_CLEAR(self->callbacks);
    Py_CLEAR(self->cancel_msg);
    return 0;
}

static void
waiter_dealloc(WaiterObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    waiter_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

PyObject *
waiter_new(ModuleState *st, PyObject *loop)
{
    WaiterObject *self = PyObject_GC_New(WaiterObject, st->waiter_type);
    if (self == NULL) {
        return NULL;
    }
    self->loop = Py_NewRef(loop);
    self->state = WAITER_IDLE;
    self->blocking = 0;
    self->result = NULL;
    self->exception = NULL;
    self->callbacks = NULL;
    self->cancel_msg = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

void
waiter_reset(PyObject *w)
{
    WaiterObject *self = (WaiterObject *)w;
    self->state = WAITER_PENDING;
    self->blocking = 0;
    Py_CLEAR(self->result);
    Py_CLEAR(self->exception);
    Py_CLEAR(self->callbacks);
    Py_CLEAR(self->cancel_msg);
}

int
waiter_is_pending(PyObject *w)
{
    return ((WaiterObject *)w)->state == WAITER_PENDING;
}

/* Schedule every callback with loop.call_soon(fn, self, context=ctx). */
static int
schedule_callbacks(WaiterObject *self, ModuleState *st)
{
    PyObject *callbacks = self->callbacks;
    self->callbacks = NULL;
    if (callbacks == NULL) {
        return 0;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(callbacks); i++) {
        PyObject *entry = PyList_GET_ITEM(callbacks, i);
        PyObject *fn = PyTuple_GET_ITEM(entry, 0);
        PyObject *ctx = PyTuple_GET_ITEM(entry, 1);
        PyObject *call_soon = PyObject_GetAttr(self->loop, st->str_call_soon);
        PyObject *r = NULL;
        if (call_soon != NULL) {
            /* call_soon(fn, self[, context=ctx]): with kwnames the keyword
             * values follow the positional ones in args. */
            PyObject *args[3] = {fn, (PyObject *)self, ctx};
            r = PyObject_Vectorcall(call_soon, args, 2,
                                    ctx == Py_None ? NULL : st->kwnames_context);
            Py_DECREF(call_soon);
        }
        if (r == NULL) {
            rc = -1;
            break;
        }
        Py_DECREF(r);
    }
    Py_DECREF(callbacks);
    return rc;
}

int
waiter_set_result(PyObject *w, ModuleState *st, PyObject *value)
{
    WaiterObject *self = (WaiterObject *)w;
    if (self->state != WAITER_PENDING) {
        return 0;               /* cancelled by its awaiter meanwhile */
    }
    self->state = WAITER_DONE;
    Py_XSETREF(self->result, Py_NewRef(value));
    return schedule_callbacks(self, st);
}

int
waiter_set_exception(PyObject *w, ModuleState *st, PyObject *exc)
{
    WaiterObject *self = (WaiterObject *)w;
    if (self->state != WAITER_PENDING) {
        return 0;
    }
    self->state = WAITER_DONE;
    Py_XSETREF(self->exception, Py_NewRef(exc));
    return schedule_callbacks(self, st);
}

int
waiter_set_cancelled(PyObject *w, ModuleState *st)
{
    WaiterObject *self = (WaiterObject *)w;
    if (self->state != WAITER_PENDING) {
        return 0;
    }
    self->state = WAITER_CANCELLED;
    return schedule_callbacks(self, st);
}

static ModuleState *
waiter_state(WaiterObject *self)
{
    return state_from_type(Py_TYPE(self));
}

/* Raise what the awaiting coroutine should see; NULL always. */
static PyObject *
raise_outcome(WaiterObject *self)
{
    if (self->state == WAITER_CANCELLED) {
        PyObject *cls = waiter_state(self)->cancelled_error;
        if (self->cancel_msg != NULL && self->cancel_msg != Py_None) {
            PyErr_SetObject(cls, self->cancel_msg);
        }
        else {
            PyErr_SetNone(cls);
        }
        return NULL;
    }
    PyObject *exc = self->exception;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    return NULL;
}

/* ---- the Future API ---- */

static PyObject *
waiter_result(WaiterObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->state == WAITER_DONE && self->exception == NULL) {
        return Py_NewRef(self->result ? self->result : Py_None);
    }
    if (self->state == WAITER_DONE || self->state == WAITER_CANCELLED) {
        return raise_outcome(self);
    }
    PyErr_SetString(PyExc_RuntimeError, "Result is not ready.");
    return NULL;
}

static PyObject *
waiter_exception(WaiterObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->state == WAITER_CANCELLED) {
        return raise_outcome(self);
    }
    if (self->state != WAITER_DONE) {
        PyErr_SetString(PyExc_RuntimeError, "Exception is not set.");
        return NULL;
    }
    return Py_NewRef(self->exception ? self->exception : Py_None);
}

static PyObject *
waiter_done(WaiterObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->state == WAITER_DONE ||
                           self->state == WAITER_CANCELLED);
}

static PyObject *
waiter_cancelled(WaiterObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->state == WAITER_CANCELLED);
}

static PyObject *
waiter_get_loop(WaiterObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self->loop);
}

static PyObject *
waiter_cancel(WaiterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"msg", NULL};
    PyObject *msg = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:cancel", kwlist, &msg)) {
        return NULL;
    }
    if (self->state != WAITER_PENDING) {
        Py_RETURN_FALSE;
    }
    self->state = WAITER_CANCELLED;
    Py_XSETREF(self->cancel_msg, Py_NewRef(msg));
    if (schedule_callbacks(self, waiter_state(self)) < 0) {
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *
waiter_add_done_callback(WaiterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fn", "context", NULL};
    PyObject *fn, *ctx = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$O:add_done_callback",
                                     kwlist, &fn, &ctx)) {
        return NULL;
    }
    PyObject *entry = PyTuple_Pack(2, fn, ctx);
    if (entry == NULL) {
        return NULL;
    }
    if (self->state == WAITER_DONE || self->state == WAITER_CANCELLED) {
        /* Already over: schedule it now, as asyncio.Future does. */
        PyObject *list = PyList_New(1);
        if (list == NULL) {
            Py_DECREF(entry);
            return NULL;
        }
        PyList_SET_ITEM(list, 0, entry);
        Py_XSETREF(self->callbacks, list);
        if (schedule_callbacks(self, waiter_state(self)) < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (self->callbacks == NULL && (self->callbacks = PyList_New(0)) == NULL) {
        Py_DECREF(entry);
        return NULL;
    }
    int rc = PyList_Append(self->callbacks, entry);
    Py_DECREF(entry);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
waiter_remove_done_callback(WaiterObject *self, PyObject *fn)
{
    Py_ssize_t removed = 0;
    if (self->callbacks != NULL) {
        PyObject *kept = PyList_New(0);
        if (kept == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->callbacks); i++) {
            PyObject *entry = PyList_GET_ITEM(self->callbacks, i);
            int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(entry, 0), fn,
                                              Py_EQ);
            if (eq < 0) {
                Py_DECREF(kept);
                return NULL;
            }
            if (eq) {
                removed++;
            }
            else if (PyList_Append(kept, entry) < 0) {
                Py_DECREF(kept);
                return NULL;
            }
        }
        Py_SETREF(self->callbacks, kept);
    }
    return PyLong_FromSsize_t(removed);
}

/* ---- await ---- */

static PyObject *
waiter_await(WaiterObject *self)
{
    return Py_NewRef(self);
}

static PyObject *
waiter_iternext(WaiterObject *self)
{
    if (self->state == WAITER_PENDING) {
        /* Suspend the task on us (it reads _asyncio_future_blocking). */
        self->blocking = 1;
        return Py_NewRef(self);
    }
    if (self->state == WAITER_DONE && self->exception == NULL) {
        PyObject *value = self->result ? self->result : Py_None;
        if (value == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        else {
            /* StopIteration(value), safe for tuples and exceptions too. */
            PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
            if (stop == NULL) {
                return NULL;
            }
            PyErr_SetObject(PyExc_StopIteration, stop);
            Py_DECREF(stop);
        }
        return NULL;
    }
    if (self->state == WAITER_IDLE) {
        PyErr_SetString(PyExc_RuntimeError, "nothing to wait for");
        return NULL;
    }
    return raise_outcome(self);
}

static PyObject *
get_blocking(WaiterObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->blocking);
}

static int
set_blocking(WaiterObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    int v = value ? PyObject_IsTrue(value) : 0;
    if (v < 0) {
        return -1;
    }
    self->blocking = v;
    return 0;
}

static PyMethodDef waiter_methods[] = {
    {"result", (PyCFunction)waiter_result, METH_NOARGS, NULL},
    {"exception", (PyCFunction)waiter_exception, METH_NOARGS, NULL},
    {"done", (PyCFunction)waiter_done, METH_NOARGS, NULL},
    {"cancelled", (PyCFunction)waiter_cancelled, METH_NOARGS, NULL},
    {"cancel", (PyCFunction)(void (*)(void))waiter_cancel,
     METH_VARARGS | METH_KEYWORDS, NULL},
    {"get_loop", (PyCFunction)waiter_get_loop, METH_NOARGS, NULL},
    {"add_done_callback", (PyCFunction)(void (*)(void))waiter_add_done_callback,
     METH_VARARGS | METH_KEYWORDS, NULL},
    {"remove_done_callback", (PyCFunction)waiter_remove_done_callback, METH_O,
     NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef waiter_getset[] = {
    {"_asyncio_future_blocking", (getter)get_blocking, (setter)set_blocking,
     NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot waiter_slots[] = {
    {Py_tp_doc, "The awaitable of one streaming read or write (reused)."},
    {Py_tp_dealloc, waiter_dealloc},
    {Py_tp_traverse, waiter_traverse},
    {Py_tp_clear, waiter_clear},
    {Py_tp_methods, waiter_methods},
    {Py_tp_getset, waiter_getset},
    {Py_tp_iter, waiter_await},
    {Py_tp_iternext, waiter_iternext},
    {Py_am_await, waiter_await},
    {0, NULL},
};

PyType_Spec waiter_spec = {
    .name = "asyncgrpc._core.Waiter",
    .basicsize = sizeof(WaiterObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = waiter_slots,
};
