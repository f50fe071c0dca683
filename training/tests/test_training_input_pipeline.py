"""Balancing with augmented images and the tf.data stream."""

from __future__ import annotations

import numpy as np

from training.dataset import Split
from training.input_pipeline import balance_with_augmentation, inference_stream, training_stream


def unbalanced() -> Split:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1)
    images = rng.uniform(0, 255, (len(labels), 16, 16, 1)).astype(np.float32)
    return Split(images, labels, np.array([f"s{i}" for i in range(len(labels))]))


def test_minority_classes_topped_up_with_augmented_copies() -> None:
    split = unbalanced()
    balanced, added = balance_with_augmentation(split, 3, seed=1)
    assert added == [0, 6, 9]
    assert balanced.counts(3) == [10, 10, 10]
    copies = balanced.images[len(split) :]
    assert copies.shape == (15, 16, 16, 1)
    assert 0 <= copies.min() and copies.max() <= 255
    originals = split.images[split.labels > 0]
    # Augmented, not duplicated: no copy equals an original image.
    assert not any(np.array_equal(c, o) for c in copies for o in originals)
    assert set(balanced.groups[len(split) :]) <= set(split.groups[split.labels > 0])


def test_copies_without_geometric_augmentation_are_not_resampled() -> None:
    split = unbalanced()
    split = Split(split.images * 0.8, split.labels, split.groups)  # no pixel clips at x1.1
    balanced, added = balance_with_augmentation(split, 3, seed=1, geometric=False)
    assert added == [0, 6, 9]
    copies = zip(balanced.images[len(split) :], balanced.labels[len(split) :], strict=True)
    for copy, label in copies:
        # Each copy is one of its class's images, maybe mirrored, times one intensity factor:
        # every pixel keeps its value relative to its neighbours (no interpolation smoothed it).
        views = [v for o in split.images[split.labels == label] for v in (o, o[:, ::-1])]
        assert any(np.allclose(copy, v * (copy.sum() / v.sum()), rtol=1e-4) for v in views)
        assert not any(np.array_equal(copy, v) for v in views)


def test_balanced_data_is_left_alone() -> None:
    split = unbalanced()
    even = Split(split.images[[0, 10, 14]], split.labels[[0, 10, 14]], split.groups[[0, 10, 14]])
    balanced, added = balance_with_augmentation(even, 3, seed=0)
    assert added == [0, 0, 0] and len(balanced) == 3


def test_training_stream_batches_rgb_one_hot() -> None:
    split = unbalanced()
    stream = training_stream(split, 3, batch_size=4, seed=0, random_flip=True)
    batches = list(stream)
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 3]
    images, labels = batches[0]
    assert images.shape == (4, 16, 16, 3) and labels.shape == (4, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert sorted(np.concatenate([b[1].numpy().argmax(1) for b in batches]).tolist()) == sorted(
        split.labels.tolist()
    )
    # Every image comes out as itself or its mirror image.
    pool = [split.images[i, :, :, 0] for i in range(len(split))]
    for image in batches[1][0].numpy()[..., 0]:
        assert any(np.array_equal(image, p) or np.array_equal(image, p[:, ::-1]) for p in pool)


def test_inference_stream_keeps_order() -> None:
    split = unbalanced()
    out = np.concatenate([b.numpy() for b in inference_stream(split.images, 4)])
    np.testing.assert_array_equal(out, np.repeat(split.images, 3, axis=-1))


def test_augmented_stream_changes_images_each_epoch_within_range() -> None:
    split = unbalanced()
    stream = training_stream(split, 3, batch_size=16, seed=0, random_flip=False, augment=True)
    first = next(iter(stream))[0].numpy()
    second = next(iter(stream))[0].numpy()
    assert first.shape == (15, 16, 16, 3)
    assert 0.0 <= first.min() and first.max() <= 255.0
    pool = [split.images[i, :, :, 0] for i in range(len(split))]
    # Rotated / shifted / zoomed: no image comes out as an original (nor mirrored) ...
    assert not any(np.array_equal(image, p) for image in first[..., 0] for p in pool)
    # ... and the next epoch draws new transforms.
    assert not np.array_equal(np.sort(first.ravel()), np.sort(second.ravel()))
