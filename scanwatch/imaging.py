"""Image preprocessing shared by training and the inference worker.

One function turns a stored MR slice into the model's input, so that what the model saw in
training is exactly what it sees in production: :func:`preprocess_grey_stack` for many slices
(the worker), :func:`preprocess_grey` and :func:`preprocess_slice` (training) for one, the same
values to the bit. Numpy only: the worker must not need TensorFlow to prepare images.

The steps are defined by the float64 functions below (:func:`to_modality_values`,
:func:`normalise_intensity` with :func:`stored_robust_range`, :func:`bilinear_zoom` of the
zero-padded square: :func:`reference_grey`); the fused float32 pipeline gives their values to
float32 rounding (tests/unit/test_imaging.py bounds the difference) at about a third of their
CPU (``bench/preprocess_cpu.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

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
    return _histogram_range(stored, slope, intercept)


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a 2-D image to a centred square, then resize it bilinearly to ``size``²
    (float32): :func:`bilinear_zoom` of the padded square, computed in float32 with the padding
    folded into the taps (equal to it within float32 rounding)."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    return np.ascontiguousarray(_resize(image.astype(np.float32), size))


def bilinear_zoom(square: np.ndarray, size: int) -> np.ndarray:
    """``scipy.ndimage.zoom(square, size / side, order=1, mode="nearest", grid_mode=True)``
    (pixel centres aligned; coordinates beyond the edge take the edge pixel; float64
    arithmetic, float32 out) as two separable gathers: the reference resize, which
    :func:`square_resize` and :func:`preprocess_grey_stack` give to float32 rounding. The values are
    zoom's to float32's last bit: the float64 sums are added in another order, which rounds a
    rare pixel (about 1 in 50 000) one unit in the last place the other way."""
    side = square.shape[0]
    rows, weights, following = _bilinear_taps(side, size)
    values = square.astype(np.float64)
    along_rows = values[rows] * (1 - weights)[:, None] + values[following] * weights[:, None]
    along_both = along_rows[:, rows] * (1 - weights) + along_rows[:, following] * weights
    return along_both.astype(np.float32)


def reference_grey(
    stored: np.ndarray, size: int, slope: float = 1.0, intercept: float = 0.0
) -> np.ndarray:
    """The steps :func:`preprocess_grey` fuses, one by one as they are defined: float32
    modality values, the robust range to [0, 255] in float64, a zero-padded centred square,
    :func:`bilinear_zoom`. Several times its CPU: what tests and benchmarks hold it to."""
    values = to_modality_values(stored, slope, intercept)
    image = normalise_intensity(values, stored_robust_range(stored, slope, intercept))
    rows, columns = image.shape
    side = max(rows, columns)
    padded = np.zeros((side, side), np.float32)
    top, left = (side - rows) // 2, (side - columns) // 2
    padded[top : top + rows, left : left + columns] = image
    return padded if side == size else bilinear_zoom(padded, size)


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
    many slices repeats it into three channels once, in place): :func:`preprocess_grey_stack`
    of a stack of one, so a slice comes out the same alone or in a stack, to the bit."""
    if stored.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {stored.shape}")
    return preprocess_grey_stack(stored[None], size, slope, intercept)[0]


