/*
 * call.h: one server-side RPC (the Call type, base of ServicerContext).
 */
#ifndef ASYNCGRPC_CALL_H
#define ASYNCGRPC_CALL_H

#include "types.h"

extern PyType_Spec call_spec;

/* A new Call (of the server's context class) for a call the core handed us.
 * Takes ownership of `c` and moves the entries of `md` (left empty). */
CallObject *call_new(ServerObject *server, MethodEntry *method,
                     PyObject *method_str, grpc_call *c,
                     gpr_timespec deadline, grpc_metadata_array *md);
/* Start RECV_CLOSE_ON_SERVER, so that a cancel or a deadline is seen at once. */
int call_start_recv_close(CallObject *self);
/* Deserialize `payload` (bytes, or NULL if the client sent none; ignored
 * for request-streaming methods, whose handler gets None and reads itself),
 * call the behavior and schedule its task; every failure ends the RPC with a
 * status. */
void call_run_handler(CallObject *self, PyObject *behavior,
                      PyObject *deserializer, PyObject *serializer,
                      PyObject *payload);
/* End the RPC with a status and no message. 0, or -1 if it is already over. */
int call_finish_status(CallObject *self, grpc_status_code code,
                       const char *details);

/* Start the next queued write of a call the server deferred (see
 * server_defer_write), or drop the queue if the RPC is over. */
void call_resume_write(CallObject *self);

#endif
