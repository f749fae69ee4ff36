"""`launch`: N local worker processes of one lmstack command, for multi-worker development.

Each worker gets a TF_CONFIG naming every worker on a free localhost port
(the same variable Kubeflow's TFJob sets on a cluster), so
`MultiWorkerMirroredStrategy` connects them. Their output is prefixed with
`[worker i]`; if one fails, the others are stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

from pipelines.errors import ConfigError, UserError


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free now (bound once and released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(workers: int) -> list[str]:
    """One TF_CONFIG per worker of a localhost cluster; worker 0 is the chief."""
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(workers)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(workers)]


def _pump(index: int, pipe, out: TextIO, lock: threading.Lock) -> None:
    for line in iter(pipe.readline, ""):
        with lock:
            out.write(f"[worker {index}] {line}")
            out.flush()
    pipe.close()


def launch(workers: int, argv: Sequence[str], out: TextIO = sys.stdout, grace_seconds: float = 10.0) -> int:
    """Runs `lmstack ARGV` in `workers` processes and waits for all of them.

    Returns:
        0 if every worker succeeded, else the first failing worker's exit status.
    Raises:
        UserError: fewer than 1 worker or no command.
    """
    if workers < 1:
        raise ConfigError("workers", workers, "must be at least 1")
    if not argv:
        raise UserError("no command to launch; write it after --, e.g. "
                        "`lmstack launch --workers=2 -- train --workdir=DIR --strategy=multi_worker`")
    lock = threading.Lock()
    procs, pumps = [], []
    for i, config in enumerate(tf_configs(workers)):
        env = dict(os.environ, TF_CONFIG=config, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "app", *argv], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(i, proc.stdout, out, lock), daemon=True)
        pump.start()
        pumps.append(pump)
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, status = failed[0]
                with lock:
                    out.write(f"[launch] worker {index} exited with status {status}; stopping the others\n")
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(procs, grace_seconds)
        for pump in pumps:
            pump.join(timeout=5)
    return status


def _stop(procs, grace_seconds: float) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
