"""The codes of scanwatch's AI results on FHIR (DESIGN §6), written once: the worker builds
Observations with them and every reader (the chatbot's actions, the portal) finds its values by
them. Plain constants, no imports: the chatbot's own virtualenv imports this module too."""

#: Local CodeSystem of scanwatch's AI observation codes (the score and per-class probabilities).
CODE_SYSTEM = "urn:scanwatch:codesystem:mri-ai"
#: Local CodeSystem of the classes a model predicts (the class names of its signature).
CLASS_SYSTEM = "urn:scanwatch:codesystem:mri-ai-class"
#: ``Observation.code`` of the study-level anomaly score.
ANOMALY_SCORE_CODE = "anomaly-score"
ANOMALY_SCORE_DISPLAY = "MRI AI anomaly score"
#: Prefix of the component code carrying one class probability: ``p-<class name>``.
PROBABILITY_CODE_PREFIX = "p-"
#: DiagnosticReport.code of the AI report (local).
REPORT_CODE = "mri-ai-report"
REPORT_DISPLAY = "MRI AI anomaly report"

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
FINDING_CODE = "121071"  # DCM "Finding": the component carrying the predicted class
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
ABNORMAL = "A"
NORMAL = "N"
#: Observation components that keep where the study's strongest evidence lies (the slice with
#: the largest slice anomaly score) and by which rule the slices became the study's score.
#: ``valueString``: the SOPInstanceUID of the strongest slice's instance.
STRONGEST_SLICE_CODE = "strongest-slice"
STRONGEST_SLICE_DISPLAY = "Slice with the strongest evidence"
#: ``valueInteger``: its frame number (1-based) in a multi-frame instance; absent otherwise.
STRONGEST_SLICE_FRAME_CODE = "strongest-slice-frame"
STRONGEST_SLICE_FRAME_DISPLAY = "Frame number of the slice with the strongest evidence"
#: ``valueQuantity``: that slice's own anomaly score, 1 - p(normal), before any calibration.
STRONGEST_SLICE_SCORE_CODE = "strongest-slice-anomaly-score"
STRONGEST_SLICE_SCORE_DISPLAY = "Anomaly score of the slice with the strongest evidence"
#: ``valueString``: the model's study rule (``scanwatch.study_score.StudyRule.name``: mean,
#: max, top_3_mean, noisy_or), which turned slice scores into the study's anomaly score.
STUDY_RULE_CODE = "study-rule"
STUDY_RULE_DISPLAY = "Rule from slice scores to the study score"
