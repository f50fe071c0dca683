"""What the worker's core needs from the outside, as Protocols (cosmicpython's ports).

The adapters implement them: :class:`inference_worker.adapters.tf_serving.TfServingModel`
(the model server over gRPC), :class:`inference_worker.adapters.fhir_writer.FhirWriter` (the
FHIR API over HTTP), Faust topics and the Faust table (wired in :mod:`inference_worker.app`).
Unit tests use fakes. Adapters raise the domain errors of :mod:`inference_worker.errors`, never
their transport's own.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from scanwatch.study_score import LEGACY_RULE, StudyRule


@dataclass(frozen=True)
class Prediction:
    """Model outputs for a batch of images, and which model version produced them."""

    probabilities: npt.NDArray[np.float32]  # (n, classes)
    class_names: list[str]
    threshold: float
    model_name: str
    model_version: int
    #: How the slice outputs become the study result: the model's ``study_rule`` output, or
    #: :data:`~scanwatch.study_score.LEGACY_RULE` (the study mean) for a model without one.
    study_rule: StudyRule = LEGACY_RULE
    #: (n, size, size) Grad-CAM in [0, 1], when the model's ``serving_default`` returns its
    #: heatmaps with the score (one pass); None otherwise (the saliency signature is asked).
    heatmaps: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class Saliency:
    """The saliency signature's answer for a batch of images (``schemas.model_signature``)."""

    heatmaps: npt.NDArray[np.float32]  # (n, size, size), Grad-CAM in [0, 1]
    probabilities: npt.NDArray[np.float32]  # (n, classes): per-slice, as Predict's
    class_names: list[str]
    model_name: str
    model_version: int


class Model(Protocol):
    """A served model that speaks the contract of :mod:`schemas.model_signature`."""

    @property
    def image_size(self) -> int | None:
        """Side of the model's square input images; ``None`` until the signature is checked."""
        ...

    @property
    def input_context(self) -> str:
        """How the model's three input channels are built
        (:data:`scanwatch.imaging.INPUT_CONTEXTS`): its ``study_rule``'s ``context``, as its
        last answer gave it; ``"none"`` before any answer."""
        ...

    async def check_signature(self) -> int:
        """Check the served signature against the contract; return the image size.

        Raises :class:`~inference_worker.errors.SignatureMismatch` (fatal) or
        :class:`~inference_worker.errors.ModelUnavailable` (transient).
        """
        ...

    async def predict(self, images: npt.NDArray[np.float32]) -> Prediction:
        """Score ``images`` (n, size, size, 3); every row comes from one model version."""
        ...

    async def explain(self, images: npt.NDArray[np.float32], model_version: int) -> Saliency:
        """Grad-CAM heatmaps of ``images`` from ``model_version`` (the version that scored them).

        Raises :class:`~inference_worker.errors.SaliencyUnavailable` when that version has no
        saliency signature, :class:`~inference_worker.errors.ModelUnavailable` (transient).
        """
        ...


class ResourceWriter(Protocol):
    """Where FHIR resources go (the FHIR API in production, a list in unit tests)."""

    async def put_all(self, resources: list[dict[str, Any]]) -> None:
        """Write ``resources`` in order; raises :class:`~inference_worker.errors.FhirUnavailable`
        when the API is unreachable for now."""
        ...

    async def put_missing(self, resources: list[dict[str, Any]]) -> None:
        """Write, in order, those of ``resources`` the store does not hold yet (an existing one
        is left as it is); raises like :meth:`put_all`."""
        ...


class Sink(Protocol):
    """A topic to send raw events to (a Faust topic in production)."""

    def send(self, *, key: bytes | None, value: bytes) -> Awaitable[Any]:
        """Hand one event to the producer."""
        ...
