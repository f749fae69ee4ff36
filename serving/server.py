"""A model server that speaks TensorFlow Serving's REST and gRPC APIs.

`tensorflow_model_server` cannot be installed on every machine (it is on
neither PyPI nor Debian), so lmstack ships this one: the same URLs, the same
protos (tensorflow-serving-api's generated gRPC services), the same JSON and
the same status codes, so a client written for one works with the other.

    gRPC  PredictionService.Predict / Classify / GetModelMetadata, ModelService.GetModelStatus
    REST  POST /v1/models/NAME[/versions/N]:predict   ("inputs" columnar or "instances" rows)
          POST /v1/models/NAME[/versions/N]:classify  ("examples" + optional "context": tf.Example features)
          GET  /v1/models/NAME[/versions/N]           (version status)
          GET  /v1/models/NAME[/versions/N]/metadata  (signatures)

Models come from `--model_base_path` or a ModelServerConfig file; versions
load (with their warm-up requests) and unload under the version policy while
the server runs (`ServedModel.refresh`); requests may be batched
(`serving.batching`) and are counted in Prometheus metrics
(`serving.metrics`). SavedModels are loaded with TensorFlow's own loader; the
server imports only TensorFlow, tensorflow-text (whose ops the tokenizers use)
and the `serving` modules, never `models/` or `pipelines/`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import pathlib
import re
import threading
import time
from concurrent import futures
from http import server as http_server
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops the exported graphs use)

from serving import tensors, textproto
from serving.batching import Batcher, BatchingParameters
from serving.contract import CLASSIFY_METHOD, HTTP_STATUS, ServingError
from serving.metrics import Registry

DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"
MAX_REQUEST_BYTES = 64 << 20  # REST bodies; gRPC messages have the same limit (grpc.max_receive_message_length)

log = logging.getLogger("lmstack.serve")


@dataclasses.dataclass
class LoadedVersion:
    version: int
    path: pathlib.Path
    model: Any  # what tf.saved_model.load returns
    signatures: dict[str, Any]  # name -> concrete function
    methods: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> SignatureDef method name

    def __post_init__(self):
        # structured_input_signature rebuilds its answer on every access: read it once.
        self._specs = {name: fn.structured_input_signature[1] for name, fn in self.signatures.items()}

    def input_specs(self, signature: str) -> dict[str, tf.TensorSpec]:
        return self._specs[signature]

    def numpy_function(self, signature: str):
        """The signature as numpy arrays in, numpy arrays out (what the batcher merges and splits)."""
        fn = self.signatures[signature]
        specs = self.input_specs(signature)

        def run(**arrays):
            outputs = fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in arrays.items()})
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


def replay_warmup(loaded: LoadedVersion, warmup_file: pathlib.Path) -> int:
    """Runs the PredictionLog requests of assets.extra/tf_serving_warmup_requests, as TensorFlow Serving does."""
    if not warmup_file.is_file():
        return 0
    from tensorflow_serving.apis import prediction_log_pb2

    count = 0
    for record in tf.data.TFRecordDataset(str(warmup_file)).as_numpy_iterator():
        log_record = prediction_log_pb2.PredictionLog.FromString(record)
        kind = log_record.WhichOneof("log_type")
        if kind == "predict_log":
            request = log_record.predict_log.request
            fn = loaded.signatures[request.model_spec.signature_name or "serving_default"]
            fn(**{k: tf.constant(tensors.to_ndarray(v)) for k, v in request.inputs.items()})
        elif kind == "classify_log":
            request = log_record.classify_log.request
            signature = request.model_spec.signature_name or "serving_default"
            (key,) = loaded.input_specs(signature)
            fn = loaded.signatures[signature]
            fn(**{key: tf.constant(examples_of(request.input))})
        else:
            continue
        count += 1
    return count


def method_names(path: pathlib.Path) -> dict[str, str]:
    """Signature name -> method name (tensorflow/serving/predict, .../classify) from saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    return {k: v.method_name for k, v in saved.meta_graphs[0].signature_def.items()}


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


