"""Labelled image sets as training sees them, split into train / validation / test.

Images are model inputs already: float32 in [0, 255], ``(N, size, size, C)`` with ``C`` 1 (MR,
grey; the input pipeline repeats it to RGB, as :func:`scanwatch.imaging.preprocess_slice` does)
or 3 (colour photographs). ``groups`` holds the unit that must never straddle two splits (the
subject, the patient, the lesion): splits are made by group, never by image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from scanwatch.durable import replace_file

SPLITS = ("train", "val", "test")
#: ``description["slices_from"]`` of slices taken from whole studies (``training.study_dataset``).
FROM_STUDIES = "studies"
#: Default share of groups in validation and test (the rest trains).
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


@dataclass(frozen=True)
class Split:
    """One split: images, integer labels (indices into the class names) and their groups."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    #: ``(N, H, W)`` uint8: where each image's lesion is (0–255, all 0 on a normal image), for
    #: training with a mask head (slices of studies built with ``lesion_masks``); else None.
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be (N, H, W, 1|3), got {self.images.shape}")
        if not (len(self.images) == len(self.labels) == len(self.groups)):
            raise ValueError("images, labels and groups differ in length")
        if self.masks is not None and self.masks.shape != self.images.shape[:3]:
            raise ValueError(
                f"masks must be {self.images.shape[:3]} (one per image), got {self.masks.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self, n_classes: int) -> list[int]:
        """Images per class."""
        return np.bincount(self.labels, minlength=n_classes).tolist()


@dataclass(frozen=True)
class LabelledImages:
    """A dataset ready to train on: class names and three disjoint splits."""

    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    description: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SPLITS:
            split = getattr(self, name)
            if len(split) and split.labels.max() >= len(self.class_names):
                raise ValueError(f"{name} has labels outside the {len(self.class_names)} classes")
        seen: dict[str, str] = {}
        for name in SPLITS:
            for group in np.unique(getattr(self, name).groups):
                other = seen.setdefault(str(group), name)
                if other != name:
                    raise ValueError(f"group {group!r} is in both {other} and {name} (leakage)")

    @property
    def from_studies(self) -> bool:
        """Whether the slices were taken from whole (synthetic) studies."""
        return self.description.get("slices_from") == FROM_STUDIES

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    def fingerprint(self) -> str:
        """SHA-256 over class names, pixels, labels and groups of every split (hex)."""
        digest = hashlib.sha256(json.dumps(list(self.class_names)).encode())
        for name in SPLITS:
            split = getattr(self, name)
            arrays = [split.images, split.labels, split.groups.astype(str)]
            if split.masks is not None:  # a set without masks keeps its fingerprint
                arrays.append(split.masks)
            for array in arrays:
                digest.update(np.ascontiguousarray(array).tobytes())
                digest.update(str(array.shape).encode())
        return digest.hexdigest()

    def summary(self) -> dict:
        """Images per class and groups per split (for logs, reports and the data card)."""
        return {
            name: {
                "images": len(getattr(self, name)),
                "groups": int(len(np.unique(getattr(self, name).groups))),
                "per_class": dict(
                    zip(
                        self.class_names,
                        getattr(self, name).counts(len(self.class_names)),
                        strict=True,
                    )
                ),
            }
            for name in SPLITS
        }

    def save(self, path: Path) -> None:
        """Write to one ``.npz`` (written beside, then renamed: never half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "class_names": np.array(self.class_names),
            "description": np.array(json.dumps(self.description)),
        }
        for name in SPLITS:
            split = getattr(self, name)
            arrays[f"{name}_images"] = split.images
            arrays[f"{name}_labels"] = split.labels
            arrays[f"{name}_groups"] = split.groups.astype(str)
            if split.masks is not None:
                arrays[f"{name}_masks"] = split.masks
        temp = path.with_name(f".{path.name}.tmp.npz")
        # Cast: savez's stub types **kwds like its own keyword options; these are all arrays.
        np.savez(temp, **cast(dict[str, Any], arrays))
        replace_file(temp, path)

    @classmethod
    def load(cls, path: Path) -> LabelledImages:
        with np.load(Path(path), allow_pickle=False) as data:
            splits = {
                name: Split(
                    data[f"{name}_images"],
                    data[f"{name}_labels"],
                    data[f"{name}_groups"],
                    data[f"{name}_masks"] if f"{name}_masks" in data else None,
                )
                for name in SPLITS
            }
            return cls(
                class_names=tuple(str(c) for c in data["class_names"]),
                description=json.loads(str(data["description"])),
                **splits,
            )


def split_by_group(
    groups: Sequence[str] | np.ndarray,
    seed: int,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> dict[str, np.ndarray]:
    """Indices of each split, assigning whole groups: a seeded shuffle of the distinct groups.

    Every split gets at least one group when there are at least three groups.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    names = np.asarray([str(g) for g in groups])
    distinct = np.unique(names)
    if len(distinct) < 3:
        raise ValueError(f"need at least 3 distinct groups to split, got {len(distinct)}")
    order = np.random.default_rng(seed).permutation(distinct)
    n_test = max(1, round(len(order) * test_fraction)) if test_fraction else 0
    n_val = max(1, round(len(order) * val_fraction)) if val_fraction else 0
    assigned = {
        "test": set(order[:n_test]),
        "val": set(order[n_test : n_test + n_val]),
        "train": set(order[n_test + n_val :]),
    }
    return {
        name: np.flatnonzero(np.isin(names, list(members))) for name, members in assigned.items()
    }


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    class_names: Sequence[str],
    seed: int,
    description: dict | None = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> LabelledImages:
    """Split stacked images by group into a :class:`LabelledImages`."""
    groups_array = np.asarray([str(g) for g in groups])
    indices = split_by_group(groups_array, seed, val_fraction, test_fraction)
    splits = {
        name: Split(images[idx], np.asarray(labels)[idx].astype(np.int64), groups_array[idx])
        for name, idx in indices.items()
    }
    return LabelledImages(tuple(class_names), description=description or {}, **splits)
