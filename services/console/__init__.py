"""The staff console. Today: DICOMweb (QIDO-RS, WADO-RS) over the listener's file store, read
only, for the console's own viewer and for any outside viewer (OHIF, Weasis)."""