class ServedModel:
    """One model name: its base path, version policy and labels, and the versions loaded now.

    `refresh()` makes the loaded versions match the policy and what is on
    disk: new versions load (and replay their warm-up requests) before old
    ones unload, so there is always a version to answer; a version that
    fails to load is reported in the status and left out of the policy's
    choice (versions are immutable once exported), so the others keep serving.
    Requests hold the `LoadedVersion` they started with, so a swap never
    cuts one short.

    Args:
        name: the name requests use.
        base_path: a directory of integer version subdirectories.
        policy: which versions to serve.
        labels: label -> version (`/labels/L` in REST, `version_label` in gRPC).
    """

    def __init__(self, name: str, base_path: str | pathlib.Path, policy: VersionPolicy = VersionPolicy(),
                 labels: dict[str, int] | None = None):
        self.name = name
        self.base_path = pathlib.Path(base_path)
        self.policy = policy
        self.labels = dict(labels or {})
        self.versions: dict[int, LoadedVersion] = {}
        self.failed: dict[int, str] = {}  # version -> why it did not load
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    def on_disk(self) -> list[int]:
        if not self.base_path.is_dir():
            return []
        return sorted(int(p.name) for p in self.base_path.iterdir()
                      if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file())

    def refresh(self) -> None:
        """Loads the versions the policy wants and unloads the others (see the class docstring)."""
        with self._refresh_lock:
            wanted = self.policy.choose([v for v in self.on_disk() if v not in self.failed])
            for version in wanted:
                if version in self.versions:
                    continue
                path = self.base_path / str(version)
                try:
                    model = tf.saved_model.load(str(path))
                    loaded = LoadedVersion(version, path, model, dict(model.signatures), method_names(path))
                    warmed = replay_warmup(loaded, path / "assets.extra" / "tf_serving_warmup_requests")
                except Exception as e:  # a broken export must not take the server down
                    self.failed[version] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    log.error("%s version %d failed to load: %s", self.name, version, self.failed[version])
                    continue
                with self._lock:
                    self.versions = {**self.versions, version: loaded}
                log.info("%s version %d loaded from %s (%d warm-up requests)", self.name, version, path, warmed)
            keep = set(wanted) if any(v in self.versions for v in wanted) else set(self.versions)
            for version in sorted(set(self.versions) - keep):
                with self._lock:
                    self.versions = {v: lv for v, lv in self.versions.items() if v != version}
                log.info("%s version %d unloaded", self.name, version)

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


