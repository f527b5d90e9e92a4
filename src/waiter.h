/*
 * waiter.h: the Waiter type, the reusable awaitable of streaming reads and
 * writes (one per call and direction instead of a Future per message).
 */
#ifndef ASYNCGRPC_WAITER_H
#define ASYNCGRPC_WAITER_H

#include "types.h"

typedef struct WaiterObject WaiterObject;

extern PyType_Spec waiter_spec;

/* A new idle Waiter bound to `loop`, or NULL with an exception. */
PyObject *waiter_new(ModuleState *st, PyObject *loop);
/* Make it pending for a new operation (the previous one has completed). */
void waiter_reset(PyObject *w);
int waiter_is_pending(PyObject *w);
/* End the pending operation (no-op if its awaiter cancelled it meanwhile)
 * and schedule the callbacks. 0, or -1 with an exception. */
int waiter_set_result(PyObject *w, ModuleState *st, PyObject *value);
int waiter_set_exception(PyObject *w, ModuleState *st, PyObject *exc);
/* End it with CancelledError (the RPC is gone). */
int waiter_set_cancelled(PyObject *w, ModuleState *st);

#endif
