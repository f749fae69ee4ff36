"""The protocol-free core of the server: what a request may ask, and what running it does.

`ModelServer` answers Predict, Classify, status and metadata for the models
it holds; `grpc_api` and `rest_api` only translate their protocol to these
calls. Every request is checked in full before it runs or joins a batch
(signature, input names, dtypes and integer ranges, shapes, one batch size
across its inputs, and the `Limits`), so a bad request fails alone with
INVALID_ARGUMENT and never takes its batch neighbours with it.

A request runs under a `deadlines.Call` (its deadline and whether its
client is still there); the `deadlines.Watchdog` stops the work of
abandoned requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from serving import contract as c
from serving.server.batching import Batcher, BatchingParameters
from serving.contract import ServingError
from serving.server.metrics import Registry
from serving.server.deadlines import Call, Watchdog
from serving.server.request_log import LogOptions, RequestLogs
from serving.server.versions import XLA_DISABLED, LoadedVersion, ServedModel, canonical, log, saved_model_proto

UNKNOWN_MODEL = "(unknown)"  # the metrics label of requests for a model the server does not hold
# A stream's optional inputs and their defaults (greedy), and its largest chunk in tokens (chunks
# double from 1 up to it).
_STREAM_DEFAULTS = {c.MAX_NEW_TOKENS: 50, c.TEMPERATURE: 0.0, c.TOP_K: 0, c.TOP_P: 1.0, c.SEED: 0}
_MAX_CHUNK = 16
_PENALTIES = (c.PRESENCE_PENALTY, c.FREQUENCY_PENALTY)  # a stream's optional penalties (a step scheduler's)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; past a limit it fails with INVALID_ARGUMENT naming it.

    Attributes:
        max_request_bytes: a REST body or a gRPC message (TensorFlow Serving's gRPC default is 2 GB;
            its REST server reads bodies into memory whole).
        max_request_rows: rows (first dimension) of a request's inputs.
        max_tensor_elements: elements of one input tensor (checked on the declared shape, before
            anything is allocated for it).
        max_text_bytes: bytes of all the string inputs of a request together (prompts, texts to score,
            serialized examples): a text's cost in tokens and memory grows with its length.
        max_new_tokens: the largest `max_new_tokens` a generation request may ask for.
    """
    max_request_bytes: int = 64 << 20
    max_request_rows: int = 256
    max_tensor_elements: int = 1 << 20
    max_text_bytes: int = 1 << 16
    max_new_tokens: int = 2048

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be at least 1, got {getattr(self, field.name)}")


