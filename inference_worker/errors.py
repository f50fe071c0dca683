"""The worker's failure classes (STYLE habit 7), known to the core; adapters raise them.

* :class:`UnusableStudy`: the message's fault. The study goes to the dead-letter topic.
* :class:`TransientError` (:class:`ModelUnavailable`, :class:`FhirUnavailable`): may go away by
  itself. Retried with backoff, then the study is parked and announced again later.
* :class:`SignatureMismatch`: the served model breaks the contract. Fatal: the worker stops.

Anything else is fatal too: the worker crashes, its supervisor restarts it and the uncommitted
message is redelivered.
"""

from __future__ import annotations


class UnusableStudy(Exception):
    """The study cannot be scored (no MR series, unreadable files or pixels). Not transient."""


class TransientError(Exception):
    """A failure of a remote service that may go away by itself (down, restarting, slow)."""


class ModelUnavailable(TransientError):
    """The model server is down, overloaded or too slow, or refuses calls for now."""


class FhirUnavailable(TransientError):
    """The FHIR API is down, overloaded or too slow."""


class SignatureMismatch(RuntimeError):
    """The served model does not have the contract's signature: fatal for the worker."""


class SaliencyUnavailable(Exception):
    """The served model has no ``saliency`` signature (one exported before it existed): its
    studies are scored without heatmaps. Not transient, not fatal."""
