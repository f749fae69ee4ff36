"""tf.data service: its servers (`lmstack data-service`) and the training input read through one.

The training input (`dataset.train_dataset`) is built as usual, then handed
to the service: its workers run the pipeline (read shards, cut windows,
shuffle, batch) and the trainer receives batches. Every process of one
training run (the workers of a multi-worker job) consumes from one shared
job, named after the run, so each batch goes to one of them; the service's
workers each run the whole (repeated, shuffled) pipeline — TensorFlow's
`parallel_epochs` mode, which needs nothing of the pipeline's source.
"""

from __future__ import annotations

import socket
import urllib.parse

import tensorflow as tf

from pipelines.errors import ConfigError

service = tf.data.experimental.service


def dispatcher(port: int, workers: int = 0) -> list:
    """A dispatcher on `port` and `workers` workers in this process; returns the servers (dispatcher first)."""
    servers = [service.DispatchServer(service.DispatcherConfig(port=port))]
    servers += [worker(f"localhost:{port}", 0, "localhost:%port%") for _ in range(workers)]
    return servers


def worker(dispatcher_address: str, port: int = 0, worker_address: str = ""):
    """A worker registered with the dispatcher; `worker_address` is where trainers reach it
    (default: this host's name and the bound port)."""
    return service.WorkerServer(service.WorkerConfig(
        dispatcher_address=dispatcher_address, port=port,
        worker_address=worker_address or f"{socket.gethostname()}:%port%"))


def check_address(address: str, timeout: float = 10.0) -> str:
    """`grpc://HOST:PORT` of a dispatcher that answers.

    Raises:
        ConfigError: not an address, or nothing listens there (training would wait forever).
    """
    parsed = urllib.parse.urlsplit(address if "://" in address else f"grpc://{address}")
    if parsed.scheme != "grpc" or not parsed.hostname or not parsed.port:
        raise ConfigError("data_service", address, "expected grpc://HOST:PORT of a tf.data service dispatcher")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError("data_service", address, f"no tf.data service dispatcher answers there "
                          f"({e.strerror or e}); start one with `lmstack data-service --port=PORT`") from None
    return f"grpc://{parsed.hostname}:{parsed.port}"


def distribute(ds: tf.data.Dataset, address: str, job_name: str) -> tf.data.Dataset:
    """`ds` produced by the service's workers, consumed in the shared job `job_name`."""
    ds = ds.apply(service.distribute(processing_mode=service.ShardingPolicy.OFF, service=address,
                                     job_name=job_name))
    options = tf.data.Options()
    # The service hands each consumer other batches: the strategy must not shard them again by file.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)
