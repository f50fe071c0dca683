"""Server-side batching: concurrent Predict calls merged into one engine call, like TF Serving.

A :class:`BatchingServable` wraps a loaded version. ``run`` enqueues the request as a task and
waits; batch threads take the oldest task, add the compatible tasks behind it (same signature,
same requested outputs, same per-image shapes and dtypes) up to ``max_batch_size`` images, waiting
at most ``batch_timeout_micros`` after the oldest task arrived for the batch to fill, run the
engine once on the concatenation and hand every task its own rows back. A request larger than
``max_batch_size`` is split into several tasks (``enable_large_batch_splitting``) or refused.
When more than ``max_enqueued_batches`` batches are waiting, new requests get UNAVAILABLE, as
TF Serving answers when its batch queue is full.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2

from services.model_server.engine import Servable
from services.model_server.errors import InvalidArgument, ServingError, Unavailable
from services.model_server.tf_serving_files import BatchingParameters

logger = logging.getLogger(__name__)

MICROS = 1e-6
_Key = tuple[object, ...]


@dataclass(eq=False)
class _Task:
    key: _Key
    signature_name: str
    output_names: list[str]
    inputs: Mapping[str, np.ndarray]
    size: int
    enqueued: float = field(default_factory=time.monotonic)
    result: Future[dict[str, np.ndarray]] = field(default_factory=Future)


def _batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    sizes = {alias: (v.shape[0] if v.ndim else None) for alias, v in inputs.items()}
    distinct = set(sizes.values())
    size = distinct.pop() if len(distinct) == 1 else None
    if size is None:
        raise InvalidArgument(
            f"Batching session Run() input tensors must have equal 0th-dimension size; got {sizes}"
        )
    return int(size)


class BatchingServable:
    """A servable whose ``run`` calls are merged into batches (see the module docstring)."""

    def __init__(
        self,
        servable: Servable,
        params: BatchingParameters,
        observe_batch: Callable[[int], None] = lambda size: None,
        name: str = "batch",
    ) -> None:
        self.servable = servable
        self.params = params
        self._observe_batch = observe_batch
        self._timeout_s = params.batch_timeout_micros * MICROS
        self._queue: deque[_Task] = deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(params.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        return self.servable.signature_defs

    @property
    def signature_names(self) -> frozenset[str]:
        return self.servable.signature_names

    @property
    def queued_images(self) -> int:
        """Images waiting for a batch thread."""
        with self._cond:
            return self._queued_images

    def run(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_names: list[str]
    ) -> dict[str, np.ndarray]:
        size = _batch_size(inputs)
        limit = self.params.max_batch_size
        if size == 0:
            return self.servable.run(signature_name, inputs, output_names)
        if size > limit and not self.params.enable_large_batch_splitting:
            raise InvalidArgument(
                f"Task size {size} is larger than maximum input batch size {limit}"
            )
        key: _Key = (
            signature_name,
            tuple(output_names),
            tuple(sorted((a, v.shape[1:], v.dtype.str) for a, v in inputs.items())),
        )
        tasks = [
            _Task(
                key,
                signature_name,
                output_names,
                {alias: value[start : start + limit] for alias, value in inputs.items()},
                min(limit, size - start),
            )
            for start in range(0, size, limit)
        ]
        with self._cond:
            if self._closed:
                raise Unavailable("the model version is being unloaded")
            capacity = self.params.max_enqueued_batches * limit
            if self._queued_images + size > capacity and self._queued_images > 0:
                raise Unavailable(
                    "The batch scheduling queue to which this task was submitted is full"
                )
            self._queue.extend(tasks)
            self._queued_images += size
            self._cond.notify_all()
        parts = [task.result.result() for task in tasks]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in output_names}

    def close(self) -> None:
        """Finish the queued tasks, then stop the batch threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    # -- batch threads ------------------------------------------------------------------------

    def _fill(self) -> list[_Task]:
        """The tasks the next batch takes: the oldest one and compatible ones, up to the limit."""
        first, limit = self._queue[0], self.params.max_batch_size
        taken, total = [], 0
        for task in self._queue:
            if task.key == first.key and total + task.size <= limit:
                taken.append(task)
                total += task.size
                if total == limit:
                    break
        return taken

    def _next_batch(self) -> list[_Task] | None:
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None  # closed and drained
                taken = self._fill()
                remaining = self._queue[0].enqueued + self._timeout_s - time.monotonic()
                full = sum(t.size for t in taken) >= self.params.max_batch_size
                if full or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            for task in taken:
                self._queue.remove(task)
                self._queued_images -= task.size
            return taken

    def _padded_size(self, size: int) -> int:
        for allowed in self.params.allowed_batch_sizes:
            if allowed >= size:
                return allowed
        return size

    def _work(self) -> None:
        while (tasks := self._next_batch()) is not None:
            self._run(tasks)

    def _run(self, tasks: list[_Task]) -> None:
        first = tasks[0]
        size = sum(t.size for t in tasks)
        padded = self._padded_size(size)
        try:
            inputs = {}
            for alias in first.inputs:
                parts = [t.inputs[alias] for t in tasks]
                if padded > size:  # repeat the last image: padding rows are dropped below
                    parts.append(np.repeat(parts[-1][-1:], padded - size, axis=0))
                inputs[alias] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            outputs = self.servable.run(first.signature_name, inputs, first.output_names)
            self._observe_batch(padded)
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != padded:
                    raise ServingError(
                        f"Batched output tensor {name} has shape {list(value.shape)}: its 0th "
                        f"dimension must equal the batch size {padded}"
                    )
            start = 0
            for task in tasks:
                end = start + task.size
                task.result.set_result({n: v[start:end] for n, v in outputs.items()})
                start = end
        except Exception as error:  # every waiting request gets the engine's error
            for task in tasks:
                if not task.result.done():
                    task.result.set_exception(error)
