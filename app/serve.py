"""Serve exported models over TensorFlow Serving's REST and gRPC APIs.

The flags are `tensorflow_model_server`'s: --port (gRPC), --rest_api_port,
and either --model_name with --model_base_path (a directory of integer
versions, as `lmstack export` writes them) or --model_config_file (the same
ModelServerConfig text file TensorFlow Serving reads: several models, version
policies latest/all/specific, version labels). New versions under a base path
load while the server runs (checked every --file_system_poll_wait_seconds),
after their warm-up requests, and old ones unload under the version policy.
Clients written for TensorFlow Serving work unchanged.

With --enable_batching, concurrent requests to one signature run as one
batch (--batching_parameters_file: the BatchingParameters text format);
--monitoring_config_file turns on Prometheus metrics on the REST port under
TensorFlow Serving's metric names. SIGTERM stops accepting requests and lets
the ones in flight finish.

example:
  lmstack serve --model_name=lm --model_base_path=runs/shakespeare/export/lm
  lmstack serve --model_config_file=deploy/serving/models.config --enable_batching \
      --batching_parameters_file=deploy/serving/batching_parameters.txt \
      --monitoring_config_file=deploy/serving/monitoring.config
  curl -d '{"inputs": {"prompt": ["ROMEO."], "max_new_tokens": [40]}}' localhost:8501/v1/models/lm:predict
"""

from __future__ import annotations

import signal
import sys
import threading

from absl import flags

from pipelines.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port)", flag_values=fv)
    flags.DEFINE_integer("rest_api_port", 8501, "REST port (0: any free port)", flag_values=fv)
    flags.DEFINE_string("model_name", "lm", "the name requests use", flag_values=fv)
    flags.DEFINE_string("model_base_path", "", "directory holding the model's version directories",
                        flag_values=fv)
    flags.DEFINE_string("model_config_file", "", "a ModelServerConfig text file (instead of --model_base_path)",
                        flag_values=fv)
    flags.DEFINE_integer("file_system_poll_wait_seconds", 1,
                         "seconds between checks for new versions (0: load once at start)", flag_values=fv)
    flags.DEFINE_integer("grpc_max_threads", 64, "threads answering gRPC requests (requests in flight at once)",
                         flag_values=fv)
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


def run(fv: flags.FlagValues) -> int:
    import logging

    from serving import batching as batching_lib
    from serving import server
    from serving.contract import ServingError

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    server.log.addHandler(handler)
    server.log.setLevel(logging.INFO)
    if bool(fv.model_base_path) == bool(fv.model_config_file):
        raise UserError("give either --model_base_path (with --model_name) or --model_config_file")
    if fv.batching_parameters_file and not fv.enable_batching:
        raise UserError("--batching_parameters_file needs --enable_batching")
    if fv.tensorflow_intra_op_parallelism < 0 or fv.tensorflow_inter_op_parallelism < 0:
        raise UserError("--tensorflow_intra_op_parallelism and --tensorflow_inter_op_parallelism take 0 "
                        "(TensorFlow's choice) or a number of threads")
    import tensorflow as tf

    # Before anything runs on TensorFlow's runtime, which makes its thread pools once.
    if fv.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(fv.tensorflow_intra_op_parallelism)
    if fv.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(fv.tensorflow_inter_op_parallelism)
    try:
        batching = None
        if fv.enable_batching:
            batching = (batching_lib.read_parameters(fv.batching_parameters_file) if fv.batching_parameters_file
                        else batching_lib.BatchingParameters())
        metrics_path = server.read_monitoring_config(fv.monitoring_config_file) if fv.monitoring_config_file else None
        if fv.model_config_file:
            served = server.models_from_config_file(fv.model_config_file)
        else:
            served = {fv.model_name: server.ServedModel(fv.model_name, fv.model_base_path)}
        loaded = {name: model.load_latest() for name, model in served.items()}
    except ServingError as e:
        raise UserError(e.message) from None
    core = server.ModelServer(served, batching=batching, metrics_path=metrics_path)
    core.refresh()
    core.start_polling(fv.file_system_poll_wait_seconds)
    try:
        grpc_server, grpc_port = server.start_grpc(core, fv.port, workers=fv.grpc_max_threads)
        rest_server, rest_port = server.start_rest(core, fv.rest_api_port)
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot listen: {e}; choose other --port/--rest_api_port") from None
    for name, version in loaded.items():
        print(f"serving {name} version {version.version} from {version.path}", file=sys.stderr)
    print(f"gRPC on port {grpc_port}, REST on port {rest_port}"
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
    rest_server.shutdown()  # stops accepting connections
    done = grpc_server.stop(grace=30)  # refuses new RPCs, lets running ones finish
    core.drain(timeout=30)
    done.wait()
    if core.batcher is not None:
        core.batcher.close()
    return 0
