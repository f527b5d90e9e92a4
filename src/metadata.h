/*
 * metadata.h: gRPC metadata <-> Python tuples of (key, value) pairs.
 *
 * Keys are str. Keys ending in "-bin" carry bytes values; other keys carry
 * str values (ASCII, legal header characters).
 */
#ifndef ASYNCGRPC_METADATA_H
#define ASYNCGRPC_METADATA_H

#include "types.h"

/* A new tuple of (key, value) tuples from a received array, or NULL. */
PyObject *metadata_to_tuple(const grpc_metadata_array *array);
/* Validate and copy a Python iterable of pairs into `out` (which must be
 * empty). Returns 0, or -1 with TypeError/ValueError naming the bad entry;
 * the protocol's reserved keys (grpc-status, grpc-timeout, ...) are
 * refused. */
int metadata_from_object(PyObject *pairs, SendMetadata *out);
/* The same for metadata asyncgrpc builds itself (reserved keys allowed). */
int metadata_from_trusted(PyObject *pairs, SendMetadata *out);
/* Append copies (new slice refs) of the items of `extra` to `md`. 0 or -1. */
int metadata_append(SendMetadata *md, const SendMetadata *extra);
/* Release the slices and the array of `md` and leave it empty. */
void metadata_clear(SendMetadata *md);

#endif
