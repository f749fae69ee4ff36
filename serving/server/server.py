"""`tensorflow_model_server` as one object: its options, `build_and_start` and `wait_for_termination`.

TensorFlow Serving's `model_servers/server.cc` has this shape: `Server::Options` holds every flag,
`BuildAndStart(options)` reads the config files, loads the models and starts the gRPC and REST
servers, and `WaitForTermination()` blocks until the process is told to stop. `lmstack serve` makes
its flags from `Options` and calls these two; tests start servers the same way.

    server = Server.build_and_start(Options(model_name="lm", model_base_path="runs/x/export/lm", port=0))
    ...  # server.grpc_port, server.rest_port, server.core
    server.stop()
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
from typing import Any

from serving.server.batching import BatchingParameters
from serving.server import grpc_api, openai_api, rest_api, scheduler
from serving.server.config import (SSLConfig, models_from_config_file, read_batching_parameters,
                                   read_monitoring_config, read_ssl_config)
from serving.server.core import Limits, ModelServer
from serving.server.metrics import Registry
from serving.server.request_log import LogOptions
from serving.server.scheduler import SchedulerOptions
from serving.server.versions import LoadedVersion, ServedModel

# How long requests in flight may run on after a stop before they are cut (TF Serving's gRPC grace).
GRACE_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a server starts with. The names, meanings and defaults are `tensorflow_model_server`'s
    flags, so errors name them as flags; the fields after `xla_gpu_compilation_enabled` are lmstack's own.

    Attributes:
        port: gRPC port (0: any free port).
        rest_api_port: REST port (0: any free port).
        rest_api_num_threads: threads running REST requests (0: 4 per CPU, as TF Serving).
        rest_api_timeout_in_ms: a REST request's deadline; its work stops there (0: none).
        model_name: the name requests use.
        model_base_path: directory holding the model's version directories.
        model_config_file: a ModelServerConfig text file (instead of model_base_path).
        model_config_file_poll_wait_seconds: seconds between re-reads of model_config_file (0: read once).
        file_system_poll_wait_seconds: seconds between checks for new versions (0: load once at start).
        max_num_load_retries: tries after a version's first failed load.
        load_retry_interval_micros: microseconds between load tries.
        grpc_max_threads: threads answering gRPC requests (requests in flight at once).
        grpc_channel_arguments: gRPC server options: key=value,key=value.
        enable_grpc_healthcheck_service: serve grpc.health.v1.Health.
        ssl_config_file: an SSLConfig text file: gRPC over TLS only (server_key, server_cert, custom_ca,
            client_verify).
        tensorflow_intra_op_parallelism: threads one op may use (0: TensorFlow's choice, every core). A small
            model on few cores serves more rows per second with 1.
        tensorflow_inter_op_parallelism: ops run at once (0: TensorFlow's choice).
        enable_batching: merge concurrent requests into batches.
        batching_parameters_file: BatchingParameters text file (max_batch_size, batch_timeout_micros, ...).
        monitoring_config_file: MonitoringConfig text file: prometheus_config { enable: true path: ... }.
        enable_model_warmup: replay assets.extra/tf_serving_warmup_requests at load.
        saved_model_tags: the SavedModel tags to load (lmstack exports: serve).
        enable_signature_method_name_check: Classify only signatures whose method name is
            tensorflow/serving/classify.
        xla_cpu_compilation_enabled: run the XLA-compiled signatures (the *_xla ones), compiling their shape
            buckets at load; off, they fail (as on TensorFlow Serving).
        xla_gpu_compilation_enabled: XLA on GPUs and CPU: as xla_cpu_compilation_enabled.
        bind_address: (lmstack extension) the address both ports listen on: 127.0.0.1 for this host only;
            :: for every IPv6 and IPv4 interface.
        model_config_roots: (lmstack extension) directories HandleReloadConfigRequest may load models from,
            besides the base paths the server started with; '*' allows any.
        max_request_bytes: (lmstack extension) the largest REST body or gRPC message.
        max_request_rows: (lmstack extension) rows of one request.
        max_tensor_elements: (lmstack extension) elements of one input tensor.
        max_text_bytes: (lmstack extension) bytes of a request's strings together (prompts, texts to score).
        max_new_tokens_limit: (lmstack extension) the largest max_new_tokens a request may ask for.
        continuous_batching: (lmstack extension) schedule generation step by step over a pool of cache
            slots (generate, serving_default, their _xla twins and streams; exports with the step
            signatures); off, each request runs call by call, batched as TF Serving batches.
        generation_slots: (lmstack extension) sequences decoded at once (0: as many as 1 GiB of caches
            holds, at most 32 and the export's largest compiled batch).
        generation_steps_per_call: (lmstack extension) decoding steps per call at a batch of 16 or more,
            before finished sequences leave and waiting ones join (1-64; smaller batches run
            proportionally more steps, up to 64).
        generation_max_waiting: (lmstack extension) sequences that may wait for a slot; past it a request
            fails with RESOURCE_EXHAUSTED (0: 8 per slot).
        openai_api_port: (lmstack extension) serve the OpenAI-compatible API (/v1/models,
            /v1/completions, /v1/chat/completions) on this port (0: off).
        openai_api_keys_file: (lmstack extension) API keys, one a line (re-read when it changes): an
            OpenAI request without `Authorization: Bearer KEY` is refused (401). Without it the API is
            open, as the TF Serving ports are.
        request_log_max_file_bytes: (lmstack extension) request logs (a model's logging_config) start a
            new file past this size...
        request_log_max_file_seconds: (lmstack extension) ... or this age.
        request_log_max_total_bytes: (lmstack extension) the request log files under one prefix
            together; the oldest are deleted to stay within it.
        request_log_max_queued: (lmstack extension) records waiting to be written; past it new ones are
            dropped (and counted), so slow storage never holds a request.
        request_log_seed: (lmstack extension) seeds which requests are sampled (0: a random seed).
    """
    port: int = 8500
    rest_api_port: int = 8501
    rest_api_num_threads: int = 0
    rest_api_timeout_in_ms: int = 30000
    model_name: str = "lm"
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: int = 0
    file_system_poll_wait_seconds: int = 1
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    grpc_max_threads: int = 64
    grpc_channel_arguments: str = ""
    enable_grpc_healthcheck_service: bool = False
    ssl_config_file: str = ""
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    enable_batching: bool = False
    batching_parameters_file: str = ""
    monitoring_config_file: str = ""
    enable_model_warmup: bool = True
    saved_model_tags: str = "serve"
    enable_signature_method_name_check: bool = False
    xla_cpu_compilation_enabled: bool = False
    xla_gpu_compilation_enabled: bool = False
    bind_address: str = "0.0.0.0"
    model_config_roots: tuple[str, ...] = ()
    max_request_bytes: int = Limits.max_request_bytes
    max_request_rows: int = Limits.max_request_rows
    max_tensor_elements: int = Limits.max_tensor_elements
    max_text_bytes: int = Limits.max_text_bytes
    max_new_tokens_limit: int = Limits.max_new_tokens
    continuous_batching: bool = True
    generation_slots: int = SchedulerOptions.slots
    generation_steps_per_call: int = SchedulerOptions.steps_per_call
    generation_max_waiting: int = SchedulerOptions.max_waiting
    openai_api_port: int = 0
    openai_api_keys_file: str = ""
    request_log_max_file_bytes: int = LogOptions.max_file_bytes
    request_log_max_file_seconds: int = int(LogOptions.max_file_seconds)
    request_log_max_total_bytes: int = LogOptions.max_total_bytes
    request_log_max_queued: int = LogOptions.max_queued
    request_log_seed: int = LogOptions.seed

    def validate(self) -> None:
        """Raises ValueError for the settings that cannot start a server, one line each."""
        if bool(self.model_base_path) == bool(self.model_config_file):
            raise ValueError("give either --model_base_path (with --model_name) or --model_config_file")
        if self.batching_parameters_file and not self.enable_batching:
            raise ValueError("--batching_parameters_file needs --enable_batching")
        if self.tensorflow_intra_op_parallelism < 0 or self.tensorflow_inter_op_parallelism < 0:
            raise ValueError("--tensorflow_intra_op_parallelism and --tensorflow_inter_op_parallelism take 0 "
                             "(TensorFlow's choice) or a number of threads")
        if set(self.saved_model_tags.split(",")) != {"serve"}:
            raise ValueError(f"--saved_model_tags={self.saved_model_tags}: lmstack serves the 'serve' tag set of "
                             "SavedModels (TensorFlow's loader with the exported signatures)")
        if self.openai_api_keys_file and not self.openai_api_port:
            raise ValueError("--openai_api_keys_file needs --openai_api_port")
        if self.openai_api_keys_file and not os.path.isfile(self.openai_api_keys_file):
            raise ValueError(f"--openai_api_keys_file={self.openai_api_keys_file}: no such file (one API key a line)")
        for name in ("port", "rest_api_port", "openai_api_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"--{name}={getattr(self, name)}: a port is 0 (any free one) to 65535")
        for name in ("rest_api_num_threads", "max_num_load_retries", "file_system_poll_wait_seconds",
                     "model_config_file_poll_wait_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)}: must not be negative")
        if self.grpc_max_threads < 1:
            raise ValueError(f"--grpc_max_threads={self.grpc_max_threads}: must be at least 1")
        if self.model_config_file_poll_wait_seconds and not self.model_config_file:
            raise ValueError("--model_config_file_poll_wait_seconds needs --model_config_file")
        self.limits()
        self.scheduling()
        self.request_log()

    @property
    def xla(self) -> bool:
        return self.xla_cpu_compilation_enabled or self.xla_gpu_compilation_enabled

    def scheduling(self) -> SchedulerOptions:
        """The step scheduler's options (ValueError on a bad one)."""
        return SchedulerOptions(slots=self.generation_slots, steps_per_call=self.generation_steps_per_call,
                                max_waiting=self.generation_max_waiting)

    def request_log(self) -> LogOptions:
        """How request logs are written (ValueError on a bad setting)."""
        return LogOptions(max_file_bytes=self.request_log_max_file_bytes,
                          max_file_seconds=self.request_log_max_file_seconds,
                          max_total_bytes=self.request_log_max_total_bytes,
                          max_queued=self.request_log_max_queued, seed=self.request_log_seed)

    def limits(self) -> Limits:
        """The per-request limits (ValueError on one below 1)."""
        return Limits(max_request_bytes=self.max_request_bytes, max_request_rows=self.max_request_rows,
                      max_tensor_elements=self.max_tensor_elements, max_text_bytes=self.max_text_bytes,
                      max_new_tokens=self.max_new_tokens_limit)


class Server:
    """A started server: the protocol-free core and its gRPC and REST front ends (`build_and_start`).

    Attributes:
        options: what it started with.
        core: the protocol-free server (models, batching, metrics, limits).
        loaded: model name -> the version serving when it started.
        grpc_port, rest_port: the ports it listens on (the free ones picked for a 0).
        openai_port: the OpenAI-compatible API's port (0: not served).
        batching: the batching parameters, or None without batching.
        metrics_path: the REST path of the Prometheus page, or None.
        ssl: the gRPC TLS settings, or None.
    """

    def __init__(self, options: Options, core: ModelServer, loaded: dict[str, LoadedVersion],
                 batching: BatchingParameters | None, metrics_path: str | None, ssl: SSLConfig | None):
        self.options, self.core, self.loaded = options, core, loaded
        self.batching, self.metrics_path, self.ssl = batching, metrics_path, ssl
        self.grpc_port = self.rest_port = self.openai_port = 0
        self._grpc: Any = None
        self._rest: rest_api.RestServer | None = None
        self._openai: rest_api.RestServer | None = None

    @classmethod
    def build_and_start(cls, options: Options) -> Server:
        """Reads the config files, loads each model's newest version, starts polling for new versions
        and config changes, and starts gRPC and REST.

        Raises:
            ValueError: settings or a config file that cannot start a server; a port it cannot listen on.
            ServingError: a model with no loadable version, a base path that cannot be read.
        """
        options.validate()
        import tensorflow as tf

        # Before anything runs on TensorFlow's runtime, which makes its thread pools once.
        if options.tensorflow_intra_op_parallelism:
            tf.config.threading.set_intra_op_parallelism_threads(options.tensorflow_intra_op_parallelism)
        if options.tensorflow_inter_op_parallelism:
            tf.config.threading.set_inter_op_parallelism_threads(options.tensorflow_inter_op_parallelism)
        metrics = Registry()  # the core's, and the step schedulers' it makes
        model_options = {"max_num_load_retries": options.max_num_load_retries,
                         "load_retry_interval": max(0.0, options.load_retry_interval_micros / 1e6),
                         "warmup": options.enable_model_warmup, "xla": options.xla}
        if options.continuous_batching:
            model_options["scheduler"] = functools.partial(
                scheduler.for_version, options=options.scheduling(), xla=options.xla, metrics=metrics,
                warm_up=options.enable_model_warmup)
        batching = None
        if options.enable_batching:
            batching = (read_batching_parameters(options.batching_parameters_file)
                        if options.batching_parameters_file else BatchingParameters())
        metrics_path = read_monitoring_config(options.monitoring_config_file) if options.monitoring_config_file \
            else None
        ssl = read_ssl_config(options.ssl_config_file) if options.ssl_config_file else None
        channel_arguments = grpc_api.parse_channel_arguments(options.grpc_channel_arguments)
        if options.model_config_file:
            served = models_from_config_file(options.model_config_file, **model_options)
        else:
            served = {options.model_name: ServedModel(options.model_name, options.model_base_path, **model_options)}
        loaded = {name: model.load_latest() for name, model in served.items()}
        roots = None if "*" in options.model_config_roots else options.model_config_roots
        core = ModelServer(served, batching=batching, metrics=metrics, metrics_path=metrics_path,
                           limits=options.limits(), model_roots=roots,
                           method_name_check=options.enable_signature_method_name_check, xla=options.xla,
                           request_log=options.request_log())
        core.model_options = model_options
        server = cls(options, core, loaded, batching, metrics_path, ssl)
        core.refresh()
        core.start_polling(options.file_system_poll_wait_seconds, options.model_config_file or None,
                           options.model_config_file_poll_wait_seconds,
                           lambda path: models_from_config_file(path, **model_options))
        try:
            server._grpc, server.grpc_port = grpc_api.start_grpc(
                core, options.port, workers=options.grpc_max_threads, host=options.bind_address, ssl=ssl,
                health=options.enable_grpc_healthcheck_service, channel_arguments=channel_arguments)
            timeout = options.rest_api_timeout_in_ms / 1000 if options.rest_api_timeout_in_ms > 0 else None
            threads = options.rest_api_num_threads or 4 * (os.cpu_count() or 1)
            server._rest, server.rest_port = rest_api.start_rest(
                core, options.rest_api_port, host=options.bind_address, timeout=timeout, threads=threads)
            if options.openai_api_port:
                keys = openai_api.Keys(options.openai_api_keys_file) if options.openai_api_keys_file else None
                server._openai = rest_api.RestServer(
                    core, options.openai_api_port, host=options.bind_address, threads=threads,
                    app=openai_api.OpenAiApi(core, timeout, keys), error_body=openai_api.framing_error)
                server.openai_port = server._openai.port
        except (OSError, RuntimeError, ValueError) as e:
            server.stop(grace=0)
            raise ValueError(f"cannot listen: {e}; choose other --port/--rest_api_port/--openai_api_port/"
                             "--bind_address") from None
        return server

    def wait_for_termination(self) -> None:
        """Blocks until the process gets SIGINT or SIGTERM (then `stop` it). Call it from the main thread."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        # Python runs a signal handler in the main thread, between bytecodes. The kernel may deliver
        # SIGTERM to any of the gRPC or TensorFlow threads, which leaves an untimed wait here asleep
        # (SIGTERM ignored for 60 s). Waking every half second lets the handler run.
        while not stop.wait(timeout=0.5):
            pass

    def stop(self, grace: float = GRACE_SECONDS) -> bool:
        """Stops accepting requests, lets the ones in flight finish for up to `grace` seconds, then
        closes everything.

        Returns:
            True when every request in flight finished in time.
        """
        core = self.core
        core.stop_polling()
        if core.health is not None:
            core.health.enter_graceful_shutdown()
        for http in (self._rest, self._openai):
            if http is not None:
                http.stop_accepting()
        done = self._grpc.stop(grace=grace) if self._grpc is not None else None  # refuses new RPCs
        drained = core.drain(timeout=grace)
        for http in (self._rest, self._openai):
            if http is not None:
                http.shutdown()
        if done is not None:
            done.wait()
        if core.batcher is not None:
            core.batcher.close()
        for model in core.models.values():
            for loaded in model.versions.values():
                if loaded.scheduler is not None:
                    loaded.scheduler.close()
        core.request_logs.close()  # after the last request: its record is written
        return drained
