"""Decoding and resizing a chosen series' pixels: in this process, or in a pool of processes.

The headers are read once, in the worker's process (:func:`inference_worker.series.choose_series`),
with the pixel data left in the file. What a decoder needs of each chosen instance is then
described by :func:`describe`: for native (uncompressed) little-endian greyscale pixel data, the
element's offset and length in the file, so that a decoder reads those bytes and nothing else
(no second parse of the header); for anything else (compressed transfer syntaxes, colour), the
dataset itself, whose deferred pixel data pydicom reads and decodes. Either way the stored
values are the ones pydicom's ``pixel_array`` gives (bits above BitsStored masked, signed values
sign-extended), and :func:`scanwatch.imaging.preprocess_grey_stack` makes the model input of
the images (one channel; repeated into three, as a view, once the study's rows are together).

:class:`PixelPool` runs that work off the event loop: with ``processes`` 0 or 1 on the loop's
default thread executor, as before; with more, a study's instances are split across that many
processes, each reading, decoding and resizing its share. A pool process that dies (killed, out
of memory, a decoder crash) breaks the pool (``BrokenProcessPool``): the pool is replaced and
the study tried once more on the new one; a second break on the same study makes the study
unusable (a file that kills its decoder would otherwise kill every pool it meets).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from inference_worker.errors import UnusableStudy
from scanwatch.imaging import preprocess_grey_stack

__all__ = [
    "Decoded",
    "InstancePixels",
    "NativePixels",
    "PixelPool",
    "PixelSource",
    "decode_and_resize",
    "describe",
    "into_grey",
    "into_rgb",
]

log = logging.getLogger(__name__)

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class NativePixels:
    """Where an instance's native pixel data lies in its file, and how its words are laid out."""

    offset: int
    length: int
    dtype: str  # numpy dtype of one stored value: "<u2", "<i2", "u1" or "i1"
    frames: int
    Rows: int
    Columns: int
    BitsStored: int


@dataclass(frozen=True)
class InstancePixels:
    """One instance's share of a study's decoding: where its pixels are, and which of its
    images go to which rows of the model input (``images``: (row, frame index, slope,
    intercept); frame index None for a single-frame instance)."""

    SOPInstanceUID: str
    path: str
    native: NativePixels | None
    #: The header's dataset (pixel data deferred) when ``native`` is None: pydicom decodes it.
    dataset: Dataset | None = field(compare=False, repr=False)
    images: tuple[tuple[int, int | None, float, float], ...]


@dataclass(frozen=True)
class Decoded:
    """Model input rows made by one decoder call, and its time (seconds) per stage."""

    rows: tuple[int, ...]
    #: (len(rows), size, size): one grey channel, a third of the bytes sent back from a pool
    #: process; :func:`into_rgb` repeats it into the model's three channels.
    images: npt.NDArray[np.float32]
    decode_s: float
    resize_s: float


def native_pixels(ds: Dataset) -> NativePixels | None:
    """The file location of ``ds``'s pixel data if a plain read of it is the whole decoding
    (native little-endian, one sample of 8 or 16 bits, still in the file); else None."""
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if syntax not in _NATIVE_SYNTAXES or not getattr(ds, "filename", None):
        return None
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    # A raw element whose value is None: deferred, still in the file (read with defer_size).
    if not isinstance(element, RawDataElement) or element.value is not None:
        return None
    try:
        layout = {keyword: int(getattr(ds, keyword)) for keyword in _REQUIRED_LAYOUT}
        layout["SamplesPerPixel"] = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        layout["NumberOfFrames"] = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return _native(layout, element.value_tell, element.length)


#: The Image Pixel attributes (US) a native read needs, by tag (SamplesPerPixel: 1 if absent).
_REQUIRED_LAYOUT = {
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "PixelRepresentation": 0x00280103,
}
_SAMPLES_PER_PIXEL = 0x00280002
#: The tags a header scan reads for :func:`native_from_scan`, and the one it only locates.
LAYOUT_TAGS = frozenset({*_REQUIRED_LAYOUT.values(), _SAMPLES_PER_PIXEL})
PIXEL_DATA_TAG = 0x7FE00010