def preprocess_grey_stack(
    stored: np.ndarray | Sequence[np.ndarray],
    size: int,
    slopes: float | Sequence[float] | np.ndarray = 1.0,
    intercepts: float | Sequence[float] | np.ndarray = 0.0,
    *,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """:func:`preprocess_grey` of each stored slice of ``stored``: float32 ``(n, size, size)``.

    ``stored``: a stack ``(n, rows, columns)``, or a sequence of 2-D slices (their shapes and
    types may differ: nothing is stacked). ``slopes``, ``intercepts``: Rescale Slope and
    Intercept, one for all slices or one per slice; each slice keeps its own robust range.
    ``out``: the float32 ``(n, size, size)`` array (or view) to write into, returned.

    The steps of the reference pipeline (:func:`to_modality_values`,
    :func:`normalise_intensity` with the range of :func:`stored_robust_range`,
    :func:`square_resize` as :func:`bilinear_zoom` of the zero-padded square, in float64) are
    fused in float32, a dozen numpy calls a slice: the stored values less the value that
    normalises to 0, clipped in place to the span that normalises to [0, 255]; the bilinear
    resize with the square's padding folded into its taps (a tap in the padding has weight 0:
    no padded square); the scale to [0, 255] applied to the resized image. The outputs differ
    from the reference's by float32 rounding only (a few units in the last place of 255 on MR
    slices; tests/unit/test_imaging.py bounds it).
    """
    if isinstance(stored, np.ndarray) and stored.ndim != 3:
        raise ValueError(f"expected a stack of 2-D slices, got shape {stored.shape}")
    for image in stored:
        if image.ndim != 2:
            raise ValueError(f"expected 2-D slices, got one of shape {image.shape}")
    count = len(stored)
    slope, intercept = (_per_slice(given, count) for given in (slopes, intercepts))
    if out is None:
        out = np.empty((count, size, size), np.float32)
    elif out.shape != (count, size, size) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(count, size, size)}, got {out.dtype} {out.shape}")
    images = out
    if count == 0:
        return images
    # Every slice's range first, then every slice's image: interleaved, each evicted the
    # other's arrays from the cache (0.8 ms more a 38-slice study).
    normalisations = [
        _normalisation(stored[index], float(slope[index]), float(intercept[index]))
        for index in range(count)
    ]
    for index, (zero, lowest, highest, scale) in enumerate(normalisations):
        # Less the value that normalises to 0, clipped to the span that normalises to
        # [0, 255]; resized; scaled to [0, 255]. One slice at a time: its arrays stay in the
        # core's cache (measured cheaper than five at a time).
        if scale == 0:  # no foreground: all zeros
            images[index] = 0.0
            continue
        values = stored[index].astype(np.float32)
        values -= zero
        values.clip(lowest, highest, out=values)
        np.multiply(_resize(values, size), scale, out=images[index])
    # Two float32 taps can sum a hair above the span: 255.00002 at most.
    np.minimum(images, np.float32(255.0), out=images)
    return images


def _per_slice(given: float | Sequence[float] | np.ndarray, count: int) -> np.ndarray:
    """One float64 value a slice: ``given`` for each, or each of ``given``."""
    values = np.asarray(given, dtype=np.float64)
    if values.ndim == 0:
        return np.full(count, values)
    if values.shape != (count,):
        raise ValueError(f"expected one value or {count}, got shape {values.shape}")
    return values


def _normalisation(
    stored: np.ndarray, slope: float, intercept: float
) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """A slice's float32 ``zero``, ``lowest``, ``highest`` and ``scale``:
    ``clip(stored - zero, lowest, highest) * scale`` is :func:`normalise_intensity`'s value of
    its modality values (the robust range ``[low, high]`` to [0, 255], clipped). A slice
    without foreground (constant) gets a scale of 0: its image is all zeros."""
    robust: tuple[float, float] | None = None
    if stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2 and slope > 0:
        robust = _histogram_range(stored, slope, intercept)
    else:
        values = to_modality_values(stored, slope, intercept)
        foreground = values[values > values.min()]
        if foreground.size:
            low, high = np.percentile(foreground, [LOW_PERCENTILE, HIGH_PERCENTILE])
            robust = (float(low), float(high))
    if robust is None:
        return np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    low, high = float(robust[0]), float(robust[1])
    if high <= low:
        high = low + 1.0
    scale = slope * (255.0 / (high - low))
    if scale == 0:
        return np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    span = 255.0 / scale
    zero = (low - intercept) / slope
    return (
        np.float32(zero),
        np.float32(min(span, 0.0)),
        np.float32(max(span, 0.0)),
        np.float32(scale),
    )


