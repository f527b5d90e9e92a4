/*
 * byte_buffer.c: grpc_byte_buffer <-> bytes, with exactly one copy each way.
 */
#include "byte_buffer.h"

#include <string.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>

PyObject *
byte_buffer_to_bytes(grpc_byte_buffer *bb)
{
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, bb)) {
        PyErr_SetString(PyExc_ValueError, "cannot read (decompress) message");
        return NULL;
    }
    size_t length = grpc_byte_buffer_length(reader.buffer_out);
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length);
    if (bytes == NULL) {
        grpc_byte_buffer_reader_destroy(&reader);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(bytes);
    size_t offset = 0;
    grpc_slice slice;
    while (grpc_byte_buffer_reader_next(&reader, &slice)) {
        size_t n = GRPC_SLICE_LENGTH(slice);
        if (offset + n > length) {      /* cannot happen; never overrun */
            n = length - offset;
        }
        memcpy(out + offset, GRPC_SLICE_START_PTR(slice), n);
        offset += n;
        grpc_slice_unref(slice);
    }
    grpc_byte_buffer_reader_destroy(&reader);
    return bytes;
}

grpc_byte_buffer *
byte_buffer_from_object(PyObject *data)
{
    grpc_slice slice;
    if (PyBytes_CheckExact(data)) {
        slice = grpc_slice_from_copied_buffer(PyBytes_AS_STRING(data),
                                              (size_t)PyBytes_GET_SIZE(data));
    }
    else {
        Py_buffer view;
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Format(PyExc_TypeError,
                         "a serialized message must be bytes, not %.100s",
                         Py_TYPE(data)->tp_name);
            return NULL;
        }
        slice = grpc_slice_from_copied_buffer(view.buf, (size_t)view.len);
        PyBuffer_Release(&view);
    }
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);    /* the buffer took its own ref (CORE_NOTES 3) */
    return bb;
}
