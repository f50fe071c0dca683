"""Image preprocessing shared by training and the inference worker.

One function turns a stored MR slice into the model's input, so that what the model saw in
training is exactly what it sees in production. Numpy and scipy only: the worker must not need
TensorFlow to prepare images.
"""

from __future__ import annotations

import functools

import numpy as np

#: Percentiles used for robust intensity normalisation (ignore a few hot or dead pixels).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


def to_modality_values(
    stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0
) -> np.ndarray:
    """Apply Rescale Slope and Rescale Intercept (PS3.3 C.11.1.1.2) to stored pixel values."""
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def normalise_intensity(
    values: np.ndarray, robust_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Map the robust intensity range of a slice to [0, 255] (float32).

    The range is taken from the foreground (values above the slice minimum) so that a mostly
    empty slice does not flatten the anatomy; a constant slice becomes all zeros.
    ``robust_range``: that range, already known (:func:`stored_robust_range`).
    """
    values = values.astype(np.float32, copy=False)
    if robust_range is None:
        foreground = values[values > values.min()]
        if foreground.size == 0:
            return np.zeros_like(values)
        low, high = np.percentile(foreground, [LOW_PERCENTILE, HIGH_PERCENTILE])
    else:
        low, high = robust_range
    if high <= low:
        high = low + 1.0
    return (np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.float32)


def stored_robust_range(
    stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0
) -> tuple[float, float] | None:
    """The range :func:`normalise_intensity` takes from the modality values of integer
    ``stored`` values, found from their histogram instead of by sorting (several times less
    CPU for 16-bit MR slices). The same order statistics, interpolated the same way, give the
    same range (to the last bits of a float64). None where this does not apply: not integers, a
    slope that is not positive (the order flips), more than 16 bits, a constant slice (for
    which :func:`normalise_intensity` finds no foreground itself).
    """
    if stored.dtype.kind not in "ui" or stored.dtype.itemsize > 2 or not slope > 0:
        return None
    flat = stored.ravel()
    lowest = int(flat.min())
    # bincount takes non-negative integers: count from the minimum (signed: in int32).
    shifted = flat.astype(np.int32) - lowest if stored.dtype.kind == "i" else flat - lowest
    counts = np.bincount(shifted)
    foreground = np.cumsum(counts[1:])  # the values above the slice minimum
    n = int(foreground[-1]) if foreground.size else 0
    if n == 0:
        return None
    bounds = []
    for q in (LOW_PERCENTILE, HIGH_PERCENTILE):
        # np.percentile's default ("linear"): the order statistics around q/100 * (n - 1).
        virtual = q / 100 * (n - 1)
        below = int(np.floor(virtual))
        ranks = np.searchsorted(foreground, [below, min(below + 1, n - 1)], side="right")
        # The float32 modality values, interpolated in float64 as np.percentile does.
        a, b = to_modality_values(ranks + 1 + lowest, slope, intercept).astype(np.float64)
        gamma = virtual - below
        bounds.append(b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)
    return bounds[0], bounds[1]


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a 2-D image to a centred square, then resize it bilinearly to ``size``²."""
    rows, cols = image.shape
    side = max(rows, cols)
    padded = np.zeros((side, side), dtype=np.float32)
    top, left = (side - rows) // 2, (side - cols) // 2
    padded[top : top + rows, left : left + cols] = image
    if side == size:
        return padded
    return bilinear_zoom(padded, size)


def bilinear_zoom(square: np.ndarray, size: int) -> np.ndarray:
    """``scipy.ndimage.zoom(square, size / side, order=1, mode="nearest", grid_mode=True)``
    (pixel centres aligned; coordinates beyond the edge take the edge pixel; float64
    arithmetic, float32 out) as two separable gathers, at about half its CPU. The values are
    zoom's to float32's last bit: the float64 sums are added in another order, which rounds a
    rare pixel (about 1 in 50 000) one unit in the last place the other way."""
    side = square.shape[0]
    rows, weights, following = _bilinear_taps(side, size)
    values = square.astype(np.float64)
    along_rows = values[rows] * (1 - weights)[:, None] + values[following] * weights[:, None]
    along_both = along_rows[:, rows] * (1 - weights) + along_rows[:, following] * weights
    return along_both.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _bilinear_taps(side: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the input index at or before its centre, the weight of the next
    one, and that next index (clamped to the edge)."""
    centres = np.clip((np.arange(size) + 0.5) * (side / size) - 0.5, 0, side - 1)
    rows = np.floor(centres).astype(np.intp)
    return rows, centres - rows, np.minimum(rows + 1, side - 1)


def preprocess_slice(
    stored: np.ndarray, size: int, slope: float = 1.0, intercept: float = 0.0
) -> np.ndarray:
    """A stored 2-D MR slice → model input: float32 ``(size, size, 3)`` with values in [0, 255].

    Steps: Rescale Slope/Intercept, robust normalisation, square pad + bilinear resize, grey to
    three channels (EfficientNet's stem expects RGB and does its own scaling).
    """
    return np.repeat(preprocess_grey(stored, size, slope, intercept)[:, :, None], 3, axis=2)


def preprocess_grey(
    stored: np.ndarray, size: int, slope: float = 1.0, intercept: float = 0.0
) -> np.ndarray:
    """:func:`preprocess_slice`'s one grey channel, float32 ``(size, size)`` (whoever stacks
    many slices repeats it into three channels once, in place)."""
    if stored.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {stored.shape}")
    values = to_modality_values(stored, slope, intercept)
    image = normalise_intensity(values, stored_robust_range(stored, slope, intercept))
    return square_resize(image, size)
