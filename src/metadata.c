/*
 * metadata.c: validation and conversion of metadata in both directions.
 * A SendMetadata owns its array and one ref on each key and value slice.
 */
#include "metadata.h"

#include <string.h>
#include <grpc/slice.h>

/* As the core decides it: a "-bin" suffix after at least one character
 * ("-bin" alone is a text key there, so it must be one here too). */
static int
is_binary_key(const char *key, Py_ssize_t len)
{
    return len > 4 && memcmp(key + len - 4, "-bin", 4) == 0;
}

PyObject *
metadata_to_tuple(const grpc_metadata_array *array)
{
    PyObject *result = PyTuple_New((Py_ssize_t)array->count);
    if (result == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < array->count; i++) {
        const grpc_metadata *md = &array->metadata[i];
        const char *k = (const char *)GRPC_SLICE_START_PTR(md->key);
        Py_ssize_t klen = (Py_ssize_t)GRPC_SLICE_LENGTH(md->key);
        const char *v = (const char *)GRPC_SLICE_START_PTR(md->value);
        Py_ssize_t vlen = (Py_ssize_t)GRPC_SLICE_LENGTH(md->value);
        PyObject *key = PyUnicode_DecodeLatin1(k, klen, NULL);
        PyObject *value = is_binary_key(k, klen)
            ? PyBytes_FromStringAndSize(v, vlen)
            : PyUnicode_DecodeLatin1(v, vlen, NULL);
        PyObject *pair = (key && value) ? PyTuple_Pack(2, key, value) : NULL;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (pair == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, (Py_ssize_t)i, pair);
    }
    return result;
}

void
metadata_clear(SendMetadata *md)
{
    for (size_t i = 0; i < md->count; i++) {
        grpc_slice_unref(md->items[i].key);
        grpc_slice_unref(md->items[i].value);
    }
    PyMem_Free(md->items);
    md->items = NULL;
    md->count = 0;
}

/* The protocol's own keys, which the core parses and acts on: from a
 * handler they are refused (a grpc-timeout in sent metadata aborts the
 * process in core 1.51; a grpc-status in the headers breaks the RPC for the
 * client). Other keys that applications set, such as
 * grpc-status-details-bin (rich error details), stay allowed. */
static const char *const RESERVED_KEYS[] = {
    "grpc-status", "grpc-message", "grpc-timeout", "grpc-encoding",
    "grpc-accept-encoding", "grpc-internal-encoding-request",
    "grpc-internal-stream-encoding-request", "grpc-previous-rpc-attempts",
    "grpc-retry-pushback-ms",
    /* Indexed by core 1.51's HPACK encoder in a way that, mixed with other
     * headers over a sequence of RPCs, desynchronizes the connection's
     * tables ("Invalid HPACK index" on the client; fuzz defect D6). */
    "grpc-tags-bin", "grpc-trace-bin", "te", "user-agent",
    NULL,
};