def native_from_scan(
    transfer_syntax: str, values: dict[int, bytes], places: dict[int, tuple[int, int]]
) -> NativePixels | None:
    """:func:`native_pixels` from a header scan (:func:`scanwatch.dicom_scan.scan_file`) of a
    single-frame instance: its raw US values and where its pixel data lies."""
    if transfer_syntax not in _NATIVE_SYNTAXES or PIXEL_DATA_TAG not in places:
        return None
    layout = {"NumberOfFrames": 1}
    for keyword, tag in (*_REQUIRED_LAYOUT.items(), ("SamplesPerPixel", _SAMPLES_PER_PIXEL)):
        raw = values.get(tag)
        if raw is None and tag == _SAMPLES_PER_PIXEL:
            raw = b"\x01\x00"
        if raw is None or len(raw) != 2:
            return None
        layout[keyword] = int.from_bytes(raw, "little") or (1 if tag == _SAMPLES_PER_PIXEL else 0)
    offset, length = places[PIXEL_DATA_TAG]
    return _native(layout, offset, length)


def _native(layout: dict[str, int], offset: int, length: int | None) -> NativePixels | None:
    """The native read of pixel data at ``offset`` (``length`` bytes), if ``layout`` is one
    sample of 8 or 16 bits that those bytes hold whole."""
    bits, stored = layout["BitsAllocated"], layout["BitsStored"]
    frames, rows, columns = layout["NumberOfFrames"], layout["Rows"], layout["Columns"]
    if (
        layout["SamplesPerPixel"] != 1
        or bits not in (8, 16)
        or not 0 < stored <= bits
        or length in (None, _UNDEFINED_LENGTH)
    ):
        return None
    assert length is not None
    if length < frames * rows * columns * bits // 8:
        return None
    signed = layout["PixelRepresentation"] == 1
    dtype = ("<i2" if signed else "<u2") if bits == 16 else ("i1" if signed else "u1")
    return NativePixels(offset, length, dtype, frames, rows, columns, stored)


#: Where an instance's pixels come from: their place in the file (a header scan found it), or
#: the dataset its header was read from by pydicom (pixel data deferred).
PixelSource = NativePixels | Dataset


def describe(
    sources: dict[str, PixelSource],
    paths: dict[str, str],
    images: Sequence[tuple[str, int | None, float, float]],
) -> list[InstancePixels]:
    """What the decoders need, per instance, to make the model input rows ``images``
    ((SOPInstanceUID, frame index, slope, intercept) per row, in row order) from the
    ``sources`` their headers were read from."""
    rows: dict[str, list[tuple[int, int | None, float, float]]] = {}
    for row, (uid, index, slope, intercept) in enumerate(images):
        rows.setdefault(uid, []).append((row, index, slope, intercept))
    described = []
    for uid, wanted in rows.items():
        source = sources[uid]
        native: NativePixels | None
        if isinstance(source, NativePixels):
            native, ds = source, None
        else:
            native = native_pixels(source)
            ds = None if native else source
        described.append(InstancePixels(uid, paths[uid], native, ds, tuple(wanted)))
    return described


def _stored_values(instance: InstancePixels) -> npt.NDArray[np.generic]:
    """The instance's stored values, as pydicom's ``pixel_array`` gives them."""
    native = instance.native
    if native is None:
        assert instance.dataset is not None
        return instance.dataset.pixel_array
    count = native.frames * native.Rows * native.Columns
    size = count * np.dtype(native.dtype).itemsize
    with open(instance.path, "rb") as file:
        file.seek(native.offset)
        data = file.read(size)
    if len(data) != size:
        raise OSError(f"pixel data of {instance.SOPInstanceUID} is truncated")
    values = np.frombuffer(data, dtype=native.dtype, count=count)
    bits = values.dtype.itemsize * 8
    if native.BitsStored < bits:
        if values.dtype.kind == "u":  # the bits above BitsStored are not the value's
            values = values & np.array((1 << native.BitsStored) - 1, dtype=values.dtype)
        else:  # two's complement in BitsStored bits: extend the sign
            shift = bits - native.BitsStored
            values = (values << shift) >> shift
    shape = (native.Rows, native.Columns)
    return values.reshape((native.frames, *shape) if native.frames > 1 else shape)