def models_from_config_file(path: str | pathlib.Path) -> dict[str, ServedModel]:
    """ServedModels from a ModelServerConfig text proto (TensorFlow Serving's --model_config_file)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        config = text_format.Parse(pathlib.Path(path).read_text(), model_server_config_pb2.ModelServerConfig())
    except (OSError, text_format.ParseError) as e:
        raise ServingError("INVALID_ARGUMENT", f"cannot read the model config file {path}: {e}") from None
    return models_from_config(config, str(path))


def models_from_config(config, source: str = "the model config") -> dict[str, ServedModel]:
    """ServedModels from a ModelServerConfig proto (a file's or a HandleReloadConfigRequest's)."""
    served = {}
    for m in config.model_config_list.config:
        if not m.name or not m.base_path:
            raise ServingError("INVALID_ARGUMENT", f"{source}: every model config needs a name and a base_path")
        if m.model_platform not in ("", "tensorflow"):
            raise ServingError("INVALID_ARGUMENT", f"{source}: model {m.name!r} has platform {m.model_platform!r}; "
                                                   "only 'tensorflow' SavedModels are served")
        which = m.model_version_policy.WhichOneof("policy_choice")
        if which == "all":
            policy = VersionPolicy("all")
        elif which == "specific":
            policy = VersionPolicy("specific", versions=tuple(m.model_version_policy.specific.versions))
        else:
            policy = VersionPolicy("latest", num_versions=m.model_version_policy.latest.num_versions or 1)
        served[m.name] = ServedModel(m.name, m.base_path, policy, dict(m.version_labels))
    if not served:
        raise ServingError("INVALID_ARGUMENT", f"{source} configures no model (model_config_list is empty)")
    return served


def read_monitoring_config(path: str | pathlib.Path) -> str | None:
    """The Prometheus path of a MonitoringConfig text file, or None if it is not enabled."""
    schema = {"prometheus_config": {"enable": bool, "path": str}}
    try:
        config = textproto.parse(pathlib.Path(path).read_text(), schema).get("prometheus_config", {})
    except (OSError, ValueError) as e:
        raise ServingError("INVALID_ARGUMENT", f"monitoring config file {path}: {e}") from None
    if not config.get("enable", False):
        return None
    return config.get("path") or DEFAULT_METRICS_PATH


class ModelServer:
    """The models a server answers for and what a request does with them (protocol-free).

    Args:
        models: name -> ServedModel.
        batching: dynamic batching parameters; None runs every request on its own.
        metrics: where request counts, latencies and batch sizes go.
        metrics_path: the REST path that serves them (None: not served).
    """

    def __init__(self, models: dict[str, ServedModel], batching: BatchingParameters | None = None,
                 metrics: Registry | None = None, metrics_path: str | None = None):
        self.models = models
        self.metrics = metrics or Registry()
        self.metrics_path = metrics_path
        self.batcher = Batcher(batching, self._observe_batch) if batching else None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._in_flight = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def track(self):
        """A context around one request, so `drain` can wait for the requests in flight."""
        with self._idle:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Waits until no request is in flight (True) or `timeout` passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def refresh(self) -> None:
        for model in list(self.models.values()):
            model.refresh()
            self.metrics.loaded_versions.set(model.name, value=len(model.versions))

    def reload(self, models: dict[str, ServedModel]) -> None:
        """Serves `models` from now on (HandleReloadConfigRequest): new ones load, dropped ones go.

        A model whose name and base path stay keeps its loaded versions and takes the new
        policy and labels. Raises ServingError if a model of the new config loads no version
        (the old config then stays in force).
        """
        merged = {}
        for name, model in models.items():
            old = self.models.get(name)
            if old is not None and old.base_path == model.base_path:
                old.policy, old.labels = model.policy, model.labels
                model = old
            merged[name] = model
        for model in merged.values():
            model.load_latest()
        self.models = merged
        self.refresh()

    def _observe_batch(self, model_name: str, rows: int, waited_us: float) -> None:
        self.metrics.batch_size.observe(model_name, value=rows)
        self.metrics.queuing_latency.observe(model_name, value=waited_us)
        self.metrics.queued_rows.set(model_name, value=self.batcher.queued_rows())

    def start_polling(self, seconds: float) -> None:
        """Checks the base paths for new or removed versions every `seconds` (0: never)."""
        if seconds <= 0:
            return

        def poll():
            while not self._stop.wait(seconds):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 (keep polling; the error is logged)
                    log.exception("refreshing the model versions failed")

        self._poller = threading.Thread(target=poll, name="version-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
        return self.models[name]

    @contextlib.contextmanager
    def _counted(self, name: str, signature: str, api: str, entrypoint: str):
        """Counts one request by its status (OK or the ServingError's code) and times it, as TF Serving does."""
        began, status = time.perf_counter(), "OK"
        try:
            yield
        except ServingError as e:
            status = e.code
            raise
        finally:
            self.metrics.request_count.inc(name, signature, status)
            self.metrics.request_latency.observe(name, api, entrypoint, value=(time.perf_counter() - began) * 1e6)

    def predict(self, name: str, version: int | None, signature: str, inputs: dict[str, np.ndarray],
                label: str | None = None, entrypoint: str = "GRPC") -> tuple[LoadedVersion, dict[str, np.ndarray]]:
        """Runs one request (batched with others if batching is on); counts and times it."""
        signature = signature or "serving_default"
        with self._counted(name, signature, "predict", entrypoint):
            return self._predict(name, version, signature, inputs, label)

    def _predict(self, name, version, signature, inputs, label):
        return self._run(name, self.model(name).get(version, label), signature, inputs)

    def _run(self, name: str, loaded: LoadedVersion, signature: str, inputs: dict[str, np.ndarray]):
        """One signature call on the version a request holds (batched if batching is on)."""
        if signature not in loaded.signatures:
            raise ServingError("FAILED_PRECONDITION",
                               f"Serving signature name: \"{signature}\" not found in signature def "
                               f"(have: {', '.join(sorted(loaded.signatures))})")
        fn = loaded.signatures[signature]
        specs = loaded.input_specs(signature)
        missing = sorted(set(specs) - set(inputs))
        extra = sorted(set(inputs) - set(specs))
        if missing or extra:
            raise ServingError("INVALID_ARGUMENT", f"signature {signature!r} expects inputs "
                                                   f"{sorted(specs)}; missing {missing}, unexpected {extra}")
        arrays = {key: _as_input(key, inputs[key], spec) for key, spec in specs.items()}
        run = loaded.numpy_function(signature)
        try:
            if self.batcher is not None:
                outputs = self.batcher.run((name, loaded.version, signature), name, run, arrays)
            else:
                outputs = run(**arrays)
        except tf.errors.OpError as e:
            code = {tf.errors.InvalidArgumentError: "INVALID_ARGUMENT",
                    tf.errors.ResourceExhaustedError: "RESOURCE_EXHAUSTED"}.get(type(e), "INTERNAL")
            raise ServingError(code, _op_error_message(e.message)) from None
        return loaded, outputs

    def classify(self, name: str, version: int | None, signature: str, examples: list[bytes],
                 label: str | None = None, entrypoint: str = "GRPC") -> tuple[LoadedVersion, np.ndarray, np.ndarray]:
        """Runs serialized tf.Examples through a classification signature (TensorFlow Serving's Classify).

        Returns:
            `(version, classes [B, C] bytes, scores [B, C] float)`.
        """
        signature = signature or "serving_default"
        with self._counted(name, signature, "classify", entrypoint):
            if not examples:
                raise ServingError("INVALID_ARGUMENT", "Input is empty.")
            loaded = self.model(name).get(version, label)
            if signature not in loaded.signatures:
                raise ServingError("INVALID_ARGUMENT", f"No signature was found with the name: {signature}")
            method = loaded.methods.get(signature, "")
            if method != CLASSIFY_METHOD:
                raise ServingError("INVALID_ARGUMENT", f"Expected classification signature method_name to be "
                                                       f"{CLASSIFY_METHOD}. Was: {method}")
            (key,) = loaded.input_specs(signature)
            loaded, outputs = self._run(name, loaded, signature, {key: np.array(examples, dtype=object)})
            scores = outputs.get("scores")
            classes = outputs.get("classes")
            if scores is None and classes is None:
                raise ServingError("INVALID_ARGUMENT", "Expected classification signature outputs "
                                                       "classes and/or scores")
            return loaded, classes, scores

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[dict[str, Any]]:
        model = self.model(name)
        if label:
            version = model.get(None, label).version
        return model.status(version)

    def signature_defs(self, name: str, version: int | None = None, label: str | None = None):
        """(version, the SavedModel's SignatureDefMap proto) as TensorFlow Serving reports metadata."""
        from tensorflow.core.protobuf import saved_model_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        loaded = self.model(name).get(version, label)
        saved = saved_model_pb2.SavedModel.FromString((loaded.path / "saved_model.pb").read_bytes())
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in saved.meta_graphs[0].signature_def.items():
            if not key.startswith("__"):  # TensorFlow's internal signatures (e.g. __saved_model_init_op)
                signatures.signature_def[key].CopyFrom(value)
        return loaded.version, signatures


def _as_input(key: str, value, spec: tf.TensorSpec) -> np.ndarray:
    """A request's value for one input as a numpy array of the signature's dtype and a compatible shape."""
    array = np.asarray(value)
    if spec.dtype == tf.string:
        if array.dtype.kind not in ("O", "S", "U") or (array.dtype.kind == "O" and array.size and not all(
                isinstance(x, (bytes, str)) for x in array.flat)):
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} must be strings")
        array = array.astype(object)
    else:
        try:
            if array.dtype.kind in ("O", "S", "U"):
                raise ValueError(f"got {array.dtype.kind!r} values")
            # JSON numbers arrive as int64/float64: narrowing is fine, a float for an int input is not.
            strict = array.dtype.kind == "f" and array.size and spec.dtype.is_integer
            array = array.astype(spec.dtype.as_numpy_dtype, casting="same_kind" if strict else "unsafe")
        except (TypeError, ValueError) as e:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} is not {spec.dtype.name}: {e}") from None
    if not spec.shape.is_compatible_with(array.shape):
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} has shape {list(array.shape)}, expected {spec.shape}")
    return array


