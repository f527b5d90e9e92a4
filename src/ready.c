/*
 * ready.c: Ready, an awaitable whose result is already there.
 *
 * Call.write() below the write queue's high-water mark and Call.read() of a
 * message that has already arrived return one of these instead of an
 * asyncio.Future: `await` on it returns its value at once, without
 * suspending the task or scheduling anything on the loop (a Future costs
 * an allocation, a done callback and a task wake-up per message).
 *
 * `await ready` runs am_send (PyIter_Send, the path of the SEND opcode),
 * which returns the value directly; __next__ raises StopIteration(value) for
 * code that iterates by hand. A Ready is immutable and may be awaited any
 * number of times; the module keeps one for None (ModuleState.ready_none).
 */
#include "ready.h"

#include "utils.h"

typedef struct {
    PyObject_HEAD
    PyObject *value;             /* strong ref, never NULL */
} ReadyObject;

PyObject *
ready_new(ModuleState *st, PyObject *value)
{
    PyTypeObject *tp = st->ready_type;
    ReadyObject *self = (ReadyObject *)tp->tp_alloc(tp, 0);
    if (self == NULL) {
        return NULL;
    }
    self->value = Py_NewRef(value);
    return (PyObject *)self;
}

static PyObject *
ready_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PySendResult
ready_send(PyObject *self, PyObject *arg, PyObject **result)
{
    (void)arg;
    *result = Py_NewRef(((ReadyObject *)self)->value);
    return PYGEN_RETURN;
}

static PyObject *
ready_next(PyObject *self)
{
    PyObject *value = ((ReadyObject *)self)->value;
    if (value == Py_None) {
        return NULL;   /* StopIteration without a value: None */
    }
    /* Wrap the value, so a tuple or an exception is not taken as args. */
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

static int
ready_traverse(ReadyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->value);
    return 0;
}

static int
ready_clear(ReadyObject *self)
{
    Py_CLEAR(self->value);
    return 0;
}

static void
ready_dealloc(ReadyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    ready_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
ready_repr(ReadyObject *self)
{
    return PyUnicode_FromFormat("<asyncgrpc Ready %R>", self->value);
}

static PyType_Slot ready_slots[] = {
    {Py_am_await, ready_await},
    {Py_am_send, ready_send},
    {Py_tp_iter, ready_await},
    {Py_tp_iternext, ready_next},
    {Py_tp_traverse, ready_traverse},
    {Py_tp_clear, ready_clear},
    {Py_tp_dealloc, ready_dealloc},
    {Py_tp_repr, ready_repr},
    {Py_tp_doc, (void *)"An awaitable that is already done (Call.read() and "
                "Call.write() return it when nothing needs to wait)."},
    {0, NULL},
};

PyType_Spec ready_spec = {
    .name = "asyncgrpc._core.Ready",
    .basicsize = sizeof(ReadyObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = ready_slots,
};
