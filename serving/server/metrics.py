"""Prometheus metrics under TensorFlow Serving's names, so one dashboard reads both servers.

TensorFlow Serving exports its monitoring metrics with '/' turned into ':'
(`/tensorflow/serving/request_count` -> `:tensorflow:serving:request_count`).
Metrics TensorFlow Serving has no name for are prefixed `lmstack:`. Label
values are escaped as the text exposition format requires (backslash, double
quote, newline), so no value a client sends can forge a series; the server
labels requests for unknown models with one fixed name
(`serving.server.core.UNKNOWN_MODEL`), so clients cannot grow the page.
"""

from __future__ import annotations

import bisect
import threading
from typing import Sequence

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"  # microseconds, as TensorFlow Serving reports it
BATCH_SIZE = ":tensorflow:serving:batching_session:processed_batch_size"
QUEUING_LATENCY = ":tensorflow:serving:batching_session:queuing_latency"  # microseconds
QUEUE_ROWS = "lmstack:batching:queued_rows"
LOADED_VERSIONS = "lmstack:model:loaded_versions"
TIME_TO_FIRST_TOKEN = "lmstack:generation:time_to_first_token_seconds"
TIME_PER_OUTPUT_TOKEN = "lmstack:generation:time_per_output_token_seconds"
PROMPT_TOKENS = "lmstack:generation:prompt_tokens"
GENERATED_TOKENS = "lmstack:generation:generated_tokens"
WAITING_ROWS = "lmstack:generation:waiting_rows"
ACTIVE_ROWS = "lmstack:generation:active_rows"
CANCELLED_REQUESTS = "lmstack:generation:cancelled_requests"
REQUEST_LOG_COUNT = ":tensorflow:serving:request_log_count"
REQUEST_LOG_DELETED = "lmstack:request_log:deleted_files"

LATENCY_BUCKETS_US = tuple(float(10 * 1.8 ** i) for i in range(33))  # 10 us .. ~2.6e9 us, TF Serving's scheme
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = tuple(2 ** i for i in range(17))  # 1 .. 65536 tokens


def escape(value: str) -> str:
    """A label value as the Prometheus text format writes it."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str]):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[tuple, object] = {}

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        return self._header() + [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in self._values.items()]


class Gauge(Counter):
    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        with self._lock:
            self._values[labels] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str], buckets: Sequence[float]):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(buckets)

    def observe(self, *labels: str, value: float) -> None:
        with self._lock:
            counts, total = self._values.get(labels, ([0] * (len(self.buckets) + 1), 0.0))
            counts = list(counts)
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._values[labels] = (counts, total + value)

    def count(self, *labels: str) -> int:
        counts, _ = self._values.get(labels, ([0], 0.0))
        return sum(counts)

    def render(self) -> list[str]:
        lines = self._header()
        for key, (counts, total) in self._values.items():
            running = 0
            for bound, n in zip(list(self.buckets) + [float("inf")], counts):
                running += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                bucket = _labels(self.label_names, key, 'le="' + le + '"')
                lines.append(f"{self.name}_bucket{bucket} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {total:g}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


class Registry:
    """The server's metrics; `render()` is the Prometheus text exposition format."""

    def __init__(self):
        self.request_count = Counter(REQUEST_COUNT, "The total number of requests.", ("model_name", "status"))
        self.request_latency = Histogram(
            REQUEST_LATENCY, "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ("model_name", "API", "entrypoint"), LATENCY_BUCKETS_US)
        self.batch_size = Histogram(BATCH_SIZE, "Rows in each batch the server ran.", ("model_name",), BATCH_BUCKETS)
        self.queuing_latency = Histogram(QUEUING_LATENCY, "Microseconds a request waited to join a batch.",
                                         ("model_name",), LATENCY_BUCKETS_US)
        self.queued_rows = Gauge(QUEUE_ROWS, "Rows waiting in the batching queues.", ("model_name",))
        self.loaded_versions = Gauge(LOADED_VERSIONS, "Versions loaded and serving, by model.", ("model_name",))
        # Generation scheduled step by step (serving.server.scheduler); `streamed` is "true" for the
        # streams (REST :stream, gRPC StreamGenerate, OpenAI stream) and "false" for whole answers.
        self.time_to_first_token = Histogram(
            TIME_TO_FIRST_TOKEN, "Seconds from a sequence's arrival to its first generated token.",
            ("model_name", "streamed"), SECONDS_BUCKETS)
        self.time_per_output_token = Histogram(
            TIME_PER_OUTPUT_TOKEN, "Seconds between a sequence's generated tokens (one observation per decoding "
            "call it takes part in).", ("model_name", "streamed"), SECONDS_BUCKETS)
        self.prompt_tokens = Histogram(PROMPT_TOKENS, "Prompt tokens of each sequence.", ("model_name",),
                                       TOKEN_BUCKETS)
        self.generated_tokens = Histogram(GENERATED_TOKENS, "Tokens generated for each finished sequence.",
                                          ("model_name",), TOKEN_BUCKETS)
        self.waiting_rows = Gauge(WAITING_ROWS, "Sequences waiting for a generation slot.", ("model_name",))
        self.active_rows = Gauge(ACTIVE_ROWS, "Sequences in the generation slots.", ("model_name",))
        self.cancelled_requests = Counter(
            CANCELLED_REQUESTS, "Generation requests stopped before their end: the deadline passed, the client "
            "disconnected, or it stopped reading (a stop string).", ("model_name", "reason"))
        self.request_log_count = Counter(
            REQUEST_LOG_COUNT, "The total number of requests logged from the model server sliced down by model_name "
            "and status code.", ("model_name", "status_code"))
        self.request_log_deleted = Counter(REQUEST_LOG_DELETED, "Request log files deleted to stay within "
                                           "--request_log_max_total_bytes.", ("filename_prefix",))

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.request_count, self.request_latency, self.batch_size, self.queuing_latency,
                       self.queued_rows, self.loaded_versions, self.time_to_first_token, self.time_per_output_token,
                       self.prompt_tokens, self.generated_tokens, self.waiting_rows, self.active_rows,
                       self.cancelled_requests, self.request_log_count, self.request_log_deleted):
            lines += metric.render()
        return "\n".join(lines) + "\n"
