"""Serve exported models over TensorFlow Serving's REST and gRPC APIs.

The flags are `tensorflow_model_server`'s, with its meanings and defaults:
--port (gRPC), --rest_api_port, and either --model_name with
--model_base_path (a directory of integer versions, as `lmstack export`
writes them) or --model_config_file (the ModelServerConfig text file
TensorFlow Serving reads: several models, version policies, labels; re-read
every --model_config_file_poll_wait_seconds). New versions load while the
server runs (checked every --file_system_poll_wait_seconds), after their
warm-up requests, and old ones unload under the version policy. Clients and
deployments written for TensorFlow Serving work unchanged; its flags that
mean nothing here are accepted with a one-line warning.

Flags marked "lmstack extension" are this server's own: the address to bind,
the per-request limits, and where HandleReloadConfigRequest may load models
from. SIGTERM stops accepting requests and lets the ones in flight finish.

example:
  lmstack serve --model_name=lm --model_base_path=runs/shakespeare/export/lm
  lmstack serve --model_config_file=deploy/serving/models.config --enable_batching \
      --batching_parameters_file=deploy/serving/batching_parameters.txt \
      --monitoring_config_file=deploy/serving/monitoring.config
  curl -d '{"inputs": {"prompt": ["ROMEO."], "max_new_tokens": [40]}}' localhost:8501/v1/models/lm:predict
"""

from __future__ import annotations

import os
import sys

from absl import flags

from app import settings
from pipelines.errors import UserError

VERSION = "2.21.0"  # the TensorFlow Serving release whose API and flags this server follows

# tensorflow_model_server flags that change nothing here: (type, default, why).
NO_EFFECT = {
    "grpc_socket_path": (str, "", "no UNIX socket listener"),
    "rest_api_enable_cors_support": (bool, False, "no CORS headers"),
    "allow_version_labels_for_unavailable_models": (bool, False, "labels may name any version"),
    "enable_per_model_batching_parameters": (bool, False, "one batching config for every model"),
    "num_load_threads": (int, 0, "versions load one at a time"),
    "num_unload_threads": (int, 0, "versions unload one at a time"),
    "flush_filesystem_caches": (bool, True, "no filesystem caches to flush"),
    "tensorflow_session_parallelism": (int, 0, "use --tensorflow_intra_op_parallelism"),
    "use_alts_credentials": (bool, False, "no ALTS; use --ssl_config_file"),
    "platform_config_file": (str, "", "TensorFlow SavedModels only"),
    "num_request_iterations_for_warmup": (int, 0, "each warm-up request runs once"),
    "remove_unused_fields_from_bundle_metagraph": (bool, True, "TensorFlow's loader keeps what it keeps"),
    "prefer_tflite_model": (bool, False, "SavedModels only; TFLite runs on the device (`lmstack tflite`)"),
    "num_tflite_pools": (int, 0, "no TFLite sessions"),
    "num_tflite_interpreters_per_pool": (int, 1, "no TFLite sessions"),
    "enable_profiler": (bool, True, "no profiler service"),
    "thread_pool_factory_config_file": (str, "", "TensorFlow's thread pools"),
    "mixed_precision": (str, "", "the SavedModel's own precision"),
    "skip_initialize_tpu": (bool, False, "no TPUs"),
    "enable_serialization_as_tensor_content": (bool, False, "outputs always fill the typed fields"),
}


def define_flags(fv: flags.FlagValues) -> None:
    from serving.server import Options

    settings.define(fv, Options)
    flags.DEFINE_bool("version", False, "print the version and exit", flag_values=fv)
    for name, (kind, default, why) in NO_EFFECT.items():
        define = {str: flags.DEFINE_string, bool: flags.DEFINE_bool, int: flags.DEFINE_integer}[kind]
        define(name, default, f"TensorFlow Serving's flag; no effect here ({why})", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    import logging

    if fv.version:
        import tensorflow as tf

        print(f"TensorFlow ModelServer: lmstack serve (TensorFlow Serving {VERSION} API)\n"
              f"TensorFlow Library: {tf.__version__}")
        return 0
    from serving import server

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    server.log.addHandler(handler)
    server.log.setLevel(logging.INFO)
    try:
        return _serve(fv)
    finally:  # reached when start-up fails (a served run ends in os._exit): a later run in this process
        server.log.removeHandler(handler)  # must not log to this run's stderr


def _serve(fv: flags.FlagValues) -> int:
    from serving.contract import ServingError
    from serving.server import Options, Server
    from serving.server.server import GRACE_SECONDS

    for name, (_, default, why) in NO_EFFECT.items():
        if fv[name].present and fv[name].value != default:
            print(f"lmstack serve: warning: --{name} has no effect here ({why})", file=sys.stderr)
    options = settings.build(fv, Options)
    try:
        server = Server.build_and_start(options)
    except ServingError as e:
        raise UserError(e.message) from None
    except ValueError as e:
        raise UserError(str(e)) from None
    for name, version in server.loaded.items():
        print(f"serving {name} version {version.version} from {version.path}", file=sys.stderr)
    where = options.bind_address
    print(f"gRPC{' (TLS)' if server.ssl else ''} on {where}:{server.grpc_port}, REST on {where}:{server.rest_port}"
          + (f", batching up to {server.batching.max_batch_size} rows" if server.batching else "")
          + (f", metrics at {server.metrics_path}" if server.metrics_path else ""), file=sys.stderr, flush=True)
    server.wait_for_termination()
    print("stopping: no new requests, finishing the ones in flight", file=sys.stderr, flush=True)
    drained = server.stop()
    print("stopped" + ("" if drained else f" (requests still running after {GRACE_SECONDS:.0f} s were cut)"),
          file=sys.stderr, flush=True)
    # Exit without Python's interpreter teardown: TensorFlow and gRPC threads may still be inside
    # native code (a request past the drain window), and finalizing modules under them crashed the
    # process (SIGSEGV) instead of exiting 0.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
