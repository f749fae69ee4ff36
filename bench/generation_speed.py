"""Generation tokens/s: cached decoding vs recomputing the prefix, vs keras-hub.

For the GPT and the LSTM ("small" presets, untrained weights: speed does
not depend on them), prompt 16 tokens + 112 new tokens, greedy, batch 1
and 8, all in one process and interleaved over rounds:

- `cached`: lmstack's decoder with the KV cache / LSTM state
  (`models.decoding.generate`, one tf.while_loop);
- `recompute`: a greedy loop in which every step runs the full model over
  the whole (padded) sequence — what generation costs without a cache;
- `keras-hub`: `GPT2CausalLM.generate` (Keras 3) on a GPT-2 of the same
  size (layers, width, heads, MLP, context, vocabulary), as the reference.

Prints a table and writes bench/results/generation_speed.json.

usage: python bench/generation_speed.py [--rounds=3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: F401  (environment before TensorFlow)
import numpy as np
import tensorflow as tf

import models
from models import decoding

VOCAB = 88  # the char vocabulary of the bundled corpus
PROMPT, NEW = 16, 112
RESULTS = ROOT / "bench" / "results"
KERAS_HUB_SETTINGS: dict[str, str] = {}


def prompts(batch: int) -> np.ndarray:
    return np.random.default_rng(0).integers(4, VOCAB, size=[batch, PROMPT]).astype(np.int32)


def cached_runner(family: str, batch: int):
    config = models.make_config(family, "small", vocab_size=VOCAB, dropout=0.0)
    generator = decoding.Generator(models.decoder(models.build(config), config))
    rows = prompts(batch).tolist()
    return lambda: generator.generate(rows, NEW)


def recompute_runner(family: str, batch: int):
    config = models.make_config(family, "small", vocab_size=VOCAB, dropout=0.0)
    model = models.build(config)
    padded = np.zeros([batch, PROMPT + NEW], np.int32)
    padded[:, :PROMPT] = prompts(batch)
    total = PROMPT + NEW

    @tf.function(jit_compile=True)  # compiled like the cached loop, for a fair ratio
    def run(tokens):
        def step(index, tokens):
            logits = model(tokens, training=False)  # (B, T, V): the whole sequence again
            chosen = tf.argmax(logits[:, index - 1, :], axis=-1, output_type=tf.int32)
            column = tf.one_hot(index, total, on_value=True, off_value=False)[tf.newaxis, :]
            return index + 1, tf.where(column, chosen[:, tf.newaxis], tokens)
        return tf.while_loop(lambda index, tokens: index < total, step, (tf.constant(PROMPT), tokens))[1]

    return lambda: run(tf.constant(padded)).numpy()


def keras_hub_runner(batch: int):
    import keras_hub

    c = models.make_config("transformer", "small", vocab_size=VOCAB)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=c.layers, num_heads=c.heads, hidden_dim=c.d_model,
        intermediate_dim=c.mlp_ratio * c.d_model, dropout=0.0, max_sequence_length=c.seq_len)
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")  # keras-hub's defaults otherwise (its generate is XLA-compiled
    KERAS_HUB_SETTINGS["jit_compile"] = str(lm.jit_compile)  # where the backend allows)
    padded = np.zeros([batch, PROMPT + NEW], np.int32)
    padded[:, :PROMPT] = prompts(batch)
    mask = np.zeros_like(padded, bool)
    mask[:, :PROMPT] = True
    inputs = {"token_ids": padded, "padding_mask": mask}
    return lambda: lm.generate(inputs, stop_token_ids=None)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runners = {}
    for batch in (1, 8):
        for family in ("transformer", "lstm"):
            runners[(family, "cached", batch)] = cached_runner(family, batch)
            runners[(family, "recompute", batch)] = recompute_runner(family, batch)
        runners[("transformer", "keras-hub GPT2CausalLM", batch)] = keras_hub_runner(batch)
    for fn in runners.values():  # trace / compile once, outside the timings
        fn()
    seconds = {key: [] for key in runners}
    for r in range(args.rounds):
        for key, fn in runners.items():
            seconds[key].append(timed(fn))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    for (family, method, batch), values in seconds.items():
        s = statistics.median(values)
        rows.append({"model": family, "method": method, "batch": batch, "seconds": round(s, 4),
                     "new_tokens_per_s": round(batch * NEW / s, 1)})

    def rate(family, method, batch):
        return next(r["new_tokens_per_s"] for r in rows
                    if (r["model"], r["method"], r["batch"]) == (family, method, batch))

    for row in rows:
        row["vs_recompute"] = round(row["new_tokens_per_s"] / rate(row["model"], "recompute", row["batch"]), 2) \
            if row["method"] != "keras-hub GPT2CausalLM" else None
        row["vs_keras_hub"] = round(row["new_tokens_per_s"] / rate("transformer", "keras-hub GPT2CausalLM",
                                                                   row["batch"]), 2)
    result = {
        "benchmark": "generation_speed", "prompt_tokens": PROMPT, "new_tokens": NEW, "vocab": VOCAB,
        "presets": {"transformer": models.config_to_json(models.make_config("transformer", "small", VOCAB)),
                    "lstm": models.config_to_json(models.make_config("lstm", "small", VOCAB))},
        "rounds": args.rounds, "keras_hub": KERAS_HUB_SETTINGS, "lmstack_jit_compile": True,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__},
        "rows": rows,
        "targets": {"cached_vs_recompute_at_128": ">= 3", "transformer_cached_vs_keras_hub": ">= 1"},
    }
    print(f"\n{'model':12} {'method':24} {'batch':>5} {'tokens/s':>10} {'vs recompute':>13} {'vs keras-hub':>13}")
    for r in rows:
        vr = f"{r['vs_recompute']:.2f}" if r["vs_recompute"] is not None else "-"
        print(f"{r['model']:12} {r['method']:24} {r['batch']:5} {r['new_tokens_per_s']:10.1f} {vr:>13} "
              f"{r['vs_keras_hub']:13.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "generation_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
