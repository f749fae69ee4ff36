"""Training input through a tf.data service: `lmstack data-service` runs the servers, `train
--data_service` reads its batches from them."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipelines.launch import free_ports
from tests.helpers import ROOT, run_cli


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        assert process.poll() is None, process.stderr.read()
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


def test_training_reads_its_batches_from_a_data_service(tmp_path, corpus_file, capsys):
    (port,) = free_ports(1)
    service = subprocess.Popen([sys.executable, "-m", "app", "data-service", f"--port={port}", "--workers=1"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(port, service)
        run = tmp_path / "run"
        code, _, err = run_cli(capsys, "prepare", f"--corpus={corpus_file}", f"--workdir={run}")
        assert code == 0, err
        # The trainer has no input of its own: the steps end only if the service's worker delivers.
        code, out, err = run_cli(capsys, "train", f"--workdir={run}", "--preset=tiny", "--steps=6", "--batch_size=4",
                                 "--eval_every=0", "--progress=none", f"--data_service=grpc://localhost:{port}")
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["steps"] == 6
        assert f"tf.data service at grpc://localhost:{port}" in err
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0


@pytest.mark.parametrize("address, message", [
    ("http://localhost:5050", "expected grpc://HOST:PORT"),
    ("grpc://localhost", "expected grpc://HOST:PORT"),
    ("grpc://localhost:{free}", "no tf.data service dispatcher answers there"),
])
def test_a_data_service_that_is_not_there_is_one_line_before_training(tmp_path, corpus_file, capsys, address,
                                                                      message):
    run = tmp_path / "run"
    assert run_cli(capsys, "prepare", f"--corpus={corpus_file}", f"--workdir={run}")[0] == 0
    (free,) = free_ports(1)
    code, _, err = run_cli(capsys, "train", f"--workdir={run}", "--preset=tiny", "--steps=2",
                           f"--data_service={address.format(free=free)}")
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (run / "checkpoints").exists()
