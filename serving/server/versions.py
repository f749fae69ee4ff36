"""Model versions: which are on disk, which the policy serves, loading them (with warm-up and retries).

A model's base path holds one directory per version, named by a plain
decimal integer (`1`, `2`, ...; not `01x`, not `²`), each a SavedModel as
`lmstack export` writes it. `ServedModel.refresh()` makes the loaded versions
match the version policy: new versions load and replay their warm-up
requests before old ones unload, so there is always a version to answer;
requests hold the `LoadedVersion` they started with, so a swap never cuts
one short. A version that fails to load is retried `max_num_load_retries`
times, `load_retry_interval` seconds apart (a version still being copied in
by a tool that does not rename into place loads on a later try); after that
it stays reported as failed and the others keep serving.

Base paths are read through TensorFlow's filesystems (`tf.io.gfile`), as TensorFlow
Serving reads them through `tensorflow::Env`: a local directory, `file://`,
`gs://` or any scheme this TensorFlow build registers. Paths stay strings.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import posixpath
import re
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops the exported graphs use)

from serving import tensors
from serving import contract as c
from serving.contract import SERVING_DEFAULT, ServingError

log = logging.getLogger("lmstack.serve")

XLA_DISABLED = "XLA compilation disabled"  # TensorFlow's message when a server has not enabled XLA
_VERSION_DIR = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also takes '²'


@dataclasses.dataclass
class LoadedVersion:
    version: int
    path: str  # the version's directory, local or a URI
    model: Any  # what tf.saved_model.load returns
    signatures: dict[str, Any]  # name -> concrete function
    methods: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> SignatureDef method name
    context: int | None = None  # a transformer's context: max_new_tokens must stay below it
    # The batch sizes its compiled signatures were built for (a step scheduler pads to them).
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    scheduler: Any = None  # the step scheduler of its generation (`serving.server.scheduler`), if any
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # its lmstack_config.json ({} without one)

    def __post_init__(self):
        # structured_input_signature rebuilds its answer on every access: read it once.
        self._specs = {name: fn.structured_input_signature[1] for name, fn in self.signatures.items()}

    def input_specs(self, signature: str) -> dict[str, tf.TensorSpec]:
        return self._specs[signature]

    def numpy_function(self, signature: str, cancellable):
        """The signature as numpy arrays in, numpy arrays out (what the batcher merges and splits).

        Args:
            cancellable: `cancellable(fn, calls)` returns `fn` wrapped so that it stops when every
                call in `calls` is abandoned (`serving.server.core.Watchdog.cancellable`).
        """
        fn = self.signatures[signature]
        specs = self.input_specs(signature)

        def run(arrays: dict[str, np.ndarray], calls: Sequence) -> dict[str, np.ndarray]:
            outputs = cancellable(fn, calls)(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in arrays.items()})
            return {k: v.numpy() for k, v in outputs.items()}
        return run


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve (TensorFlow Serving's `model_version_policy`).

    Attributes:
        kind: 'latest' (the `num_versions` newest), 'all', or 'specific' (`versions`).
    """
    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def choose(self, on_disk: list[int]) -> list[int]:
        if self.kind == "all":
            return list(on_disk)
        if self.kind == "specific":
            return [v for v in on_disk if v in self.versions]
        return sorted(on_disk)[-max(1, self.num_versions):]


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a local path or a `scheme://` URI (TensorFlow filesystems use '/')."""
    base = str(base)  # a pathlib.Path, or lmstack's GPath (a URI; it has no __fspath__ on purpose)
    return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)


def canonical(base_path: str) -> str:
    """A base path as one spelling: local paths absolute with symlinks resolved, URIs normalized."""
    scheme, sep, rest = base_path.partition("://")
    if not sep or "/" in scheme:
        return os.path.realpath(base_path)
    if scheme == "file":
        return os.path.realpath(rest)
    return f"{scheme}://{posixpath.normpath(rest)}"


def check_scheme(base_path: str) -> None:
    """Raises ServingError INVALID_ARGUMENT if no TensorFlow filesystem here handles the path's scheme."""
    scheme, sep, _ = base_path.partition("://")
    if sep and "/" not in scheme and scheme not in tf.io.gfile.get_registered_schemes():
        known = ", ".join(sorted(s + "://" for s in tf.io.gfile.get_registered_schemes() if s))
        raise ServingError("INVALID_ARGUMENT", f"no filesystem here handles {scheme}:// in {base_path!r} "
                                               f"(TensorFlow has: {known}); use one of those or a local path"
                           + ("; s3:// comes with `pip install tensorflow-io`" if scheme == "s3" else ""))


