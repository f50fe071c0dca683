"""Readers of TF Serving's own files: the model config (``--model_config_file``) and the
batching parameters (``--batching_parameters_file``). The shipped ones are in
``tf_serving_config/``; this server's settings (which name these files) are ``config.py``.

The model config is the text-format ``ModelServerConfig`` proto of ``tensorflow_model_server``::

    model_config_list {
      config {
        name: "brain-mri-anomaly"
        base_path: "/models/brain-mri-anomaly"
        model_platform: "tensorflow"
        model_version_policy { latest { num_versions: 2 } }   # or all {} / specific { versions: 3 }
        version_labels { key: "stable" value: 3 }
        version_labels { key: "canary" value: 4 }
      }
    }

It is parsed with TF Serving's own generated classes, so a file this server accepts is one TF
Serving accepts. The batching parameters file is TF Serving's text-format ``BatchingParameters``
(``--batching_parameters_file``); its proto is not in the ``tensorflow-serving-api`` wheel, so
the fields this server honours are declared here with TF Serving's names and types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message
from tensorflow_serving.config import model_server_config_pb2

#: The only platform this server runs (TF Serving's name for SavedModels).
TENSORFLOW_PLATFORM = "tensorflow"

PolicyKind = Literal["latest", "all", "specific"]


class ConfigError(ValueError):
    """A model config or batching file that cannot be served; the message says why."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of the versions present in a base path should be loaded (TF Serving's policies)."""

    kind: PolicyKind = "latest"
    num_versions: int = 1  # for "latest"
    versions: frozenset[int] = frozenset()  # for "specific"

    def choose(self, present: list[int]) -> set[int]:
        """The versions to serve out of ``present`` (the loadable ones, in any order)."""
        if self.kind == "all":
            return set(present)
        if self.kind == "specific":
            return set(present) & self.versions
        return set(sorted(present, reverse=True)[: self.num_versions])

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return f"specific {sorted(self.versions)}"
        return "all"


@dataclass(frozen=True)
class ModelConfig:
    """One served model: its name, where its versions live, which to load and their labels."""

    name: str
    base_path: Path
    policy: VersionPolicy = VersionPolicy()
    version_labels: dict[str, int] = field(default_factory=dict)


def check_name(name: str) -> str:
    """A model name must be a plain folder name (it is used in paths and metric labels)."""
    if not name or name in (".", "..") or "/" in name or name.startswith("."):
        raise ValueError(f"model name must be a plain folder name, not {name!r}")
    return name


def _policy(config: model_server_config_pb2.ModelConfig) -> VersionPolicy:
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice is None or choice == "latest":
        # num_versions 0 (unset) means 1, as in TF Serving.
        return VersionPolicy("latest", num_versions=max(1, policy.latest.num_versions))
    if choice == "all":
        return VersionPolicy("all")
    versions = frozenset(policy.specific.versions)
    if not versions:
        raise ConfigError(f"model {config.name}: a specific version policy needs versions")
    return VersionPolicy("specific", versions=versions)


def parse_model_config(text: str, source: str = "model config") -> list[ModelConfig]:
    """The models of a ``model_config_list`` text proto, validated."""
    proto = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as error:
        raise ConfigError(f"{source}: {error}") from error
    if proto.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{source}: only model_config_list is supported")
    models: list[ModelConfig] = []
    for config in proto.model_config_list.config:
        try:
            check_name(config.name)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from error
        if not config.base_path:
            raise ConfigError(f"{source}: model {config.name} has no base_path")
        platform = config.model_platform or TENSORFLOW_PLATFORM
        if platform != TENSORFLOW_PLATFORM:
            raise ConfigError(
                f"{source}: model {config.name}: model_platform must be "
                f"{TENSORFLOW_PLATFORM!r}, not {platform!r}"
            )
        labels = dict(config.version_labels)
        bad = {label: v for label, v in labels.items() if not label or v < 0}
        if bad:
            raise ConfigError(f"{source}: model {config.name}: bad version labels {bad}")
        models.append(ModelConfig(config.name, Path(config.base_path), _policy(config), labels))
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: models configured twice: {duplicates}")
    if not models:
        raise ConfigError(f"{source}: no model configured")
    return models


