"""Class balancing with augmented images and the tf.data input pipeline.

Balancing happens once, in memory, before training: each minority class is topped up to the
size of the largest with augmented copies of its own images (flip, small rotation and shift,
intensity scaling), so the network sees every class equally often without exact duplicates.
Rotation and shift resample the image, which smooths it: a lesion 2–3 pixels wide loses part of
its peak and the noise part of its grain, so training images stop looking like the ones the
model scores. Without ``geometric`` augmentation the copies are only flipped and scaled in
intensity, and no training image is resampled.
The training stream is then ``from_tensor_slices → cache → shuffle → batch → map → prefetch``,
built so that the accelerator (here: the CPU cores running the model) never waits for data.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage

from training.dataset import Split
from training.model import MASK_OUTPUT, OUTPUT_LAYER

#: Augmentation ranges for the balancing copies.
MAX_ROTATION_DEG = 10.0
MAX_SHIFT_SHARE = 0.05
MAX_ZOOM_SHARE = 0.1
INTENSITY_RANGE = (0.9, 1.1)
PIXEL_MAX = 255.0


def augment_image(
    image: np.ndarray, rng: np.random.Generator, geometric: bool = True
) -> np.ndarray:
    """A plausible variant of one model-input image ``(H, W, C)`` in [0, 255]: flipped or not,
    scaled in intensity and, when ``geometric``, slightly rotated and shifted (resampled)."""
    return _augment(image, rng, geometric)[0]


def _augment(
    image: np.ndarray, rng: np.random.Generator, geometric: bool
) -> tuple[np.ndarray, bool]:
    """:func:`augment_image`, and whether it flipped the image."""
    flipped = bool(rng.random() < 0.5)
    out = image[:, ::-1] if flipped else image
    if geometric:
        out = ndimage.rotate(
            out,
            rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG),
            axes=(0, 1),
            reshape=False,
            order=1,
            mode="constant",
        )
        shift = rng.uniform(-MAX_SHIFT_SHARE, MAX_SHIFT_SHARE, 2) * image.shape[0]
        out = ndimage.shift(out, (*shift, 0), order=1, mode="constant")
    out = out * rng.uniform(*INTENSITY_RANGE)
    return np.clip(out, 0, PIXEL_MAX).astype(np.float32), flipped


def balance_with_augmentation(
    split: Split, n_classes: int, seed: int, geometric: bool = True
) -> tuple[Split, list[int]]:
    """Top up every class to the largest class's count with augmented copies
    (:func:`augment_image`; ``geometric=False``: flipped and intensity-scaled only).

    Returns the balanced split and the number of copies added per class. Copies keep the group
    of the image they came from, and its mask, flipped with it. A split with masks is balanced
    only without ``geometric`` augmentation (ValueError): a mask is not resampled.
    """
    if split.masks is not None and geometric:
        raise ValueError("a split with lesion masks is balanced only without geometric copies")
    counts = split.counts(n_classes)
    target = max(counts)
    rng = np.random.default_rng(seed)
    added = [0] * n_classes
    images, labels, groups = [split.images], [split.labels], [split.groups]
    masks = [] if split.masks is None else [split.masks]
    for label, count in enumerate(counts):
        if count == 0 or count == target:
            continue
        sources = rng.choice(np.flatnonzero(split.labels == label), target - count, replace=True)
        copies = [_augment(split.images[i], rng, geometric) for i in sources]
        images.append(np.stack([image for image, _ in copies]))
        labels.append(np.full(len(sources), label, dtype=split.labels.dtype))
        groups.append(split.groups[sources])
        if split.masks is not None:
            masks.append(
                np.stack(
                    [
                        split.masks[i][:, ::-1] if flipped else split.masks[i]
                        for i, (_, flipped) in zip(sources, copies, strict=True)
                    ]
                )
            )
        added[label] = len(sources)
    balanced = Split(
        np.concatenate(images),
        np.concatenate(labels),
        np.concatenate(groups),
        np.concatenate(masks) if masks else None,
    )
    return balanced, added


def _to_rgb(images: tf.Tensor) -> tf.Tensor:
    """Grey ``(B, H, W, 1)`` → ``(B, H, W, 3)`` as preprocess_slice repeats it; RGB unchanged."""
    if images.shape[-1] == 1:
        return tf.repeat(images, 3, axis=-1)
    return images


def _geometric_augmenter(seed: int) -> keras.Sequential:
    """Small random rotation, shift and zoom per image (batched, on the fly)."""
    return keras.Sequential(
        [
            keras.layers.RandomRotation(MAX_ROTATION_DEG / 360.0, fill_mode="constant", seed=seed),
            keras.layers.RandomTranslation(
                MAX_SHIFT_SHARE, MAX_SHIFT_SHARE, fill_mode="constant", seed=seed + 1
            ),
            keras.layers.RandomZoom(MAX_ZOOM_SHARE, fill_mode="constant", seed=seed + 2),
        ]
    )


def cell_targets(masks: np.ndarray, stride: int) -> np.ndarray:
    """Each ``stride``² cell's largest lesion cover (0–1) of ``(N, H, W)`` uint8 masks:
    float32 ``(N, H / stride, W / stride, 1)``, the mask head's target."""
    n, height, width = masks.shape
    if height % stride or width % stride:
        raise ValueError(f"masks of {height}×{width} do not divide into {stride}-pixel cells")
    cells = masks.reshape(n, height // stride, stride, width // stride, stride).max(axis=(2, 4))
    return (cells.astype(np.float32) / 255.0)[..., None]


def training_stream(
    split: Split,
    n_classes: int,
    batch_size: int,
    seed: int,
    random_flip: bool,
    augment: bool = False,
    mask_stride: int = 0,
) -> tf.data.Dataset:
    """Shuffled, batched ``(images, one-hot labels)`` batches, one epoch per iteration.

    ``random_flip`` mirrors half the images; ``augment`` also rotates, shifts and zooms each
    image slightly (new draws every epoch), which a model trained from scratch on a few
    thousand images needs against overfitting. ``mask_stride``: the targets are
    ``{"probabilities": labels, "lesion_map": cell_targets(masks)}`` (a mask head's; the split
    must have masks, and a mask is flipped with its image but never resampled, so ``augment``
    is refused with it).
    """
    one_hot = np.eye(n_classes, dtype=np.float32)[split.labels]
    if mask_stride:
        if split.masks is None:
            raise ValueError("a mask head needs a split with lesion masks")
        if augment:
            raise ValueError("lesion masks are not resampled: train them without augment")
        targets: Any = (one_hot, cell_targets(split.masks, mask_stride))
    else:
        targets = one_hot
    data = tf.data.Dataset.from_tensor_slices((split.images, targets)).cache()
    data = data.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    augmenter = _geometric_augmenter(seed) if augment else None

    def prepare(images: tf.Tensor, labels: Any) -> tuple[tf.Tensor, Any]:
        images = _to_rgb(images)
        cells = labels[1] if mask_stride else None
        if random_flip:
            flip = tf.random.uniform([tf.shape(images)[0], 1, 1, 1], seed=seed) < 0.5
            images = tf.where(flip, tf.reverse(images, axis=[2]), images)
            if cells is not None:
                cells = tf.where(flip, tf.reverse(cells, axis=[2]), cells)
        if augmenter is not None:
            images = tf.clip_by_value(augmenter(images, training=True), 0.0, PIXEL_MAX)
        if cells is not None:
            return images, {OUTPUT_LAYER: labels[0], MASK_OUTPUT: cells}
        return images, labels

    return data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def inference_stream(images: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of model inputs in order (evaluation and validation)."""
    data = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).cache()
    return data.map(_to_rgb, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """NumPy twin of the pipeline's channel expansion."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
