"""TensorProto <-> numpy, written the way TensorFlow Serving writes its responses.

TensorFlow Serving fills a PredictResponse with `Tensor::AsProtoField`: the
values go to the repeated field of their type (`float_val`, `int_val`,
`string_val`, ...), not to `tensor_content`, which is what
`tf.make_tensor_proto` uses for numbers. Clients that read
`response.outputs["scores"].float_val` directly rely on that, so
`to_proto` writes the typed fields. `to_ndarray` reads both forms (requests
come either way) with TensorFlow's rule that a field with fewer values than
the shape repeats its last value.

This is also the gRPC server's per-request path: a few numpy calls instead of
the general machinery of tf.make_ndarray / tf.make_tensor_proto, which cost
more than the rest of a request's Python work once TensorFlow's threads have
run in between. Dtypes without a typed field here (complex, bfloat16,
resources, variants) fall back to TensorFlow's functions.
"""

from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

# dtype enum -> (numpy dtype, the TensorProto field AsProtoField writes its values to)
_FIELDS = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
    types_pb2.DT_HALF: (np.dtype(np.float16), "half_val"),  # the float16 bit patterns, as ints
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
}
_ENUMS = {dtype: enum for enum, (dtype, _) in _FIELDS.items()}


def to_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """The array a TensorProto holds; strings come back as an object array of bytes.

    Raises:
        ValueError: the proto holds more values than its shape has elements.
    """
    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.dtype == types_pb2.DT_STRING:
        dtype, values = np.dtype(object), np.empty(len(proto.string_val), object)
        values[:] = proto.string_val
    elif proto.dtype in _FIELDS:
        dtype, field = _FIELDS[proto.dtype]
        if proto.tensor_content:
            return np.frombuffer(proto.tensor_content, dtype).reshape(shape).copy()
        if field == "half_val":
            values = np.array(proto.half_val, np.uint16).view(np.float16)
        else:
            values = np.array(getattr(proto, field), dtype)
    else:
        import tensorflow as tf

        return tf.make_ndarray(proto)
    size = math.prod(shape)
    if values.size == size:
        return values.reshape(shape)
    if values.size > size:
        raise ValueError(f"a tensor of shape {shape} holds {values.size} values")
    if values.size == 0:
        return np.full(shape, b"" if values.dtype.kind == "O" else 0, dtype)
    return np.concatenate([values, np.repeat(values[-1:], size - values.size)]).reshape(shape)


def to_proto(array) -> tensor_pb2.TensorProto:
    """A TensorProto of `array` with its values in the typed field (TensorFlow Serving's AsProtoField).

    str and bytes arrays (or object arrays of them) become DT_STRING, str encoded as UTF-8.
    """
    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.flat)
    elif array.dtype in _ENUMS:
        enum = _ENUMS[array.dtype]
        proto = tensor_pb2.TensorProto(dtype=enum)
        field = _FIELDS[enum][1]
        flat = array.ravel()
        getattr(proto, field).extend((flat.view(np.uint16) if field == "half_val" else flat).tolist())
    else:
        import tensorflow as tf

        return tf.make_tensor_proto(array)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto
