"""scanwatch.tensors: what the worker sends is what TensorFlow's own encoder would send."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

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