def is_file(path: str | os.PathLike) -> bool:
    return tf.io.gfile.exists(str(path)) and not tf.io.gfile.isdir(str(path))


def read_bytes(path: str | os.PathLike) -> bytes:
    with tf.io.gfile.GFile(str(path), "rb") as f:
        return f.read()


def replay_warmup(loaded: LoadedVersion, warmup_file: str | os.PathLike, xla: bool = False, threads: int = 1,
                  skip: Sequence[str] = ()) -> int:
    """Runs the PredictionLog requests of a warm-up file (assets.extra/tf_serving_warmup_requests), as
    TensorFlow Serving does, on `threads` threads (its num_model_warmup_threads): XLA compiles one
    shape bucket per thread. Requests for the signatures in `skip` are left out.

    Raises:
        ServingError: a request calls an XLA-compiled signature and `xla` is off (TensorFlow Serving
            fails the load the same way: its first compilation request fails).
    """
    if not is_file(warmup_file):
        return 0
    from tensorflow_serving.apis import prediction_log_pb2

    calls = []
    for record in tf.data.TFRecordDataset(str(warmup_file)).as_numpy_iterator():
        log_record = prediction_log_pb2.PredictionLog.FromString(record)
        kind = log_record.WhichOneof("log_type")
        if kind == "predict_log":
            request = log_record.predict_log.request
            name = request.model_spec.signature_name or SERVING_DEFAULT
            if name in skip:
                continue
            if c.needs_xla(name) and not xla:
                raise ServingError("FAILED_PRECONDITION", f"{XLA_DISABLED}: the warm-up requests call the XLA-compiled "
                                                          f"signature {name!r} (an export made with --xla_warmup); "
                                                          "start the server with --xla_cpu_compilation_enabled")
            inputs = {k: tf.constant(tensors.to_ndarray(v)) for k, v in request.inputs.items()}
        elif kind == "classify_log":
            request = log_record.classify_log.request
            name = request.model_spec.signature_name or SERVING_DEFAULT
            (key,) = loaded.input_specs(name)
            inputs = {key: tf.constant(examples_of(request.input))}
        else:
            continue
        calls.append(functools.partial(loaded.signatures[name], **inputs))
    if threads <= 1:
        for call in calls:
            call()
    else:
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="warmup") as pool:
            for future in [pool.submit(call) for call in calls]:
                future.result()
    return len(calls)


def export_info(path: str | os.PathLike) -> dict[str, Any]:
    """An export's lmstack_config.json ({} for a SavedModel without one)."""
    import json

    config = join(path, c.ASSETS_EXTRA, c.CONFIG_FILE)
    return json.loads(read_bytes(config)) if is_file(config) else {}


def model_context(path: str | os.PathLike, info: dict[str, Any] | None = None) -> int | None:
    """A transformer export's context length (from its lmstack_config.json, or `info` read from it), or None."""
    model = (export_info(path) if info is None else info).get("model") or {}
    return int(model["seq_len"]) if model.get("family") == "transformer" and "seq_len" in model else None


def saved_model_proto(path: str | os.PathLike):
    """The SavedModel proto of a version directory's saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    return saved_model_pb2.SavedModel.FromString(read_bytes(join(path, "saved_model.pb")))


def method_names(path: str | os.PathLike) -> dict[str, str]:
    """Signature name -> method name (tensorflow/serving/predict, .../classify) from saved_model.pb."""
    return {k: v.method_name for k, v in saved_model_proto(path).meta_graphs[0].signature_def.items()}


def examples_of(request_input) -> list[bytes]:
    """A ClassificationRequest's `input` as serialized tf.Examples (context merged into each, as TF Serving does)."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in request_input.example_list.examples]
    if kind == "example_list_with_context":
        with_context = request_input.example_list_with_context
        merged = []
        for e in with_context.examples:
            example = tf.train.Example()
            example.CopyFrom(with_context.context)
            example.MergeFrom(e)
            merged.append(example.SerializeToString())
        return merged
    return []


