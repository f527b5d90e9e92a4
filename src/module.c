/*
 * module.c: the asyncgrpc._core module: multi-phase init, module state,
 * the gRPC library's init/shutdown and the process-wide counters.
 *
 * grpc_init() runs once per module object (exec) and grpc_shutdown() when
 * the module is freed, and only if no server outlived it.
 */
#include "types.h"

#include <errno.h>
#include <stdlib.h>

#include "call.h"
#include "ready.h"
#include "server.h"
#include "utils.h"

#ifdef ASYNCGRPC_BUNDLED_GRPCIO
/* The bundled core (gRPC 1.85) reads sockets on its EventEngine threads,
 * which then hand every call to the loop thread: on the one CPU a server
 * usually gets, that is two more thread switches per RPC (unary 10x10:
 * about 40k req/s, against 65k with the iomgr transport, which our
 * completion-queue polls drive; RESULTS.md, "Both cores"). Unless the user
 * chose experiments, the listener and the endpoints stay on iomgr. The core
 * reads GRPC_EXPERIMENTS once, while this library is loaded (its static
 * initializers) or at the latest in grpc_init(): the variable is set by a
 * constructor that runs before them and removed again once grpc_init() has
 * run, so a grpcio in the same process keeps its own defaults. */
#define BUNDLED_CORE_EXPERIMENTS \
    "-event_engine_listener,-event_engine_for_all_other_endpoints"
static int experiments_set_here;   /* plain C, set before any Python runs */

__attribute__((constructor(101))) static void
choose_core_experiments(void)
{
    if (getenv("GRPC_EXPERIMENTS") == NULL &&
        setenv("GRPC_EXPERIMENTS", BUNDLED_CORE_EXPERIMENTS, 0) == 0) {
        experiments_set_here = 1;
    }
}
#endif

static PyObject *
core_stats(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    ModuleState *st = PyModule_GetState(module);
    Counters *c = &st->counters;
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsi}",
        "events", (unsigned long long)c->events,
        "events_inline", (unsigned long long)c->events_inline,
        "events_via_ring", (unsigned long long)c->events_via_ring,
        "eventfd_writes",
        (unsigned long long)__atomic_load_n(&c->eventfd_writes, __ATOMIC_RELAXED),
        "wakeups", (unsigned long long)c->wakeups,
        "drains", (unsigned long long)c->drains,
        "baton_to_poller", (unsigned long long)c->baton_to_poller,
        "rpcs_started", (unsigned long long)c->rpcs_started,
        "rpcs_finished", (unsigned long long)c->rpcs_finished,
        "rpcs_rejected", (unsigned long long)c->rpcs_rejected,
        "live_servers", st->live_servers);
}

/* configure(usage_error, eof): the Python package hands over the objects
 * the C fast paths of read()/write() need. */
static PyObject *
core_configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    ModuleState *st = PyModule_GetState(module);
    if (nargs != 2 || !PyExceptionClass_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(usage_error: type, eof: object)");
        return NULL;
    }
    Py_XSETREF(st->usage_error, Py_NewRef(args[0]));
    Py_XSETREF(st->eof, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static PyObject *
core_grpc_version(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(grpc_version_string());
}

/* _inject_post_failures(n): test hook: the next n posts of a request slot
 * fail as if the core refused them (the refusal path cannot be reached from
 * the wire). */
static PyObject *
core_inject_post_failures(PyObject *module, PyObject *arg)
{
    ModuleState *st = PyModule_GetState(module);
    int n = as_int(arg);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    st->inject_post_failures = n < 0 ? 0 : n;
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"stats", core_stats, METH_NOARGS,
     "Process-wide counters of the bridge and the RPCs (a dict of ints)."},
    {"configure", (PyCFunction)(void (*)(void))core_configure, METH_FASTCALL,
     "configure(usage_error, eof): objects used by Call.read()/write()."},
    {"grpc_version", core_grpc_version, METH_NOARGS,
     "The version of the gRPC C core this module runs on."},
    {"core_version", core_grpc_version, METH_NOARGS,
     "grpc_version_string() of the linked gRPC C core (e.g. '29.0.0')."},
    {"_inject_post_failures", core_inject_post_failures, METH_O,
     "Test hook: make the next n request-slot posts fail."},
    {NULL, NULL, 0, NULL},
};

