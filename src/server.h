/*
 * server.h: the Server type (a grpc_server served from an asyncio loop).
 */
#ifndef ASYNCGRPC_SERVER_H
#define ASYNCGRPC_SERVER_H

#include "types.h"

extern PyType_Spec server_spec;

#endif
