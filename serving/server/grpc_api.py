"""gRPC: tensorflow-serving-api's PredictionService and ModelService over the core.

    PredictionService.Predict / Classify / GetModelMetadata
    ModelService.GetModelStatus / HandleReloadConfigRequest
    grpc.health.v1.Health (with --enable_grpc_healthcheck_service)
    lmstack.serving.StreamingService.StreamGenerate (lmstack extension: a PredictRequest in, a stream
        of PredictResponses out, one per chunk of tokens; `contract.STREAM_METHOD`)

Every client error carries the status TensorFlow Serving would return
(INVALID_ARGUMENT for bad tensors, unknown outputs and impossible shapes,
NOT_FOUND for unknown models and versions). A request runs until its gRPC
deadline; a client that cancels or disconnects stops its work
(`deadlines.Call`). Tensors are checked against the limits on their declared
shape before any memory is allocated for them.
"""

from __future__ import annotations

import functools
import math
from concurrent import futures
from typing import Any, Sequence

import grpc

from serving import contract as c
from serving import tensors
from serving.contract import SERVING_DEFAULT, ServingError
from serving.server.config import SSLConfig, models_from_config
from serving.server.core import ModelServer, internal_error
from serving.server.deadlines import Call
from serving.server.versions import examples_of, log


def _fail(context, error: ServingError):
    context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN), error.message)


