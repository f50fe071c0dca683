"""The serving signature every scanwatch model exports and the worker checks.

Written down once here; ``training`` exports it, ``services/model_server`` serves it and the
worker refuses to start when ``GetModelMetadata`` disagrees with it.

Models describe themselves: besides the probabilities they return their class names and their
operating threshold, per image, so that a worker talking to a remote TensorFlow Serving needs no
side channel to know what the numbers mean. Every output has the batch dimension first, as TF
Serving's server-side batching requires.

A second signature, :data:`SALIENCY_SIGNATURE_NAME`, returns the same probabilities and class
names together with a Grad-CAM heatmap per image (:data:`SALIENCY_OUTPUTS`): the evidence the
console overlays on each slice. It is a standard SavedModel signature, so TensorFlow Serving
serves it unchanged (``ModelSpec.signature_name = "saliency"``), and a plain forward graph (no
gradient ops), so OpenVINO converts it too. A model may also return the same heatmaps from
``serving_default`` (the optional :data:`HEATMAPS_OUTPUT`): one pass over the images then gives
the score and its evidence, where the saliency signature runs the network a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

SIGNATURE_NAME = "serving_default"
#: The Grad-CAM signature (see :data:`SALIENCY_OUTPUTS`).
SALIENCY_SIGNATURE_NAME = "saliency"
#: The class whose probability means "nothing abnormal"; anomaly score = 1 - p(normal).
NORMAL_CLASS = "normal"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor in the signature: ``-1`` marks a free dimension."""

    name: str
    dtype: str  # TensorFlow dtype name: "float32", "string"
    shape: tuple[int, ...]


#: Images after :func:`scanwatch.preprocess.preprocess_slice`: float32 RGB in [0, 255], square.
#: Height and width are free here (EfficientNet B0..B7 differ) and read from the model metadata.
INPUT = TensorSpec("images", "float32", (-1, -1, -1, 3))
OUTPUTS = (
    TensorSpec("probabilities", "float32", (-1, -1)),
    TensorSpec("class_names", "string", (-1, -1)),
    TensorSpec("threshold", "float32", (-1,)),
)
#: How a study's slice outputs become one study result: a JSON object per image (the same row
#: for every image of a model), parsed by :mod:`scanwatch.study_score` (``StudyRule``):
#: ``{"aggregation": "mean" | "max" | "top_k_mean" | "noisy_or", "k": int,
#: "calibration": {"slope": float, "intercept": float}, "operating_point": str}``.
#: Optional, so models exported before it still pass: a model without it is read as the
#: study mean with no calibration (what scanwatch did before study-level rules existed).
#: With it, ``threshold`` is the operating point on the calibrated study score.
STUDY_RULE = TensorSpec("study_rule", "string", (-1,))
#: Output alias of the heatmaps in the saliency signature (and, optionally, ``serving_default``).
HEATMAPS = "heatmaps"
#: The saliency signature's heatmaps (below), returned by ``serving_default`` beside the
#: probabilities they explain. Optional: a client that does not want them names the other
#: outputs in ``PredictRequest.output_filter``.
HEATMAPS_OUTPUT = TensorSpec(HEATMAPS, "float32", (-1, -1, -1))
#: ``serving_default`` outputs a model may add to :data:`OUTPUTS` (checked when present).
OPTIONAL_OUTPUTS = (STUDY_RULE, HEATMAPS_OUTPUT)
#: The saliency signature takes the same :data:`INPUT` and returns, per image:
#:
#: * ``probabilities`` and ``class_names``: as :data:`OUTPUTS` (the same numbers as
#:   ``serving_default`` for the same images);
#: * ``heatmaps`` (N×S×S, S the input side): Grad-CAM (Selvaraju et al., 2017) of the image's
#:   most probable class (the first on a tie, ``argmax`` of ``probabilities``) over the last
#:   convolutional block, ReLU'd, upsampled bilinearly to the input's S×S and divided by its
#:   maximum, so values are in [0, 1] (an all-zero map when no feature argues for the class).
#:   The gradient is that of the class's pre-softmax score, as in the paper.
SALIENCY_OUTPUTS = (
    TensorSpec("probabilities", "float32", (-1, -1)),
    TensorSpec("class_names", "string", (-1, -1)),
    HEATMAPS_OUTPUT,
)


def check(
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
    expected_outputs: tuple[TensorSpec, ...] = OUTPUTS,
    optional_outputs: tuple[TensorSpec, ...] = (),
) -> list[str]:
    """Compare a served signature with the contract; return the differences (empty if equal).

    ``inputs``/``outputs`` map tensor alias to what the server reports; ``expected_outputs`` is
    :data:`OUTPUTS` (``serving_default``) or :data:`SALIENCY_OUTPUTS`. Fixed sizes where the
    contract has ``-1`` are allowed (a served model fixes its image size); the reverse is not.
    ``optional_outputs`` may be present or not; when present they are checked like the others.
    """
    problems: list[str] = []
    present_optional = tuple(t for t in optional_outputs if t.name in outputs)
    for kind, expected, actual in (
        ("input", (INPUT,), inputs),
        ("output", expected_outputs + present_optional, outputs),
    ):
        expected_names = {t.name for t in expected}
        if set(actual) != expected_names:
            problems.append(f"{kind} names {sorted(actual)} != {sorted(expected_names)}")
            continue
        for spec in expected:
            got = actual[spec.name]
            if got.dtype != spec.dtype:
                problems.append(f"{kind} {spec.name}: dtype {got.dtype} != {spec.dtype}")
            if len(got.shape) != len(spec.shape):
                problems.append(f"{kind} {spec.name}: rank {len(got.shape)} != {len(spec.shape)}")
                continue
            for axis, (g, e) in enumerate(zip(got.shape, spec.shape, strict=True)):
                if e != -1 and g != e:
                    problems.append(f"{kind} {spec.name}: dim {axis} is {g}, expected {e}")
    image = inputs.get(INPUT.name)
    if image is not None and len(image.shape) == 4 and image.shape[1] != image.shape[2]:
        problems.append(f"input {INPUT.name}: images must be square, got {image.shape[1:3]}")
    heatmaps = outputs.get(HEATMAPS)
    if (
        image is not None
        and heatmaps is not None
        and len(image.shape) == 4
        and len(heatmaps.shape) == 3
        and heatmaps.shape[1:] != image.shape[1:3]
    ):
        problems.append(
            f"output {HEATMAPS}: {heatmaps.shape[1:]} is not the input's size {image.shape[1:3]}"
        )
    return problems


def check_serving(inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec]) -> list[str]:
    """:func:`check` against ``serving_default``'s contract, its optional outputs included."""
    return check(inputs, outputs, OUTPUTS, OPTIONAL_OUTPUTS)


def check_saliency(inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec]) -> list[str]:
    """:func:`check` against the saliency signature's contract."""
    return check(inputs, outputs, SALIENCY_OUTPUTS)
