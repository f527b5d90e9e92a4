/*
 * byte_buffer.h: conversion between grpc_byte_buffer and Python bytes.
 */
#ifndef ASYNCGRPC_BYTE_BUFFER_H
#define ASYNCGRPC_BYTE_BUFFER_H

#include "types.h"

/* A new bytes object with the whole (decompressed) contents of `bb`, or NULL
 * with an exception set. Does not take ownership of `bb`. */
PyObject *byte_buffer_to_bytes(grpc_byte_buffer *bb);
/* A new byte buffer holding a copy of `data` (bytes, bytearray or any
 * buffer), or NULL with TypeError set. The caller destroys it. */
grpc_byte_buffer *byte_buffer_from_object(PyObject *data);

#endif
