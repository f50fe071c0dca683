"""Images/s of the model server's engines, bare and through the gRPC server, in one run.

    .venv/bin/python bench/model_engines_bench.py [--model-dir var/models/brain-mri-anomaly/1]
        [--batch-sizes 1 8 16] [--seconds 5] [--engines tensorflow openvino] [--bf16]

Inputs are real MR slices: the bundled MNI152 study (``scanwatch.sample.build_mr_study``)
preprocessed by ``scanwatch.imaging.preprocess_slice`` at the model's size, cycled to fill each
batch. For each engine and batch size:

* **bare**: ``engine.load(path).run(...)`` in this process, back to back;
* **gRPC**: ``scanwatch-model-server`` started as a subprocess on the same engine, one client
  sending ``Predict`` back to back (TF Serving's API, the worker's encoding: tensor_content);
* **gRPC, batching**: the same with server-side batching and 4 concurrent clients.

Each figure is images answered / wall time, the best of 3 rounds of ``--seconds``/3 after two
warm-up calls (best: least disturbed by the other processes sharing the cores).
Also printed: the largest |Δ probability| between OpenVINO and TensorFlow on the slices, and the
machine's load average before and after (other processes share the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.kafka_local import free_port  # noqa: E402
from scanwatch import tensors  # noqa: E402
from scanwatch.imaging import preprocess_slice  # noqa: E402
from scanwatch.model_repository import DEFAULT_MODEL_NAME  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402
from schemas.model_signature import SIGNATURE_NAME  # noqa: E402

OUTPUTS = ["class_names", "probabilities", "threshold"]
CLIENTS = 4
WARMUP_CALLS = 2
ROUNDS = 3


def out(*parts: object) -> None:
    """One line to stdout (benchmarks report there; ``print`` is banned by the linter)."""
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def mr_slices(size: int, count: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        images = []
        for path in build_mr_study(Path(folder), n_slices=count):
            ds = pydicom.dcmread(path)
            images.append(
                preprocess_slice(
                    ds.pixel_array,
                    size,
                    float(ds.get("RescaleSlope", 1.0)),
                    float(ds.get("RescaleIntercept", 0.0)),
                )
            )
    return np.stack(images)


def batch_of(slices: np.ndarray, size: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(slices, (size, *slices.shape[1:])))


def measure(call: Callable[[], int], seconds: float, rounds: int = ROUNDS) -> float:
    """Images/s of ``call`` (which returns the images it answered): the best of ``rounds``.

    Each round lasts ``seconds / rounds`` or more. The best round is the one least disturbed by
    other processes on the machine (the development machine's cores are shared).
    """
    for _ in range(WARMUP_CALLS):
        call()
    rates = []
    for _ in range(rounds):
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / rounds or done == 0:
            done += call()
        rates.append(done / elapsed)
    return max(rates)


def engine_of(name: str, cache: Path, precision: str = "f32") -> object:
    if name == "openvino":
        from services.model_server.openvino_engine import OpenVINOEngine

        return OpenVINOEngine(cache, inference_precision=precision)
    from services.model_server.engine import TensorFlowEngine

    return TensorFlowEngine()


def start_server(
    model_dir: Path, engine: str, batching: bool, cache: Path, precision: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "SCANWATCH_MODEL_SERVER_MODEL_BASE_PATH": str(model_dir.parent.parent),
        "SCANWATCH_MODEL_SERVER_MODEL_NAME": model_dir.parent.name,
        "SCANWATCH_MODEL_SERVER_PORT": str(port),
        "SCANWATCH_MODEL_SERVER_METRICS_PORT": "0",
        "SCANWATCH_MODEL_SERVER_ENGINE": engine,
        "SCANWATCH_MODEL_SERVER_OPENVINO_CACHE_DIR": str(cache),
        "SCANWATCH_MODEL_SERVER_OPENVINO_INFERENCE_PRECISION": precision,
        "SCANWATCH_MODEL_SERVER_ENABLE_BATCHING": "true" if batching else "false",
        "SCANWATCH_MODEL_SERVER_MAX_BATCH_SIZE": "32",
        "SCANWATCH_MODEL_SERVER_BATCH_TIMEOUT_MICROS": "1000",
        "SCANWATCH_MODEL_SERVER_LOG_LEVEL": "WARNING",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.model_server"], cwd=ROOT, env=env)
    return process, f"127.0.0.1:{port}"


def wait_available(address: str, name: str, process: subprocess.Popen[bytes]) -> None:
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    deadline = time.monotonic() + 300
    with grpc.insecure_channel(address) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("model server exited")
            try:
                states = stub.GetModelStatus(request, timeout=2).model_version_status
                if any(
                    s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE for s in states
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError("model server did not become available")


def grpc_rate(address: str, name: str, batch: np.ndarray, clients: int, seconds: float) -> float:
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["images"].CopyFrom(tensors.to_tensor_proto(batch))
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def call() -> int:
            stub.Predict(request, timeout=120)
            return len(batch)

        if clients == 1:
            return measure(call, seconds)
        with ThreadPoolExecutor(clients) as pool:
            rates = list(pool.map(lambda _: measure(call, seconds), range(clients)))
        return sum(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", type=Path, default=ROOT / "var/models" / DEFAULT_MODEL_NAME / "1"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--engines", nargs="+", default=["tensorflow", "openvino"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--bf16", action="store_true", help="also OpenVINO with bf16 inference")
    parser.add_argument("--no-grpc", action="store_true", help="bare engines only")
    args = parser.parse_args()

    load_before = os.getloadavg()
    from scanwatch.saved_model import read_signature

    inputs, _ = read_signature(args.model_dir)
    size = inputs["images"].shape[1]
    slices = mr_slices(size, 16)
    cache = Path(tempfile.mkdtemp(prefix="ov-cache-"))
    variants = [(e, "f32") for e in args.engines]
    if args.bf16 and "openvino" in args.engines:
        variants.append(("openvino", "bf16"))

    rows: list[dict[str, object]] = []
    reference: dict[str, np.ndarray] = {}
    for engine, precision in variants:
        label = engine if precision == "f32" else f"{engine} ({precision})"
        servable = engine_of(engine, cache, precision).load(args.model_dir)  # type: ignore[attr-defined]
        probabilities = servable.run(SIGNATURE_NAME, {"images": slices}, OUTPUTS)["probabilities"]
        reference.setdefault("tensorflow", probabilities)
        delta = float(np.abs(probabilities - reference["tensorflow"]).max())
        for batch_size in args.batch_sizes:
            batch = batch_of(slices, batch_size)
            rate = measure(
                lambda b=batch, s=servable: len(
                    s.run(SIGNATURE_NAME, {"images": b}, OUTPUTS)["threshold"]
                ),
                args.seconds,
            )
            rows.append(
                {
                    "engine": label,
                    "path": "bare",
                    "batch": batch_size,
                    "img_s": rate,
                    "max_abs_delta_vs_tf": delta,
                }
            )
            out(json.dumps(rows[-1]))
        del servable
        if args.no_grpc:
            continue
        for batching, clients in ((False, 1), (True, CLIENTS)):
            process, address = start_server(args.model_dir, engine, batching, cache, precision)
            try:
                wait_available(address, args.model_dir.parent.name, process)
                for batch_size in args.batch_sizes:
                    batch = batch_of(slices, batch_size)
                    rate = grpc_rate(
                        address, args.model_dir.parent.name, batch, clients, args.seconds
                    )
                    path = "gRPC" if not batching else f"gRPC, batching, {clients} clients"
                    rows.append({"engine": label, "path": path, "batch": batch_size, "img_s": rate})
                    out(json.dumps(rows[-1]))
            finally:
                process.terminate()
                process.wait(60)

    load_after = os.getloadavg()
    out()
    out(
        f"model {args.model_dir} ({size}x{size}), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average before {load_before[0]:.1f} after {load_after[0]:.1f}"
    )
    out("| engine | path | batch | images/s |")
    out("| --- | --- | ---: | ---: |")
    for row in rows:
        out(f"| {row['engine']} | {row['path']} | {row['batch']} | {row['img_s']:.1f} |")
    deltas = {r["engine"]: r["max_abs_delta_vs_tf"] for r in rows if "max_abs_delta_vs_tf" in r}
    out("max |Δ probability| vs TensorFlow on the 16 MR slices:", deltas)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