static int
intern(PyObject **slot, const char *s)
{
    *slot = PyUnicode_InternFromString(s);
    return *slot == NULL ? -1 : 0;
}

static int
core_exec(PyObject *module)
{
    ModuleState *st = PyModule_GetState(module);
    memset(&st->counters, 0, sizeof(st->counters));
    if (intern(&st->str_add_done_callback, "add_done_callback") < 0 ||
        intern(&st->str_add_reader, "add_reader") < 0 ||
        intern(&st->str_call_soon, "call_soon") < 0 ||
        intern(&st->str_cancel, "cancel") < 0 ||
        intern(&st->str_create_future, "create_future") < 0 ||
        intern(&st->str_create_task, "create_task") < 0 ||
        intern(&st->str_dispatch_generic, "_dispatch_generic") < 0 ||
        intern(&st->str_done, "done") < 0 ||
        intern(&st->str_drain, "_drain") < 0 ||
        intern(&st->str_on_task_done, "_on_task_done") < 0 ||
        intern(&st->str_on_wakeup, "_on_wakeup") < 0 ||
        intern(&st->str_remove_reader, "remove_reader") < 0 ||
        intern(&st->str_report, "_report") < 0 ||
        intern(&st->str_result, "result") < 0 ||
        intern(&st->str_run_done_callbacks, "_run_done_callbacks") < 0 ||
        intern(&st->str_set_exception, "set_exception") < 0 ||
        intern(&st->str_set_result, "set_result") < 0) {
        return -1;
    }
    st->kwnames_name = Py_BuildValue("(s)", "name");
    st->empty_tuple = PyTuple_New(0);
    if (st->kwnames_name == NULL || st->empty_tuple == NULL) {
        return -1;
    }
    PyObject *exceptions = PyImport_ImportModule("asyncio.exceptions");
    if (exceptions == NULL) {
        return -1;
    }
    st->cancelled_error = PyObject_GetAttrString(exceptions, "CancelledError");
    Py_DECREF(exceptions);
    if (st->cancelled_error == NULL) {
        return -1;
    }
    st->call_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &call_spec,
                                                             NULL);
    if (st->call_type == NULL ||
        PyModule_AddType(module, st->call_type) < 0) {
        return -1;
    }
    st->ready_type = (PyTypeObject *)PyType_FromModuleAndSpec(module,
                                                              &ready_spec, NULL);
    if (st->ready_type == NULL ||
        PyModule_AddType(module, st->ready_type) < 0 ||
        (st->ready_none = ready_new(st, Py_None)) == NULL) {
        return -1;
    }
    st->server_type = (PyTypeObject *)PyType_FromModuleAndSpec(
        module, &server_spec, NULL);
    if (st->server_type == NULL ||
        PyModule_AddType(module, st->server_type) < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "REQUESTS_PER_METHOD", 64) < 0) {
        return -1;
    }
    /* The grpcio release whose C core is linked in (ASYNCGRPC_BUNDLED_CORE=1
     * builds, defined by setup.py), or None for a system libgrpc. */
#ifdef ASYNCGRPC_BUNDLED_GRPCIO
    if (PyModule_AddStringConstant(module, "BUNDLED_CORE",
                                   ASYNCGRPC_BUNDLED_GRPCIO) < 0) {
        return -1;
    }
#else
    if (PyModule_AddObjectRef(module, "BUNDLED_CORE", Py_None) < 0) {
        return -1;
    }
