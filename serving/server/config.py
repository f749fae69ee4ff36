"""The files `tensorflow_model_server` reads, parsed as the protobuf messages it parses them into.

    --model_config_file        ModelServerConfig   (tensorflow-serving-api ships its _pb2)
    --batching_parameters_file BatchingParameters  (not in the wheel: descriptor built here)
    --monitoring_config_file   MonitoringConfig    (likewise)
    --ssl_config_file          SSLConfig           (likewise)

The three messages the wheel lacks are declared below field for field as in
TensorFlow Serving's .proto files (same package, names and numbers), so
`google.protobuf.text_format` accepts exactly the files TensorFlow Serving
accepts (`allowed_batch_sizes: [8, 16]`, comments, wrapper messages) and
names the file and field of anything it does not.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf import message_factory
from google.protobuf import wrappers_pb2

from serving.server.batching import BatchingParameters
from serving.server.request_log import check_logging_config
from serving.contract import ServingError
from serving.server.versions import ServedModel, VersionPolicy, check_scheme, read_bytes

DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"

_F = descriptor_pb2.FieldDescriptorProto
# message -> [(field, number, type, label, type_name)], as in TensorFlow Serving's protos.
_MESSAGES = {
    # tensorflow_serving/servables/tensorflow/session_bundle_config.proto
    "BatchingParameters": [
        ("max_batch_size", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, _F.TYPE_INT64, _F.LABEL_REPEATED, None),
        ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
        ("enable_large_batch_splitting", 8, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.BoolValue"),
        ("max_execution_batch_size", 9, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ],
    # tensorflow_serving/config/monitoring_config.proto
    "PrometheusConfig": [
        ("enable", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
        ("path", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ],
    "MonitoringConfig": [
        ("prometheus_config", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".tensorflow.serving.PrometheusConfig"),
    ],
    # tensorflow_serving/config/ssl_config.proto
    "SSLConfig": [
        ("server_key", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("server_cert", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("custom_ca", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("client_verify", 4, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
    ],
}


def _build_messages() -> dict[str, type]:
    """The message classes of `_MESSAGES`, in a pool of their own (beside wrappers.proto)."""
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(name="lmstack/tensorflow_serving_configs.proto",
                                              package="tensorflow.serving", syntax="proto3",
                                              dependency=[wrappers.name])
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            f = message.field.add(name=field, number=number, type=kind, label=label, json_name=field)
            if type_name:
                f.type_name = type_name
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
            for name in _MESSAGES}


MESSAGES = _build_messages()


def read_text_proto(path: str | os.PathLike, message, what: str):
    """Parses a text-format protobuf file into `message`; ServingError INVALID_ARGUMENT naming file and field."""
    path = str(path)  # a str, pathlib.Path or lmstack's GPath (which has no __fspath__)
    check_scheme(path)
    try:
        text = read_bytes(path).decode()
    except tf.errors.OpError as e:
        raise ServingError("INVALID_ARGUMENT", f"cannot read the {what} {path}: {e.message}") from None
    except UnicodeDecodeError as e:
        raise ServingError("INVALID_ARGUMENT", f"cannot read the {what} {path}: {e}") from None
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ServingError("INVALID_ARGUMENT", f"the {what} {path} is not a valid "
                                               f"{message.DESCRIPTOR.name}: {e}") from None


# ---------------------------------------------------------------------------
# --model_config_file


def models_from_config_file(path: str | os.PathLike, **model_options) -> dict[str, ServedModel]:
    """ServedModels from a ModelServerConfig text file (TensorFlow Serving's --model_config_file)."""
    from tensorflow_serving.config import model_server_config_pb2

    config = read_text_proto(path, model_server_config_pb2.ModelServerConfig(), "model config file")
    return models_from_config(config, str(path), **model_options)


def models_from_config(config, source: str = "the model config", **model_options) -> dict[str, ServedModel]:
    """ServedModels from a ModelServerConfig proto (a file's or a HandleReloadConfigRequest's).

    `model_options` go to every ServedModel (load retries).
    """
    if config.WhichOneof("config") == "custom_model_config":
        raise ServingError("INVALID_ARGUMENT", f"{source}: custom_model_config is not supported; "
                                               "use model_config_list")
    served = {}
    for m in config.model_config_list.config:
        if not m.name or not m.base_path:
            raise ServingError("INVALID_ARGUMENT", f"{source}: every model config needs a name and a base_path")
        if m.name in served:
            raise ServingError("INVALID_ARGUMENT", f"{source}: model name {m.name!r} appears twice")
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
        logging = m.logging_config if m.HasField("logging_config") else None
        if logging is not None:
            check_logging_config(m.name, logging)
        served[m.name] = ServedModel(m.name, m.base_path, policy, dict(m.version_labels),
                                     logging_config=logging, **model_options)
    if not served:
        raise ServingError("INVALID_ARGUMENT", f"{source} configures no model (model_config_list is empty)")
    return served


# ---------------------------------------------------------------------------
# --monitoring_config_file


def read_monitoring_config(path: str | os.PathLike) -> str | None:
    """The Prometheus path of a MonitoringConfig file, or None if it is not enabled."""
    config = read_text_proto(path, MESSAGES["MonitoringConfig"](), "monitoring config file").prometheus_config
    if not config.enable:
        return None
    return config.path or DEFAULT_METRICS_PATH


# ---------------------------------------------------------------------------
# --ssl_config_file


@dataclasses.dataclass(frozen=True)
class SSLConfig:
    """TensorFlow Serving's SSLConfig: PEM texts (not file names), as its server reads them."""
    server_key: str
    server_cert: str
    custom_ca: str = ""
    client_verify: bool = False


def read_ssl_config(path: str | os.PathLike) -> SSLConfig:
    config = read_text_proto(path, MESSAGES["SSLConfig"](), "SSL config file")
    if not config.server_key or not config.server_cert:
        raise ServingError("INVALID_ARGUMENT", f"the SSL config file {path} needs server_key and server_cert "
                                               "(the PEM text itself)")
    if config.client_verify and not config.custom_ca:
        raise ServingError("INVALID_ARGUMENT", f"the SSL config file {path} sets client_verify without custom_ca "
                                               "(the CA that signs the client certificates)")
    return SSLConfig(config.server_key, config.server_cert, config.custom_ca, config.client_verify)


# ---------------------------------------------------------------------------
# --batching_parameters_file


def read_batching_parameters(path: str | os.PathLike) -> BatchingParameters:
    """A BatchingParameters file as `serving.server.batching.BatchingParameters` (TF Serving's defaults and checks)."""
    message = read_text_proto(path, MESSAGES["BatchingParameters"](), "batching parameters file")
    values = {}
    for field in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads",
                  "enable_large_batch_splitting", "max_execution_batch_size"):
        if message.HasField(field):
            values[field] = getattr(message, field).value
    values["allowed_batch_sizes"] = tuple(message.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = message.pad_variable_length_inputs
    try:
        return BatchingParameters(**values)
    except ValueError as e:
        raise ServingError("INVALID_ARGUMENT", f"batching parameters file {path}: {e}") from None