def read_model_config(path: Path) -> list[ModelConfig]:
    """Parse a model config file (see :func:`parse_model_config`)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read model config {path}: {error}") from error
    return parse_model_config(text, str(path))


# -- batching parameters ------------------------------------------------------------------------

_WRAPPERS = "google/protobuf/wrappers.proto"
#: TF Serving's BatchingParameters fields (session_bundle_config.proto) this server reads.
_BATCHING_FIELDS = (
    ("max_batch_size", 1, ".google.protobuf.Int64Value", False),
    ("batch_timeout_micros", 2, ".google.protobuf.Int64Value", False),
    ("max_enqueued_batches", 3, ".google.protobuf.Int64Value", False),
    ("num_batch_threads", 4, ".google.protobuf.Int64Value", False),
    ("thread_pool_name", 5, ".google.protobuf.StringValue", False),
    ("allowed_batch_sizes", 6, None, True),
    ("pad_variable_length_inputs", 7, None, False),
    ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue", False),
)


def _batching_parameters_class() -> type[Message]:
    from google.protobuf import wrappers_pb2  # noqa: F401 - registers wrappers.proto in the pool

    file = descriptor_pb2.FileDescriptorProto(
        name="scanwatch/model_server/batching_parameters.proto",
        package="scanwatch.model_server",
        syntax="proto3",
        dependency=[_WRAPPERS],
    )
    message = file.message_type.add(name="BatchingParameters")
    for name, number, type_name, repeated in _BATCHING_FIELDS:
        entry = message.field.add(name=name, number=number)
        entry.label = entry.LABEL_REPEATED if repeated else entry.LABEL_OPTIONAL
        if type_name:
            entry.type, entry.type_name = entry.TYPE_MESSAGE, type_name
        elif repeated:
            entry.type = entry.TYPE_INT64
        else:
            entry.type = entry.TYPE_BOOL
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName("scanwatch.model_server.BatchingParameters")
    except KeyError:
        added = pool.AddSerializedFile(file.SerializeToString())
        descriptor = added.message_types_by_name["BatchingParameters"]
    return message_factory.GetMessageClass(descriptor)


@dataclass(frozen=True)
class BatchingParameters:
    """Server-side batching, with TF Serving's names and defaults."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1
    allowed_batch_sizes: tuple[int, ...] = ()
    enable_large_batch_splitting: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_timeout_micros < 0:
            problems.append(f"batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")
        if self.max_enqueued_batches < 1:
            problems.append(f"max_enqueued_batches must be >= 1, got {self.max_enqueued_batches}")
        if self.num_batch_threads < 1:
            problems.append(f"num_batch_threads must be >= 1, got {self.num_batch_threads}")
        sizes = list(self.allowed_batch_sizes)
        if sizes and (sizes != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            problems.append(
                "allowed_batch_sizes must increase strictly and end with max_batch_size "
                f"({self.max_batch_size}), got {sizes}"
            )
        if problems:
            raise ConfigError("; ".join(problems))


def parse_batching_parameters(text: str, source: str = "batching parameters") -> BatchingParameters:
    """A ``BatchingParameters`` text proto; unknown TF Serving fields are accepted and ignored."""
    proto = _batching_parameters_class()()
    try:
        text_format.Parse(text, proto, allow_unknown_field=True)
    except text_format.ParseError as error:
        raise ConfigError(f"{source}: {error}") from error
    defaults = BatchingParameters()
    values: dict[str, object] = {}
    for name in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "enable_large_batch_splitting",
    ):
        values[name] = (
            getattr(proto, name).value if proto.HasField(name) else getattr(defaults, name)
        )
    values["allowed_batch_sizes"] = tuple(proto.allowed_batch_sizes)  # type: ignore[attr-defined]
    try:
        return BatchingParameters(**values)  # type: ignore[arg-type]
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error


def read_batching_parameters(path: Path) -> BatchingParameters:
    """Parse a batching parameters file (see :func:`parse_batching_parameters`)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read batching parameters {path}: {error}") from error
    return parse_batching_parameters(text, str(path))