def _from_proto(key: str, proto) -> np.ndarray:
    try:
        return tensors.to_ndarray(proto)
    except (ValueError, TypeError) as e:
        raise ServingError("INVALID_ARGUMENT", f"input {key!r}: {e}") from None


def _op_error_message(message: str) -> str:
    """The line of a TensorFlow error that says what went wrong (not the graph location)."""
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("assertion failed: ["):  # tf.debugging asserts: the message is the first [...]
            return line[len("assertion failed: ["):].split("]", 1)[0].strip()
        if line and not line.startswith(("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")):
            return line.split(" [[", 1)[0]
    return message.strip()


# ---------------------------------------------------------------------------
# gRPC


def grpc_servicers(core: ModelServer):
    """PredictionService and ModelService servicers over `core` (tensorflow-serving-api's base classes)."""
    import grpc
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)

    def fail(context, error: ServingError):
        context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN), error.message)

    def version_of(spec) -> dict[str, Any]:
        which = spec.WhichOneof("version_choice")
        return {"version": spec.version.value if which == "version" else None,
                "label": spec.version_label if which == "version_label" else None}

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            with core.track():
                return self._predict(request, context)

        def _predict(self, request, context):
            try:
                inputs = {k: _from_proto(k, v) for k, v in request.inputs.items()}
                loaded, outputs = core.predict(request.model_spec.name, signature=request.model_spec.signature_name,
                                               inputs=inputs, **version_of(request.model_spec))
            except ServingError as e:
                return fail(context, e)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = loaded.version
            response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
            names = set(request.output_filter) or set(outputs)
            for key in names:
                response.outputs[key].CopyFrom(tensors.to_proto(outputs[key]))
            return response

        def Classify(self, request, context):
            with core.track():
                try:
                    loaded, classes, scores = core.classify(
                        request.model_spec.name, signature=request.model_spec.signature_name,
                        examples=examples_of(request.input), **version_of(request.model_spec))
                except ServingError as e:
                    return fail(context, e)
                response = classification_pb2.ClassificationResponse()
                response.model_spec.name = request.model_spec.name
                response.model_spec.version.value = loaded.version
                response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
                for row in range(len(scores if scores is not None else classes)):
                    classifications = response.result.classifications.add()
                    for j in range(len(scores[row] if scores is not None else classes[row])):
                        cls = classifications.classes.add()
                        if classes is not None:
                            cls.label = classes[row][j].decode("utf-8", errors="replace")
                        if scores is not None:
                            cls.score = float(scores[row][j])
                return response

        def GetModelMetadata(self, request, context):
            if list(request.metadata_field) != ["signature_def"]:
                return fail(context, ServingError("INVALID_ARGUMENT", "Metadata field signature_def is the only one "
                                                                      "supported; set metadata_field"))
            try:
                version, signatures = core.signature_defs(request.model_spec.name, **version_of(request.model_spec))
            except ServingError as e:
                return fail(context, e)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = version
            response.metadata["signature_def"].Pack(signatures)
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            try:
                statuses = core.status(request.model_spec.name, **version_of(request.model_spec))
            except ServingError as e:
                return fail(context, e)
            response = get_model_status_pb2.GetModelStatusResponse()
            for s in statuses:
                v = response.model_version_status.add()
                v.version = s["version"]
                v.state = get_model_status_pb2.ModelVersionStatus.State.Value(s["state"])
                v.status.error_code = getattr(grpc.StatusCode, s["error_code"]).value[0]
                v.status.error_message = s["error_message"]
            return response

        def HandleReloadConfigRequest(self, request, context):
            from tensorflow_serving.apis import model_management_pb2

            try:
                core.reload(models_from_config(request.config, "the reload request"))
            except ServingError as e:
                return fail(context, e)
            return model_management_pb2.ReloadConfigResponse()

    return PredictionService(), ModelService()


