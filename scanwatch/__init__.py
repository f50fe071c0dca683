"""The shared runtime kernel of the scanwatch services: logging, identifiers, image
preprocessing, tensor conversion, child-process helpers and the synthetic sample study. Services
import from here instead of copying helpers; development tooling lives in ``devtools``."""
