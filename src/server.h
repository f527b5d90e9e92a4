/*
 * server.h: the Server type (a grpc_server served from an asyncio loop).
 */
#ifndef ASYNCGRPC_SERVER_H
#define ASYNCGRPC_SERVER_H

#include "types.h"

extern PyType_Spec server_spec;

/* Fork safety (DESIGN 5: a forked child's copy of a server is inert).
 * server_fork_generation() changes in every child process; a server made
 * in an earlier generation neither polls, nor answers, nor calls into the
 * core (whose threads did not survive the fork), and its teardown only
 * releases memory. server_register_atfork() installs the hook (once per
 * process; 0 or an errno). */
int server_register_atfork(void);
unsigned server_fork_generation(void);
static inline int
server_inert(const ServerObject *self)
{
    return self->fork_generation != server_fork_generation();
}

/* KeyboardInterrupt and SystemExit raised by Python code that the drain runs
 * (a deserializer, a generic handler's service(), a serializer, a done
 * callback) are not RPC errors: the RPC ends with a status, and the
 * exception is kept here to be raised from the loop callback that is
 * running (_drain, _on_wakeup, a task's done callback), as asyncio does for
 * task code. Returns 1 if `exc` is such an exception (then kept: the first
 * one wins), 0 otherwise. Does not consume `exc`. */
int server_defer_fatal(ServerObject *self, PyObject *exc);
/* An exception is set: keep it as above if it is KeyboardInterrupt or
 * SystemExit, else PyErr_WriteUnraisable(obj). Clears the indicator. */
void server_write_unraisable(ServerObject *self, PyObject *obj);
/* Raise the kept exception, if any: returns -1 with it set, or 0. */
int server_raise_deferred(ServerObject *self);

/* A streaming call finished a write and has more queued: its next write
 * starts at the drain's next empty poll (server_drain), not at once, so a
 * handler that writes without pause cannot keep the completion queue busy
 * forever: the empty polls are where the core reads the sockets (cancels,
 * other clients, pings). Takes a reference to `call` until then. */
void server_defer_write(ServerObject *self, CallObject *call);

#endif
