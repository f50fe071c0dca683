"""Scoring one ready study: select and preprocess slices, Predict, the study result by the
model's study rule (:func:`scanwatch.study_score.study_result`), write FHIR.

Free of Kafka and of any transport: the flow (:mod:`inference_worker.flow`) hands it a
:class:`StudyReadyV1` and publishes what it returns. The model and the FHIR writer are ports
(:mod:`inference_worker.ports`). Failures are classified (:mod:`inference_worker.errors`):
:class:`UnusableStudy` is the message's fault (dead letter), transient ones are retried here,
anything else is fatal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np
import numpy.typing as npt

from inference_worker import fhir_resources, heatmaps
from inference_worker.errors import ModelUnavailable, SaliencyUnavailable, SignatureMismatch
from inference_worker.metrics import WorkerMetrics
from inference_worker.pixels import PixelPool
from inference_worker.ports import Model, Prediction, ResourceWriter
from inference_worker.retry import with_retries
from inference_worker.series import (
    ChosenSeries,
    SelectedSeries,
    SelectionRules,
    SourceSlice,
    choose_series,
    context_plan,
    pixel_work,
    read_instances,
    selected,
    with_context,
)
from scanwatch import ids
from scanwatch.imaging import NEIGHBOURS, NO_CONTEXT
from scanwatch.study_score import StudyResult, study_result
from schemas import InferenceResultV1, StudyReadyV1
from schemas.model_signature import NORMAL_CLASS

log = logging.getLogger(__name__)

__all__ = [
    "ResourceWriter",
    "Scorer",
    "received_study",
    "result_event",
    "scored_study",
    "study_of",
]


def study_of(prediction: Prediction) -> StudyResult:
    """The study result of a prediction's slices under the model's own study rule."""
    if NORMAL_CLASS not in prediction.class_names:
        raise SignatureMismatch(
            f"model {prediction.model_name} v{prediction.model_version} has no "
            f"{NORMAL_CLASS!r} class: {prediction.class_names}"
        )
    return study_result(
        prediction.probabilities,
        prediction.class_names.index(NORMAL_CLASS),
        prediction.study_rule,
    )


class Scorer:
    """Scores studies with one model and writes results with one resource writer."""

    def __init__(
        self,
        model: Model,
        writer: ResourceWriter,
        retries: int,
        metrics: WorkerMetrics | None = None,
        rules: SelectionRules | None = None,
        heatmap_retries: int = 1,
        heatmaps: bool = True,
        pixels: PixelPool | None = None,
    ) -> None:
        """``heatmap_retries``: retries of a transient failure of the saliency Predict; fewer
        than the score's, since the score is written already and a heatmap is not worth
        holding the study's result event back for long. ``pixels``: where pixel data is
        decoded and resized (default: the event loop's thread executor, in this process); its
        owner closes it."""
        self.model = model
        self.pixels = pixels or PixelPool(0)
        self.heatmap_retries = heatmap_retries
        self.heatmaps = heatmaps
        self.rules = rules or SelectionRules()
        self.writer = writer
        self.retries = retries
        self.metrics = metrics or WorkerMetrics()

    async def score(self, ready: StudyReadyV1) -> InferenceResultV1:
        """Score a study and write its FHIR resources; return the result event.

        Each stage's seconds go to ``scanwatch_worker_stage_seconds`` (see
        :class:`~inference_worker.metrics.WorkerMetrics`)."""
        stages = self.metrics.stage_seconds
        started = time.monotonic()
        # Reading DICOM and resizing is CPU and disk work: keep it off the event loop.
        loop = asyncio.get_running_loop()
        refs = list(ready.instances)
        read = await loop.run_in_executor(None, read_instances, refs)
        headers_read = time.monotonic()
        # Off the loop too: it reads the chosen series' middle file for the patient's facts.
        chosen = await loop.run_in_executor(None, choose_series, refs, self.rules, read)
        received = received_study(ready, chosen)
        registered = fhir_resources.registered_resources_for(received)
        chose = time.monotonic()
        stages.labels("header_read").observe(headers_read - started)
        stages.labels("series_choice").observe(chose - headers_read)
        # While the model works, the study is recorded as received, so that a patient who asks
        # early learns it arrived; if the model fails (or is down before its first answer), that
        # record stays until a retry scores it.
        registering = asyncio.ensure_future(
            with_retries(lambda: self.writer.put_missing(registered), self.retries, "FHIR write")
        )
        try:
            image_size = self.model.image_size
            if image_size is None:
                image_size = await with_retries(
                    self.model.check_signature, self.retries, "GetModelMetadata"
                )
            # The inputs the served model was trained with (its study rule's context, as
            # its last answer gave it; "none" before any answer and for older models).
            context = getattr(self.model, "input_context", NO_CONTEXT)
            decoding = time.monotonic()
            images, decode_s, resize_s = await self._inputs(chosen, image_size, context)
            scored = selected(chosen, images)
            prepared = time.monotonic()
            # Summed over the pool's processes (a study split across two counts both).
            stages.labels("decode").observe(decode_s)
            stages.labels("resize").observe(resize_s)
            stages.labels("pixels").observe(prepared - decoding)
            stages.labels("preprocess").observe(prepared - started)
            prediction = await with_retries(
                lambda: self.model.predict(scored.images), self.retries, "Predict"
            )
            if prediction.study_rule.context != context:
                # The answering version wants other inputs (the first study, or a new version
                # with another context published meanwhile): build them and ask again, once.
                context = prediction.study_rule.context
                log.info(
                    "model's input context differs; study scored again",
                    extra={"StudyInstanceUID": ready.StudyInstanceUID, "context": context},
                )
                images, _, _ = await self._inputs(chosen, image_size, context)
                scored = selected(chosen, images)
                prediction = await with_retries(
                    lambda: self.model.predict(scored.images), self.retries, "Predict"
                )
                if prediction.study_rule.context != context:
                    raise ModelUnavailable("the served model's input context kept changing")
        except BaseException:
            await asyncio.gather(registering, return_exceptions=True)
            raise
        predicted = time.monotonic()
        stages.labels("predict").observe(predicted - prepared)
        await registering
        registered_at = time.monotonic()
        stages.labels("register_wait").observe(registered_at - predicted)
        study = scored_study(ready, received, prediction, study_of(prediction), scored.slices)
        ruled = time.monotonic()
        stages.labels("study_rule").observe(ruled - registered_at)
        # A redelivered study finds its heatmaps stored: its resources are then rebuilt with
        # them, the same as the first delivery's last write (no new FHIR version, no new file).
        present = await loop.run_in_executor(
            None, self._present_heatmaps, ready.StudyInstanceUID, scored, prediction
        )
        looked = time.monotonic()
        stages.labels("heatmap_lookup").observe(looked - ruled)
        if present is not None:
            study = dataclasses.replace(study, heatmaps=heatmaps.as_reference(present))
            self.metrics.heatmaps.labels("present").inc()
        resources = fhir_resources.all_resources_for(study)
        built = time.monotonic()
        stages.labels("fhir_build").observe(built - looked)
        await with_retries(lambda: self.writer.put_all(resources), self.retries, "FHIR write")
        written = time.monotonic()
        stages.labels("fhir_write").observe(written - built)
        result = result_event(study, slice_count=len(scored.images))
        if self.heatmaps and present is None and scored.slices:
            await self._add_heatmaps(study, scored, prediction)
            stages.labels("heatmap").observe(time.monotonic() - written)
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
                "write_s": round(written - predicted, 3),
            },
        )
        return result

    async def _inputs(
        self, chosen: ChosenSeries, image_size: int, context: str
    ) -> tuple[npt.NDArray[np.float32], float, float]:
        """The model input of the chosen slices for a model trained with ``context``, and the
        seconds spent decoding and resizing. ``none``: the scored slices, each repeated (a view,
        as ever); ``neighbours``: the scored slices and their neighbours decoded, stacked."""
        if context != NEIGHBOURS:
            return await self.pixels.decode(pixel_work(chosen), len(chosen.frames), image_size)
        plan = context_plan(chosen)
        grey, decode_s, resize_s = await self.pixels.decode_grey(
            pixel_work(chosen, plan.frames), len(plan.frames), image_size
        )
        return with_context(plan, grey), decode_s, resize_s

    @staticmethod
    def _present_heatmaps(
        study_uid: str, selected: SelectedSeries, prediction: Prediction
    ) -> heatmaps.HeatmapSeries | None:
        if not selected.slices:
            return None
        return heatmaps.present_series(
            heatmaps.store_root_of(selected.slices[0].path),
            study_uid,
            selected.slices,
            prediction.model_name,
            prediction.model_version,
        )

    async def _add_heatmaps(
        self, study: fhir_resources.ScoredStudy, selected: SelectedSeries, prediction: Prediction
    ) -> None:
        """Store and reference the study's heatmaps, after its score is written: those its
        Predict returned, or else the saliency signature's (a second pass of the model).

        Never fails the study: the score is in FHIR already, and a heatmap is evidence beside
        it. A failure is logged and counted (``scanwatch_worker_heatmaps_total{outcome=
        "failed"}``); the Observation then lists no heatmap series, and the next scoring of the
        study (a redelivery, late instances, a re-drive) tries again.
        """
        try:
            maps = prediction.heatmaps
            if maps is None:
                saliency = await with_retries(
                    lambda: self.model.explain(selected.images, prediction.model_version),
                    self.heatmap_retries,
                    "Predict saliency",
                )
                maps = saliency.heatmaps
            stored = await asyncio.get_running_loop().run_in_executor(
                None,
                heatmaps.write_heatmap_series,
                heatmaps.store_root_of(selected.slices[0].path),
                study.StudyInstanceUID,
                selected.slices,
                maps,
                prediction.probabilities,
                prediction.class_names,
                prediction.model_name,
                prediction.model_version,
                study.issued,
            )
            with_heatmaps = dataclasses.replace(study, heatmaps=heatmaps.as_reference(stored))
            await with_retries(
                lambda: self.writer.put_all(fhir_resources.all_resources_for(with_heatmaps)),
                self.heatmap_retries,
                "FHIR write",
            )
        except SaliencyUnavailable as exc:
            self.metrics.heatmaps.labels("unavailable").inc()
            log.info(
                "scored without heatmaps",
                extra={"StudyInstanceUID": study.StudyInstanceUID, "why": str(exc)},
            )
            return
        except Exception as exc:  # noqa: BLE001 - any heatmap failure leaves the score standing
            self.metrics.heatmaps.labels("failed").inc()
            log.warning(
                "heatmaps failed; the score stands without them",
                # The type only: a DICOM library's message may quote header values (PHI).
                extra={"StudyInstanceUID": study.StudyInstanceUID, "error": type(exc).__name__},
            )
            return
        self.metrics.heatmaps.labels("written").inc()
        log.info(
            "heatmaps stored",
            extra={
                "StudyInstanceUID": study.StudyInstanceUID,
                "SeriesInstanceUID": stored.SeriesInstanceUID,
                "instances": len(stored.SOPInstanceUIDs),
                "written": stored.written,
            },
        )


def result_event(study: fhir_resources.ScoredStudy, slice_count: int) -> InferenceResultV1:
    """The ``inference.result.v1`` event of a scored study: the same score, class and
    probabilities as its FHIR resources, computed once by :class:`ScoredStudy`."""
    return InferenceResultV1(
        StudyInstanceUID=study.StudyInstanceUID,
        SeriesInstanceUID=study.series.SeriesInstanceUID,
        model_name=study.model_name,
        model_version=study.model_version,
        class_names=list(study.class_names),
        probabilities=list(study.probabilities),
        predicted_class=study.predicted_class,
        anomaly_score=study.anomaly_score,
        threshold=study.threshold,
        slice_count=slice_count,
        observation_id=ids.observation_id(
            study.StudyInstanceUID, study.model_name, study.model_version
        ),
    )


def received_study(
    ready: StudyReadyV1, selected: ChosenSeries | SelectedSeries
) -> fhir_resources.ReceivedStudy:
    """The study as the chosen series' header describes it."""
    header = selected.header
    return fhir_resources.ReceivedStudy(
        PatientID=header.PatientID,
        IssuerOfPatientID=header.IssuerOfPatientID,
        PatientName=header.PatientName,
        PatientSex=header.PatientSex,
        PatientBirthDate=header.PatientBirthDate,
        StudyInstanceUID=ready.StudyInstanceUID,
        AccessionNumber=header.AccessionNumber,
        StudyDescription=header.StudyDescription,
        started=header.started,
        acquired=header.acquired,
        timezone=header.timezone,
        series=fhir_resources.ScoredSeries(
            SeriesInstanceUID=selected.SeriesInstanceUID,
            Modality="MR",
            NumberOfSeriesRelatedInstances=selected.number_of_instances,
            SeriesDescription=header.SeriesDescription,
            SeriesNumber=header.SeriesNumber,
        ),
        NumberOfStudyRelatedSeries=selected.number_of_series,
        NumberOfStudyRelatedInstances=selected.study_instance_count,
    )


