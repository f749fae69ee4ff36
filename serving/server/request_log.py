"""Request logging as TensorFlow Serving defines it: a model's `logging_config` in the model config file.

    config {
      name: "lm" base_path: "/models/lm"
      logging_config {
        log_collector_config { type: "tfrecord" filename_prefix: "/logs/lm" }
        sampling_config { sampling_rate: 0.1 }
      }
    }

A sampled request is logged with its response as TensorFlow Serving's `PredictionLog`
(tensorflow-serving-api's `prediction_log_pb2`: `predict_log` or `classify_log`, with `log_metadata`
naming the model, version and signature, the sampling config and the time), one record each in
TFRecord files `PREFIX-YYYYmmdd-HHMMSS-PID-N.tfrecord` on any TensorFlow filesystem (`gs://` too).
Streams and the OpenAI routes are logged as Predict requests of the `generate` signature.

TensorFlow Serving's open-source build registers no log collector, so any `logging_config` fails
to load there; `"tfrecord"` is lmstack's collector, and another type fails at start-up as it does
there ("Cannot find LogCollector::Factory for type").

Logging never slows or fails a request: the request thread only draws the sample and queues the
tensors it already holds. One thread per prefix builds the protos and writes them; when its queue
is full, or the storage fails (a full disk, a path it cannot write), records are dropped and
counted (`:tensorflow:serving:request_log_count{status_code}`, TF Serving's counter, is OK for a
record written and RESOURCE_EXHAUSTED or UNAVAILABLE for one dropped). Files rotate by size and
age; before a new file starts, the oldest files under the prefix (this run's and earlier ones')
are deleted until the new one fits in `max_total_bytes` (`lmstack:request_log:deleted_files`).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import threading
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from serving.contract import ServingError
from serving.server.metrics import Registry
from serving.server.versions import log

COLLECTOR_TYPE = "tfrecord"
_RETRY_SECONDS = 5.0  # after a storage error, records are dropped this long before the next try
_TFRECORD_FRAMING = 16  # bytes TFRecord adds to each record: length, and a CRC of it and of the data
_FLUSH_SECONDS = 1.0  # records reach the file (for readers) at most this long after they are written


@dataclasses.dataclass(frozen=True)
class LogOptions:
    """How request logs are written (the `--request_log_*` flags).

    Attributes:
        max_file_bytes: a file is closed and a new one started past this size.
        max_file_seconds: ... or this age.
        max_total_bytes: the files under one prefix together; the oldest are deleted to stay within it.
        max_queued: records waiting to be written; past it new ones are dropped (and counted).
        seed: seeds the sampling (0: a random seed), so the same requests in the same order are
            sampled alike.
    """
    max_file_bytes: int = 64 << 20
    max_file_seconds: float = 3600.0
    max_total_bytes: int = 1 << 30
    max_queued: int = 10_000
    seed: int = 0

    def __post_init__(self):
        for name in ("max_file_bytes", "max_file_seconds", "max_total_bytes", "max_queued"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--request_log_{name}={getattr(self, name)}: must be positive")
        if self.max_file_bytes > self.max_total_bytes:
            raise ValueError(f"--request_log_max_file_bytes={self.max_file_bytes} is larger than "
                             f"--request_log_max_total_bytes={self.max_total_bytes}")


def check_logging_config(model_name: str, config) -> None:
    """ServingError INVALID_ARGUMENT for a LoggingConfig this server cannot carry out."""
    collector = config.log_collector_config
    if collector.type != COLLECTOR_TYPE:
        raise ServingError("INVALID_ARGUMENT", f"model {model_name!r}: Cannot find LogCollector::Factory for type: "
                                               f"{collector.type!r} (lmstack logs requests with type: "
                                               f"\"{COLLECTOR_TYPE}\")")
    if not collector.filename_prefix:
        raise ServingError("INVALID_ARGUMENT", f"model {model_name!r}: log_collector_config needs a filename_prefix "
                                               "(e.g. \"/logs/lm\" or \"gs://bucket/logs/lm\")")
    rate = config.sampling_config.sampling_rate
    if not 0.0 <= rate <= 1.0:
        raise ServingError("INVALID_ARGUMENT", f"model {model_name!r}: sampling_rate must be in [0, 1], got {rate}")
    if config.sampling_config.per_task_sampling_configs:
        raise ServingError("INVALID_ARGUMENT", f"model {model_name!r}: per_task_sampling_configs are not supported "
                                               "(one server task); use sampling_rate")


class Collector:
    """TFRecord files under one prefix, written by a thread of their own."""

    def __init__(self, prefix: str, options: LogOptions, metrics: Registry):
        self.prefix, self.options, self.metrics = prefix, options, metrics
        self._queue: queue.Queue = queue.Queue(options.max_queued)
        self._writer: Any = None
        self._path = ""
        self._bytes = 0
        self._opened = 0.0
        self._failed_until = 0.0
        self._flushed = 0.0
        self._files = 0
        self._thread = threading.Thread(target=self._run, name=f"request-log:{prefix}", daemon=True)
        self._thread.start()

    def put(self, model_name: str, build: Callable[[], bytes]) -> None:
        """Queues one record (`build()` makes its bytes on the writer's thread); drops it when full."""
        try:
            self._queue.put_nowait((model_name, build))
        except queue.Full:
            self.metrics.request_log_count.inc(model_name, "RESOURCE_EXHAUSTED")

    def close(self, timeout: float = 10.0) -> None:
        """Writes what is queued (for up to `timeout` seconds) and closes the file."""
        self._queue.put((None, None))
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                model_name, build = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._writer is not None and time.monotonic() - self._opened > self.options.max_file_seconds:
                    self._close_file()
                self._flush()
                continue
            if build is None:
                self._close_file()
                return
            try:
                self._write(build())
                status = "OK"
            except tf.errors.OpError as e:
                status = "UNAVAILABLE"
                self._fail(e.message)
            except Exception as e:  # a record that cannot be built is a bug; the server goes on
                status = "INTERNAL"
                log.error("request log %s: a record could not be made: %s: %s", self.prefix, type(e).__name__, e)
            self.metrics.request_log_count.inc(model_name, status)
            if time.monotonic() - self._flushed > _FLUSH_SECONDS:
                self._flush()

    def _flush(self) -> None:
        """Readers see every record written so far."""
        self._flushed = time.monotonic()
        if self._writer is not None:
            try:
                self._writer.flush()
            except tf.errors.OpError as e:
                self._fail(e.message)

    def _write(self, record: bytes) -> None:
        size = len(record) + _TFRECORD_FRAMING
        if self._writer is not None and (self._bytes + size > self.options.max_file_bytes
                                         or time.monotonic() - self._opened > self.options.max_file_seconds):
            self._close_file()
        if self._writer is None:
            if time.monotonic() < self._failed_until:
                raise tf.errors.UnavailableError(None, None, "the last write failed; retrying shortly")
            self._open_file()
        self._writer.write(record)
        self._bytes += size

    def _open_file(self) -> None:
        directory = self.prefix.rsplit("/", 1)[0] if "/" in self.prefix else "."
        tf.io.gfile.makedirs(directory)
        self._make_room()
        self._files += 1
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self._path = f"{self.prefix}-{stamp}-{os.getpid()}-{self._files:04d}.tfrecord"
        self._writer = tf.io.TFRecordWriter(self._path)
        self._bytes, self._opened = 0, time.monotonic()

    def _make_room(self) -> None:
        """Deletes the oldest files under the prefix until a new full file fits in max_total_bytes."""
        files = sorted(tf.io.gfile.glob(f"{self.prefix}-*.tfrecord"))  # oldest first: the names start with the time
        sizes = [tf.io.gfile.stat(f).length for f in files]
        total = sum(sizes)
        for path, size in zip(files, sizes):
            if total + self.options.max_file_bytes <= self.options.max_total_bytes:
                break
            tf.io.gfile.remove(path)
            total -= size
            self.metrics.request_log_deleted.inc(self.prefix)

    def _close_file(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except tf.errors.OpError as e:
                self._fail(e.message)
            self._writer = None

    def _fail(self, message: str) -> None:
        if time.monotonic() >= self._failed_until:  # one line per failure, not per record
            log.error("request log %s: writing failed, dropping records for %.0f s: %s", self.prefix,
                      _RETRY_SECONDS, message.splitlines()[0] if message else "")
        self._failed_until = time.monotonic() + _RETRY_SECONDS
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except tf.errors.OpError:
                pass


class _Logger:
    """One LoggingConfig: its sampler and its collector."""

    def __init__(self, config, collector: Collector, seed: int):
        self.config, self.collector = config, collector
        self.rate = config.sampling_config.sampling_rate
        self._random = random.Random(seed or None)
        self._lock = threading.Lock()

    def sample(self) -> bool:
        with self._lock:
            return self._random.random() < self.rate


class RequestLogs:
    """The server's request loggers: one per distinct LoggingConfig, shared by the models naming it
    (TF Serving's ServerRequestLogger), and one collector per filename prefix."""

    def __init__(self, options: LogOptions, metrics: Registry):
        self.options, self.metrics = options, metrics
        self._models: dict[str, _Logger] = {}
        self._collectors: dict[str, Collector] = {}
        self._lock = threading.Lock()

    def update(self, configs: dict[str, Any]) -> None:
        """model name -> its LoggingConfig (or None): the loggers from now on. Checks every config
        first (ServingError; nothing changes then)."""
        for name, config in configs.items():
            if config is not None:
                check_logging_config(name, config)
        with self._lock:
            by_config = {logger.config.SerializeToString(deterministic=True): logger
                         for logger in self._models.values()}
            models = {}
            for name, config in configs.items():
                if config is None:
                    continue
                key = config.SerializeToString(deterministic=True)
                if key not in by_config:
                    prefix = config.log_collector_config.filename_prefix
                    if prefix not in self._collectors:
                        self._collectors[prefix] = Collector(prefix, self.options, self.metrics)
                    by_config[key] = _Logger(config, self._collectors[prefix], self.options.seed)
                models[name] = by_config[key]
            self._models = models

    def close(self) -> None:
        with self._lock:
            collectors, self._collectors, self._models = list(self._collectors.values()), {}, {}
        for collector in collectors:
            collector.close()

    def predict(self, model_name: str, version: int, signature: str, inputs: dict[str, np.ndarray],
                outputs: dict[str, np.ndarray]) -> None:
        """Logs a Predict request and its response (if sampled); the protos are made off this thread."""
        def fill(request, response) -> None:
            for key, value in inputs.items():
                _fill_tensor(request.inputs[key], value)
            for key, value in outputs.items():
                _fill_tensor(response.outputs[key], value)

        self._log(model_name, version, signature, "predict_log", fill)

    def classify(self, model_name: str, version: int, signature: str, examples: list[bytes],
                 classes, scores) -> None:
        """Logs a Classify request (its serialized tf.Examples) and its classifications (if sampled)."""
        def fill(request, response) -> None:
            for example in examples:
                request.input.example_list.examples.add().ParseFromString(example)
            rows = len(scores) if scores is not None else len(classes)
            for i in range(rows):
                result = response.result.classifications.add()
                width = len(scores[i]) if scores is not None else len(classes[i])
                for j in range(width):
                    entry = result.classes.add()
                    if classes is not None:
                        entry.label = classes[i][j].decode("utf-8", "replace") if isinstance(
                            classes[i][j], bytes) else str(classes[i][j])
                    if scores is not None:
                        entry.score = float(scores[i][j])

        self._log(model_name, version, signature, "classify_log", fill)

    def _log(self, model_name: str, version: int, signature: str, kind: str,
             fill: Callable[[Any, Any], None]) -> None:
        """Queues a PredictionLog of `kind` (predict_log, classify_log) if this request is sampled;
        `fill(request, response)` writes the request and response protos, on the writer's thread."""
        logger = self._models.get(model_name)
        if logger is None or not logger.sample():
            return
        stamp = int(time.time())

        def build() -> bytes:
            from tensorflow_serving.apis import prediction_log_pb2

            record = prediction_log_pb2.PredictionLog()
            metadata = record.log_metadata
            metadata.model_spec.name = model_name
            metadata.model_spec.version.value = version
            metadata.model_spec.signature_name = signature
            metadata.sampling_config.CopyFrom(logger.config.sampling_config)
            metadata.saved_model_tags.append("serve")
            metadata.timestamp_secs = stamp
            log = getattr(record, kind)
            log.request.model_spec.CopyFrom(metadata.model_spec)
            log.response.model_spec.CopyFrom(metadata.model_spec)
            fill(log.request, log.response)
            return record.SerializeToString()

        logger.collector.put(model_name, build)


def _fill_tensor(proto, value) -> None:
    """A TensorProto of an array, as tf.make_tensor_proto makes it but without its Python-side checks
    (a tenth of the cost, on the writer's thread): strings in string_val, numbers in tensor_content."""
    array = np.asarray(value)
    proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=n) for n in array.shape)
    if array.dtype.kind in "OSU":
        proto.dtype = tf.string.as_datatype_enum
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
    else:
        proto.dtype = tf.as_dtype(array.dtype).as_datatype_enum
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
