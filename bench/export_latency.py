"""Latency of an exported SavedModel's signatures, called in-process.

For the transformer and the LSTM at the `small` preset (char tokenizer on the
bundled corpus; weights as initialized: latency does not depend on them),
export with `serving.exporters.savedmodel`, load with `tf.saved_model.load` and call each
signature (the XLA-compiled twins too) `--reps` times per batch size (1 and 8)
after a warm-up call (which compiles the request's shape bucket):
p50/p99 per request, and new tokens/s for the two generation signatures. The
reference, timed in the same process and interleaved, is lmstack's in-process
greedy generation (`models.decoding.generate`, the decoding loop XLA-compiled)
on the same prompts. This table is also what the server's overhead is
measured against.

Prints a table and writes bench/results/export_latency.json.

usage: python bench/export_latency.py [--reps=20] [--max_new_tokens=32]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
PROMPT = "ROMEO.\nWhat light through yonder window breaks?"
TEXT = ("But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "Arise, fair sun, and kill the envious moon.")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000.0, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()

    import app  # noqa: F401
    import tensorflow as tf

    from bench.common import untrained_export
    from models import samplers
    from pipelines.generate import TextGenerator
    from serving import contract as c

    root = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-export-bench-"))
    rows = []
    for family in ("transformer", "lstm"):
        run, version = untrained_export(root, family, "small")
        loaded = tf.saved_model.load(str(version))
        reference = TextGenerator(run)
        n_new = args.max_new_tokens
        for batch in (1, 8):
            prompts = [PROMPT] * batch
            calls = {
                c.SERVING_DEFAULT: dict(prompt=tf.constant(prompts), max_new_tokens=tf.fill([batch], n_new)),
                c.GENERATE: dict(prompt=tf.constant(prompts), max_new_tokens=tf.fill([batch], n_new),
                                 temperature=tf.fill([batch], 1.0), top_k=tf.fill([batch], 40),
                                 top_p=tf.fill([batch], 0.95), seed=tf.range(batch)),
                c.SERVING_DEFAULT_XLA: dict(prompt=tf.constant(prompts), max_new_tokens=tf.fill([batch], n_new)),
                c.GENERATE_XLA: dict(prompt=tf.constant(prompts), max_new_tokens=tf.fill([batch], n_new),
                                     temperature=tf.fill([batch], 1.0), top_k=tf.fill([batch], 40),
                                     top_p=tf.fill([batch], 0.95), seed=tf.range(batch)),
                c.SCORE: dict(text=tf.constant([TEXT] * batch)),
                c.NEXT_TOKEN_LOGITS: dict(token_ids=tf.fill([batch, 64], 5), num_tokens=tf.fill([batch], 64)),
            }
            ids = [reference.prompt_ids(p) for p in prompts]
            sampler = samplers.SamplerConfig()
            timings: dict[str, list[float]] = {name: [] for name in [*calls, "reference"]}
            new_tokens: dict[str, int] = {}
            # Warm-up (tracing, XLA compilation), then interleaved repetitions.
            for name, inputs in calls.items():
                loaded.signatures[name](**inputs)
            reference.generator.generate(ids, n_new, sampler)
            for _ in range(args.reps):
                for name, inputs in calls.items():
                    start = time.perf_counter()
                    out = loaded.signatures[name](**inputs)
                    timings[name].append(time.perf_counter() - start)
                    if c.TOKEN_IDS in out:
                        new_tokens[name] = int(tf.math.count_nonzero(out[c.TOKEN_IDS]))
                start = time.perf_counter()
                out = reference.generator.generate(ids, n_new, sampler)  # no stop token: all n_new
                timings["reference"].append(time.perf_counter() - start)
                new_tokens["reference"] = sum(len(r) for r in out)
            ref_rate = new_tokens["reference"] / np.median(timings["reference"])
            for name, values in timings.items():
                row = {"model": family, "signature": name, "batch": batch, "reps": args.reps,
                       "p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99)}
                if name in new_tokens:
                    row["new_tokens"] = new_tokens[name]
                    row["tokens_per_s"] = new_tokens[name] / float(np.median(values))
                    row["vs_reference"] = row["tokens_per_s"] / ref_rate
                rows.append(row)
                print(f"{family} batch {batch} {name}: p50 {row['p50_ms']:.1f} ms", file=sys.stderr)

    result = {"benchmark": "export_latency", "reps": args.reps, "max_new_tokens": args.max_new_tokens,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}
    print(f"{'model':12} {'signature':18} {'batch':>5} {'p50 ms':>8} {'p99 ms':>8} {'tokens/s':>9} {'vs ref':>7}")
    for r in rows:
        rate = f"{r['tokens_per_s']:9,.0f}" if "tokens_per_s" in r else f"{'–':>9}"
        ratio = f"{r['vs_reference']:6.2f}x" if "vs_reference" in r else f"{'–':>7}"
        name = "reference (XLA)" if r["signature"] == "reference" else r["signature"]
        print(f"{r['model']:12} {name:18} {r['batch']:5} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {rate} {ratio}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/export_latency.json")


if __name__ == "__main__":
    main()