#: Decoded images preprocessed together (:func:`scanwatch.imaging.preprocess_grey_stack`), at
#: most: few enough that the decoded slices waiting stay small (32 of 512² at 16 bits: 16 MiB).
STACK_SLICES = 32


class _Pending:
    """Decoded 2-D images for consecutive rows of ``images``, preprocessed in one call once
    :data:`STACK_SLICES` are waiting (or at the end)."""

    def __init__(self, images: npt.NDArray[np.float32], size: int) -> None:
        self.images, self.size = images, size
        self.first = 0  # the row of images the first waiting image goes to
        self.waiting: list[tuple[np.ndarray, float, float]] = []

    def add(self, image: np.ndarray, slope: float, intercept: float) -> None:
        self.waiting.append((image, slope, intercept))
        if len(self.waiting) == STACK_SLICES:
            self.flush()

    def flush(self) -> None:
        if not self.waiting:
            return
        stored, slopes, intercepts = zip(*self.waiting, strict=True)
        end = self.first + len(stored)
        preprocess_grey_stack(
            stored, self.size, slopes, intercepts, out=self.images[self.first : end]
        )
        self.first, self.waiting = end, []


def decode_and_resize(instances: Sequence[InstancePixels], size: int) -> Decoded:
    """Decode each instance once and preprocess its images into model input rows (up to
    :data:`STACK_SLICES` images at a time).

    Runs in a pool process (or a thread): raises :class:`UnusableStudy` for pixel data that
    cannot be read or is not greyscale 2-D."""
    rows: list[int] = []
    count = sum(len(instance.images) for instance in instances)
    images = np.empty((count, size, size), np.float32)
    pending = _Pending(images, size)
    decode_s = resize_s = 0.0
    for instance in instances:
        started = time.perf_counter()
        try:
            pixels = _stored_values(instance)
        except Exception as exc:  # noqa: BLE001 - any decoding failure makes it unusable
            raise UnusableStudy(
                f"cannot decode pixels of {instance.SOPInstanceUID}: {exc}"
            ) from None
        decoded = time.perf_counter()
        decode_s += decoded - started
        for row, index, slope, intercept in instance.images:
            image = pixels if index is None else pixels[index]
            if image.ndim != 2:
                raise UnusableStudy(
                    f"instance {instance.SOPInstanceUID} is not greyscale 2-D: {image.shape}"
                )
            pending.add(image, slope, intercept)
            rows.append(row)
        resize_s += time.perf_counter() - decoded
    started = time.perf_counter()
    pending.flush()
    resize_s += time.perf_counter() - started
    return Decoded(tuple(rows), images, decode_s, resize_s)


def into_grey(parts: Sequence[Decoded], count: int, size: int) -> npt.NDArray[np.float32]:
    """The ``count`` grey rows ``(count, size, size)`` of the decoders' ``parts``, each at its
    row number (no copy when one part holds them all in order)."""
    if len(parts) == 1 and parts[0].rows == tuple(range(count)):
        return parts[0].images
    grey = np.empty((count, size, size), np.float32)
    for part in parts:
        grey[list(part.rows)] = part.images
    return grey


def into_rgb(parts: Sequence[Decoded], count: int, size: int) -> npt.NDArray[np.float32]:
    """The model input ``(count, size, size, 3)``: each part's grey rows at their row numbers,
    repeated into three channels (as :func:`scanwatch.imaging.preprocess_slice` makes them).

    A read-only view that repeats one grey array (no copy of three channels): the Predict
    request's bytes are made from it directly (:func:`scanwatch.tensors.to_tensor_proto`)."""
    grey = into_grey(parts, count, size)
    return np.broadcast_to(grey[..., None], (count, size, size, 3))


#: How long :meth:`PixelPool.close` waits for its processes before it kills them.
CLOSE_TIMEOUT_S = 10.0