class ModelServer:
    """The models a server answers for and what a request does with them (protocol-free).

    Args:
        models: name -> ServedModel.
        batching: dynamic batching parameters; None runs every request on its own.
        metrics: where request counts, latencies and batch sizes go.
        metrics_path: the REST path that serves them (None: not served).
        limits: what one request may ask for.
        model_roots: directories a HandleReloadConfigRequest may load models from (besides the
            base paths the server started with); None allows any.
        method_name_check: Classify only signatures of the classify method name (TF Serving's
            --enable_signature_method_name_check; off by default there too).
        xla: run the XLA-compiled signatures (`*_xla`; TF Serving's --xla_cpu_compilation_enabled).
            Off, they fail as they do on TensorFlow Serving without it (there with INTERNAL
            "XLA compilation disabled"; here FAILED_PRECONDITION, naming the flag).
        request_log: how the models' `logging_config`s are written (`serving.server.request_log`).
    """

    def __init__(self, models: dict[str, ServedModel], batching: BatchingParameters | None = None,
                 metrics: Registry | None = None, metrics_path: str | None = None, limits: Limits = Limits(),
                 model_roots: Sequence[str] | None = (), method_name_check: bool = False, xla: bool = False,
                 request_log: LogOptions = LogOptions()):
        self.models = models
        self.metrics = metrics or Registry()
        self.request_logs = RequestLogs(request_log, self.metrics)
        self.request_logs.update({name: m.logging_config for name, m in models.items()})
        self.metrics_path = metrics_path
        self.limits = limits
        self.batcher = Batcher(batching, self._observe_batch) if batching else None
        self.watchdog = Watchdog()
        self.method_name_check = method_name_check
        self.xla = xla
        self.health = None  # the gRPC health servicer, when serving one
        self.model_options: dict[str, Any] = {}  # what a reload request's models are made with (ServedModel's)
        self.model_roots = None if model_roots is None else (
            [canonical(m.base_path) for m in models.values()] + [canonical(str(p)) for p in model_roots])
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._in_flight = 0
        self._idle = threading.Condition()

    # -- lifecycle ---------------------------------------------------------

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
        """Brings every model's loaded versions in line with its base path; a model whose base path
        cannot be read now keeps serving what it has (the error is logged)."""
        for model in list(self.models.values()):
            try:
                model.refresh()
            except ServingError as e:
                log.error("%s", e.message)
            self.metrics.loaded_versions.set(model.name, value=len(model.versions))

    def reload(self, models: dict[str, ServedModel], from_request: bool = True) -> None:
        """Serves `models` from now on: new ones load, dropped ones go.

        A model whose name and base path stay keeps its loaded versions and takes the new
        policy and labels. Raises ServingError if a model of the new config loads no version
        (the old config then stays in force), or if a HandleReloadConfigRequest (`from_request`;
        not the operator's own config file) names a base path outside `model_roots`.
        """
        if from_request and self.model_roots is not None:
            for model in models.values():
                path = canonical(model.base_path)
                if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in self.model_roots):
                    raise ServingError("PERMISSION_DENIED", f"model {model.name!r}: base_path {model.base_path} is "
                                                            "outside the directories this server may load from "
                                                            "(--model_config_roots)")
        merged = {}
        for name, model in models.items():
            old = self.models.get(name)
            if old is not None and old.base_path == model.base_path:
                old.policy, old.labels, old.logging_config = model.policy, model.labels, model.logging_config
                model = old
            merged[name] = model
        for model in merged.values():
            model.load_latest()
        self.request_logs.update({name: m.logging_config for name, m in merged.items()})
        self.models = merged
        self.refresh()

    def start_polling(self, seconds: float, config_file: str | None = None, config_seconds: float = 0,
                      read_config: Callable[[str], dict[str, ServedModel]] | None = None) -> None:
        """Checks the base paths for new or removed versions every `seconds` (0: never), and re-reads
        `config_file` every `config_seconds` (TF Serving's --model_config_file_poll_wait_seconds)."""
        if seconds <= 0 and not (config_file and config_seconds > 0):
            return

        def poll():
            next_config = time.monotonic() + config_seconds
            while not self._stop.wait(min(s for s in (seconds, config_seconds) if s > 0)):
                try:
                    if config_file and config_seconds > 0 and time.monotonic() >= next_config:
                        next_config = time.monotonic() + config_seconds
                        self.reload(read_config(config_file), from_request=False)
                    elif seconds > 0:
                        self.refresh()
                except ServingError as e:
                    log.error("the model config file %s was not applied: %s", config_file, e.message)
                except Exception:  # keep polling; the error is logged
                    log.exception("refreshing the model versions failed")

        self._poller = threading.Thread(target=poll, name="version-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()

    def _observe_batch(self, model_name: str, rows: int, waited_us: float) -> None:
        self.metrics.batch_size.observe(model_name, value=rows)
        self.metrics.queuing_latency.observe(model_name, value=waited_us)
        self.metrics.queued_rows.set(model_name, value=self.batcher.queued_rows())

    # -- requests ----------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name[:200]})")
        return self.models[name]

    @contextlib.contextmanager
    def counted(self, name: str, api: str, entrypoint: str):
        """Counts one request by its status and times the successful ones, as TensorFlow Serving does.

        `api` is TF Serving's label: 'Predict'/'Classify' over gRPC, 'predict'/'classify' over REST.
        Requests for a model the server does not hold are counted under one fixed name, so a
        client cannot grow the metrics page with names of its choice.
        """
        began, status = time.perf_counter(), "OK"
        label = name if name in self.models else UNKNOWN_MODEL
        try:
            yield
        except ServingError as e:
            status = e.code
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.metrics.request_count.inc(label, status)
            if status == "OK":
                self.metrics.request_latency.observe(label, api, entrypoint,
                                                     value=(time.perf_counter() - began) * 1e6)

    def predict(self, name: str, version: int | None, signature: str, inputs: dict[str, np.ndarray],
                label: str | None = None, call: Call | None = None) -> tuple[LoadedVersion, dict[str, np.ndarray]]:
        """Runs one request (batched with others if batching is on)."""
        loaded = self.model(name).get(version, label)
        signature = signature or c.SERVING_DEFAULT
        arrays = self.validate(loaded, signature, inputs)
        outputs = self._run(name, loaded, signature, arrays, call or Call(), checked=True)
        self.request_logs.predict(name, loaded.version, signature, arrays, outputs)
        return loaded, outputs

    def stream(self, name: str, version: int | None, inputs: dict[str, Any], label: str | None = None,
               call: Call | None = None) -> tuple[LoadedVersion, Iterator[dict[str, Any]]]:
        """Generates one prompt's continuation chunk by chunk (the streaming extension of REST and gRPC).

        `inputs`: `prompt` (one string), `max_new_tokens`, and optionally `temperature` (0: greedy),
        `top_k`, `top_p`, `seed`, as `generate` takes them, and `presence_penalty`,
        `frequency_penalty` (-2 to 2; with a step scheduler, as its `decode` takes them). Everything
        is checked before the first chunk runs (a bad request fails as Predict fails). The chunks call
        `generate_chunk_xla` (with XLA) or `generate_chunk` with the tokens so far, so the text is
        the text of one `generate` call; they grow 1, 2, 4, 8, 16, 16, ... tokens (the first token
        comes as soon as possible, then the per-call cost is spread). Each chunk is a request of
        its own to the batcher, so concurrent streams share batches. The stream stops between
        chunks, and a running chunk is cancelled, once `call` is abandoned. With a step scheduler
        (`serving.server.scheduler`), the tokens come from the stream's slot as they are made instead.

        Returns:
            The version, and an iterator of `{"text": new text, "token_ids": new tokens}`, then a
            last `{"completion": all the text, "finished": stopped at [EOS]}`.
        """
        call = call or Call()
        loaded = self.model(name).get(version, label)
        inputs, penalties = dict(inputs), {k: inputs[k] for k in _PENALTIES if k in inputs}
        for key, value in penalties.items():
            del inputs[key]
            value = np.asarray(value)
            if value.size != 1 or value.dtype.kind not in "iuf" or not -2.0 <= float(value.reshape(-1)[0]) <= 2.0:
                raise ServingError("INVALID_ARGUMENT", f"{key!r} is one number from -2 to 2")
            penalties[key] = value.astype(np.float32).reshape([1])
        if any(v.any() for v in penalties.values()) and loaded.scheduler is None:
            raise ServingError("FAILED_PRECONDITION", "presence and frequency penalties need generation scheduled "
                                                      "step by step (--continuous_batching, an export with the step "
                                                      "signatures)")
        signature = c.GENERATE_CHUNK_XLA if self.xla and c.GENERATE_CHUNK_XLA in loaded.signatures else c.GENERATE_CHUNK
        if signature not in loaded.signatures:
            raise ServingError("FAILED_PRECONDITION", f"model {name!r} version {loaded.version} has no "
                                                      f"{c.GENERATE_CHUNK} signature to stream with (exported "
                                                      "before lmstack could stream, or not a language model); "
                                                      "export it again")
        unknown = sorted(k[:100] for k in set(inputs) - set(_STREAM_DEFAULTS) - {c.PROMPT})
        if unknown or c.PROMPT not in inputs:
            raise ServingError("INVALID_ARGUMENT", f"a stream takes inputs {c.PROMPT!r}, "
                                                   f"{', '.join(map(repr, _STREAM_DEFAULTS))}; "
                                                   + (f"unexpected {unknown}" if unknown else f"missing {c.PROMPT!r}"))
        values = {}
        for key, default in {c.PROMPT: None, **_STREAM_DEFAULTS}.items():
            value = np.asarray(inputs.get(key, default))
            if value.size != 1:
                raise ServingError("INVALID_ARGUMENT", f"a stream takes one {key!r}, got shape {list(value.shape)}")
            values[key] = value.reshape([1])
        arrays = self.validate(loaded, signature, {**values, c.GENERATED: np.zeros([1, 0], np.int32),
                                                   c.NUM_GENERATED: np.zeros([1], np.int32),
                                                   c.CHUNK_TOKENS: np.ones([1], np.int32)})
        wanted = int(arrays[c.MAX_NEW_TOKENS][0])
        request = {c.PROMPT: arrays[c.PROMPT], **{k: arrays[k] for k in _STREAM_DEFAULTS}, **penalties}
        if loaded.scheduler is not None:  # tokens as the scheduler makes them: nothing is read twice
            return loaded, self._logged(name, loaded, request, loaded.scheduler.stream({**arrays, **penalties}, call))

        def chunks():
            generated: list[int] = []
            shown, size, text, finished = "", 1, "", False
            while len(generated) < wanted and not finished:
                call.check()
                step = {**arrays, c.CHUNK_TOKENS: np.array([size], np.int32),
                        c.GENERATED: np.array([generated], np.int32).reshape([1, len(generated)]),
                        c.NUM_GENERATED: np.array([len(generated)], np.int32)}
                out = self._run(name, loaded, signature, step, call)
                new = [int(t) for t in out[c.TOKEN_IDS][0]]
                generated += new
                finished = bool(out[c.FINISHED][0]) or not new
                text = out[c.COMPLETION][0].decode("utf-8", errors="replace")
                piece = ""
                if text.startswith(shown) and not text.endswith("\ufffd"):  # not half a character
                    piece, shown = text[len(shown):], text
                yield {"text": piece, "token_ids": new}
                size = min(2 * size, _MAX_CHUNK)
            if text != shown and text.startswith(shown):
                yield {"text": text[len(shown):], "token_ids": []}
            yield {"completion": text, "finished": finished}
        return loaded, self._logged(name, loaded, request, chunks())

    def _logged(self, name: str, loaded: LoadedVersion, request: dict[str, np.ndarray],
                chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A stream's chunks, logged (if its model logs requests) as a Predict request of `generate`
        once it ends: when its last chunk is read, or when its reader stops early (at a stop string)."""
        tokens: list[int] = []
        text, ended = [], False
        try:
            for chunk in chunks:
                tokens += chunk.get("token_ids", [])
                text.append(chunk.get("text", ""))
                if "completion" in chunk:
                    text = [chunk["completion"]]
                yield chunk
            ended = True
        except GeneratorExit:
            ended = True
            raise
        finally:
            if ended:
                self.request_logs.predict(name, loaded.version, c.GENERATE, request, {
                    c.COMPLETION: np.array(["".join(text).encode("utf-8")], object),
                    c.TOKEN_IDS: np.array([tokens], np.int32).reshape([1, len(tokens)])})

    def classify(self, name: str, version: int | None, signature: str, examples: list[bytes],
                 label: str | None = None, call: Call | None = None) -> tuple[LoadedVersion, Any, Any]:
        """Runs serialized tf.Examples through a classification signature (TensorFlow Serving's Classify).

        Returns:
            `(version, classes [B, C] bytes or None, scores [B, C] float or None)`.
        """
        signature = signature or c.SERVING_DEFAULT
        if not examples:
            raise ServingError("INVALID_ARGUMENT", "Input is empty.")
        loaded = self.model(name).get(version, label)
        if signature not in loaded.signatures:
            raise ServingError("INVALID_ARGUMENT", f"No signature was found with the name: {signature[:200]}")
        method = loaded.methods.get(signature, "")
        if self.method_name_check and method != c.CLASSIFY_METHOD:
            raise ServingError("INVALID_ARGUMENT", f"Expected classification signature method_name to be "
                                                   f"{c.CLASSIFY_METHOD}. Was: {method}")
        inputs = list(loaded.input_specs(signature))
        if len(inputs) != 1:
            raise ServingError("INVALID_ARGUMENT", f"Expected one input Tensor; signature {signature!r} takes {inputs}")
        outputs = self._run(name, loaded, signature, {inputs[0]: np.array(examples, dtype=object)}, call or Call())
        scores, classes = outputs.get(c.SCORES), outputs.get(c.CLASSES)
        if scores is None and classes is None:
            raise ServingError("INVALID_ARGUMENT", "Expected classification signature outputs classes and/or scores")
        self.request_logs.classify(name, loaded.version, signature, examples, classes, scores)
        return loaded, classes, scores

    def validate(self, loaded: LoadedVersion, signature: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The request's inputs as arrays the signature takes; ServingError INVALID_ARGUMENT otherwise."""
        if signature not in loaded.signatures:
            raise ServingError("FAILED_PRECONDITION",
                               f"Serving signature name: \"{signature[:200]}\" not found in signature def "
                               f"(have: {', '.join(sorted(loaded.signatures))})")
        if c.needs_xla(signature) and not self.xla:
            raise ServingError("FAILED_PRECONDITION", f"{XLA_DISABLED}: signature {signature!r} is XLA-compiled; start "
                                                      "the server with --xla_cpu_compilation_enabled, or call "
                                                      f"{signature[:-len(c.XLA_SUFFIX)]!r}")
        specs = loaded.input_specs(signature)
        missing = sorted(set(specs) - set(inputs))
        extra = sorted(k[:100] for k in set(inputs) - set(specs))
        if missing or extra:
            raise ServingError("INVALID_ARGUMENT", f"signature {signature!r} expects inputs "
                                                   f"{sorted(specs)}; missing {missing}, unexpected {extra}")
        limits = self.limits
        arrays = {key: as_input(key, inputs[key], spec, limits) for key, spec in specs.items()}
        rows = {key: a.shape[0] for key, a in arrays.items() if a.ndim}
        if len(set(rows.values())) > 1:
            raise ServingError("INVALID_ARGUMENT", "the inputs must share their first (batch) dimension; got "
                                                   + ", ".join(f"{k}: {n}" for k, n in sorted(rows.items())))
        if rows and max(rows.values()) > limits.max_request_rows:
            raise ServingError("INVALID_ARGUMENT", f"the request has {max(rows.values())} rows; this server takes "
                                                   f"at most {limits.max_request_rows} (--max_request_rows)")
        text = sum(len(v) for a in arrays.values() if a.dtype == object for v in a.flat)
        if text > limits.max_text_bytes:
            raise ServingError("INVALID_ARGUMENT", f"the request's strings hold {text} bytes; this server takes at "
                                                   f"most {limits.max_text_bytes} (--max_text_bytes)")
        new_tokens = arrays.get(c.MAX_NEW_TOKENS)
        if new_tokens is not None and new_tokens.size:
            outside = new_tokens[(new_tokens < 0) | (new_tokens > limits.max_new_tokens)]
            if outside.size:
                raise ServingError("INVALID_ARGUMENT", f"max_new_tokens must be between 0 and "
                                                       f"{limits.max_new_tokens} (--max_new_tokens_limit); "
                                                       f"got {int(outside[0])}")
            if loaded.context is not None and new_tokens.max() >= loaded.context:
                # The graph refuses it too (TF Serving); here it fails alone, before it joins a batch.
                raise ServingError("INVALID_ARGUMENT", f"max_new_tokens={int(new_tokens.max())} does not fit the "
                                                       f"model's context of {loaded.context} tokens: ask for at "
                                                       f"most {loaded.context - 1} (the prompt's start is dropped "
                                                       "to make room for them)")
        return arrays

    def _run(self, name: str, loaded: LoadedVersion, signature: str, inputs: dict[str, Any],
             call: Call, checked: bool = False) -> dict[str, np.ndarray]:
        """One signature call on the version a request holds (batched if batching is on); `checked`:
        the inputs are `validate`'s arrays already."""
        arrays = inputs if checked else self.validate(loaded, signature, inputs)
        call.check()
        if loaded.scheduler is not None and signature in c.GENERATION_SIGNATURES:
            return loaded.scheduler.generate(arrays, call)  # step by step, with the other sequences
        run = loaded.numpy_function(signature, self.watchdog.cancellable)
        try:
            if self.batcher is not None:
                return self.batcher.run((name, loaded.version, signature), name, run, arrays, call)
            return run(arrays, [call])
        except tf.errors.OpError as e:
            code = {tf.errors.InvalidArgumentError: "INVALID_ARGUMENT",
                    tf.errors.ResourceExhaustedError: "RESOURCE_EXHAUSTED",
                    tf.errors.CancelledError: "CANCELLED"}.get(type(e), "INTERNAL")
            raise ServingError(code, op_error_message(e.message)) from None

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[dict[str, Any]]:
        model = self.model(name)
        if label:
            version = model.get(None, label).version
        return model.status(version)

    def signature_defs(self, name: str, version: int | None = None, label: str | None = None):
        """(version, the SavedModel's SignatureDefMap proto) as TensorFlow Serving reports metadata."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        loaded = self.model(name).get(version, label)
        saved = saved_model_proto(loaded.path)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in saved.meta_graphs[0].signature_def.items():
            if not key.startswith("__"):  # TensorFlow's internal signatures (e.g. __saved_model_init_op)
                signatures.signature_def[key].CopyFrom(value)
        return loaded.version, signatures


def as_input(key: str, value, spec: tf.TensorSpec, limits: Limits) -> np.ndarray:
    """A request's value for one input as a numpy array of the signature's dtype and a compatible shape."""
    array = np.asarray(value)
    if array.size == 0:  # an empty JSON list has no type of its own
        array = array.astype(object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype)
    if array.size > limits.max_tensor_elements:
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} has {array.size} elements; this server takes at "
                                               f"most {limits.max_tensor_elements} (--max_tensor_elements)")
    if spec.dtype == tf.string:
        if array.dtype.kind not in ("O", "S", "U") or (array.dtype.kind == "O" and array.size and not all(
                isinstance(x, (bytes, str)) for x in array.flat)):
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} must be strings")
        array = array.astype(object)
    else:
        want = np.dtype(spec.dtype.as_numpy_dtype)
        if array.dtype.kind in ("O", "S", "U"):
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} is not {spec.dtype.name}: got strings")
        if array.dtype.kind == "f" and array.size and spec.dtype.is_integer:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} is not {spec.dtype.name}: got fractional numbers")
        if want.kind in "iu" and array.dtype.kind in "iub" and array.size:
            info = np.iinfo(want)
            if array.min() < info.min or array.max() > info.max:
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} holds values outside {spec.dtype.name}'s "
                                                       f"range [{info.min}, {info.max}]")
        array = array.astype(want)
    if not spec.shape.is_compatible_with(array.shape):
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} has shape {list(array.shape)}, expected {spec.shape}")
    return array


def op_error_message(message: str) -> str:
    """The line of a TensorFlow error that says what went wrong (not the graph location)."""
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("assertion failed: ["):  # tf.debugging asserts: the message is the first [...]
            return line[len("assertion failed: ["):].split("]", 1)[0].strip()
        if line and not line.startswith(("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")):
            return line.split(" [[", 1)[0]
    return message.strip()


def internal_error(what: str, error: Exception) -> str:
    """Logs a failure that is a bug on one line (no traceback) and returns what the client is told:
    INTERNAL (gRPC) or 500 (REST), naming only the exception's type."""
    log.error("%s failed: %s: %s", what, type(error).__name__, str(error).splitlines()[:1])
    return f"internal error: {type(error).__name__}"
