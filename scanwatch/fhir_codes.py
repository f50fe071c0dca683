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
