"""Run a tf.data service: a dispatcher (with local workers) or a worker, for `train --data_service`.

When preparing batches, not the model, limits a training worker (many
workers per accelerator, slow storage), `lmstack train --data_service=
grpc://HOST:PORT` moves the input pipeline — reading the shards, cutting
windows, shuffling, batching — to the workers of a tf.data service, and the
trainer only receives batches. The servers run plain TensorFlow ops, so any
machine with this package (or TensorFlow alone) can be one.

example:
  lmstack data-service --port=5050 --workers=2          # a dispatcher and 2 workers (one machine)
  lmstack data-service --dispatcher_address=HOST:5050   # a worker on another machine
  lmstack train --workdir=gs://bucket/runs/x --data_service=grpc://HOST:5050
"""

from __future__ import annotations

import signal
import sys
import threading

from absl import flags


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("port", 5050, "this server's port (a worker: 0 picks a free one)", flag_values=fv)
    flags.DEFINE_string("dispatcher_address", "", "HOST:PORT of a running dispatcher: run a worker for it "
                        "(empty: run a dispatcher on --port)", flag_values=fv)
    flags.DEFINE_integer("workers", 1, "with a dispatcher: workers to run in the same process (0: none; "
                         "start them elsewhere with --dispatcher_address)", flag_values=fv)
    flags.DEFINE_string("worker_address", "", "a worker: the HOST:PORT other machines reach it at "
                        "(default: this host's name and its port)", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from app import cli
    from pipelines import data_service

    cli.import_tensorflow_quietly()
    if fv.dispatcher_address:
        servers = [data_service.worker(fv.dispatcher_address, fv.port, fv.worker_address)]
        print(f"tf.data service worker (port {fv.port or 'any free'}) of the dispatcher at {fv.dispatcher_address}",
              file=sys.stderr)
    else:
        servers = data_service.dispatcher(fv.port, fv.workers)
        print(f"tf.data service dispatcher at grpc://localhost:{fv.port} with {fv.workers} local worker(s); "
              f"train with --data_service=grpc://HOST:{fv.port}", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for server in reversed(servers):
        server.stop()
    return 0
