"""serving.tensors: TensorProtos as TensorFlow Serving writes them, read back as TensorFlow reads them."""

import numpy as np
import pytest
import tensorflow as tf

from serving import tensors


@pytest.mark.parametrize("array", [
    np.array([[1.5, -2.25], [0.0, 3.0]], np.float32),
    np.array([1e300, -1.0], np.float64),
    np.array([[0.5, -1.5, 65504.0]], np.float16),
    np.array([[1, -2, 3]], np.int32),
    np.array([-128, 127], np.int8),
    np.array([0, 255], np.uint8),
    np.array([-(2 ** 40), 7], np.int64),
    np.array([2 ** 63 + 5], np.uint64),
    np.array([True, False, True]),
    np.array([b"To be", "é".encode("utf-8"), b""], object),
    np.array(["ROMEO.", "Juliet"]),
    np.array(3, np.int32),
    np.zeros([2, 0], np.float32),
])
def test_round_trip_agrees_with_tensorflow(array):
    proto = tensors.to_proto(array)
    expected = tf.make_ndarray(tf.make_tensor_proto(array))
    for decoded in (tensors.to_ndarray(proto), tf.make_ndarray(proto)):  # ours, and what a TF client reads
        assert decoded.shape == array.shape and decoded.dtype == expected.dtype
        np.testing.assert_array_equal(decoded, expected)


def test_values_go_to_the_typed_fields_as_in_tensorflow_serving():
    scores = tensors.to_proto(np.array([[0.25, 0.75]], np.float32))
    assert list(scores.float_val) == [0.25, 0.75] and not scores.tensor_content
    assert [d.size for d in scores.tensor_shape.dim] == [1, 2]
    assert list(tensors.to_proto(np.array([4, 5], np.int32)).int_val) == [4, 5]
    assert list(tensors.to_proto(np.array(["a", "b"])).string_val) == [b"a", b"b"]


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, 2]], np.int32),
                                   np.array([2.5, -1.0])])
def test_tensor_content_requests_decode(array):
    proto = tf.make_tensor_proto(array)  # what tf.make_tensor_proto sends: tensor_content
    assert proto.tensor_content
    np.testing.assert_array_equal(tensors.to_ndarray(proto), array)


def test_fewer_values_than_the_shape_repeat_the_last_one_like_tensorflow():
    proto = tensors.to_proto(np.array([1, 2], np.int32))
    proto.tensor_shape.dim[0].size = 4
    np.testing.assert_array_equal(tensors.to_ndarray(proto), tf.make_ndarray(proto))
    np.testing.assert_array_equal(tensors.to_ndarray(proto), [1, 2, 2, 2])
    proto.tensor_shape.dim[0].size = 1
    with pytest.raises(ValueError, match="holds 2 values"):
        tensors.to_ndarray(proto)