@dataclasses.dataclass
class _Failure:
    message: str
    attempts: int
    retry_at: float  # time.monotonic() of the next try; inf when out of retries


class ServedModel:
    """One model name: its base path, version policy and labels, and the versions loaded now.

    Args:
        name: the name requests use.
        base_path: a directory of version subdirectories: local, or a URI of a TensorFlow filesystem.
        policy: which versions to serve.
        labels: label -> version (`/labels/L` in REST, `version_label` in gRPC).
        max_num_load_retries: tries after a version's first failed load (TF Serving's flag, default 5).
        load_retry_interval: seconds between tries (TF Serving's default: 60).
        warmup: replay a version's warm-up requests before it serves (--enable_model_warmup).
        xla: the server runs XLA-compiled signatures (--xla_cpu_compilation_enabled): replay the
            export's `lmstack_xla_warmup_requests` too, which compile every shape bucket.
        scheduler: `scheduler(loaded)` makes a loaded version's step scheduler, or None for an export
            without the step signatures (`serving.server.scheduler.for_version`); None: every
            generation request runs call by call.
        logging_config: the model's LoggingConfig (`serving.server.request_log`), or None: no request logs.
    """

    def __init__(self, name: str, base_path: str | os.PathLike, policy: VersionPolicy = VersionPolicy(),
                 labels: dict[str, int] | None = None, max_num_load_retries: int = 5,
                 load_retry_interval: float = 60.0, warmup: bool = True, xla: bool = False,
                 scheduler: Callable[[LoadedVersion], Any] | None = None, logging_config: Any = None):
        self.name = name
        self.base_path = str(base_path)  # a str, pathlib.Path or GPath
        check_scheme(self.base_path)
        self.policy = policy
        self.labels = dict(labels or {})
        self.max_num_load_retries = max_num_load_retries
        self.load_retry_interval = load_retry_interval
        self.warmup = warmup
        self.xla = xla
        self.scheduler = scheduler
        self.logging_config = logging_config
        self.versions: dict[int, LoadedVersion] = {}
        self.failures: dict[int, _Failure] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    @property
    def failed(self) -> dict[int, str]:
        """version -> why it did not load (for versions not loaded now)."""
        return {v: f.message for v, f in self.failures.items() if v not in self.versions}

    def on_disk(self) -> list[int]:
        """The versions under the base path with a saved_model.pb (none if the base path is not there).

        A SavedModel being copied onto an object store by `lmstack export` gets its saved_model.pb
        after every other file, so a version is complete once it has one.
        """
        try:
            if not tf.io.gfile.isdir(self.base_path):
                return []
            names = [n.rstrip("/") for n in tf.io.gfile.listdir(self.base_path)]
            return sorted(int(n) for n in names if _VERSION_DIR.fullmatch(n)  # one request each on a store
                          and tf.io.gfile.exists(join(self.base_path, n, "saved_model.pb")))
        except tf.errors.OpError as e:  # e.g. permission denied, an object store out of reach
            reason = e.message.splitlines()[0] if e.message else type(e).__name__
            raise ServingError("UNAVAILABLE",
                               f"cannot list the versions of {self.name!r} under {self.base_path}: {reason}") from None

    def refresh(self) -> None:
        """Loads the versions the policy wants and unloads the others (see the module docstring)."""
        with self._refresh_lock:
            now = time.monotonic()
            on_disk = self.on_disk()
            # A version that failed is left out of the policy's choice until its next try, so the
            # others serve meanwhile (and for good once its tries are spent).
            candidates = [v for v in on_disk if v not in self.failures or self.failures[v].retry_at <= now]
            wanted = self.policy.choose(candidates)
            for version in wanted:
                if version not in self.versions:
                    self._load(version, self.failures.get(version))
            if any(v in self.failures for v in wanted):  # a try failed: choose again without it
                wanted = self.policy.choose([v for v in on_disk if v not in self.failures])
                for version in wanted:
                    if version not in self.versions:
                        self._load(version, None)
            keep = set(wanted) if any(v in self.versions for v in wanted) else set(self.versions)
            for version in sorted(set(self.versions) - keep):
                with self._lock:
                    gone = self.versions[version]
                    self.versions = {v: lv for v, lv in self.versions.items() if v != version}
                if gone.scheduler is not None:
                    gone.scheduler.retire()
                log.info("%s version %d unloaded", self.name, version)

    def _load(self, version: int, failure: _Failure | None) -> None:
        path = join(self.base_path, str(version))
        began = time.perf_counter()
        try:
            model = tf.saved_model.load(path)
            info = export_info(path)
            loaded = LoadedVersion(version, path, model, dict(model.signatures), method_names(path),
                                   model_context(path, info), info=info)
            if "xla_buckets" in info:
                loaded.batch_buckets = tuple(sorted(info["xla_buckets"]["batch"]))
            warmed = 0
            if self.warmup:
                extra = join(path, c.ASSETS_EXTRA)
                warmed = replay_warmup(loaded, join(extra, c.WARMUP_FILE), self.xla)
                if self.xla:  # one bucket per core: each XLA compilation runs on one thread
                    # A step scheduler runs prefill_xla and decode_xla in place of the compiled
                    # generation loops; without one, those are what runs.
                    scheduled = self.scheduler is not None and all(n in loaded.signatures for n in c.STEP_SIGNATURES)
                    unused = ((c.SERVING_DEFAULT_XLA, c.GENERATE_XLA, c.GENERATE_CHUNK_XLA) if scheduled
                              else (c.PREFILL_XLA,))
                    warmed += replay_warmup(loaded, join(extra, c.XLA_WARMUP_FILE), self.xla,
                                            threads=os.cpu_count() or 1, skip=unused)
            if self.scheduler is not None:
                loaded.scheduler = self.scheduler(loaded, model_name=self.name)
        except Exception as e:  # a broken export must not take the server down
            attempts = (failure.attempts if failure else 0) + 1
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            more = attempts <= self.max_num_load_retries
            retry_at = time.monotonic() + self.load_retry_interval if more else float("inf")
            self.failures[version] = _Failure(message, attempts, retry_at)
            log.error("%s version %d failed to load (try %d of %d): %s", self.name, version, attempts,
                      self.max_num_load_retries + 1, message)
            return
        self.failures.pop(version, None)
        with self._lock:
            self.versions = {**self.versions, version: loaded}
        log.info("%s version %d loaded from %s in %.1f s (%d warm-up requests)", self.name, version, path,
                 time.perf_counter() - began, warmed)

    def load_latest(self) -> LoadedVersion:
        """Refreshes and returns the newest loaded version (an error if none loads)."""
        self.refresh()
        with self._lock:
            if not self.versions:
                why = "; ".join(f"version {v}: {m}" for v, m in sorted(self.failed.items()))
                raise ServingError("NOT_FOUND", f"no loadable version of {self.name!r} under {self.base_path} "
                                                f"({why or 'expected BASE/1/saved_model.pb; run `lmstack export`'})")
            return self.versions[max(self.versions)]

    def get(self, version: int | None = None, label: str | None = None) -> LoadedVersion:
        with self._lock:
            versions = self.versions
        if label:
            if label not in self.labels:
                raise ServingError("INVALID_ARGUMENT", f"Unrecognized servable version label: {label}")
            version = self.labels[label]
        if not versions:
            raise ServingError("UNAVAILABLE", f"model {self.name!r} has no loaded version yet")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise ServingError("NOT_FOUND", f"Servable not found for request: Specific({self.name}, {version})")
        return versions[version]

    def status(self, version: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            loaded = set(self.versions)
        rows = [{"version": v, "state": "AVAILABLE", "error_code": "OK", "error_message": ""} for v in loaded]
        rows += [{"version": v, "state": "END", "error_code": "UNKNOWN", "error_message": m}
                 for v, m in self.failed.items()]
        if version is not None:
            rows = [r for r in rows if r["version"] == version]
            if not rows:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {self.name}")
        return sorted(rows, key=lambda r: r["version"], reverse=True)
