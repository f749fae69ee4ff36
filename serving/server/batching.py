"""Server-side dynamic batching with the semantics of TensorFlow Serving's `--batching_parameters_file`.

Concurrent requests for the same model version and signature wait in one
queue. A batch thread takes the oldest queue once it holds a full batch or
its first request has waited `batch_timeout_micros`, concatenates the
requests along the batch dimension, runs the signature once and hands each
request its rows of the outputs. As in TensorFlow Serving
(`batching/batching_session.cc`):

- a request of more rows than `max_batch_size` fails with "Task size N is
  larger than maximum input batch size M" — unless
  `enable_large_batch_splitting`, which splits it into pieces of at most
  `max_execution_batch_size` rows that run in (possibly different) batches;
- `allowed_batch_sizes` pads a batch up to the next allowed size with copies
  of its last request's first row (the padding rows' outputs are dropped);
- `pad_variable_length_inputs` lets requests whose inputs differ in a
  dimension other than the first share a batch: each request's tensors are
  padded at the end of every dimension to the batch's largest, with the
  request's own first element, and each request gets its rows of the padded
  outputs. The exported signatures answer a padded row as they answer it
  unpadded (`serving.contract`);
- without padding, TensorFlow Serving fails a whole batch whose requests'
  shapes differ; here such requests queue separately (each answer is the
  unbatched one).

Every request is validated before it joins a queue (`serving.server.core`),
so a bad request fails alone. A request whose client has gone or whose
deadline passed while it waited leaves the queue without running; a batch
whose requests are all abandoned is cancelled while it runs.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from serving.contract import ServingError


class Call(Protocol):
    """What the batcher needs to know of a request's caller (`serving.server.deadlines.Call`)."""

    def abandoned(self) -> bool: ...  # the client went away or the deadline passed

    def check(self) -> None: ...  # raises the ServingError for an abandoned call


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TensorFlow Serving's BatchingParameters, with its defaults and checks.

    Attributes:
        max_batch_size: the largest batch (and, without splitting, the largest request).
        batch_timeout_micros: how long the oldest request waits for a batch to fill.
        max_enqueued_batches: queued rows are refused (UNAVAILABLE) past this many full batches.
        num_batch_threads: batches that run at once.
        allowed_batch_sizes: batch sizes a batch is padded up to; the last must equal the execution size.
        pad_variable_length_inputs: pad inputs of different shapes to share a batch (see the module).
        enable_large_batch_splitting: split requests larger than `max_execution_batch_size`.
        max_execution_batch_size: the largest batch run when splitting (default: `max_batch_size`).
    """
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 100
    num_batch_threads: int = 4
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = 0

    def __post_init__(self):
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must not be negative, got {self.batch_timeout_micros}")
        if self.max_execution_batch_size < 0:
            raise ValueError(f"max_execution_batch_size must not be negative, got {self.max_execution_batch_size}")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
                raise ValueError(f"allowed_batch_sizes must be positive and increasing, got {list(sizes)}")
            if sizes[-1] != self.execution_batch_size:
                what = "max_execution_batch_size" if self.enable_large_batch_splitting else "max_batch_size"
                raise ValueError(f"the last entry of allowed_batch_sizes ({sizes[-1]}) must equal {what} "
                                 f"({self.execution_batch_size})")
        if self.enable_large_batch_splitting and self.execution_batch_size > self.max_batch_size:
            raise ValueError(f"max_execution_batch_size ({self.execution_batch_size}) must not exceed "
                             f"max_batch_size ({self.max_batch_size})")

    @property
    def execution_batch_size(self) -> int:
        """The most rows one run of the signature takes."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size:
            return self.max_execution_batch_size
        return self.max_batch_size


@dataclasses.dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    rows: int
    call: Call
    enqueued: float
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


# fn(inputs, calls) -> outputs: numpy in and out, first dimension the batch; `calls` are the requests in the
# batch (so fn can stop the run once all of them are abandoned).
RunFn = Callable[[dict[str, np.ndarray], Sequence[Call]], dict[str, np.ndarray]]


