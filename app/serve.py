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
import signal
import sys
import threading

from absl import flags

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
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port)", flag_values=fv)
    flags.DEFINE_integer("rest_api_port", 8501, "REST port (0: any free port)", flag_values=fv)
    flags.DEFINE_integer("rest_api_num_threads", 0, "threads running REST requests (0: 4 per CPU, as TF Serving)",
                         flag_values=fv)
    flags.DEFINE_integer("rest_api_timeout_in_ms", 30000, "a REST request's deadline; its work stops there",
                         flag_values=fv)
    flags.DEFINE_string("model_name", "lm", "the name requests use", flag_values=fv)
    flags.DEFINE_string("model_base_path", "", "directory holding the model's version directories",
                        flag_values=fv)
    flags.DEFINE_string("model_config_file", "", "a ModelServerConfig text file (instead of --model_base_path)",
                        flag_values=fv)
    flags.DEFINE_integer("model_config_file_poll_wait_seconds", 0,
                         "seconds between re-reads of --model_config_file (0: read once)", flag_values=fv)
    flags.DEFINE_integer("file_system_poll_wait_seconds", 1,
                         "seconds between checks for new versions (0: load once at start)", flag_values=fv)
    flags.DEFINE_integer("max_num_load_retries", 5, "tries after a version's first failed load", flag_values=fv)
    flags.DEFINE_integer("load_retry_interval_micros", 60_000_000, "microseconds between load tries",
                         flag_values=fv)
    flags.DEFINE_integer("grpc_max_threads", 64, "threads answering gRPC requests (requests in flight at once)",
                         flag_values=fv)
    flags.DEFINE_string("grpc_channel_arguments", "", "gRPC server options: key=value,key=value", flag_values=fv)
    flags.DEFINE_bool("enable_grpc_healthcheck_service", False, "serve grpc.health.v1.Health", flag_values=fv)
    flags.DEFINE_string("ssl_config_file", "", "an SSLConfig text file: gRPC over TLS only (server_key, "
                        "server_cert, custom_ca, client_verify)", flag_values=fv)
    flags.DEFINE_integer("tensorflow_intra_op_parallelism", 0,
                         "threads one op may use (0: TensorFlow's choice, every core). A small model on few "
                         "cores serves more rows per second with 1", flag_values=fv)
    flags.DEFINE_integer("tensorflow_inter_op_parallelism", 0,
                         "ops run at once (0: TensorFlow's choice)", flag_values=fv)
    flags.DEFINE_bool("enable_batching", False, "merge concurrent requests into batches", flag_values=fv)
    flags.DEFINE_string("batching_parameters_file", "",
                        "BatchingParameters text file (max_batch_size, batch_timeout_micros, ...)", flag_values=fv)
    flags.DEFINE_string("monitoring_config_file", "",
                        "MonitoringConfig text file: prometheus_config { enable: true path: ... }", flag_values=fv)
    flags.DEFINE_bool("enable_model_warmup", True, "replay assets.extra/tf_serving_warmup_requests at load",
                      flag_values=fv)
    flags.DEFINE_string("saved_model_tags", "serve", "the SavedModel tags to load (lmstack exports: serve)",
                        flag_values=fv)
    flags.DEFINE_bool("enable_signature_method_name_check", False,
                      "Classify only signatures whose method name is tensorflow/serving/classify", flag_values=fv)
    flags.DEFINE_bool("xla_cpu_compilation_enabled", False,
                      "run the XLA-compiled signatures (the *_xla ones), compiling "
                      "their shape buckets at load; off, they fail (as on TensorFlow Serving)", flag_values=fv)
    flags.DEFINE_bool("xla_gpu_compilation_enabled", False, "XLA on GPUs and CPU: as --xla_cpu_compilation_enabled",
                      flag_values=fv)
    flags.DEFINE_bool("version", False, "print the version and exit", flag_values=fv)
    for name, (kind, default, why) in NO_EFFECT.items():
        define = {str: flags.DEFINE_string, bool: flags.DEFINE_bool, int: flags.DEFINE_integer}[kind]
        define(name, default, f"TensorFlow Serving's flag; no effect here ({why})", flag_values=fv)
    # lmstack extensions.
    flags.DEFINE_string("bind_address", "0.0.0.0", "(lmstack extension) the address both ports listen on: "
                        "127.0.0.1 for this host only; :: for every IPv6 and IPv4 interface", flag_values=fv)
    flags.DEFINE_list("model_config_roots", [], "(lmstack extension) directories HandleReloadConfigRequest may "
                      "load models from, besides the base paths the server started with; '*' allows any",
                      flag_values=fv)
    flags.DEFINE_integer("max_request_bytes", 64 << 20, "(lmstack extension) the largest REST body or gRPC message",
                         flag_values=fv)
    flags.DEFINE_integer("max_request_rows", 256, "(lmstack extension) rows of one request", flag_values=fv)
    flags.DEFINE_integer("max_tensor_elements", 1 << 20, "(lmstack extension) elements of one input tensor",
                         flag_values=fv)
    flags.DEFINE_integer("max_text_bytes", 1 << 16, "(lmstack extension) bytes of a request's strings together "
                         "(prompts, texts to score)", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens_limit", 2048, "(lmstack extension) the largest max_new_tokens a request "
                         "may ask for", flag_values=fv)