class PixelPool:
    """Decodes and preprocesses studies off the event loop: in a pool of ``processes``
    processes, or (0 or 1) on the event loop's default thread executor."""

    def __init__(self, processes: int = 0) -> None:
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.processes = processes
        self.replaced = 0  # pools replaced after a process died
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    def _pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise RuntimeError("the pixel pool is closed")
        if self._executor is None:
            # forkserver, not fork: the worker holds threads (gRPC, Kafka) a fork would copy
            # mid-flight; the server process forks fresh decoders cheaply when one is replaced.
            self._executor = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("forkserver"),
            )
        return self._executor

    def pids(self) -> list[int]:
        """The pool processes' ids (empty before the first study or without a pool)."""
        executor = self._executor
        processes = getattr(executor, "_processes", None) or {}
        return [int(pid) for pid in processes]

    async def decode(
        self, instances: Sequence[InstancePixels], count: int, size: int
    ) -> tuple[npt.NDArray[np.float32], float, float]:
        """The ``count`` model input rows the ``instances`` describe, in row order, and the
        seconds spent decoding and resizing (summed over the processes)."""
        parts = await self._parts(instances, size)
        images = into_rgb(parts, count, size)
        return images, sum(p.decode_s for p in parts), sum(p.resize_s for p in parts)

    async def decode_grey(
        self, instances: Sequence[InstancePixels], count: int, size: int
    ) -> tuple[npt.NDArray[np.float32], float, float]:
        """:meth:`decode` with one grey channel ``(count, size, size)``, for inputs whose three
        channels are not one slice repeated (:func:`scanwatch.imaging.neighbour_channels`)."""
        parts = await self._parts(instances, size)
        grey = into_grey(parts, count, size)
        return grey, sum(p.decode_s for p in parts), sum(p.resize_s for p in parts)

    async def _parts(self, instances: Sequence[InstancePixels], size: int) -> list[Decoded]:
        loop = asyncio.get_running_loop()
        if self.processes <= 1:
            return [await loop.run_in_executor(None, decode_and_resize, instances, size)]
        return await self._in_pool(loop, instances, size)

    async def _in_pool(
        self, loop: asyncio.AbstractEventLoop, instances: Sequence[InstancePixels], size: int
    ) -> list[Decoded]:
        shares = min(self.processes, len(instances)) or 1
        # Every n-th instance to each process: shares of nearly equal size.
        chunks = [list(instances[i::shares]) for i in range(shares)]
        for attempt in (1, 2):
            executor: Executor = self._pool()
            try:
                return list(
                    await asyncio.gather(
                        *(
                            loop.run_in_executor(executor, decode_and_resize, chunk, size)
                            for chunk in chunks
                        )
                    )
                )
            except BrokenProcessPool:
                self._replace(executor)
                if attempt == 2:
                    raise UnusableStudy(
                        "a pixel decoder process died twice on this study"
                    ) from None
                log.warning("a pixel decoder process died; pool replaced, study tried again")
        raise AssertionError("unreachable")

    def _replace(self, broken: Executor) -> None:
        """Drop the broken pool (once, however many studies saw it break)."""
        if self._executor is broken:
            self._executor = None
            self.replaced += 1
            broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the pool processes (the worker is stopping); later calls fail.

        A pool whose process has just died, before its executor noticed, never stops on its
        own in Python 3.11 (the survivors wait on a queue lock the dead one held; compare
        cpython gh-132969): its processes get :data:`CLOSE_TIMEOUT_S` to stop, then are
        killed."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # Both are dropped by shutdown(); the manager thread joins the processes.
        processes = list((getattr(executor, "_processes", None) or {}).values())
        manager = getattr(executor, "_executor_manager_thread", None)
        executor.shutdown(wait=False, cancel_futures=True)
        if manager is None:
            return
        manager.join(CLOSE_TIMEOUT_S)
        if manager.is_alive():
            log.warning("pixel decoders did not stop; killed", extra={"processes": len(processes)})
            for process in processes:
                process.kill()  # a no-op for one already reaped
            manager.join(CLOSE_TIMEOUT_S)
