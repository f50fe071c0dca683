"""A model's study rule, from its ``study_rule`` output through the real model server to the
worker's Prediction, on both engines (TensorFlow, and OpenVINO, which serves string outputs as
constants)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from devtools.kafka_local import free_port
from devtools.stack import model_available
from devtools.testing import wait_for
from inference_worker.adapters.tf_serving import ModelClient, SignatureMismatch
from scanwatch.imaging import NEIGHBOURS, NO_CONTEXT
from scanwatch.study_score import LEGACY_RULE, Calibration, StudyRule
from schemas.model_signature import STUDY_RULE

pytestmark = pytest.mark.integration

CLASSES = ("normal", "mass", "bleed", "infarct")
SIZE = 32
RULE = StudyRule("top_k_mean", 3, Calibration(1.5, -0.25), "sensitivity >= 0.95 above 4 mm")
#: A model trained with context from neighbouring slices (issue 18, 2.5D).
CONTEXT_RULE = StudyRule("max", context=NEIGHBOURS, operating_point="2.5D")
#: model name → the study_rule row it exports (None: no study_rule output at all)
MODELS = {
    "with-rule": RULE.to_json(),
    "with-context": CONTEXT_RULE.to_json(),
    "broken-rule": '{"aggregation": "median"}',
    "without-rule": None,
}


def export(repository: Path, name: str, rule: str | None) -> None:
    """A tiny classifier exported by the training pipeline's own export, with its study rule;
    a rule that does not parse (the export refuses one) by its serving module, patched. The
    study rule is the serving module's, not the network's: a pooling and a dense layer stand
    for EfficientNet here (three EfficientNet exports took 150 s of CI's time)."""
    import keras

    from training.export import ServingModule, export_saved_model

    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(pooled))
    known = {r.to_json(): r for r in (RULE, CONTEXT_RULE)}
    if rule is None or rule in known:
        study_rule = None if rule is None else known[rule]
        export_saved_model(model, CLASSES, 0.4, repository, name, 1, study_rule=study_rule)
        return

    class BrokenRule(ServingModule):
        def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            outputs = super()._serve(images)
            outputs[STUDY_RULE.name] = tf.fill([tf.shape(images)[0]], tf.constant(rule))
            return outputs

    module = BrokenRule(model, CLASSES, 0.4)
    tf.saved_model.save(module, str(repository / name / "1"), signatures=module.signatures())


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, rule in MODELS.items():
        export(root, name, rule)
    return root


@pytest.fixture(scope="module", params=["tensorflow", "openvino"])
def server(request, repository, tmp_path_factory) -> Iterator[str]:
    config = tmp_path_factory.mktemp("config") / "models.config"
    config.write_text(
        "model_config_list {\n"
        + "".join(
            f'  config {{ name: "{name}" base_path: "{repository / name}" }}\n' for name in MODELS
        )
        + "}\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "SCANWATCH_MODEL_SERVER_MODEL_CONFIG_FILE": str(config),
        "SCANWATCH_MODEL_SERVER_ENGINE": request.param,
        "SCANWATCH_MODEL_SERVER_OPENVINO_CACHE_DIR": str(tmp_path_factory.mktemp("ov")),
        "SCANWATCH_MODEL_SERVER_PORT": str(port),
        "SCANWATCH_MODEL_SERVER_METRICS_PORT": "0",
    }
    for key in ("SCANWATCH_MODEL_SERVER_MODEL_NAME", "SCANWATCH_MODEL_SERVER_MODEL_BASE_PATH"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "services.model_server"], env=env)
    target = f"127.0.0.1:{port}"
    try:

        def available() -> bool:
            assert proc.poll() is None, "model server exited"
            return all(model_available(target, name) for name in MODELS)

        wait_for(available, 180, "the model server to serve the models")
        yield target
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def predict(target: str, name: str, n: int = 5, client: ModelClient | None = None):
    client = client or ModelClient(target, name, batch_size=2)

    async def run():
        try:
            await client.check_signature()  # study_rule is an accepted optional output
            images = np.random.default_rng(0).uniform(0, 255, (n, SIZE, SIZE, 3))
            return await client.predict(images.astype(np.float32))
        finally:
            await client.close()

    return asyncio.run(run())


def test_a_model_s_input_context_reaches_the_worker(server):
    """The context a model was trained with travels in its study rule: after one answer the
    client knows which inputs to send (the signature is still (B, H, W, 3) float32)."""
    client = ModelClient(server, "with-context", batch_size=2)
    assert client.input_context == NO_CONTEXT  # nothing known before an answer
    prediction = predict(server, "with-context", client=client)
    assert prediction.study_rule == CONTEXT_RULE
    assert client.input_context == NEIGHBOURS
    assert client.image_size == SIZE
    plain = ModelClient(server, "with-rule", batch_size=2)
    predict(server, "with-rule", client=plain)
    assert plain.input_context == NO_CONTEXT


def test_the_model_s_study_rule_reaches_the_prediction(server):
    prediction = predict(server, "with-rule")
    assert prediction.study_rule == RULE
    assert prediction.probabilities.shape == (5, len(CLASSES))


def test_a_model_without_study_rule_keeps_the_study_mean(server):
    assert predict(server, "without-rule").study_rule is LEGACY_RULE


def test_a_study_rule_that_does_not_parse_is_a_broken_contract(server):
    with pytest.raises(SignatureMismatch, match="study_rule.*aggregation must be one of"):
        predict(server, "broken-rule")
