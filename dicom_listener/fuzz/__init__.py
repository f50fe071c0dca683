"""Fuzzing the listener's own parsers (issue 19 point 4).

``targets`` holds one function per parser, each a property over one input's bytes: it returns
when the parser answered as documented (a value, or one of its own errors) and raises
:class:`~dicom_listener.fuzz.targets.Finding` (or lets any other exception escape) when not.
``seeds`` builds each target's starting corpus from real encodings (pynetdicom's PDUs and DIMSE
messages, pydicom's test files). ``python -m dicom_listener.fuzz <target> [libFuzzer flags]``
runs a target under atheris, coverage-guided; the tests replay the seeds and the committed
regressions and run every target for a few seconds.

Development tooling: nothing in the service imports this package.
"""