def start_grpc(core: ModelServer, port: int, workers: int = 64):
    """Starts the gRPC server on `port` (0: a free one) with `workers` threads; returns (server, port).

    Each request holds a thread while it waits in a batching queue, so batches
    can grow only as large as there are threads.
    """
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=[
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.max_send_message_length", 256 << 20)])
    predictions, models = grpc_servicers(core)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(predictions, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(models, server)
    bound = server.add_insecure_port(f"[::]:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {port}")
    server.start()
    return server, bound


# ---------------------------------------------------------------------------
# REST

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<rest>/metadata|:predict|:classify)?$")


def _json_value(array: np.ndarray):
    if array.dtype.kind in ("O", "S"):
        return np.vectorize(lambda b: b.decode("utf-8", errors="replace") if isinstance(b, bytes) else b,
                            otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def _from_json(value):
    """JSON values -> a numpy array; {"b64": ...} objects become bytes (TensorFlow Serving's convention)."""
    def convert(v):
        if isinstance(v, dict) and set(v) == {"b64"}:
            return base64.b64decode(v["b64"])
        if isinstance(v, str):
            return v.encode("utf-8")
        if isinstance(v, list):
            return [convert(x) for x in v]
        return v
    converted = convert(value)
    return np.array(converted, dtype=object) if _has_bytes(converted) else np.array(converted)


def _has_bytes(value) -> bool:
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, bytes)


def rest_predict(core: ModelServer, name: str, version: int | None, body: dict, label: str | None = None,
                 entrypoint: str = "REST") -> dict:
    """A :predict body -> the response body, in the row ("instances") or columnar ("inputs") format."""
    signature = body.get("signature_name", "")
    if ("instances" in body) == ("inputs" in body):
        raise ServingError("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key" if "instances" not in body
                           else "Only one of 'inputs' or 'instances' may be given")
    if "inputs" in body:
        inputs = body["inputs"]
        if not isinstance(inputs, dict):
            inputs = {_only_input(core, name, version, signature, label): inputs}
        _, outputs = core.predict(name, version, signature, {k: _from_json(v) for k, v in inputs.items()}, label,
                                  entrypoint)
        values = {k: _json_value(v) for k, v in outputs.items()}
        return {"outputs": values if len(values) > 1 else next(iter(values.values()))}
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty list")
    if isinstance(rows[0], dict):
        keys = set(rows[0])
        if any(set(r) != keys for r in rows if isinstance(r, dict)) or not all(isinstance(r, dict) for r in rows):
            raise ServingError("INVALID_ARGUMENT", "every instance must name the same inputs")
        columns = {k: [r[k] for r in rows] for k in keys}
    else:
        columns = {_only_input(core, name, version, signature, label): rows}
    _, outputs = core.predict(name, version, signature, {k: _from_json(v) for k, v in columns.items()}, label,
                              entrypoint)
    values = {k: _json_value(v) for k, v in outputs.items()}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    return {"predictions": [{k: v[i] for k, v in values.items()} for i in range(len(rows))]}


def _feature(name: str, value) -> tf.train.Feature:
    """A JSON feature value (a value or a list; {"b64": ...} for bytes) -> a tf.train.Feature."""
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, str) or (isinstance(v, dict) and set(v) == {"b64"}) for v in values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[
            base64.b64decode(v["b64"]) if isinstance(v, dict) else v.encode("utf-8") for v in values]))
    if all(isinstance(v, (int, bool)) for v in values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
    raise ServingError("INVALID_ARGUMENT", f"feature {name!r}: expected strings, numbers or lists of one type")


def rest_classify(core: ModelServer, name: str, version: int | None, body: dict, label: str | None = None,
                  entrypoint: str = "REST") -> dict:
    """A :classify body ("examples", optional "context") -> {"result": [[[label, score], ...], ...]}."""
    rows, context = body.get("examples"), body.get("context", {})
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ServingError("INVALID_ARGUMENT", "'examples' must be a non-empty list of JSON objects")
    if not isinstance(context, dict):
        raise ServingError("INVALID_ARGUMENT", "'context' must be a JSON object")
    examples = []
    for row in rows:
        shared = sorted(set(row) & set(context))
        if shared:
            raise ServingError("INVALID_ARGUMENT", f"features {shared} appear in both the context and an example")
        features = {k: _feature(k, v) for k, v in {**context, **row}.items()}
        examples.append(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    _, classes, scores = core.classify(name, version, body.get("signature_name", ""), examples, label, entrypoint)
    count = len(scores if scores is not None else classes)
    width = len(scores[0] if scores is not None else classes[0]) if count else 0
    result = []
    for i in range(count):
        result.append([[classes[i][j].decode("utf-8", errors="replace") if classes is not None else str(j),
                        float(scores[i][j]) if scores is not None else 0.0] for j in range(width)])
    return {"result": result}


def _only_input(core: ModelServer, name: str, version: int | None, signature: str, label: str | None) -> str:
    loaded = core.model(name).get(version, label)
    signature = signature or "serving_default"
    specs = list(loaded.input_specs(signature)) if signature in loaded.signatures else []
    if len(specs) != 1:
        raise ServingError("INVALID_ARGUMENT", f"the signature takes inputs {specs}: name them in a JSON object")
    return specs[0]


def make_rest_handler(core: ModelServer):
    from google.protobuf import json_format

    class Handler(http_server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive connections
        server_version = "lmstack-serving"
        disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart (delayed ACK)

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            log.debug("%s %s", self.address_string(), format % args)

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            with core.track():
                self._answer(method)

        def _answer(self, method: str) -> None:
            if method == "GET" and core.metrics_path and self.path.split("?")[0] == core.metrics_path:
                data = core.metrics.render().encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            try:
                match = _PATH.match(self.path.split("?")[0])
                if not match:
                    raise ServingError("NOT_FOUND", f"Malformed request: {method} {self.path}")
                name, rest, label = match["name"], match["rest"], match["label"]
                version = int(match["version"]) if match["version"] else None
                if method == "POST" and rest in (":predict", ":classify"):
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_REQUEST_BYTES:
                        self.close_connection = True  # the unread body cannot be skipped safely
                        raise ServingError("INVALID_ARGUMENT", f"request body of {length} bytes is larger than "
                                                               f"the {MAX_REQUEST_BYTES} bytes accepted")
                    try:
                        body = json.loads(self.rfile.read(length) or b"{}")
                    except ValueError as e:
                        raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {e}") from None
                    if not isinstance(body, dict):
                        raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
                    answer = rest_predict if rest == ":predict" else rest_classify
                    self._reply(200, answer(core, name, version, body, label, entrypoint="REST"))
                elif method == "GET" and rest is None:
                    statuses = core.status(name, version, label)
                    self._reply(200, {"model_version_status": [
                        {"version": str(s["version"]), "state": s["state"],
                         "status": {"error_code": s["error_code"], "error_message": s["error_message"]}}
                        for s in statuses]})
                elif method == "GET" and rest == "/metadata":
                    served, signatures = core.signature_defs(name, version, label)
                    self._reply(200, {
                        "model_spec": {"name": name, "signature_name": "", "version": str(served)},
                        "metadata": {"signature_def": json_format.MessageToDict(
                            signatures, preserving_proto_field_name=True)}})
                else:
                    raise ServingError("NOT_FOUND", f"Malformed request: {method} {self.path}")
            except ServingError as e:
                self._reply(HTTP_STATUS.get(e.code, 500), {"error": e.message})

        def do_GET(self):  # noqa: N802 (BaseHTTPRequestHandler's names)
            self._route("GET")

        def do_POST(self):  # noqa: N802
            self._route("POST")

    return Handler


class _RestServer(http_server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog; socketserver's 5 drops connections from many clients at once


def start_rest(core: ModelServer, port: int):
    """Starts the REST server on `port` (0: a free one) in a thread; returns (server, port)."""
    httpd = _RestServer(("", port), make_rest_handler(core))
    threading.Thread(target=httpd.serve_forever, name="rest", daemon=True).start()
    return httpd, httpd.server_address[1]