#endif
    /* The names of asyncgrpc's patches compiled into a bundled core
     * (scripts/core_patches.py; setup.py defines them space-separated), an
     * empty tuple for a system libgrpc. Tests ask it what the core does. */
#ifndef ASYNCGRPC_CORE_PATCHES
#define ASYNCGRPC_CORE_PATCHES ""
#endif
    PyObject *patches = PyTuple_New(0);
    if (patches == NULL) {
        return -1;
    }
    if (ASYNCGRPC_CORE_PATCHES[0] != '\0') {
        PyObject *names = PyUnicode_FromString(ASYNCGRPC_CORE_PATCHES);
        PyObject *list = names ? PyUnicode_Split(names, NULL, -1) : NULL;
        Py_XDECREF(names);
        Py_SETREF(patches, list ? PyList_AsTuple(list) : NULL);
        Py_XDECREF(list);
        if (patches == NULL) {
            return -1;
        }
    }
    int added = PyModule_AddObjectRef(module, "CORE_PATCHES", patches);
    Py_DECREF(patches);
    if (added < 0) {
        return -1;
    }
    int err = server_register_atfork();
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    grpc_init();
#ifdef ASYNCGRPC_BUNDLED_GRPCIO
    if (experiments_set_here) {
        /* The core has read its configuration (see choose_core_experiments). */
        unsetenv("GRPC_EXPERIMENTS");
        experiments_set_here = 0;
    }
#endif
    st->grpc_initialized = 1;
    st->fork_generation = server_fork_generation();
    return 0;
}

static int
core_traverse(PyObject *module, visitproc visit, void *arg)
{
    ModuleState *st = PyModule_GetState(module);
    Py_VISIT(st->server_type);
    Py_VISIT(st->call_type);
    Py_VISIT(st->ready_type);
    Py_VISIT(st->ready_none);
    Py_VISIT(st->cancelled_error);
    Py_VISIT(st->usage_error);
    Py_VISIT(st->eof);
    return 0;
}

static int
core_clear(PyObject *module)
{
    ModuleState *st = PyModule_GetState(module);
    Py_CLEAR(st->server_type);
    Py_CLEAR(st->call_type);
    Py_CLEAR(st->ready_none);
    Py_CLEAR(st->ready_type);
    Py_CLEAR(st->cancelled_error);
    Py_CLEAR(st->usage_error);
    Py_CLEAR(st->eof);
    Py_CLEAR(st->str_add_done_callback);
    Py_CLEAR(st->str_add_reader);
    Py_CLEAR(st->str_call_soon);
    Py_CLEAR(st->str_cancel);
    Py_CLEAR(st->str_create_future);
    Py_CLEAR(st->str_create_task);
    Py_CLEAR(st->str_dispatch_generic);
    Py_CLEAR(st->str_done);
    Py_CLEAR(st->str_drain);
    Py_CLEAR(st->str_on_task_done);
    Py_CLEAR(st->str_on_wakeup);
    Py_CLEAR(st->str_remove_reader);
    Py_CLEAR(st->str_report);
    Py_CLEAR(st->str_result);
    Py_CLEAR(st->str_run_done_callbacks);
    Py_CLEAR(st->str_set_exception);
    Py_CLEAR(st->str_set_result);
    Py_CLEAR(st->kwnames_name);
    Py_CLEAR(st->empty_tuple);
    return 0;
}

static void
core_free(void *module)
{
    ModuleState *st = PyModule_GetState((PyObject *)module);
    core_clear((PyObject *)module);
    /* A server still alive keeps the library in use: leave it to exit. */
    /* Nor in a forked child: the library's threads are the parent's. */
    if (st->grpc_initialized && st->live_servers == 0 &&
        st->fork_generation == server_fork_generation()) {
        st->grpc_initialized = 0;
        grpc_shutdown();
    }
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asyncgrpc._core",
    .m_doc = "The C core of asyncgrpc: a gRPC server on an asyncio loop.",
    .m_size = sizeof(ModuleState),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