def _histogram_range(
    stored: np.ndarray, slope: float, intercept: float
) -> tuple[np.float64, np.float64] | None:
    """:func:`stored_robust_range` of an integer slice of at most 16 bits, slope positive."""
    flat = stored.reshape(-1)
    base = origin = 0
    if stored.dtype.kind == "i":
        # Signed: flipping the sign bit maps the values onto the unsigned ones, in order;
        # counted from the minimum (counting from 0 would start with 2**15 empty bins).
        bits = stored.dtype.itemsize * 8
        unsigned = np.dtype(f"u{stored.dtype.itemsize}")
        flat = flat.view(unsigned) ^ unsigned.type(1 << (bits - 1))
        base, origin = 1 << (bits - 1), int(flat.min())
        if origin:
            flat = flat - unsigned.type(origin)
    counts = np.bincount(flat)  # bin b counts the stored value origin + b - base
    minimum = int((counts != 0).argmax())
    n = flat.size - int(counts[minimum])  # the foreground: values above the minimum
    if n == 0:
        return None
    bounds = []
    for q in (LOW_PERCENTILE, HIGH_PERCENTILE):
        # np.percentile's default ("linear"): the order statistics around q/100 * (n - 1).
        virtual = q / 100 * (n - 1)
        below = math.floor(virtual)
        ranks = [below, min(below + 1, n - 1)]
        stored_values = [origin - base + bin for bin in _rank_bins(counts, minimum, n, ranks)]
        # The float32 modality values (with slope 1 and intercept 0, the stored values
        # themselves: exact in a float32 up to 2**24), interpolated in float64 as
        # np.percentile does.
        if slope == 1.0 and intercept == 0.0:
            a, b = (float(value) for value in stored_values)
        else:
            modality = np.float32(slope) * np.array(stored_values, np.float32)
            a, b = (modality + np.float32(intercept)).astype(np.float64).tolist()
        gamma = virtual - below
        bounds.append(b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)
    # float64 scalars: normalise_intensity computes in float64 with them.
    return np.float64(bounds[0]), np.float64(bounds[1])