static int
is_reserved_key(const char *key, Py_ssize_t len)
{
    for (const char *const *r = RESERVED_KEYS; *r != NULL; r++) {
        if ((size_t)len == strlen(*r) && memcmp(key, *r, (size_t)len) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Fill item from one (key, value) pair; -1 with an exception on bad input
 * (reserved keys too, unless `allow_reserved`). */
static int
convert_pair(PyObject *pair, grpc_metadata *item, int allow_reserved)
{
    if (PySequence_Fast_GET_SIZE(pair) != 2) {
        PyErr_SetString(PyExc_TypeError,
                        "metadata must be (key, value) pairs of length 2");
        return -1;
    }
    PyObject *key = PySequence_Fast_GET_ITEM(pair, 0);
    PyObject *value = PySequence_Fast_GET_ITEM(pair, 1);
    Py_ssize_t klen;
    const char *k;
    if (PyUnicode_Check(key)) {
        k = PyUnicode_AsUTF8AndSize(key, &klen);
        if (k == NULL) {
            return -1;
        }
    }
    else if (PyBytes_Check(key)) {
        k = PyBytes_AS_STRING(key);
        klen = PyBytes_GET_SIZE(key);
    }
    else {
        PyErr_Format(PyExc_TypeError, "metadata key must be str, not %.100s",
                     Py_TYPE(key)->tp_name);
        return -1;
    }
    if (!allow_reserved && is_reserved_key(k, klen)) {
        PyErr_Format(PyExc_ValueError,
                     "metadata key %R is reserved: the gRPC protocol sets it",
                     key);
        return -1;
    }
    grpc_slice kslice = grpc_slice_from_copied_buffer(k, (size_t)klen);
    if (klen == 0 || !grpc_header_key_is_legal(kslice)) {
        grpc_slice_unref(kslice);
        PyErr_Format(PyExc_ValueError,
                     "invalid metadata key %R: keys must be non-empty and use "
                     "only lowercase letters, digits, '-', '_' and '.'", key);
        return -1;
    }
    grpc_slice vslice;
    if (is_binary_key(k, klen)) {
        Py_buffer view;
        if (PyUnicode_Check(value)) {
            Py_ssize_t vlen;
            const char *v = PyUnicode_AsUTF8AndSize(value, &vlen);
            if (v == NULL) {
                grpc_slice_unref(kslice);
                return -1;
            }
            vslice = grpc_slice_from_copied_buffer(v, (size_t)vlen);
        }
        else if (PyObject_GetBuffer(value, &view, PyBUF_SIMPLE) == 0) {
            vslice = grpc_slice_from_copied_buffer(view.buf, (size_t)view.len);
            PyBuffer_Release(&view);
        }
        else {
            grpc_slice_unref(kslice);
            PyErr_Format(PyExc_TypeError,
                         "value of binary metadata key %R must be bytes, "
                         "not %.100s", key, Py_TYPE(value)->tp_name);
            return -1;
        }
    }
    else {
        const char *v;
        Py_ssize_t vlen;
        if (PyUnicode_Check(value)) {
            v = PyUnicode_AsUTF8AndSize(value, &vlen);
            if (v == NULL) {
                grpc_slice_unref(kslice);
                return -1;
            }
        }
        else if (PyBytes_Check(value)) {
            v = PyBytes_AS_STRING(value);
            vlen = PyBytes_GET_SIZE(value);
        }
        else {
            grpc_slice_unref(kslice);
            PyErr_Format(PyExc_TypeError,
                         "value of metadata key %R must be str (only keys "
                         "ending in '-bin' carry bytes), not %.100s",
                         key, Py_TYPE(value)->tp_name);
            return -1;
        }
        vslice = grpc_slice_from_copied_buffer(v, (size_t)vlen);
        if (!grpc_header_nonbin_value_is_legal(vslice)) {
            grpc_slice_unref(kslice);
            grpc_slice_unref(vslice);
            PyErr_Format(PyExc_ValueError,
                         "invalid value for metadata key %R: only printable "
                         "ASCII is allowed (use a key ending in '-bin' for "
                         "binary data)", key);
            return -1;
        }
    }
    memset(item, 0, sizeof(*item));
    item->key = kslice;
    item->value = vslice;
    return 0;
}

static int
from_object(PyObject *pairs, SendMetadata *out, int allow_reserved)
{
    out->items = NULL;
    out->count = 0;
    if (pairs == NULL || pairs == Py_None) {
        return 0;
    }
    if (PyUnicode_Check(pairs) || PyBytes_Check(pairs)) {
        PyErr_SetString(PyExc_TypeError,
                        "metadata must be a sequence of (key, value) pairs");
        return -1;
    }
    PyObject *seq = PySequence_Fast(
        pairs, "metadata must be a sequence of (key, value) pairs");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n == 0) {
        Py_DECREF(seq);
        return 0;
    }
    out->items = PyMem_Calloc((size_t)n, sizeof(grpc_metadata));
    if (out->items == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *pair = NULL;
        if (PyUnicode_Check(item) || PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError,
                         "metadata must be (key, value) pairs, got %R", item);
        }
        else {
            pair = PySequence_Fast(item, "metadata must be (key, value) pairs");
        }
        if (pair == NULL ||
            convert_pair(pair, &out->items[i], allow_reserved) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(seq);
            metadata_clear(out);
            return -1;
        }
        Py_DECREF(pair);
        out->count = (size_t)i + 1;
    }
    Py_DECREF(seq);
    return 0;
}

int
metadata_from_object(PyObject *pairs, SendMetadata *out)
{
    return from_object(pairs, out, 0);
}

int
metadata_from_trusted(PyObject *pairs, SendMetadata *out)
{
    return from_object(pairs, out, 1);
}

int
metadata_append(SendMetadata *md, const SendMetadata *extra)
{
    if (extra->count == 0) {
        return 0;
    }
    grpc_metadata *items = PyMem_Realloc(
        md->items, (md->count + extra->count) * sizeof(grpc_metadata));
    if (items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    md->items = items;
    for (size_t i = 0; i < extra->count; i++) {
        grpc_metadata *item = &md->items[md->count + i];
        memset(item, 0, sizeof(*item));
        item->key = grpc_slice_ref(extra->items[i].key);
        item->value = grpc_slice_ref(extra->items[i].value);
    }
    md->count += extra->count;
    return 0;
}
