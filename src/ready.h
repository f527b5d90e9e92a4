/*
 * ready.h: the Ready type, an awaitable that is already done.
 */
#ifndef ASYNCGRPC_READY_H
#define ASYNCGRPC_READY_H

#include "types.h"

extern PyType_Spec ready_spec;

/* A new Ready whose await gives `value` (a new reference, or NULL with an
 * exception). For None, use the module state's shared ready_none. */
PyObject *ready_new(ModuleState *st, PyObject *value);

#endif