def _guarded(method):
    """A servicer method whose unexpected errors answer INTERNAL with one log line, not a traceback."""
    @functools.wraps(method)
    def run(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            if context.code() is not None:  # context.abort() raises after setting the status: let it through
                raise
            context.abort(grpc.StatusCode.INTERNAL, internal_error(method.__name__, e))
    return run


def _version_of(spec) -> dict[str, Any]:
    which = spec.WhichOneof("version_choice")
    return {"version": spec.version.value if which == "version" else None,
            "label": spec.version_label if which == "version_label" else None}


def _answered_spec(spec, version: int):
    """The ModelSpec of a response: the request's model, the version that answered, the signature run."""
    from tensorflow_serving.apis import model_pb2

    answered = model_pb2.ModelSpec(name=spec.name, signature_name=spec.signature_name or SERVING_DEFAULT)
    answered.version.value = version
    return answered


def _call(context) -> Call:
    remaining = context.time_remaining()  # None without a deadline
    return Call(timeout=remaining, is_active=context.is_active)


def decode_inputs(core: ModelServer, inputs) -> dict:
    """A request's TensorProtos as numpy arrays, each checked against the limits on its declared shape."""
    arrays = {}
    for key, proto in inputs.items():
        dims = [d.size for d in proto.tensor_shape.dim]
        if any(d < 0 for d in dims) or proto.tensor_shape.unknown_rank:
            raise ServingError("INVALID_ARGUMENT", f"input {key[:100]!r} has shape {dims}: a request's tensors "
                                                   "need a known shape")
        if math.prod(dims) > core.limits.max_tensor_elements:
            raise ServingError("INVALID_ARGUMENT", f"input {key[:100]!r} has shape {dims} "
                                                   f"({math.prod(dims)} elements); this server takes at most "
                                                   f"{core.limits.max_tensor_elements} (--max_tensor_elements)")
        try:
            arrays[key] = tensors.to_ndarray(proto)
        except (ValueError, TypeError) as e:
            raise ServingError("INVALID_ARGUMENT", f"input {key[:100]!r}: {e}") from None
    return arrays


def servicers(core: ModelServer):
    """PredictionService and ModelService servicers over `core` (tensorflow-serving-api's base classes)."""
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                         model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        @_guarded
        def Predict(self, request, context):
            spec = request.model_spec
            with core.track():
                try:
                    with core.counted(spec.name, "Predict", "GRPC"):
                        loaded, outputs = core.predict(spec.name, signature=spec.signature_name,
                                                       inputs=decode_inputs(core, request.inputs),
                                                       call=_call(context), **_version_of(spec))
                        unknown = sorted(set(request.output_filter) - set(outputs))
                        if unknown:
                            raise ServingError("INVALID_ARGUMENT", f"output tensor alias not found in signature: "
                                                                   f"{unknown[0][:100]}")
                except ServingError as e:
                    return _fail(context, e)
            response = predict_pb2.PredictResponse(model_spec=_answered_spec(spec, loaded.version))
            for key in request.output_filter or outputs:
                response.outputs[key].CopyFrom(tensors.to_proto(outputs[key]))
            return response

        @_guarded
        def Classify(self, request, context):
            spec = request.model_spec
            with core.track():
                try:
                    with core.counted(spec.name, "Classify", "GRPC"):
                        loaded, classes, scores = core.classify(
                            spec.name, signature=spec.signature_name, examples=examples_of(request.input),
                            call=_call(context), **_version_of(spec))
                except ServingError as e:
                    return _fail(context, e)
            response = classification_pb2.ClassificationResponse(model_spec=_answered_spec(spec, loaded.version))
            for row in range(len(scores if scores is not None else classes)):
                classifications = response.result.classifications.add()
                for j in range(len(scores[row] if scores is not None else classes[row])):
                    cls = classifications.classes.add()
                    if classes is not None:
                        cls.label = classes[row][j].decode("utf-8", errors="replace")
                    if scores is not None:
                        cls.score = float(scores[row][j])
            return response

        @_guarded
        def GetModelMetadata(self, request, context):
            if list(request.metadata_field) != ["signature_def"]:
                return _fail(context, ServingError("INVALID_ARGUMENT", "Metadata field signature_def is the only "
                                                                       "one supported; set metadata_field"))
            try:
                version, signatures = core.signature_defs(request.model_spec.name, **_version_of(request.model_spec))
            except ServingError as e:
                return _fail(context, e)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = version
            response.metadata["signature_def"].Pack(signatures)
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        @_guarded
        def GetModelStatus(self, request, context):
            try:
                statuses = core.status(request.model_spec.name, **_version_of(request.model_spec))
            except ServingError as e:
                return _fail(context, e)
            response = get_model_status_pb2.GetModelStatusResponse()
            for s in statuses:
                v = response.model_version_status.add()
                v.version = s["version"]
                v.state = get_model_status_pb2.ModelVersionStatus.State.Value(s["state"])
                v.status.error_code = getattr(grpc.StatusCode, s["error_code"]).value[0]
                v.status.error_message = s["error_message"]
            return response

        @_guarded
        def HandleReloadConfigRequest(self, request, context):
            try:
                core.reload(models_from_config(request.config, "the reload request", **core.model_options))
            except ServingError as e:
                return _fail(context, e)
            return model_management_pb2.ReloadConfigResponse()

    return PredictionService(), ModelService()


def stream_handler(core: ModelServer):
    """The streaming extension as a generic gRPC handler of TensorFlow Serving's own messages.

    The request is a PredictRequest whose inputs are a stream's (`prompt`, `max_new_tokens`,
    `temperature`, `top_k`, `top_p`, `seed`: `ModelServer.stream`); each response a PredictResponse
    with outputs `text` (the new text, string [1]) and `token_ids` (int32 [n]), the last one
    `completion` (string [1]) and `finished` (bool [1]). Cancelling the call stops the generation.
    """
    import numpy as np
    from tensorflow_serving.apis import predict_pb2

    def generate(request, context):
        spec = request.model_spec
        with core.track():
            try:
                with core.counted(spec.name, "StreamGenerate", "GRPC"):
                    inputs = {k: v.reshape(-1)[0] if v.size == 1 else v
                              for k, v in decode_inputs(core, request.inputs).items()}
                    loaded, chunks = core.stream(spec.name, inputs=inputs, call=_call(context), **_version_of(spec))
                for chunk in chunks:
                    response = predict_pb2.PredictResponse(model_spec=_answered_spec(spec, loaded.version))
                    if "completion" in chunk:
                        outputs = {"completion": np.array([chunk["completion"].encode("utf-8")], object),
                                   "finished": np.array([chunk["finished"]])}
                    else:
                        outputs = {"text": np.array([chunk["text"].encode("utf-8")], object),
                                   "token_ids": np.array(chunk["token_ids"], np.int32)}
                    for key, value in outputs.items():
                        response.outputs[key].CopyFrom(tensors.to_proto(value))
                    yield response
            except ServingError as e:
                _fail(context, e)
            except Exception as e:  # one log line, not a traceback
                if context.code() is not None:  # context.abort() raised after setting the status
                    raise
                context.abort(grpc.StatusCode.INTERNAL, internal_error("StreamGenerate", e))

    handler = grpc.unary_stream_rpc_method_handler(generate, request_deserializer=predict_pb2.PredictRequest.FromString,
                                                   response_serializer=predict_pb2.PredictResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(c.STREAM_SERVICE, {c.STREAM_METHOD.rsplit("/", 1)[1]: handler})


def parse_channel_arguments(text: str) -> list[tuple[str, Any]]:
    """TensorFlow Serving's --grpc_channel_arguments: 'key=value,key=value' (integers where they parse)."""
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--grpc_channel_arguments: {item!r} is not key=value")
        try:
            arguments.append((key.strip(), int(value)))
        except ValueError:
            arguments.append((key.strip(), value.strip()))
    return arguments


def start_grpc(core: ModelServer, port: int, workers: int = 64, host: str = "0.0.0.0",
               ssl: SSLConfig | None = None, health: bool = False,
               channel_arguments: Sequence[tuple[str, Any]] = ()):
    """Starts the gRPC server on `host`:`port` (port 0: a free one); returns (server, port).

    Args:
        workers: threads answering requests. Each request holds a thread while it waits in a
            batching queue, so batches can grow only as large as there are threads.
        ssl: serve TLS only (and ask clients for certificates if `ssl.client_verify`).
        health: add the standard grpc.health.v1 service; every model's status as its service name,
            '' for the server.
        channel_arguments: more gRPC server options (TF Serving's --grpc_channel_arguments).
    """
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    options = [("grpc.max_receive_message_length", core.limits.max_request_bytes),
               ("grpc.max_send_message_length", 256 << 20), *channel_arguments]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=options, maximum_concurrent_rpcs=None)
    predictions, models = servicers(core)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(predictions, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(models, server)
    server.add_generic_rpc_handlers((stream_handler(core),))
    if health:
        from grpc_health.v1 import health as health_lib
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        servicer = health_lib.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in core.models:
            servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        core.health = servicer
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if ssl is not None:
        credentials = grpc.ssl_server_credentials(
            [(ssl.server_key.encode(), ssl.server_cert.encode())],
            root_certificates=ssl.custom_ca.encode() if ssl.custom_ca else None,
            require_client_auth=ssl.client_verify)
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {address}")
    server.start()
    log.debug("gRPC listening on %s", address)
    return server, bound
