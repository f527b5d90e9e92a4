/*
 * utils.h: small helpers shared by the C files (no state of their own).
 */
#ifndef ASYNCGRPC_UTILS_H
#define ASYNCGRPC_UTILS_H

#include "types.h"

/* The module state of the module that defined `type` (a heap type of ours). */
static inline ModuleState *
state_from_type(PyTypeObject *type)
{
    return (ModuleState *)PyType_GetModuleState(type);
}

/* Recover the struct that embeds `member` at `field`. */
#define CONTAINER_OF(ptr, type, field) \
    ((type *)((char *)(ptr) - offsetof(type, field)))

/* Seconds from now until a monotonic deadline; +inf for an infinite one. */
static inline double
seconds_until(gpr_timespec deadline)
{
    if (gpr_time_cmp(deadline, gpr_inf_future(deadline.clock_type)) == 0) {
        return Py_HUGE_VAL;
    }
    gpr_timespec now = gpr_now(deadline.clock_type);
    return gpr_timespec_to_micros(gpr_time_sub(deadline, now)) / 1e6;
}

/* Take the raised exception (normalized, with its traceback attached) and
 * clear the error indicator. Returns a new reference, never NULL if an
 * exception was set. */
static inline PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* KeyboardInterrupt or SystemExit: what asyncio lets through task code. */
static inline int
is_fatal_exception(PyObject *exc)
{
    return exc != NULL &&
           (PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt) ||
            PyErr_GivenExceptionMatches(exc, PyExc_SystemExit));
}

/* An int from a Python int, or -1 with an exception (check PyErr_Occurred). */
static inline int
as_int(PyObject *obj)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value out of range for an int");
        return -1;
    }
    return (int)v;
}

/* Raise `exc` again (a reference taken by take_exception(); consumed). */
static inline void
PyErr_SetRaisedException_compat(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    if (exc == NULL) {
        PyErr_SetString(PyExc_SystemError, "no exception to raise");
        return;
    }
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc,
                  PyException_GetTraceback(exc));
#endif
}

#endif
