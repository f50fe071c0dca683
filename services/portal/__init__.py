"""The patient portal: a SMART on FHIR app (standalone patient launch) that shows a patient
their own results, progress chart, medicines and next visit, and talks to the chatbot, reading
everything from the FHIR API with the patient's own token (``README.md`` of the project)."""
