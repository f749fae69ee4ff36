"""A model server that speaks TensorFlow Serving's REST and gRPC APIs.

`tensorflow_model_server` cannot be installed on every machine (it is on
neither PyPI nor Debian), so lmstack ships this one: the same URLs, the same
protos (tensorflow-serving-api's generated gRPC services), the same JSON,
status codes, flags and config files, so a client or a deployment written for
one works with the other. It imports only TensorFlow, tensorflow-text (whose
ops the exported tokenizers use), gRPC, waitress and the runtime modules of
`serving` — never `models/`, `pipelines/` or `serving.exporters`.

The parts, each about the size of its counterpart in TensorFlow Serving:

    server.py      Options (every flag a field), Server.build_and_start, wait_for_termination, stop
    versions.py    model versions on disk, the version policy, loading with warm-up and retries
    config.py      the config files (ModelServerConfig, BatchingParameters, MonitoringConfig, SSLConfig)
    core.py        the protocol-free server: request checks and limits, batching, metrics
    batching.py    dynamic batching (TF Serving's batching parameters, padding to allowed sizes)
    metrics.py     the Prometheus page, with TF Serving's metric names
    deadlines.py   deadlines and abandoned requests: their work is cancelled
    grpc_api.py    PredictionService, ModelService and the health service
    rest_api.py    the HTTP routes (on waitress)
    scheduler.py   continuous batching: generation step by step over a pool of cache slots
    openai_api.py  the OpenAI-compatible routes (--openai_api_port), on the same core
    chat.py        chat templates (Jinja, sandboxed) for /v1/chat/completions
    json_codec.py  TensorFlow Serving's JSON for tensors
"""

from serving.server.config import (DEFAULT_METRICS_PATH, SSLConfig, models_from_config, models_from_config_file,
                                   read_batching_parameters, read_monitoring_config, read_ssl_config)
from serving.server.core import Limits, ModelServer
from serving.server.deadlines import Call
from serving.server.grpc_api import start_grpc
from serving.server.rest_api import start_rest
from serving.server.server import Options, Server
from serving.server.versions import LoadedVersion, ServedModel, VersionPolicy, log

__all__ = ["Call", "DEFAULT_METRICS_PATH", "Limits", "LoadedVersion", "ModelServer", "Options", "SSLConfig",
           "ServedModel", "Server", "VersionPolicy", "log", "models_from_config", "models_from_config_file",
           "read_batching_parameters", "read_monitoring_config", "read_ssl_config", "start_grpc", "start_rest"]
