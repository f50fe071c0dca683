"""scanwatch.tensors: what the worker sends is what TensorFlow's own encoder would send."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

from scanwatch.tensors import to_ndarray, to_tensor_proto

GREY = np.random.default_rng(7).random((5, 8, 8), dtype=np.float32)


@pytest.mark.parametrize(
    "array",
    [
        GREY[..., None].repeat(3, axis=3),  # contiguous
        np.broadcast_to(GREY[..., None], (5, 8, 8, 3)),  # a read-only view, as the worker sends
        GREY[::2, :, ::-1],  # strided
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.array(3.25, dtype=np.float32),  # a scalar
        np.array([3.25], dtype=np.float32),  # one value
        np.zeros((0, 3), dtype=np.float32),  # none
    ],
    ids=["contiguous", "broadcast", "strided", "int64", "scalar", "one", "empty"],
)
def test_packed_tensors_are_tensorflows_bytes(array: np.ndarray) -> None:
    proto = to_tensor_proto(array)
    expected = tf.make_tensor_proto(array.copy(order="C"))
    assert proto.SerializeToString() == expected.SerializeToString()
    np.testing.assert_array_equal(to_ndarray(proto), array)


def per_value(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A typed value field filled one Python number at a time (the slow, obvious way)."""
    proto = tensor_pb2.TensorProto(dtype=tf.as_dtype(array.dtype).as_datatype_enum)
    proto.tensor_shape.SetInParent()  # a scalar's shape is present, with no dimension
    for n in array.shape:
        proto.tensor_shape.dim.add(size=n)
    field = {"float32": "float_val", "float64": "double_val", "int32": "int_val"}
    getattr(proto, field[array.dtype.name]).extend(array.ravel().tolist())
    return proto


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(1).random((3, 16, 16), dtype=np.float32),  # heatmaps
        np.random.default_rng(2).random((4, 4)).astype(np.float64),
        GREY[::2, :, ::-1],  # strided
        np.array([[0.1, 0.9]], np.float32)[:, ::-1],  # reversed
        np.array(3.25, dtype=np.float32),  # a scalar
        np.zeros((0, 3), dtype=np.float32),  # none
        np.array([[-1.5, np.inf, np.nan]], np.float32),
        np.arange(-6, 6, dtype=np.int32).reshape(3, 4),  # a varint field: the slow way
    ],
    ids=["heatmaps", "float64", "strided", "reversed", "scalar", "empty", "special", "int32"],
)
def test_a_typed_value_field_is_what_filling_it_value_by_value_gives(array: np.ndarray) -> None:
    """The model server's answers (``as_field``, as TF Serving encodes them) are built from the
    array's bytes and read back in one NumPy call: the same message and the same values."""
    proto = to_tensor_proto(array, as_field=True)
    expected = per_value(array)
    assert proto == expected
    assert proto.SerializeToString() == expected.SerializeToString()
    decoded = to_ndarray(expected)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    np.testing.assert_array_equal(decoded, tf.make_ndarray(expected))


def test_one_value_that_fills_its_shape_is_decoded_as_tensorflow_does() -> None:
    proto = tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, float_val=[0.5])
    proto.tensor_shape.dim.add(size=3)
    np.testing.assert_array_equal(to_ndarray(proto), np.full(3, 0.5, np.float32))
