"""Scoring one ready study: select and preprocess slices, Predict, aggregate, write FHIR.

The core of the worker, free of Kafka: the Faust agent hands it a :class:`StudyReadyV1` and
publishes what it returns. Failures are classified: :class:`UnusableStudy` is the message's fault
(dead letter), transient ones are retried here, anything else is fatal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import date, datetime
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset

from inference_worker import fhir_resources
from inference_worker.metrics import WorkerMetrics
from inference_worker.model_client import ModelClient, Prediction
from inference_worker.retry import with_retries
from inference_worker.series import SelectedSeries, SelectionRules, select_series
from scanwatch import ids
from schemas import InferenceResultV1, StudyReadyV1
from schemas.model_signature import NORMAL_CLASS

log = logging.getLogger(__name__)


class ResourceWriter(Protocol):
    """Where FHIR resources go (the FHIR API in production, a list in unit tests)."""

    async def put_all(self, resources: list[dict]) -> None: ...


def aggregate(prediction: Prediction) -> np.ndarray:
    """Study-level class probabilities: the mean over the scored slices, renormalised."""
    mean = prediction.probabilities.astype(np.float64).mean(axis=0)
    return mean / mean.sum()


class Scorer:
    """Scores studies with one model client and writes results with one resource writer."""

    def __init__(
        self,
        model: ModelClient,
        writer: ResourceWriter,
        max_slices: int,
        retries: int,
        metrics: WorkerMetrics | None = None,
        rules: SelectionRules | None = None,
    ) -> None:
        self.model = model
        self.rules = rules or SelectionRules()
        self.writer = writer
        self.max_slices = max_slices
        self.retries = retries
        self.metrics = metrics or WorkerMetrics()

    async def score(self, ready: StudyReadyV1) -> InferenceResultV1:
        """Score a study and write its FHIR resources; return the result event."""
        started = time.monotonic()
        if self.model.image_size is None:
            await with_retries(self.model.check_signature, self.retries, "GetModelMetadata")
        assert self.model.image_size is not None
        # Reading DICOM and resizing is CPU and disk work: keep it off the event loop.
        selected = await asyncio.get_running_loop().run_in_executor(
            None,
            select_series,
            list(ready.instances),
            self.model.image_size,
            self.max_slices,
            self.rules,
        )
        prepared = time.monotonic()
        prediction = await with_retries(
            lambda: self.model.predict(selected.images), self.retries, "Predict"
        )
        predicted = time.monotonic()
        probabilities = aggregate(prediction)
        study = scored_study(ready, selected, prediction, probabilities)
        await with_retries(
            lambda: self.writer.put_all(fhir_resources.all_resources_for(study)),
            self.retries,
            "FHIR write",
        )
        class_names = prediction.class_names
        anomaly = 1.0 - float(probabilities[class_names.index(NORMAL_CLASS)])
        result = InferenceResultV1(
            StudyInstanceUID=ready.StudyInstanceUID,
            SeriesInstanceUID=selected.SeriesInstanceUID,
            model_name=prediction.model_name,
            model_version=prediction.model_version,
            class_names=class_names,
            probabilities=[float(p) for p in probabilities],
            predicted_class=class_names[int(np.argmax(probabilities))],
            anomaly_score=min(max(anomaly, 0.0), 1.0),
            threshold=prediction.threshold,
            slice_count=len(selected.images),
            observation_id=ids.observation_id(
                ready.StudyInstanceUID, prediction.model_name, prediction.model_version
            ),
        )
        stages = self.metrics.stage_seconds
        stages.labels("preprocess").observe(prepared - started)
        stages.labels("predict").observe(predicted - prepared)
        stages.labels("fhir_write").observe(time.monotonic() - predicted)
        self.metrics.studies_scored.labels(result.model_name, str(result.model_version)).inc()
        log.info(
            "study scored",
            extra={
                "StudyInstanceUID": ready.StudyInstanceUID,
                "model": result.model_name,
                "version": result.model_version,
                "slices": result.slice_count,
                "preprocess_s": round(prepared - started, 3),
                "predict_s": round(predicted - prepared, 3),
                "write_s": round(time.monotonic() - predicted, 3),
            },
        )
        return result


def scored_study(
    ready: StudyReadyV1,
    selected: SelectedSeries,
    prediction: Prediction,
    probabilities: np.ndarray,
) -> fhir_resources.ScoredStudy:
    """What the FHIR builders need, from the study's DICOM header and the model's answer.

    ``issued`` is the ready event's time, not the clock: a redelivered event then rebuilds the
    very same resources, and the FHIR API stores no new version.
    """
    ds = selected.header
    tz = fhir_resources.dicom_timezone(getattr(ds, "TimezoneOffsetFromUTC", None))
    birth = getattr(ds, "PatientBirthDate", None)
    series_number = getattr(ds, "SeriesNumber", None)
    return fhir_resources.ScoredStudy(
        PatientID=str(getattr(ds, "PatientID", "") or ""),
        IssuerOfPatientID=getattr(ds, "IssuerOfPatientID", None) or None,
        PatientName=str(ds.PatientName) if getattr(ds, "PatientName", None) else None,
        PatientSex=getattr(ds, "PatientSex", None) or None,
        PatientBirthDate=_date(birth),
        StudyInstanceUID=ready.StudyInstanceUID,
        AccessionNumber=getattr(ds, "AccessionNumber", None) or None,
        StudyDescription=getattr(ds, "StudyDescription", None) or None,
        started=_study_start(ds),
        acquired=selected.acquired,
        timezone=tz,
        series=fhir_resources.ScoredSeries(
            SeriesInstanceUID=selected.SeriesInstanceUID,
            Modality="MR",
            NumberOfSeriesRelatedInstances=selected.number_of_instances,
            SeriesDescription=getattr(ds, "SeriesDescription", None) or None,
            SeriesNumber=int(series_number) if series_number not in (None, "") else None,
        ),
        NumberOfStudyRelatedSeries=selected.number_of_series,
        NumberOfStudyRelatedInstances=selected.study_instance_count,
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        class_names=tuple(prediction.class_names),
        probabilities=tuple(float(p) for p in probabilities),
        threshold=prediction.threshold,
        issued=ready.occurred_at,
    )


def _date(value: object) -> date | None:
    from pydicom.valuerep import DA

    try:
        return DA(value) if value else None
    except ValueError:
        return None


def _study_start(ds: Dataset) -> datetime | None:
    from pydicom.valuerep import DA, TM

    try:
        if date_value := DA(getattr(ds, "StudyDate", None) or None):
            return datetime.combine(date_value, TM(getattr(ds, "StudyTime", None) or "000000"))
    except (ValueError, TypeError):
        pass
    return None
