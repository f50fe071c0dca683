"""Settings of training runs and of the training worker (``SCANWATCH_TRAIN_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scanwatch.imaging import INPUT_CONTEXTS, NO_CONTEXT
from scanwatch.logs import LogLevel
from scanwatch.model_repository import DEFAULT_MODEL_NAME
from training.model import IMAGENET, VARIANTS, normalise_variant

#: Fine-tuning defaults (see the fields): a pretrained base changes little, a new one more.
SCRATCH_LR_FACTOR = 0.5
PRETRAINED_LR_FACTOR = 0.1
SCRATCH_TOP_FRACTION = 1.0
PRETRAINED_FINE_TUNE_AFTER = 5
PRETRAINED_TOP_FRACTION = 0.3


class TrainSettings(BaseSettings):
    """How a model is trained (the article's method), where runs and models go."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_TRAIN_", protected_namespaces=())

    # -- model ------------------------------------------------------------------------------
    variant: str = Field("B0", description=f"EfficientNet variant: {', '.join(VARIANTS)}.")
    weights: str | None = Field(
        None,
        description=f"Base weights: unset trains from scratch, {IMAGENET!r} loads Keras' ImageNet "
        "weights (needs a network or the Keras cache), or a path to a local weights file.",
    )
    init_from: Path | None = Field(
        None,
        description="A SavedModel exported by scanwatch (e.g. training/default_model/saved_model)"
        " whose weights start the run, every layer trainable (warm start); same variant, classes "
        "and head required.",
    )
    context: str = Field(
        NO_CONTEXT,
        description="The three input channels: 'none' repeats each slice (every model before "
        "issue 18), 'neighbours' gives the slice below, the slice and the slice above in the "
        "study's slice order (2.5D; only a dataset that knows slice order: --dataset studies). "
        "Exported in the model's study_rule output, so the worker builds the same inputs.",
    )
    dense_units: int = Field(256, ge=1, description="Units of the ReLU dense layer of the head.")
    dropout: float = Field(0.3, ge=0, lt=1, description="Dropout before the softmax.")
    # -- optimisation -----------------------------------------------------------------------
    epochs: int = Field(60, ge=1, description="Most epochs (early stopping may end sooner).")
    batch_size: int = Field(32, ge=1, description="Images per training step.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam's learning rate before fine-tuning.")
    fine_tune_after: int | None = Field(
        None,
        ge=0,
        description="Epochs before fine-tuning starts; unset: after five with pretrained weights "
        "(the article), never from scratch (the whole base learns from the first epoch, and "
        "freezing its BatchNorm statistics early costs accuracy).",
    )
    fine_tune_learning_rate_factor: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fine-tuning learning rate = current learning rate × this factor; unset: "
        f"{SCRATCH_LR_FACTOR} from scratch, {PRETRAINED_LR_FACTOR} with pretrained weights.",
    )
    fine_tune_top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of the base's layers, from the top, trainable while fine-tuning "
        "(BatchNormalization layers stay frozen); unset: all of them from scratch (there are "
        f"no pretrained features to protect), {PRETRAINED_TOP_FRACTION} with pretrained weights.",
    )
    plateau_patience: int = Field(
        3, ge=1, description="Epochs without validation-loss improvement before the LR drops."
    )
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="LR multiplier on a plateau.")
    min_learning_rate: float = Field(1e-6, gt=0, description="The LR never drops below this.")
    early_stopping_patience: int = Field(
        15,
        ge=1,
        description="Epochs without a better validation macro-F1 (on whole studies: a better "
        "validation lesion-slice AUROC) before training stops (the validation loss of a base "
        "trained from scratch swings too much to stop on).",
    )
    balance: bool = Field(
        True, description="Oversample minority classes with augmented copies to the largest."
    )
    random_flip: bool = Field(True, description="Random left-right flips while training.")
    augment: bool | None = Field(
        None,
        description="Random small rotations, shifts and zooms while training, and in the "
        "balancing copies; off, no training image is resampled (copies are flipped and scaled "
        "in intensity only). Unset: on, but off for slices of whole synthetic studies "
        "(--dataset studies), whose generator already varies each subject's pose before the "
        "noise is added; resampled, their training images lose half their noise grain "
        "(bench/training.md, 'Resampling augmentation').",
    )
    mask_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a mask head's loss beside the classifier's: the network also "
        "learns where each lesion is (slices of whole synthetic studies only, which know; "
        "bench/training.md, 'Location supervision'). 0: no mask head. The exported model is "
        "the classifier either way.",
    )
    mask_stride: Literal[8, 16] = Field(
        16,
        description="With mask_weight: the mask head's cell, in input pixels. 16 reads the "
        "base's last stride-16 block; 8 an earlier block (block3), finer, whose gradients reach "
        "the layers that see a lesion a few pixels wide.",
    )
    seed: int = Field(0, description="Seeds weights, shuffling, augmentation and splits.")
    threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Operating threshold on the anomaly score (1 - p(normal)) of a dataset "
        "without studies; a study benchmark chooses its own (see target_sensitivity).",
    )
    # -- study-level operating point (study benchmark; see training/study_evaluation.py) -----
    target_sensitivity: float = Field(
        0.95,
        gt=0,
        le=1,
        description="The operating point's target: the highest threshold at which the "
        "validation studies' sensitivity, over lesions of at least target_min_diameter_mm, is "
        "at least this.",
    )
    target_min_diameter_mm: float = Field(
        5.0,
        ge=0,
        description="Smallest lesion diameter (mm) the sensitivity target is stated for (the "
        "study benchmark draws 4-40 mm; smaller lesions are reported, not targeted).",
    )
    aggregation_min_specificity: float = Field(
        0.90,
        gt=0,
        lt=1,
        description="Study aggregations are compared by their validation sensitivity at this "
        "specificity (then AUROC, then simplicity).",
    )
    # -- where things go --------------------------------------------------------------------
    model_name: str = Field(DEFAULT_MODEL_NAME, description="Model name (its repository folder).")
    repository: Path = Field(
        Path("var/models"), description="Model repository (TF Serving layout) to publish into."
    )
    runs_dir: Path = Field(
        Path("var/training/runs"),
        description="Run folders: checkpoints, state, history, evaluation report.",
    )
    cache_dir: Path = Field(
        Path("var/training/cache"), description="Where built datasets are cached (.npz)."
    )
    kafka_bootstrap_servers: str | None = Field(
        None,
        description="Kafka for model.published.v1 and training job events; unset: no events.",
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")

    def augments(self, from_studies: bool) -> bool:
        """Whether training resamples its images: ``augment``, or its default for data whose
        slices are (``LabelledImages.from_studies``) or are not from whole studies."""
        return self.augment if self.augment is not None else not from_studies

    @property
    def fine_tune_start(self) -> int:
        """The epoch fine-tuning starts at (``epochs``: never)."""
        if self.fine_tune_after is not None:
            return min(self.fine_tune_after, self.epochs)
        return min(PRETRAINED_FINE_TUNE_AFTER, self.epochs) if self.weights else self.epochs

    @property
    def fine_tune_factor(self) -> float:
        """The fine-tuning learning-rate factor in effect."""
        if self.fine_tune_learning_rate_factor is not None:
            return self.fine_tune_learning_rate_factor
        return SCRATCH_LR_FACTOR if self.weights is None else PRETRAINED_LR_FACTOR

    @property
    def fine_tune_fraction(self) -> float:
        """The share of the base trainable while fine-tuning, in effect."""
        if self.fine_tune_top_fraction is not None:
            return self.fine_tune_top_fraction
        return SCRATCH_TOP_FRACTION if self.weights is None else PRETRAINED_TOP_FRACTION

    @field_validator("variant")
    @classmethod
    def _variant(cls, value: str) -> str:
        return normalise_variant(value)

    @field_validator("context")
    @classmethod
    def _context(cls, value: str) -> str:
        if value not in INPUT_CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(INPUT_CONTEXTS)}, not {value!r}")
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str | None) -> str | None:
        if value in (None, "", "none", "None"):
            return None
        if value != IMAGENET and not Path(value).is_file():
            raise ValueError(f"weights must be unset, {IMAGENET!r} or an existing file: {value!r}")
        return value

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, value: Path | None) -> Path | None:
        if value is not None and not (Path(value) / "saved_model.pb").is_file():
            raise ValueError(f"init_from must be an exported SavedModel folder: {value}")
        return value

    @field_validator("model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or value in (".", "..") or "/" in value or value.startswith("."):
            raise ValueError(f"model_name must be a plain folder name, not {value!r}")
        return value

    @model_validator(mode="after")
    def _phases(self) -> TrainSettings:
        if self.min_learning_rate > self.learning_rate:
            raise ValueError("min_learning_rate must not exceed learning_rate")
        if self.mask_weight and self.augment:
            raise ValueError(
                "mask_weight needs augment off (unset or false): a lesion mask is flipped with "
                "its image but not rotated, shifted or zoomed"
            )
        return self
