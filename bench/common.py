"""What several benchmarks share: an exported model of the bundled corpus, `lmstack serve` in a subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "shakespeare.txt.gz"


def untrained_export(root: pathlib.Path, family: str, preset: str,
                     export_base: str = "", never_eos: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
    """Prepares the bundled corpus (char tokenizer) in ROOT/FAMILY, saves an untrained PRESET
    model as its checkpoint and exports it. Latency does not depend on the weights.

    `never_eos`: greedy decoding never picks [EOS] (its logit is held at 0, or -10 through an
    untied bias, while the others spread around 0), so every request makes all the tokens it
    asks for, whatever the random initialization: a load of fixed lengths.

    Returns:
        (the workdir, the exported version directory).
    """
    import tensorflow as tf

    import models
    from pipelines import checkpoints, prepare, tokenizers
    from serving.exporters import savedmodel

    workdir = root / family
    prepare.prepare(prepare.PrepareConfig(corpus=(str(CORPUS),), tokenizer=tokenizers.TokenizerConfig("char")),
                    workdir)
    vocab = json.loads((workdir / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    config = models.make_config(family, preset, vocab)
    model = models.build(config)
    if never_eos:
        table = model.get_layer("token_embedding").embeddings
        table.assign(tf.tensor_scatter_nd_update(table, [[tokenizers.EOS_ID]], tf.zeros([1, table.shape[1]])))
        logits = model.get_layer("logits")
        if logits.weights and len(logits.weights) == 2:  # an untied Dense: kernel and bias
            kernel, bias = logits.weights
            columns = tf.tensor_scatter_nd_update(tf.transpose(kernel), [[tokenizers.EOS_ID]],
                                                  tf.zeros([1, kernel.shape[0]]))
            kernel.assign(tf.transpose(columns))
            bias.assign(tf.tensor_scatter_nd_update(bias, [[tokenizers.EOS_ID]], [-10.0]))
    checkpoints.save(workdir, model, config, step=1)
    return workdir, savedmodel.export(workdir, savedmodel.ExportConfig(export_base=export_base))


def measured_lmstack(*argv: str) -> dict:
    """Runs one `lmstack` command as its own process: its wall seconds, its own peak resident MB
    (`os.wait4`'s rusage: no other process counted) and its last stdout line (parsed if JSON).

    Raises:
        SystemExit: the command failed (with the end of its stderr).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        began = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "app", *argv], cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - began
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"lmstack {' '.join(argv)} failed:\n{err.read()[-3000:]}")
        out.seek(0)
        lines = out.read().strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {"output": lines[-1]}
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "result": result}  # ru_maxrss: KB on Linux


class Server:
    """`lmstack serve` in a subprocess, ready once its status answers.

    Args:
        flags: `lmstack serve` flags besides the ports.
        log: a file for the server's stderr (its load and warm-up lines), or None to drop it.
    """

    def __init__(self, *flags: str, log: pathlib.Path | None = None, timeout: float = 600):
        from pipelines.launch import free_ports
        from serving import client
        from serving.contract import ServingError

        self.grpc, self.rest = free_ports(2)
        self.started = time.perf_counter()
        self._log = open(log, "w") if log else subprocess.DEVNULL  # closed in stop
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", f"--port={self.grpc}", f"--rest_api_port={self.rest}",
             "--file_system_poll_wait_seconds=0", *flags],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log)
        status = client.connect(self.target("grpc"), "grpc", retries=0).status
        while True:  # polled every 0.2 s: the time to ready is a figure some benchmarks report
            try:
                status()
                break
            except ServingError:
                if self.process.poll() is not None or time.perf_counter() - self.started > timeout:
                    raise RuntimeError(f"lmstack serve {' '.join(flags)} did not start") from None
                time.sleep(0.2)
        self.ready_seconds = time.perf_counter() - self.started

    def target(self, protocol: str) -> str:
        return f"127.0.0.1:{self.grpc if protocol == 'grpc' else self.rest}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
