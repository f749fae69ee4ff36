"""Clients for TensorFlow Serving's REST and gRPC APIs (and `lmstack serve`, which speaks both).

    client = serving.client.connect("localhost:8500", protocol="grpc", model_name="lm")
    client.generate(["ROMEO."], max_new_tokens=50)        # -> ["..."]
    client.score(["To be, or not to be"])                 # -> [(log_likelihood, num_tokens)]
    client.classify(["A dark, dull thriller."])          # a classifier export -> [[("fresh", 0.2), ("rotten", 0.8)]]

Both clients send the signatures of `serving.contract`, time out after
`timeout` seconds, retry a request the server answers UNAVAILABLE (HTTP 503,
or no connection yet) up to `retries` times with exponential backoff, and
raise `ServingError` with the server's own message for anything else.

The gRPC client uses tensorflow-serving-api's `PredictionServiceStub` and
`ModelServiceStub`; the REST client uses only the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Any, Iterator, Literal, Sequence

from serving import contract as c

PROTOCOLS = ("rest", "grpc")


ServingError = c.ServingError

# The gRPC status behind each HTTP status of TensorFlow Serving's REST API.
_HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class _Client:
    """What both protocols offer; subclasses implement `predict`, `metadata` and `status`."""

    def __init__(self, target: str, model_name: str = c.DEFAULT_MODEL_NAME, version: int | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.25):
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def predict(self, signature: str, inputs: dict[str, Sequence]) -> dict[str, list]:
        """Calls one signature with columnar inputs; returns its outputs as lists."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    def status(self) -> list[dict[str, Any]]:
        """[{"version": int, "state": "AVAILABLE" | ..., "error_code": ..., "error_message": ...}]"""
        raise NotImplementedError

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 50, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, compiled: bool = False) -> list[str]:
        """Continuations of `prompts`: greedy (serving_default) at temperature 0, else sampled (generate).

        `compiled` calls their XLA-compiled twins (serving_default_xla, generate_xla): the same text,
        faster, from a server that runs XLA (`--xla_cpu_compilation_enabled`).
        """
        n = len(prompts)
        inputs: dict[str, list] = {c.PROMPT: list(prompts), c.MAX_NEW_TOKENS: [max_new_tokens] * n}
        signature = c.SERVING_DEFAULT
        if temperature > 0:
            signature = c.GENERATE
            inputs.update({c.TEMPERATURE: [float(temperature)] * n, c.TOP_K: [top_k] * n,
                           c.TOP_P: [float(top_p)] * n, c.SEED: [seed] * n})
        if compiled:
            signature += c.XLA_SUFFIX
        return [_text(s) for s in self.predict(signature, inputs)[c.COMPLETION]]

    def stream(self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
        """Yields the continuation of `prompt` as the server makes it (lmstack serve's streaming
        extension; the same text as `generate` with these settings). Closing the iterator early
        cancels the generation on the server."""
        inputs = {c.PROMPT: prompt, c.MAX_NEW_TOKENS: max_new_tokens, c.TEMPERATURE: float(temperature),
                  c.TOP_K: top_k, c.TOP_P: float(top_p), c.SEED: seed}
        for chunk in self._stream(inputs):
            if chunk.get("text"):
                yield chunk["text"]

    def _stream(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def score(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(log-likelihood in nats, tokens) of each text."""
        out = self.predict(c.SCORE, {c.TEXT: list(texts)})
        return [(float(ll), int(n)) for ll, n in zip(out[c.LOG_LIKELIHOOD], out[c.NUM_TOKENS])]

    def next_token_logits(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """The logits of the token after each row; rows may differ in length (padded with 0 here)."""
        rows = [list(row) for row in token_ids]
        width = max((len(r) for r in rows), default=0)
        return self.predict(c.NEXT_TOKEN_LOGITS, {c.TOKEN_IDS: [r + [0] * (width - len(r)) for r in rows],
                                                  c.NUM_TOKENS: [len(r) for r in rows]})[c.LOGITS]

    def classify(self, texts: Sequence[str], signature: str = c.CLASSIFY) -> list[list[tuple[str, float]]]:
        """A classifier export's (label, score) pairs per text, through TensorFlow Serving's Classify API."""
        raise NotImplementedError

    def _with_retries(self, call):
        for attempt in range(self.retries + 1):
            try:
                return call()
            except ServingError as e:
                if e.code != "UNAVAILABLE" or attempt == self.retries:
                    raise
            time.sleep(self.backoff * 2 ** attempt)


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


class RestClient(_Client):
    """TensorFlow Serving's REST API: `POST /v1/models/NAME[/versions/N]:predict`, columnar inputs.

    Args:
        target: 'host:port' (the REST port, 8501 by default in TensorFlow Serving) or an http(s) URL.
    """

    def _url(self, suffix: str = "") -> str:
        base = self.target if self.target.startswith(("http://", "https://")) else f"http://{self.target}"
        path = f"{base.rstrip('/')}/v1/models/{self.model_name}"
        if self.version is not None:
            path += f"/versions/{self.version}"
        return path + suffix

    def _request(self, url: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})

        def call():
            with self._open(request, url) as response:
                try:
                    return json.loads(response.read())
                except TimeoutError:
                    raise ServingError("DEADLINE_EXCEEDED", f"no answer from {url} in {self.timeout} s") from None

        return self._with_retries(call)

    def _open(self, request, url: str):
        """The response to `request`; TensorFlow Serving's error as a ServingError."""
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except ValueError:
                message = text or e.reason
            raise ServingError(_HTTP_TO_CODE.get(e.code, f"HTTP {e.code}"), message) from None
        except (urllib.error.URLError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise ServingError("DEADLINE_EXCEEDED", f"no answer from {url} in {self.timeout} s") from None
            raise ServingError("UNAVAILABLE", f"cannot reach {url}: {reason}") from None
        except TimeoutError:
            raise ServingError("DEADLINE_EXCEEDED", f"no answer from {url} in {self.timeout} s") from None

    def predict(self, signature: str, inputs: dict[str, Sequence]) -> dict[str, list]:
        body = {"signature_name": signature, "inputs": {k: list(v) for k, v in inputs.items()}}
        outputs = self._request(self._url(":predict"), body)["outputs"]
        if not isinstance(outputs, dict):  # a signature with one output answers with its value
            outputs = {next(iter(c.SIGNATURES[signature].outputs)): outputs}
        return outputs

    def _stream(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """`:stream`'s server-sent events as dicts (an `event: error` raises ServingError)."""
        url = self._url(":stream")
        request = urllib.request.Request(url, data=json.dumps({"inputs": inputs}).encode("utf-8"),
                                         headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        with self._with_retries(lambda: self._open(request, url)) as response:
            event = ""
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[len("event:"):].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[len("data:"):])
                    if event == "error":
                        raise ServingError("INTERNAL", data.get("error", ""))
                    yield data
                    if event == "done":
                        return
                elif not line:
                    event = ""

    def classify(self, texts: Sequence[str], signature: str = c.CLASSIFY) -> list[list[tuple[str, float]]]:
        body = {"signature_name": signature, "examples": [{c.TEXT: t} for t in texts]}
        return [[(label, float(score)) for label, score in row]
                for row in self._request(self._url(":classify"), body)["result"]]

    def metadata(self) -> dict[str, Any]:
        return self._request(self._url("/metadata"))

    def status(self) -> list[dict[str, Any]]:
        answer = self._request(self._url())
        return [{"version": int(v["version"]), "state": v["state"],
                 "error_code": v.get("status", {}).get("error_code", "OK"),
                 "error_message": v.get("status", {}).get("error_message", "")}
                for v in answer.get("model_version_status", [])]


class GrpcClient(_Client):
    """TensorFlow Serving's gRPC API through tensorflow-serving-api's stubs.

    Args:
        target: 'host:port' (the gRPC port, 8500 by default in TensorFlow Serving).
    """

    def __init__(self, target: str, *args, **kwargs):
        super().__init__(target, *args, **kwargs)
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self._grpc = grpc
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)])
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _spec(self, signature: str = ""):
        from tensorflow_serving.apis import model_pb2

        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature)
        if self.version is not None:
            spec.version.value = self.version
        return spec

    def _call(self, method, request):
        def call():
            try:
                return method(request, timeout=self.timeout)
            except self._grpc.RpcError as e:
                raise ServingError(e.code().name, e.details() or str(e)) from None
        return self._with_retries(call)

    def predict(self, signature: str, inputs: dict[str, Sequence]) -> dict[str, list]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        from serving import tensors

        request = predict_pb2.PredictRequest(model_spec=self._spec(signature))
        for name, value in inputs.items():
            known = c.SIGNATURES[signature].inputs.get(name) if signature in c.SIGNATURES else None
            dtype = tf.dtypes.as_dtype(known.dtype) if known else None  # else numpy's own
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
        response = self._call(self._predictions.Predict, request)
        return {name: tensors.to_ndarray(proto).tolist() for name, proto in response.outputs.items()}

    def _stream(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """StreamGenerate's responses as dicts (lmstack serve's streaming extension)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        from serving import tensors

        request = predict_pb2.PredictRequest(model_spec=self._spec())
        for name, value in inputs.items():
            dtype = tf.dtypes.as_dtype(c.SIGNATURES[c.GENERATE].inputs[name].dtype)
            request.inputs[name].CopyFrom(tf.make_tensor_proto([value], dtype=dtype))
        method = self._channel.unary_stream(c.STREAM_METHOD,
                                            request_serializer=predict_pb2.PredictRequest.SerializeToString,
                                            response_deserializer=predict_pb2.PredictResponse.FromString)
        responses = method(request, timeout=self.timeout)
        try:
            for response in responses:
                out = {name: tensors.to_ndarray(proto).tolist() for name, proto in response.outputs.items()}
                if "completion" in out:
                    yield {"completion": _text(out["completion"][0]), "finished": bool(out["finished"][0])}
                else:
                    yield {"text": _text(out["text"][0]), "token_ids": out["token_ids"]}
        except self._grpc.RpcError as e:
            raise ServingError(e.code().name, e.details() or str(e)) from None
        finally:
            responses.cancel()  # closing the iterator early stops the server's work

    def classify(self, texts: Sequence[str], signature: str = c.CLASSIFY) -> list[list[tuple[str, float]]]:
        from tensorflow_serving.apis import classification_pb2

        request = classification_pb2.ClassificationRequest(model_spec=self._spec(signature))
        for text in texts:
            request.input.example_list.examples.add().features.feature[c.TEXT].bytes_list.value.append(
                text.encode("utf-8"))
        response = self._call(self._predictions.Classify, request)
        return [[(k.label, k.score) for k in row.classes] for row in response.result.classifications]

    def metadata(self) -> dict[str, Any]:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=self._spec(),
                                                                metadata_field=["signature_def"])
        response = self._call(self._predictions.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return {"model_spec": json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True),
                "metadata": {"signature_def": json_format.MessageToDict(signatures, preserving_proto_field_name=True)}}

    def status(self) -> list[dict[str, Any]]:
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._spec())
        response = self._call(self._models.GetModelStatus, request)
        return [{"version": v.version, "state": get_model_status_pb2.ModelVersionStatus.State.Name(v.state),
                 "error_code": _code_name(v.status.error_code), "error_message": v.status.error_message}
                for v in response.model_version_status]


def _code_name(code: int) -> str:
    import grpc

    return next((s.name for s in grpc.StatusCode if s.value[0] == code), str(code))


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where a client sends its requests, and how long it waits for them.

    Attributes:
        target: HOST:PORT of the server (gRPC 8500, REST 8501 by default).
        protocol: TensorFlow Serving API to use: grpc or rest.
        model_name: the model's name on the server.
        version: a specific version (default: the server's latest).
        timeout: seconds to wait for an answer.
        retries: retries while the server is UNAVAILABLE.
    """
    target: str = "localhost:8500"
    protocol: Literal["grpc", "rest"] = "grpc"
    model_name: str = c.DEFAULT_MODEL_NAME
    version: int | None = None
    timeout: float = 60.0
    retries: int = 3

    def connect(self) -> RestClient | GrpcClient:
        return connect(self.target, self.protocol, model_name=self.model_name, version=self.version,
                       timeout=self.timeout, retries=self.retries)


def connect(target: str, protocol: str = "grpc", **kwargs) -> RestClient | GrpcClient:
    """A client for `protocol` ('rest' or 'grpc'); kwargs as for the client classes."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {'|'.join(PROTOCOLS)}")
    return RestClient(target, **kwargs) if protocol == "rest" else GrpcClient(target, **kwargs)
