"""Training speed: tokens/s, peak memory and model FLOPs utilization, vs keras-hub.

For the transformer and the LSTM at the `tiny` and `small` presets, XLA off
and on, and the same transformer built with keras-hub (`GPT2Backbone` in a
`GPT2CausalLM`, Keras 3) as the reference, each configuration trains in its own
process (so peak resident memory is its own) on the bundled corpus through
`pipelines.train.build_and_compile` and `dataset.train_dataset`. Rounds
alternate the order of configurations (these machines are shared and noisy).
MFU = tokens/s x training FLOPs per token / a matmul peak measured in the
same process.

Prints a table and writes bench/results/train_speed.json.

usage: python bench/train_speed.py [--rounds=2] [--steps=60] [--batch_size=16]
(--steps caps the timed steps; each configuration is timed for about 15 s.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
CORPUS = ROOT / "data" / "shakespeare.txt.gz"
CONFIGS = [(impl, preset, xla) for preset in ("tiny", "small") for xla in (False, True)
           for impl in ("transformer", "lstm", "keras-hub")]


def matmul_peak_gflops(seconds: float = 2.0) -> float:
    import tensorflow as tf

    n = 1024
    a, b = tf.random.normal([n, n]), tf.random.normal([n, n])
    mm = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    mm(a, b).numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mm(a, b).numpy()
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


def measure(impl: str, preset: str, xla: bool, steps: int, batch: int, workdir: str,
            seconds_budget: float = 15.0) -> dict:
    """Runs in a child process: one configuration, timed after warm-up steps."""
    import app  # noqa: F401
    import tensorflow as tf

    import models
    from pipelines import dataset, train

    vocab = json.loads((pathlib.Path(workdir) / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    family = "lstm" if impl == "lstm" else "transformer"
    config = models.make_config(family, preset, vocab, dropout=0.0)
    seq = config.seq_len
    ds = dataset.train_dataset(workdir, seq, batch, seed=0)
    if impl == "keras-hub":
        import keras
        import keras_hub

        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=vocab, num_layers=config.layers, num_heads=config.heads, hidden_dim=config.d_model,
            intermediate_dim=config.mlp_ratio * config.d_model, dropout=0.0, max_sequence_length=seq)
        model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01, global_clipnorm=1.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=xla)
        ds = ds.map(lambda x, y: ({"token_ids": x, "padding_mask": tf.ones_like(x, tf.bool)}, y))
        params = model.count_params()
    else:
        model = train.build_and_compile(config, train.TrainConfig(steps=10_000, warmup_steps=10,
                                                                  jit_compile=xla))
        params = model.count_params()
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace, compile, fill buffers
    # Whole fit() calls of 5 steps until `seconds_budget` has passed (a slow
    # configuration still finishes in bounded time; a fast one gets many steps).
    done, start = 0, time.perf_counter()
    while done < steps and (done < 5 or time.perf_counter() - start < seconds_budget):
        model.fit(ds, steps_per_epoch=5, epochs=1, verbose=0)
        done += 5
    seconds = time.perf_counter() - start
    tokens_per_s = done * batch * seq / seconds
    flops = 3 * config.flops_per_token()
    peak = matmul_peak_gflops()
    return {"impl": impl, "preset": preset, "xla": xla, "params": params, "seq_len": seq, "batch": batch,
            "steps_timed": done,
            "tokens_per_s": tokens_per_s, "train_flops_per_token": flops, "matmul_peak_gflops": peak,
            "mfu": tokens_per_s * flops / (peak * 1e9),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, preset, xla, workdir = args.child.split(":")
        print(json.dumps(measure(impl, preset, xla == "1", args.steps, args.batch_size, workdir)))
        return

    import app  # noqa: F401
    from pipelines import prepare, tokenizers

    workdir = tempfile.mkdtemp(prefix="lmstack-train-bench-")
    prepare.prepare(prepare.PrepareConfig(corpus=(str(CORPUS),), tokenizer=tokenizers.TokenizerConfig("char")),
                    workdir)
    runs: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS if r % 2 == 0 else list(reversed(CONFIGS))
        for impl, preset, xla in order:
            child = f"{impl}:{preset}:{int(xla)}:{workdir}"
            out = subprocess.run([sys.executable, __file__, f"--child={child}", f"--steps={args.steps}",
                                  f"--batch_size={args.batch_size}"], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{child} failed:\n{out.stderr[-3000:]}")
            runs[(impl, preset, xla)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {impl} {preset} xla={xla}: "
                  f"{runs[(impl, preset, xla)][-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)

    rows = []
    for key, values in runs.items():
        row = dict(values[0])
        for field in ("tokens_per_s", "mfu", "matmul_peak_gflops", "peak_rss_mb"):
            row[field] = statistics.median(v[field] for v in values)
        rows.append(row)
    for row in rows:
        ref = next(r for r in rows if (r["impl"], r["preset"], r["xla"]) == ("keras-hub", row["preset"], row["xla"]))
        row["vs_keras_hub"] = row["tokens_per_s"] / ref["tokens_per_s"]
    result = {"benchmark": "train_speed", "steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}
    header = f"{'model':12} {'preset':6} {'xla':5} {'params':>9} {'tokens/s':>9} {'vs keras-hub':>12} {'MFU':>6} {'peak MB':>8}"
    print(header)
    for r in rows:
        print(f"{r['impl']:12} {r['preset']:6} {str(r['xla']):5} {r['params']:9,} {r['tokens_per_s']:9,.0f} "
              f"{r['vs_keras_hub']:12.2f} {r['mfu']:6.1%} {r['peak_rss_mb']:8.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/train_speed.json")


if __name__ == "__main__":
    main()
