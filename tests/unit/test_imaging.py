"""scanwatch.imaging: the fast robust range is the reference one."""

from __future__ import annotations

import numpy as np

from scanwatch import imaging


def test_the_stored_value_histogram_gives_np_percentile_s_range_exactly():
    """The fast robust range (bincount of the stored integers) is np.percentile's, to the bit,
    so the model sees what it saw before and what training makes."""
    rng = np.random.default_rng(20)
    for trial in range(200):
        dtype = (np.uint16, np.int16, np.uint8, np.int8)[trial % 4]
        info = np.iinfo(dtype)
        low = int(rng.integers(info.min, info.max))
        high = int(rng.integers(low, info.max + 1))
        shape = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        stored = rng.integers(low, high + 1, size=shape, dtype=dtype)
        slope = float(rng.choice([1.0, 0.5, 2.37, 1e-3]))
        intercept = float(rng.choice([0.0, -1024.0, 3.3]))
        values = imaging.to_modality_values(stored, slope, intercept)
        robust = imaging.stored_robust_range(stored, slope, intercept)
        if robust is None:
            assert (stored == stored.min()).all()  # constant: no foreground
            continue
        reference = imaging.normalise_intensity(values)
        np.testing.assert_array_equal(imaging.normalise_intensity(values, robust), reference)
    assert imaging.stored_robust_range(np.ones((3, 3), np.float32)) is None
    assert imaging.stored_robust_range(np.arange(9, dtype=np.uint16).reshape(3, 3), -1.0) is None


def test_the_bilinear_zoom_is_scipy_s_value_for_value():
    """square_resize's zoom was scipy.ndimage.zoom: the separable version gives its values, to
    float32's last bit (a different float64 summation order rounds a rare pixel the other way:
    1 of 50176 in the first failing case; never more than one unit in the last place)."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    for side in [*rng.integers(2, 600, size=40).tolist(), 127, 129, 233, 256, 512]:
        for size in (128, 224, 64):
            square = (rng.random((side, side)) * 255).astype(np.float32)
            if side == size:
                continue
            expected = ndimage.zoom(square, size / side, order=1, mode="nearest", grid_mode=True)
            assert expected.shape == (size, size)
            actual = imaging.bilinear_zoom(square, size)
            np.testing.assert_array_max_ulp(actual, expected, maxulp=1)
            assert np.count_nonzero(actual != expected) <= max(2, actual.size // 10_000)
