"""Read a SavedModel's signatures the way TensorFlow Serving does, without loading the model.

A contract between training (whose export checks the signature it wrote), the model server
(which serves it) and the tools that inspect a model repository: all read ``saved_model.pb``
here. Only protobuf parsing: no Keras, no graph loading.
"""

from __future__ import annotations

from pathlib import Path

from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from scanwatch.model_repository import SAVED_MODEL_FILE
from scanwatch.tensors import signature_specs
from schemas import model_signature
from schemas.model_signature import TensorSpec

#: The MetaGraph tag TF Serving loads (``tf.saved_model.SERVING``).
SERVE_TAG = "serve"


def read_signature_defs(saved_model_dir: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """All SignatureDefs of the ``serve`` MetaGraph of a SavedModel, as TF Serving reports them."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(saved_model_dir) / SAVED_MODEL_FILE).read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"{saved_model_dir} has no MetaGraph tagged {SERVE_TAG!r}")


def read_signature(
    saved_model_dir: Path, signature_name: str = model_signature.SIGNATURE_NAME
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """``(inputs, outputs)`` of a SavedModel's signature, ready for ``model_signature.check``."""
    signatures = read_signature_defs(saved_model_dir)
    if signature_name not in signatures:
        raise ValueError(f"{saved_model_dir} has no signature {signature_name!r}")
    return signature_specs(signatures[signature_name])
