"""Balancing with augmented images and the tf.data stream."""

from __future__ import annotations

import numpy as np
import pytest

from training.dataset import Split
from training.input_pipeline import (
    balance_with_augmentation,
    cell_targets,
    inference_stream,
    training_stream,
)
from training.model import MASK_OUTPUT, OUTPUT_LAYER


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


def masked(size: int = 32) -> Split:
    """Images whose lesion is a bright square at a random place, its mask exactly there."""
    rng = np.random.default_rng(3)
    labels = np.array([0] * 6 + [1] * 3 + [2] * 2)
    images = rng.uniform(0, 50, (len(labels), size, size, 1)).astype(np.float32)
    masks = np.zeros((len(labels), size, size), np.uint8)
    for i in np.flatnonzero(labels):
        row, column = rng.integers(0, size - 4, 2)
        images[i, row : row + 4, column : column + 4] = 250.0
        masks[i, row : row + 4, column : column + 4] = 255
    return Split(images, labels, np.array([f"s{i}" for i in range(len(labels))]), masks)


def lesion_where_mask_says(images: np.ndarray, masks: np.ndarray) -> None:
    for image, mask in zip(images, masks, strict=True):
        assert (image[..., 0][mask > 0] > 200).all()
        assert not (image[..., 0][mask == 0] > 200).any()


def test_balancing_copies_carry_their_masks_flipped_with_them() -> None:
    split = masked()
    balanced, added = balance_with_augmentation(split, 3, seed=2, geometric=False)
    assert added == [0, 3, 4] and balanced.masks is not None
    copies = slice(len(split), None)
    assert balanced.masks[copies].any(axis=(1, 2)).all()
    lesion_where_mask_says(balanced.images[copies], balanced.masks[copies])
    # Some copies were mirrored, so the check above saw flipped masks too.
    first = split.masks[np.flatnonzero(split.labels)]
    assert any(not any(np.array_equal(c, m) for m in first) for c in balanced.masks[copies])
    with pytest.raises(ValueError, match="geometric"):
        balance_with_augmentation(split, 3, seed=2, geometric=True)


def test_a_mask_stream_targets_each_cell_and_flips_it_with_its_image() -> None:
    split = masked()
    cells = cell_targets(split.masks, 8)
    assert cells.shape == (len(split), 4, 4, 1)
    assert cells.max() == 1.0 and set(np.unique(cells)) <= {0.0, 1.0}
    stream = training_stream(split, 3, batch_size=4, seed=1, random_flip=True, mask_stride=8)
    seen_flipped = False
    for images, targets in stream:
        assert set(targets) == {OUTPUT_LAYER, MASK_OUTPUT}
        for image, target in zip(images.numpy(), targets[MASK_OUTPUT].numpy(), strict=True):
            bright = image[..., 0] > 200
            expected = bright.reshape(4, 8, 4, 8).any(axis=(1, 3))
            np.testing.assert_array_equal(target[..., 0] > 0, expected)
            index = next(
                i
                for i in range(len(split))
                if np.allclose(split.images[i, ..., 0].sum(), image[..., 0].sum())
            )
            seen_flipped |= not np.array_equal(image[..., 0], split.images[index, ..., 0])
    assert seen_flipped
    with pytest.raises(ValueError, match="lesion masks"):
        training_stream(unbalanced(), 3, batch_size=4, seed=1, random_flip=True, mask_stride=8)
    with pytest.raises(ValueError, match="resampled"):
        training_stream(split, 3, 4, 1, random_flip=True, augment=True, mask_stride=8)
    with pytest.raises(ValueError, match="cells"):
        cell_targets(split.masks, 5)
