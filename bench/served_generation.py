"""Served generation speed: `lmstack serve` (REST) against generation in-process, new tokens/s.

For the transformer and the LSTM at the `small` preset (char tokenizer on the
bundled corpus; untrained weights: speed does not depend on them), greedy,
batch 1 and 8,
the prompt "ROMEO.\\nWhat light through yonder window breaks?" (47 tokens):

- `served xla`: `lmstack serve --xla_cpu_compilation_enabled` in a subprocess,
  the `serving_default_xla` signature over REST with lmstack's client (JSON
  encoding and HTTP included: what a client of the server meets);
- `served`: the same server, the uncompiled `serving_default` (what a server
  without XLA runs);
- `served stream` (batch 1): the same server's streaming extension over REST
  (`:stream`, server-sent events; chunks through `generate_chunk_xla`), read
  to the end; its time to the first token is reported too;
- `lmstack in-process`: lmstack's own loop on the same weights in this process
  (`models.decoding.generate`, XLA-compiled);
- `keras-hub compiled` (transformer): keras-hub's `GPT2CausalLM.generate` on a
  GPT-2 of the same shape, `jit_compile=True` (keras-hub's own default leaves
  it uncompiled on this backend), in this process.

Each is timed at 16 and 80 new tokens and the rate is differenced,
(tokens(80) - tokens(16)) / (t(80) - t(16)), so fixed costs (request, tokenizing, prefill)
cancel: the rate of the decoding loop as each runs it. (Untrained weights
may choose [EOS] before the end: the served rows count the tokens each
answer holds, so the difference is over the tokens actually made.) Methods alternate
within a round; the table shows the median over `--rounds` rounds of each
round's differenced rate. The server's load time (every shape bucket
compiled from the warm-up requests) and its first request after loading
are reported too.

Prints a table and writes bench/results/served_generation.json.

usage: python bench/served_generation.py [--rounds=5]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
PROMPT = "ROMEO.\nWhat light through yonder window breaks?"
SHORT, LONG = 16, 80  # prompt 47 + 80 = 127: inside the small transformer's context of 128
BATCHES = (1, 8)


def timed(fn) -> tuple[float, int]:
    """(seconds, new tokens made) of one call."""
    start = time.perf_counter()
    made = fn()
    return time.perf_counter() - start, made


def served_runner(client, signature: str, batch: int, new: int):
    from serving import contract as c

    inputs = {c.PROMPT: [PROMPT] * batch, c.MAX_NEW_TOKENS: [new] * batch}

    def run():
        out = client.predict(signature, inputs)
        return sum(1 for row in out[c.TOKEN_IDS] for t in row if t)
    return run


def stream_runner(client, new: int):
    from serving import contract as c

    def run():
        chunks = client._stream({c.PROMPT: PROMPT, c.MAX_NEW_TOKENS: new})
        return sum(len(chunk.get("token_ids", ())) for chunk in chunks)
    return run


def first_token_seconds(client) -> float:
    from serving import contract as c

    start = time.perf_counter()
    chunks = client._stream({c.PROMPT: PROMPT, c.MAX_NEW_TOKENS: LONG})
    next(chunks)
    elapsed = time.perf_counter() - start
    chunks.close()
    return elapsed


def in_process_runner(generator, batch: int, new: int):
    from models import samplers

    ids = [generator.prompt_ids(PROMPT)] * batch
    sampler = samplers.SamplerConfig()
    return lambda: sum(map(len, generator.generator.generate(ids, new, sampler)))  # no stop token


def keras_hub_runner(vocab: int, prompt_ids: list[int], batch: int, new: int, built: dict):
    import keras_hub

    import models

    if "lm" not in built:
        c = models.make_config("transformer", "small", vocab_size=vocab)
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=vocab, num_layers=c.layers, num_heads=c.heads, hidden_dim=c.d_model,
            intermediate_dim=c.mlp_ratio * c.d_model, dropout=0.0, max_sequence_length=c.seq_len)
        built["lm"] = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        built["lm"].compile(sampler="greedy", jit_compile=True)
    lm = built["lm"]
    length = len(prompt_ids) + new
    padded = np.zeros([batch, length], np.int32)
    padded[:, :len(prompt_ids)] = prompt_ids
    mask = np.zeros_like(padded, bool)
    mask[:, :len(prompt_ids)] = True
    def run():
        lm.generate({"token_ids": padded, "padding_mask": mask}, stop_token_ids=None)
        return batch * new  # no stop token: every position
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import app  # noqa: F401
    import tensorflow as tf

    from bench.common import Server, untrained_export
    from pipelines.generate import TextGenerator
    from serving import client as client_lib
    from serving import contract as c

    root = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-served-generation-"))
    rows, loads = [], {}
    for family in ("transformer", "lstm"):
        workdir, version = untrained_export(root, family, "small")
        log = root / f"serve-{family}.log"
        server = Server(f"--model_base_path={version.parent}", "--xla_cpu_compilation_enabled", log=log)
        try:
            client = client_lib.connect(server.target("rest"), "rest", timeout=600)
            first, _ = timed(served_runner(client, c.SERVING_DEFAULT_XLA, 1, SHORT))
            loaded = re.search(r"loaded from .* in ([0-9.]+) s \(([0-9]+) warm-up requests\)", log.read_text())
            loads[family] = {"ready_seconds": round(server.ready_seconds, 1),
                             "load_seconds": float(loaded[1]) if loaded else None,
                             "warmup_requests": int(loaded[2]) if loaded else None,
                             "first_request_seconds": round(first, 3)}
            print(f"{family}: server ready in {server.ready_seconds:.0f} s, first request {first * 1000:.0f} ms",
                  file=sys.stderr)
            generator = TextGenerator(workdir)
            prompt_ids = generator.prompt_ids(PROMPT)
            built: dict = {}
            runners = {}
            for batch in BATCHES:
                for new in (SHORT, LONG):
                    runners[("served xla", batch, new)] = served_runner(client, c.SERVING_DEFAULT_XLA, batch, new)
                    runners[("served", batch, new)] = served_runner(client, c.SERVING_DEFAULT, batch, new)
                    runners[("lmstack in-process", batch, new)] = in_process_runner(generator, batch, new)
                    if batch == 1:
                        runners[("served stream", batch, new)] = stream_runner(client, new)
                    if family == "transformer":
                        runners[("keras-hub compiled", batch, new)] = keras_hub_runner(
                            generator.tokenizer.vocabulary_size(), prompt_ids, batch, new, built)
            for fn in runners.values():  # trace and compile outside the timings
                fn()
            rates: dict[tuple, list[float]] = {}
            ttft = []
            for r in range(args.rounds):
                seconds = {key: timed(fn) for key, fn in runners.items()}
                ttft.append(first_token_seconds(client))
                for (method, batch, new), (t_long, made_long) in seconds.items():
                    if new == LONG:
                        t_short, made_short = seconds[(method, batch, SHORT)]
                        rates.setdefault((method, batch), []).append((made_long - made_short) / (t_long - t_short))
                print(f"{family}: round {r + 1}/{args.rounds} done", file=sys.stderr)
            loads[family]["stream_first_token_ms"] = round(statistics.median(ttft) * 1000, 1)
        finally:
            server.stop()
        for (method, batch), values in rates.items():
            rows.append({"model": family, "method": method, "batch": batch,
                         "new_tokens_per_s": round(statistics.median(values), 1),
                         "rounds": [round(v, 1) for v in values]})

    def rate(family, method, batch):
        return next((r["new_tokens_per_s"] for r in rows
                     if (r["model"], r["method"], r["batch"]) == (family, method, batch)), None)

    for row in rows:
        own = rate(row["model"], "lmstack in-process", row["batch"])
        hub = rate(row["model"], "keras-hub compiled", row["batch"])
        row["vs_in_process"] = round(row["new_tokens_per_s"] / own, 2)
        row["vs_keras_hub"] = round(row["new_tokens_per_s"] / hub, 2) if hub else None
    targets = []
    for batch in BATCHES:
        served = rate("transformer", "served xla", batch)
        targets.append({"target": f"transformer batch {batch}: served xla >= keras-hub compiled",
                        "value": round(served / rate("transformer", "keras-hub compiled", batch), 2),
                        "met": served >= rate("transformer", "keras-hub compiled", batch)})
        for family in ("transformer", "lstm"):
            ratio = rate(family, "served xla", batch) / rate(family, "lmstack in-process", batch)
            targets.append({"target": f"{family} batch {batch}: served xla >= 0.8x in-process",
                            "value": round(ratio, 2), "met": ratio >= 0.8})
    result = {"benchmark": "served_generation", "prompt": PROMPT, "new_tokens": [SHORT, LONG],
              "rounds": args.rounds, "loads": loads, "rows": rows, "targets": targets,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__}}
    print(f"\n{'model':12} {'method':20} {'batch':>5} {'tokens/s':>10} {'vs in-process':>14} {'vs keras-hub':>13}")
    for r in rows:
        hub = f"{r['vs_keras_hub']:.2f}" if r["vs_keras_hub"] is not None else "-"
        print(f"{r['model']:12} {r['method']:20} {r['batch']:5} {r['new_tokens_per_s']:10.1f} "
              f"{r['vs_in_process']:14.2f} {hub:>13}")
    print()
    for family, load in loads.items():
        print(f"{family}: ready {load['ready_seconds']} s after start (load + {load['warmup_requests']} warm-up "
              f"requests: {load['load_seconds']} s); first request {load['first_request_seconds'] * 1000:.0f} ms; "
              f"a stream's first token after {load['stream_first_token_ms']} ms (median)")
    for t in targets:
        print(f"- {t['target']}: {t['value']} ({'met' if t['met'] else 'NOT met'})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "served_generation.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/served_generation.json")


if __name__ == "__main__":
    main()