def scored_study(
    ready: StudyReadyV1,
    received: fhir_resources.ReceivedStudy,
    prediction: Prediction,
    result: StudyResult,
    slices: tuple[SourceSlice, ...] = (),
) -> fhir_resources.ScoredStudy:
    """What the FHIR builders need: the received study, the model's answer and its study
    result (``slices``: the stored slice behind each scored image, where the strongest evidence
    is looked up).

    ``issued`` is the ready event's time, not the clock: a redelivered event then rebuilds the
    very same resources, and the FHIR API stores no new version.
    """
    described = {f.name: getattr(received, f.name) for f in dataclasses.fields(received)}
    return fhir_resources.ScoredStudy(
        **described,
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        class_names=tuple(prediction.class_names),
        probabilities=tuple(float(p) for p in result.probabilities),
        threshold=prediction.threshold,
        issued=ready.occurred_at,
        evidence=_evidence(prediction, result, slices),
    )


def _evidence(
    prediction: Prediction, result: StudyResult, slices: tuple[SourceSlice, ...]
) -> fhir_resources.Evidence | None:
    if len(slices) != len(result.slice_anomaly):
        return None
    strongest = slices[result.strongest]
    return fhir_resources.Evidence(
        rule=prediction.study_rule.name,
        SOPInstanceUID=strongest.SOPInstanceUID,
        frame=strongest.frame,
        # clamped against rounding, as the study's own score is
        anomaly_score=min(max(float(result.slice_anomaly[result.strongest]), 0.0), 1.0),
    )