def _rank_bins(counts: np.ndarray, minimum: int, n: int, ranks: list[int]) -> list[int]:
    """The histogram bins of the foreground values of ``ranks`` (counted from the smallest):
    the first bin whose count, with those before it, passes the rank. Searched from the
    minimum up for low ranks, from the top down for high ones (the same rank counted from the
    largest), in the few hundred bins at that end first (MR slices: the low ranks lie within a
    few bins of the minimum, the high ones within ~250 of the top; a cumulative sum of a whole
    16-bit histogram cost more than the rest of the search), all of them where those fall
    short."""
    top = len(counts) - 1
    from_top = ranks[0] > n // 2
    wanted = [n - 1 - rank for rank in ranks] if from_top else ranks
    window = max(_RANK_WINDOW, len(counts) // 8)
    while True:
        if from_top:
            part = counts[top : max(minimum, top - window) : -1]
        else:
            part = counts[minimum + 1 : minimum + 1 + window]
        cumulative = np.cumsum(part)
        if cumulative[-1] > max(wanted):  # always so once the window spans the foreground
            break
        window = top - minimum
    found = np.searchsorted(cumulative, wanted, side="right").tolist()
    return [top - j if from_top else minimum + 1 + j for j in found]


#: Histogram bins summed first at each end in the search for the robust range's ranks.
_RANK_WINDOW = 512


def _resize(image: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """:func:`square_resize` of a float32 ``image`` without building the padded square (a tap
    in the padding has weight 0). Rows first, then columns, as :func:`bilinear_zoom`; the
    column taps are gathered from the rows as they lie in memory, so the result may be a
    transposed view. Every multiply is by a whole plane of weights: numpy's fast loops, not
    one short loop per row."""
    rows, columns = image.shape
    side = max(rows, columns)
    if not rows == size == side:
        first, second, w_first, w_second = _weight_planes(rows, side, size, columns)
        along = image[first]
        along *= w_first
        following = image[second]
        following *= w_second
        along += following
        image = along
    if not columns == size == side:
        first, second, w_first, w_second = _weight_planes(columns, side, size, image.shape[0])
        # image[:, first] lies column by column: its transpose is contiguous.
        across = image[:, first].T
        across *= w_first
        following = image[:, second].T
        following *= w_second
        across += following
        image = across.T
    return image


@functools.lru_cache(maxsize=32)
def _weight_planes(
    length: int, side: int, size: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_padded_taps` along an axis, the weights spread over ``(size, width)`` planes
    (each output line's weight repeated along the ``width`` values it multiplies)."""
    first, w_first, second, w_second = _padded_taps(length, side, size)
    planes = np.repeat(w_first[:, None], width, axis=1), np.repeat(w_second[:, None], width, axis=1)
    for plane in planes:
        plane.setflags(write=False)  # shared by every call (and thread) that resizes alike
    return first, second, planes[0], planes[1]


@functools.lru_cache(maxsize=32)
def _padded_taps(
    length: int, side: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_bilinear_taps` of the ``side``-long padded axis, mapped onto the ``length``
    values it pads (centred): per output index, the two input indices and their float32
    weights; a tap in the padding reads a zero, so it keeps an index in range and weight 0."""
    rows, weights, following = _bilinear_taps(side, size)
    pad = (side - length) // 2
    taps = []
    for index, weight in ((rows, 1 - weights), (following, weights)):
        inside = (index >= pad) & (index < pad + length)
        taps.append(np.clip(index - pad, 0, length - 1))
        taps.append(np.where(inside, weight, 0.0).astype(np.float32))
    return taps[0], taps[1], taps[2], taps[3]


# -- the three channels: one slice repeated, or the slice and its neighbours (2.5D) --------------

#: Each slice's three channels are that slice three times (what every model before issue 18
#: was trained on, and what a model that says nothing about its context gets).
NO_CONTEXT = "none"
#: Channel 0 is the slice below (the previous one in the series' order along the slice
#: normal), channel 1 the slice, channel 2 the slice above; at either end of the series the
#: missing neighbour is the slice itself.
NEIGHBOURS = "neighbours"
#: The input contexts a model may be trained with (``training --context``, the model's
#: ``study_rule`` output carries a model's own; see :mod:`scanwatch.study_score`).
INPUT_CONTEXTS = (NO_CONTEXT, NEIGHBOURS)


def adjacent_rows(count: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The rows below and above each of ``count`` slices in series order, the ends clamped
    to the slice itself."""
    rows = np.arange(count, dtype=np.intp)
    return np.maximum(rows - 1, 0), np.minimum(rows + 1, max(count - 1, 0))


def neighbour_channels(
    grey: npt.NDArray[np.float32],
    rows: npt.ArrayLike,
    below: npt.ArrayLike,
    above: npt.ArrayLike,
) -> npt.NDArray[np.float32]:
    """The :data:`NEIGHBOURS` model input ``(len(rows), S, S, 3)``: for each ``i``, channels
    ``grey[below[i]]``, ``grey[rows[i]]``, ``grey[above[i]]`` of the preprocessed grey slices
    ``grey`` (``(n, S, S)`` or ``(n, S, S, 1)``). Training and the worker both build their
    2.5D inputs here."""
    grey = np.asarray(grey, dtype=np.float32)
    if grey.ndim == 4 and grey.shape[-1] == 1:
        grey = grey[..., 0]
    if grey.ndim != 3:
        raise ValueError(f"grey slices must be (n, S, S) or (n, S, S, 1), got {grey.shape}")
    out = np.empty((len(np.atleast_1d(rows)), *grey.shape[1:], 3), np.float32)
    for channel, index in enumerate((below, rows, above)):
        out[..., channel] = grey[np.asarray(index, dtype=np.intp)]
    return out
