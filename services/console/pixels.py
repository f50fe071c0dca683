"""Pixel data for WADO-RS: frames as uncompressed bytes, rendered images (8-bit grey or RGB
PNG/JPEG with window/level), and the multipart/related bodies that carry them (PS3.18 §8.7).
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian

#: Transfer syntaxes whose PixelData are the frames' bytes as they are (little endian, native).
NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})
#: VOI LUT functions (PS3.3 §C.11.2.1.3) the ``window`` parameter may name.
VOI_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
#: Bytes read per chunk when a stored file is streamed into a response.
CHUNK = 1024 * 1024


class NotDecodable(Exception):
    """The stored pixel data cannot be decoded here (a compressed transfer syntax without a
    decoder): 406, the instance itself (application/dicom) can still be retrieved."""


@dataclass(frozen=True)
class Window:
    """A VOI window: centre, width and function."""

    center: float
    width: float
    function: str = "linear"

    @classmethod
    def parse(cls, text: str) -> Window:
        """``center,width[,function]`` (PS3.18 §8.3.5.1.4); ValueError when malformed."""
        parts = text.split(",")
        if len(parts) not in (2, 3):
            raise ValueError("window is center,width[,function]")
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError as exc:
            raise ValueError("window center and width must be numbers") from exc
        function = parts[2].strip().lower() if len(parts) == 3 else "linear"
        if function not in VOI_FUNCTIONS:
            raise ValueError(f"window function must be one of {', '.join(VOI_FUNCTIONS)}")
        if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
            raise ValueError("window width must be positive")
        if function == "linear" and width < 1:
            raise ValueError("a linear window's width must be at least 1")
        return cls(center, width, function)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """0-255 grey levels of modality values (PS3.3 §C.11.2.1.2)."""
        c, w = self.center, self.width
        if self.function == "linear":
            out = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0 if w > 1 else values * 0
            out = np.where(values <= c - 0.5 - (w - 1) / 2, 0.0, out)
            out = np.where(values > c - 0.5 + (w - 1) / 2, 255.0, out)
        elif self.function == "linear-exact":
            out = ((values - c) / w + 0.5) * 255.0
        else:
            out = 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def frame_count(ds: pydicom.Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def frame_bytes(path: Path, numbers: Iterable[int]) -> list[bytes]:
    """The uncompressed bytes of frames ``numbers`` (1-based; checked by the caller), little
    endian, as PS3.5 §8.1.1 lays out native pixel data. Native files are sliced as stored;
    compressed ones are decoded with pydicom (:class:`NotDecodable` when it cannot)."""
    ds = pydicom.dcmread(path)
    transfer = str(ds.file_meta.TransferSyntaxUID)
    numbers = list(numbers)
    if transfer in NATIVE_LE and int(ds.BitsAllocated) % 8 == 0:
        size = (
            int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
            * int(ds.BitsAllocated) // 8
        )  # fmt: skip
        data = ds.PixelData
        return [bytes(data[(n - 1) * size : n * size]) for n in numbers]
    out = []
    for n in numbers:
        array = _decode(path, ds, n - 1, as_rgb=False)
        out.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return out


def _decode(path: Path, ds: pydicom.Dataset, index: int, *, as_rgb: bool) -> np.ndarray:
    try:
        return pixel_array(str(path), index=index, as_rgb=as_rgb)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        name = UID(str(ds.file_meta.TransferSyntaxUID)).name
        raise NotDecodable(
            f"the pixel data are stored as {name}, which this server cannot decode; retrieve "
            "the instance (application/dicom) and decode it in the viewer"
        ) from exc


def render(path: Path, number: int, window: Window | None, media_type: str) -> bytes:
    """Frame ``number`` as an 8-bit PNG or JPEG: grey through the window (``window``, else the
    header's first WindowCenter/WindowWidth, else the frame's range), colour as stored."""
    ds = pydicom.dcmread(path)
    array = _decode(path, ds, number - 1, as_rgb=True)
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        values = array.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0
        )
        voi = window or _header_window(ds) or _range_window(values)
        grey = voi.apply(values)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            grey = 255 - grey
        image = Image.fromarray(grey, mode="L")
    else:
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    if media_type == "image/png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _first(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if value else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _header_window(ds: pydicom.Dataset) -> Window | None:
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width < 1:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR")).lower().replace("_", "-")
    return Window(center, width, function if function in VOI_FUNCTIONS else "linear")


def _range_window(values: np.ndarray) -> Window:
    low, high = float(values.min()), float(values.max())
    return Window((low + high) / 2, max(high - low, 1.0), "linear-exact")


def transcode_explicit_le(path: Path) -> bytes:
    """The instance as Explicit VR Little Endian (decoded when compressed): for a viewer that
    asked for that transfer syntax. :class:`NotDecodable` when the pixels cannot be decoded."""
    ds = pydicom.dcmread(path)
    transfer = UID(str(ds.file_meta.TransferSyntaxUID))
    if transfer.is_compressed:
        try:
            ds.decompress()
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            raise NotDecodable(
                f"the instance is stored as {transfer.name}, which this server cannot decode; "
                "ask for transfer-syntax=* to receive it as stored"
            ) from exc
    elif transfer == "1.2.840.10008.1.2.2":
        raise NotDecodable("Explicit VR Big Endian instances are only served as stored")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def new_boundary() -> str:
    return uuid.uuid4().hex


def part_header(boundary: str, content_type: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()


def multipart(boundary: str, parts: Iterable[tuple[str, bytes]]) -> Iterator[bytes]:
    """A multipart/related body of in-memory ``(content type, bytes)`` parts."""
    for content_type, data in parts:
        yield part_header(boundary, content_type)
        yield data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()
