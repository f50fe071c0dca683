"""TF Serving's model config and batching parameters files, and the settings that point at them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.model_server.config import Settings
from services.model_server.tf_serving_files import (
    BatchingParameters,
    ConfigError,
    ModelConfig,
    VersionPolicy,
    parse_batching_parameters,
    parse_model_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "tf_serving_config"

TWO_MODELS = """
model_config_list {
  config {
    name: "brain-mri-anomaly"
    base_path: "/models/brain-mri-anomaly"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
    version_labels { key: "stable" value: 3 }
    version_labels { key: "canary" value: 4 }
  }
  config {
    name: "skin-lesions"
    base_path: "/models/skin-lesions"
    model_version_policy { specific { versions: 1 versions: 5 } }
  }
  config { name: "audit" base_path: "/models/audit" model_version_policy { all {} } }
  config { name: "plain" base_path: "/models/plain" }
}
"""


def test_model_config_list_is_read_with_policies_and_labels() -> None:
    models = {m.name: m for m in parse_model_config(TWO_MODELS)}
    assert list(models) == ["brain-mri-anomaly", "skin-lesions", "audit", "plain"]
    brain = models["brain-mri-anomaly"]
    assert brain.base_path == Path("/models/brain-mri-anomaly")
    assert brain.policy == VersionPolicy("latest", num_versions=2)
    assert brain.version_labels == {"stable": 3, "canary": 4}
    assert models["skin-lesions"].policy == VersionPolicy("specific", versions=frozenset({1, 5}))
    assert models["audit"].policy.kind == "all"
    assert models["plain"].policy == VersionPolicy("latest", num_versions=1)  # TF's default


@pytest.mark.parametrize(
    ("policy", "chosen"),
    [
        (VersionPolicy(), {7}),
        (VersionPolicy("latest", num_versions=2), {5, 7}),
        (VersionPolicy("all"), {1, 5, 7}),
        (VersionPolicy("specific", versions=frozenset({1, 9})), {1}),  # 9 is not there
    ],
)
def test_version_policies_choose_among_present_versions(
    policy: VersionPolicy, chosen: set[int]
) -> None:
    assert policy.choose([5, 1, 7]) == chosen


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model_config_list { config { name: 'a' } }", "has no base_path"),
        ("model_config_list { config { name: '../a' base_path: '/m' } }", "plain folder name"),
        (
            "model_config_list { config { name: 'a' base_path: '/m' model_platform: 'onnx' } }",
            "model_platform must be 'tensorflow'",
        ),
        (
            "model_config_list { config { name: 'a' base_path: '/m' } "
            "config { name: 'a' base_path: '/n' } }",
            "configured twice",
        ),
        (
            "model_config_list { config { name: 'a' base_path: '/m' "
            "model_version_policy { specific { } } } }",
            "needs versions",
        ),
        ("model_config_list { }", "no model configured"),
        ("model_config_list { config { nme: 'a' } }", "nme"),
        ("custom_model_config { }", "only model_config_list"),
    ],
)
def test_bad_model_configs_are_refused(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_model_config(text)


def test_batching_parameters_file_is_read_with_tf_serving_names() -> None:
    params = parse_batching_parameters(
        """
        max_batch_size { value: 32 }
        batch_timeout_micros { value: 2000 }
        max_enqueued_batches { value: 8 }
        num_batch_threads { value: 2 }
        allowed_batch_sizes: 8
        allowed_batch_sizes: 16
        allowed_batch_sizes: 32
        pad_variable_length_inputs: false
        batch_padding_policy { value: "PAD_UP" }
        """
    )
    assert params == BatchingParameters(
        max_batch_size=32,
        batch_timeout_micros=2000,
        max_enqueued_batches=8,
        num_batch_threads=2,
        allowed_batch_sizes=(8, 16, 32),
    )
    assert parse_batching_parameters("") == BatchingParameters()  # TF Serving's defaults


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_batch_size { value: 0 }", "max_batch_size must be >= 1"),
        ("max_batch_size { value: 8 } allowed_batch_sizes: 4", "end with max_batch_size"),
        ("max_batch_size: 8", "max_batch_size"),  # a wrapper, as in TF Serving
    ],
)
def test_bad_batching_parameters_are_refused(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_batching_parameters(text)


def test_shipped_config_files_parse() -> None:
    models = parse_model_config((CONFIG_DIR / "models.config").read_text())
    assert "brain-mri-anomaly" in {m.name for m in models}
    params = parse_batching_parameters((CONFIG_DIR / "batching_parameters.txt").read_text())
    assert params.max_batch_size >= 16  # the worker's default batch fits in one engine call


def test_single_model_settings_are_a_shortcut_for_one_config() -> None:
    settings = Settings(model_base_path=Path("/srv"), version_labels={"stable": 2})
    assert settings.model_configs() == [
        ModelConfig(
            "brain-mri-anomaly", Path("/srv/brain-mri-anomaly"), VersionPolicy(), {"stable": 2}
        )
    ]
    assert settings.batching() is None


def test_settings_read_the_model_config_file(tmp_path: Path) -> None:
    file = tmp_path / "models.config"
    file.write_text(TWO_MODELS)
    settings = Settings(model_config_file=file)
    assert [m.name for m in settings.model_configs()] == [
        "brain-mri-anomaly",
        "skin-lesions",
        "audit",
        "plain",
    ]
    with pytest.raises(ValidationError, match="model_config_file replaces"):
        Settings(model_config_file=file, model_name="other")
    file.write_text("model_config_list { config { name: 'a' } }")
    with pytest.raises(ValidationError, match="has no base_path"):
        Settings(model_config_file=file)


def test_batching_settings(tmp_path: Path) -> None:
    assert Settings(enable_batching=True, max_batch_size=8).batching() == BatchingParameters(
        max_batch_size=8, batch_timeout_micros=2000, max_enqueued_batches=16
    )
    file = tmp_path / "batching.txt"
    file.write_text("max_batch_size { value: 4 }")
    assert Settings(enable_batching=True, batching_parameters_file=file).batching() == (
        BatchingParameters(max_batch_size=4)
    )
    with pytest.raises(ValidationError, match="needs enable_batching"):
        Settings(batching_parameters_file=file)
    with pytest.raises(ValidationError, match="replaces"):
        Settings(enable_batching=True, batching_parameters_file=file, max_batch_size=8)
    with pytest.raises(ValidationError, match="openvino"):
        Settings(engine="onnxruntime")