def pad_to(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """`array` padded at the end of every dimension but the first to `shape`, with its first element.

    TensorFlow Serving's `AddPadding` (batching_util.cc): "using existing values in padding".
    """
    widths = [(0, 0)] + [(0, want - have) for have, want in zip(array.shape[1:], shape[1:])]
    if not any(after for _, after in widths) or array.size == 0:
        return array
    if array.dtype == object:  # np.pad's constant mode does not take bytes
        out = np.full((array.shape[0], *shape[1:]), array.flat[0], dtype=object)
        out[tuple(slice(0, n) for n in array.shape)] = array
        return out
    return np.pad(array, widths, constant_values=array.flat[0])


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
        self._runners: dict[Any, tuple[str, RunFn]] = {}
        self._rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{i}", daemon=True)
                         for i in range(parameters.num_batch_threads)]
        for t in self._threads:
            t.start()

    def queued_rows(self) -> int:
        return self._rows

    def run(self, key: Any, model_name: str, fn: RunFn, inputs: dict[str, np.ndarray], call: Call) -> dict:
        """Runs `fn` on `inputs` in a batch with other requests of the same key; returns this request's rows.

        `inputs` must be validated: every array has the same first dimension.
        """
        p = self.parameters
        rows = int(next(iter(inputs.values())).shape[0])
        if rows > p.max_batch_size:
            raise ServingError("INVALID_ARGUMENT", f"Task size {rows} is larger than maximum input batch size "
                                                   f"{p.max_batch_size}")
        if rows == 0:
            return fn(inputs, [call])
        step = p.execution_batch_size
        pieces = [{k: v[i:i + step] for k, v in inputs.items()} for i in range(0, rows, step)]
        if p.pad_variable_length_inputs:  # shapes beyond the batch dimension may differ within a queue
            shape_key = tuple((k, v.ndim, v.dtype.str) for k, v in sorted(inputs.items()))
        else:
            shape_key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(inputs.items()))
        queue_key = (key, shape_key)
        now = time.perf_counter()
        tasks = [_Task(piece, int(next(iter(piece.values())).shape[0]), call, now) for piece in pieces]
        with self._cond:
            if self._closed:
                raise ServingError("UNAVAILABLE", "the server is shutting down")
            if self._rows + rows > p.max_enqueued_batches * p.max_batch_size:
                raise ServingError("UNAVAILABLE", "The batch scheduling queue to which this task was submitted "
                                                  "is full")
            self._queues.setdefault(queue_key, collections.deque()).extend(tasks)
            self._runners[queue_key] = (model_name, fn)
            self._rows += rows
            self._cond.notify_all()
        for task in tasks:
            task.done.wait()
        for task in tasks:
            if task.error is not None:
                raise task.error
        if len(tasks) == 1:
            return tasks[0].outputs
        return {k: np.concatenate([t.outputs[k] for t in tasks], axis=0) for k in tasks[0].outputs}

    def close(self) -> None:
        """Stops the batch threads; requests still queued fail with UNAVAILABLE."""
        with self._cond:
            self._closed = True
            left = [t for q in self._queues.values() for t in q]
            self._queues.clear()
            self._cond.notify_all()
        for task in left:
            task.error = ServingError("UNAVAILABLE", "the server is shutting down")
            task.done.set()

    def _ready(self, now: float):
        """The key of the queue to run now, or (None, seconds to wait)."""
        timeout = self.parameters.batch_timeout_micros / 1e6
        oldest_key, wait = None, None
        for key, queue in self._queues.items():
            if not queue:
                continue
            rows = sum(t.rows for t in queue)
            age = now - queue[0].enqueued
            if rows >= self.parameters.execution_batch_size or age >= timeout:
                if oldest_key is None or queue[0].enqueued < self._queues[oldest_key][0].enqueued:
                    oldest_key = key
            else:
                wait = timeout - age if wait is None else min(wait, timeout - age)
        return oldest_key, wait

    def _loop(self) -> None:
        while True:
            abandoned = []
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
                while queue and rows + queue[0].rows <= self.parameters.execution_batch_size:
                    task = queue.popleft()
                    self._rows -= task.rows
                    if task.call.abandoned():  # its client left or its deadline passed while it waited
                        abandoned.append(task)
                        continue
                    batch.append(task)
                    rows += task.rows
                if not queue:
                    del self._queues[key]
                    model_name, fn = self._runners.pop(key)
                else:
                    model_name, fn = self._runners[key]
            for task in abandoned:
                try:
                    task.call.check()
                    task.error = ServingError("CANCELLED", "the request was abandoned")
                except ServingError as e:
                    task.error = e
                task.done.set()
            if batch:
                self._run(model_name, fn, batch, rows)

    def _run(self, model_name: str, fn: RunFn, batch: list[_Task], rows: int) -> None:
        waited_us = (time.perf_counter() - batch[0].enqueued) * 1e6
        ran = rows
        try:
            if len(batch) == 1 and not self.parameters.allowed_batch_sizes:
                outputs = [fn(batch[0].inputs, [batch[0].call])]
            else:
                merged, ran = self._merge(batch, rows)
                result = fn(merged, [t.call for t in batch])
                outputs, start = [], 0
                for task in batch:
                    outputs.append({k: v[start:start + task.rows] for k, v in result.items()})
                    start += task.rows
            for task, out in zip(batch, outputs):
                task.outputs = out
        except BaseException as e:  # every waiting request gets the error
            for task in batch:
                task.error = e
        finally:
            self.on_batch(model_name, ran, waited_us)
            for task in batch:
                task.done.set()

    def _merge(self, batch: list[_Task], rows: int) -> tuple[dict[str, np.ndarray], int]:
        """The batch's inputs as one array per name (padded as TensorFlow Serving pads), and its size."""
        names = batch[0].inputs
        if self.parameters.pad_variable_length_inputs:
            shapes = {k: np.max([t.inputs[k].shape for t in batch], axis=0) for k in names}
            parts = {k: [pad_to(t.inputs[k], shapes[k]) for t in batch] for k in names}
        else:
            parts = {k: [t.inputs[k] for t in batch] for k in names}
        size = next((s for s in self.parameters.allowed_batch_sizes if s >= rows), rows)
        if size > rows:  # TF Serving pads with the last task's first row
            for k in names:
                parts[k].append(np.repeat(parts[k][-1][:1], size - rows, axis=0))
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}, size
