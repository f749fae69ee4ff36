"""Server-side dynamic batching, configured like TensorFlow Serving's `--batching_parameters_file`.

Concurrent requests for the same model version and signature, whose inputs
agree in every dimension but the first, wait in one queue. A batch thread
takes the oldest queue once it holds `max_batch_size` rows or its first
request has waited `batch_timeout_micros`, concatenates the requests along
the batch dimension, runs the signature once and hands each request its rows
of the outputs. Requests with inputs of other shapes (e.g. `token_ids` of
another length) queue separately, so every answer equals the unbatched one;
lmstack's text signatures take `[B]` strings, so prompts of any length share
a batch. A request larger than `max_batch_size` runs on its own.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import threading
import time
from typing import Any, Callable

import numpy as np

from serving import textproto
from serving.contract import ServingError

_SCHEMA = {
    "max_batch_size": {"value": int},
    "batch_timeout_micros": {"value": int},
    "max_enqueued_batches": {"value": int},
    "num_batch_threads": {"value": int},
    "thread_pool_name": {"value": str},
    "allowed_batch_sizes": int,
    "pad_variable_length_inputs": bool,
    "enable_large_batch_splitting": {"value": bool},
}


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TensorFlow Serving's BatchingParameters (its defaults where a field is left out)."""
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 100
    num_batch_threads: int = 4
    pad_variable_length_inputs: bool = False

    def __post_init__(self):
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must not be negative, got {self.batch_timeout_micros}")


def read_parameters(path: str | pathlib.Path) -> BatchingParameters:
    """Reads a batching parameters text file; `ServingError` INVALID_ARGUMENT names what is wrong."""
    try:
        fields = textproto.parse(pathlib.Path(path).read_text(), _SCHEMA)
        values = {k: (v["value"] if isinstance(v, dict) else v) for k, v in fields.items()
                  if k in {f.name for f in dataclasses.fields(BatchingParameters)}}
        return BatchingParameters(**values)
    except (OSError, ValueError) as e:
        raise ServingError("INVALID_ARGUMENT", f"batching parameters file {path}: {e}") from None


@dataclasses.dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    rows: int
    enqueued: float
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


class Batcher:
    """Queues per batch key and the threads that run them.

    Args:
        parameters: the batching parameters.
        on_batch: called with (model name, rows, microseconds the oldest request waited) per batch run.
    """

    def __init__(self, parameters: BatchingParameters,
                 on_batch: Callable[[str, int, float], None] = lambda *_: None):
        self.parameters = parameters
        self.on_batch = on_batch
        self._queues: dict[Any, collections.deque[_Task]] = {}
        self._runners: dict[Any, Callable] = {}
        self._rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{i}", daemon=True)
                         for i in range(parameters.num_batch_threads)]
        for t in self._threads:
            t.start()

    def queued_rows(self) -> int:
        return self._rows

    def run(self, key: Any, model_name: str, fn: Callable[..., dict], inputs: dict[str, np.ndarray]) -> dict:
        """Runs `fn(**inputs)` in a batch with other requests of the same key; returns this request's rows.

        `fn` takes and returns numpy arrays whose first dimension is the batch.
        """
        rows = int(next(iter(inputs.values())).shape[0])
        p = self.parameters
        if rows > p.max_batch_size or rows == 0:
            return fn(**inputs)
        shape_key = (key, tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(inputs.items())))
        task = _Task(inputs, rows, time.perf_counter())
        with self._cond:
            if self._rows + rows > p.max_enqueued_batches * p.max_batch_size:
                raise ServingError("UNAVAILABLE", "The batch scheduling queue to which this task was submitted "
                                                  "is full")
            self._queues.setdefault(shape_key, collections.deque()).append(task)
            self._runners[shape_key] = (model_name, fn)
            self._rows += rows
            self._cond.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _ready(self, now: float):
        """The key of the queue to run now, or (None, seconds to wait)."""
        timeout = self.parameters.batch_timeout_micros / 1e6
        oldest_key, wait = None, None
        for key, queue in self._queues.items():
            if not queue:
                continue
            rows = sum(t.rows for t in queue)
            age = now - queue[0].enqueued
            if rows >= self.parameters.max_batch_size or age >= timeout:
                if oldest_key is None or queue[0].enqueued < self._queues[oldest_key][0].enqueued:
                    oldest_key = key
            else:
                wait = timeout - age if wait is None else min(wait, timeout - age)
        return oldest_key, wait

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    key, wait = self._ready(time.perf_counter())
                    if key is not None:
                        break
                    self._cond.wait(wait)
                queue = self._queues[key]
                batch, rows = [], 0
                while queue and rows + queue[0].rows <= self.parameters.max_batch_size:
                    task = queue.popleft()
                    batch.append(task)
                    rows += task.rows
                if not queue:
                    del self._queues[key]
                self._rows -= rows
                model_name, fn = self._runners[key]
            self._run(model_name, fn, batch, rows)

    def _run(self, model_name: str, fn: Callable[..., dict], batch: list[_Task], rows: int) -> None:
        waited_us = (time.perf_counter() - batch[0].enqueued) * 1e6
        try:
            if len(batch) == 1:
                outputs = [fn(**batch[0].inputs)]
            else:
                merged = {k: np.concatenate([t.inputs[k] for t in batch], axis=0) for k in batch[0].inputs}
                result = fn(**merged)
                outputs, start = [], 0
                for task in batch:
                    outputs.append({k: v[start:start + task.rows] for k, v in result.items()})
                    start += task.rows
            for task, out in zip(batch, outputs):
                task.outputs = out
        except BaseException as e:  # noqa: BLE001 (every waiting request gets the error)
            for task in batch:
                task.error = e
        finally:
            self.on_batch(model_name, rows, waited_us)
            for task in batch:
                task.done.set()