def _check(fv: flags.FlagValues) -> None:
    """The flag combinations that cannot start a server, each refused in one line."""
    if bool(fv.model_base_path) == bool(fv.model_config_file):
        raise UserError("give either --model_base_path (with --model_name) or --model_config_file")
    if fv.batching_parameters_file and not fv.enable_batching:
        raise UserError("--batching_parameters_file needs --enable_batching")
    if fv.tensorflow_intra_op_parallelism < 0 or fv.tensorflow_inter_op_parallelism < 0:
        raise UserError("--tensorflow_intra_op_parallelism and --tensorflow_inter_op_parallelism take 0 "
                        "(TensorFlow's choice) or a number of threads")
    if set(fv.saved_model_tags.split(",")) != {"serve"}:
        raise UserError(f"--saved_model_tags={fv.saved_model_tags}: lmstack serves the 'serve' tag set of "
                        "SavedModels (TensorFlow's loader with the exported signatures)")
    for name in ("port", "rest_api_port"):
        if not 0 <= fv[name].value <= 65535:
            raise UserError(f"--{name}={fv[name].value}: a port is 0 (any free one) to 65535")
    for name in ("rest_api_num_threads", "max_num_load_retries", "file_system_poll_wait_seconds",
                 "model_config_file_poll_wait_seconds"):
        if fv[name].value < 0:
            raise UserError(f"--{name}={fv[name].value}: must not be negative")
    if fv.grpc_max_threads < 1:
        raise UserError(f"--grpc_max_threads={fv.grpc_max_threads}: must be at least 1")
    if fv.model_config_file_poll_wait_seconds and not fv.model_config_file:
        raise UserError("--model_config_file_poll_wait_seconds needs --model_config_file")


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
    from serving import server
    from serving.contract import ServingError

    for name, (_, default, why) in NO_EFFECT.items():
        if fv[name].present and fv[name].value != default:
            print(f"lmstack serve: warning: --{name} has no effect here ({why})", file=sys.stderr)
    _check(fv)
    import tensorflow as tf

    # Before anything runs on TensorFlow's runtime, which makes its thread pools once.
    if fv.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(fv.tensorflow_intra_op_parallelism)
    if fv.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(fv.tensorflow_inter_op_parallelism)
    xla = fv.xla_cpu_compilation_enabled or fv.xla_gpu_compilation_enabled
    model_options = {"max_num_load_retries": fv.max_num_load_retries,
                     "load_retry_interval": max(0.0, fv.load_retry_interval_micros / 1e6),
                     "warmup": fv.enable_model_warmup, "xla": xla}
    try:
        from serving.server import grpc_api

        limits = server.Limits(max_request_bytes=fv.max_request_bytes, max_request_rows=fv.max_request_rows,
                               max_tensor_elements=fv.max_tensor_elements, max_text_bytes=fv.max_text_bytes,
                               max_new_tokens=fv.max_new_tokens_limit)
        channel_arguments = grpc_api.parse_channel_arguments(fv.grpc_channel_arguments)
        batching = None
        if fv.enable_batching:
            from serving.batching import BatchingParameters

            batching = (server.read_batching_parameters(fv.batching_parameters_file)
                        if fv.batching_parameters_file else BatchingParameters())
        metrics_path = server.read_monitoring_config(fv.monitoring_config_file) if fv.monitoring_config_file else None
        ssl = server.read_ssl_config(fv.ssl_config_file) if fv.ssl_config_file else None
        if fv.model_config_file:
            served = server.models_from_config_file(fv.model_config_file, **model_options)
        else:
            served = {fv.model_name: server.ServedModel(fv.model_name, fv.model_base_path, **model_options)}
        loaded = {name: model.load_latest() for name, model in served.items()}
    except ServingError as e:
        raise UserError(e.message) from None
    except ValueError as e:
        raise UserError(str(e)) from None
    roots = None if "*" in fv.model_config_roots else fv.model_config_roots
    core = server.ModelServer(served, batching=batching, metrics_path=metrics_path, limits=limits,
                              model_roots=roots, method_name_check=fv.enable_signature_method_name_check, xla=xla)
    core.refresh()
    core.start_polling(fv.file_system_poll_wait_seconds, fv.model_config_file or None,
                       fv.model_config_file_poll_wait_seconds,
                       lambda path: server.models_from_config_file(path, **model_options))
    try:
        grpc_server, grpc_port = server.start_grpc(
            core, fv.port, workers=fv.grpc_max_threads, host=fv.bind_address, ssl=ssl,
            health=fv.enable_grpc_healthcheck_service, channel_arguments=channel_arguments)
        rest_server, rest_port = server.start_rest(
            core, fv.rest_api_port, host=fv.bind_address, threads=fv.rest_api_num_threads or 4 * (os.cpu_count() or 1),
            timeout=fv.rest_api_timeout_in_ms / 1000 if fv.rest_api_timeout_in_ms > 0 else None)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot listen: {e}; choose other --port/--rest_api_port/--bind_address") from None
    for name, version in loaded.items():
        print(f"serving {name} version {version.version} from {version.path}", file=sys.stderr)
    print(f"gRPC{' (TLS)' if ssl else ''} on {fv.bind_address}:{grpc_port}, REST on {fv.bind_address}:{rest_port}"
          + (f", batching up to {batching.max_batch_size} rows" if batching else "")
          + (f", metrics at {metrics_path}" if metrics_path else ""), file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Python runs a signal handler in the main thread, between bytecodes. The kernel may deliver
    # SIGTERM to any of the gRPC or TensorFlow threads, which leaves an untimed wait here asleep
    # (seen once in CI: SIGTERM ignored for 60 s). Waking every half second lets the handler run.
    while not stop.wait(timeout=0.5):
        pass
    print("stopping: no new requests, finishing the ones in flight", file=sys.stderr, flush=True)
    core.stop_polling()
    if core.health is not None:
        core.health.enter_graceful_shutdown()
    rest_server.stop_accepting()
    done = grpc_server.stop(grace=30)  # refuses new RPCs, lets running ones finish
    drained = core.drain(timeout=30)
    rest_server.shutdown()
    done.wait()
    if core.batcher is not None:
        core.batcher.close()
    print("stopped" + ("" if drained else " (requests still running after 30 s were cut)"), file=sys.stderr,
          flush=True)
    # Exit without Python's interpreter teardown: TensorFlow and gRPC threads may still be inside
    # native code (a request past the drain window), and finalizing modules under them crashed the
    # process (SIGSEGV) instead of exiting 0.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
