"""Training speed: tokens/s, peak memory and model FLOPs utilization, vs keras-hub.

The headline is the user's view: whole `lmstack train` processes against a
stock keras-hub script (bench/keras_hub_train.py) training the same GPT
(small shape: 4 layers, width 128, 4 heads, context 128; batch 16, dropout
0, XLA on both), each at two step counts (60 and 360) so start-up,
compilation, lmstack's final evaluation and saving cancel in the difference:
tokens/s = 300 steps x 16 x 128 / (wall(360) - wall(60)). The two tools
alternate within a round and which goes first alternates between rounds;
the ratio is the median over rounds (`--user_rounds`). lmstack runs with its
defaults but `--eval_every=0` (the keras-hub script validates nothing).

Then, model against model:
For the transformer and the LSTM at the `tiny` and `small` presets, XLA off
and on, and the same transformer built with keras-hub (`GPT2Backbone` in a
`GPT2CausalLM`, Keras 3) as the reference, each configuration trains in its own
process (so peak resident memory is its own) on the bundled corpus through
`pipelines.training.build_and_compile` and `dataset.train_dataset`. The ratio to
keras-hub comes from the reference trained in the same process, interleaved
with ours; rounds alternate the order of configurations (these machines are
shared and noisy).

tokens/s is the steady state of training: per fit() call of 10 steps, the
time from the first step's end to the last one's (a long run is one fit();
the per-call setup - a new iterator refilling the shuffle buffer - is left out).
MFU = tokens/s x training FLOPs per token / a matmul peak measured in the
same process.

Every process imports `app`, so it runs with lmstack's host allocator (BFC,
see app/__init__.py) - the keras-hub reference in it too. Two more processes
per round train the small XLA transformer and keras-hub with TensorFlow's
default allocator (`TF_CPU_ALLOCATOR_USE_BFC=false`), for what a keras-hub
script run as it comes would see.

Prints a table and writes bench/results/train_speed.json.

usage: python bench/train_speed.py [--user_rounds=3] [--user_view_only] [--rounds=2] [--steps=60] [--batch_size=16]
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
STEPS_PER_CALL = 10
# (implementation, preset, XLA, host allocator)
CONFIGS = [(impl, preset, xla, "bfc") for preset in ("tiny", "small") for xla in (False, True)
           for impl in ("transformer", "lstm", "keras-hub")]
CONFIGS += [(impl, "small", True, "tf-default") for impl in ("transformer", "keras-hub")]


def _whole_run(command: list[str], env: dict | None = None) -> float:
    began = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - began


def user_view(workdir: str, rounds: int, batch: int, lengths=(60, 360)) -> dict:
    """Differenced whole-process tokens/s of `lmstack train` and the stock keras-hub script, interleaved."""
    import shutil

    tokens = (lengths[1] - lengths[0]) * batch * 128
    stock_env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}

    def lmstack(steps):
        run = tempfile.mkdtemp(prefix="lmstack-user-view-")
        shutil.rmtree(run)
        shutil.copytree(workdir, run)
        try:
            return _whole_run([sys.executable, "-m", "app", "train", f"--workdir={run}", "--model=transformer",
                               "--preset=small", "--dropout=0", f"--batch_size={batch}", f"--steps={steps}",
                               "--jit_compile", "--eval_every=0"], env=stock_env)
        finally:
            shutil.rmtree(run, ignore_errors=True)

    def keras_hub(steps):
        return _whole_run([sys.executable, str(ROOT / "bench" / "keras_hub_train.py"), f"--corpus={CORPUS}",
                           f"--steps={steps}", f"--batch_size={batch}"], env=stock_env)

    tools = {"lmstack": lmstack, "keras-hub": keras_hub}
    per_round = []
    for r in range(rounds):
        walls = {name: {} for name in tools}
        for steps in lengths:
            for name in (list(tools) if r % 2 == 0 else list(reversed(tools))):
                walls[name][steps] = tools[name](steps)
        rates = {name: tokens / (w[lengths[1]] - w[lengths[0]]) for name, w in walls.items()}
        per_round.append({"walls": walls, "tokens_per_s": rates, "ratio": rates["lmstack"] / rates["keras-hub"]})
        print(f"user view, round {r + 1}: lmstack {rates['lmstack']:,.0f} tokens/s, keras-hub "
              f"{rates['keras-hub']:,.0f}: {per_round[-1]['ratio']:.2f}x", file=sys.stderr)
    # The machine has a slow mode (whole stretches at about half speed, within and across
    # processes), so the fastest wall of each (tool, length) over the rounds is the estimate of
    # what each tool does; the per-round ratios show the spread.
    best = {name: tokens / (min(r["walls"][name][lengths[1]] for r in per_round)
                            - min(r["walls"][name][lengths[0]] for r in per_round)) for name in tools}
    return {"lengths": list(lengths), "batch": batch, "rounds": per_round,
            "best_tokens_per_s": best, "ratio_best": best["lmstack"] / best["keras-hub"],
            "ratio_median": statistics.median(r["ratio"] for r in per_round),
            "lmstack_tokens_per_s_median": statistics.median(r["tokens_per_s"]["lmstack"] for r in per_round),
            "keras_hub_tokens_per_s_median": statistics.median(r["tokens_per_s"]["keras-hub"] for r in per_round)}


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


def _build(impl: str, config, vocab: int, xla: bool, ds):
    """(model, its dataset, its Keras module) for one implementation, compiled and warmed up."""
    import tensorflow as tf

    from pipelines import training

    if impl == "keras-hub":
        import keras
        import keras_hub

        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=vocab, num_layers=config.layers, num_heads=config.heads, hidden_dim=config.d_model,
            intermediate_dim=config.mlp_ratio * config.d_model, dropout=0.0, max_sequence_length=config.seq_len)
        model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01, global_clipnorm=1.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=xla)
        ds = ds.map(lambda x, y: ({"token_ids": x, "padding_mask": tf.ones_like(x, tf.bool)}, y))
    else:
        from models.backend import keras

        model = training.build_and_compile(config, training.TrainConfig(steps=10_000, warmup_steps=10, jit_compile=xla))
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace, compile, fill buffers
    return model, ds, keras


def _steady_seconds(model, ds, keras) -> float:
    """Seconds of the last STEPS_PER_CALL - 1 steps of one fit() call (`keras`: tf_keras or Keras 3)."""
    ends = []

    class Stamps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    model.fit(ds, steps_per_epoch=STEPS_PER_CALL, epochs=1, verbose=0, callbacks=[Stamps()])
    return ends[-1] - ends[0]


def measure(impl: str, preset: str, xla: bool, steps: int, batch: int, workdir: str,
            seconds_budget: float = 15.0) -> dict:
    """Runs in a child process: one configuration, timed after warm-up steps.

    Peak memory is read before anything else is built. For lmstack's models the
    keras-hub transformer of the same preset is then built in the same process
    and the two alternate fit() calls, so `vs_keras_hub` is a ratio
    of interleaved timings (the machine's load swings hit both alike).
    """
    import app  # noqa: F401

    import models
    from pipelines import dataset

    vocab = json.loads((pathlib.Path(workdir) / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    family = "lstm" if impl == "lstm" else "transformer"
    config = models.make_config(family, preset, vocab, dropout=0.0)
    seq = config.seq_len
    ds = dataset.train_dataset(workdir, seq, batch, seed=0)
    contenders = [_build(impl, config, vocab, xla, ds)]  # (model, dataset, Keras module) each
    params = contenders[0][0].count_params()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if impl != "keras-hub":
        reference = models.make_config("transformer", preset, vocab, dropout=0.0)
        contenders.append(_build("keras-hub", reference, vocab, xla,
                                 dataset.train_dataset(workdir, reference.seq_len, batch, seed=0)))
    # Whole fit() calls until `seconds_budget` has passed (a slow configuration
    # still finishes in bounded time; a fast one gets many steps).
    seconds = [[] for _ in contenders]
    done, start = 0, time.perf_counter()
    while done < steps and (done < STEPS_PER_CALL or time.perf_counter() - start < seconds_budget * len(contenders)):
        for contender, times in zip(contenders, seconds):
            times.append(_steady_seconds(*contender))
        done += STEPS_PER_CALL - 1
    tokens_per_s = done * batch * seq / sum(seconds[0])
    flops = 3 * config.flops_per_token()
    peak = matmul_peak_gflops()
    row = {"impl": impl, "preset": preset, "xla": xla, "params": params, "seq_len": seq, "batch": batch,
           "steps_timed": done,
           "tokens_per_s": tokens_per_s, "train_flops_per_token": flops, "matmul_peak_gflops": peak,
           "mfu": tokens_per_s * flops / (peak * 1e9), "peak_rss_mb": peak_rss_mb}
    if impl != "keras-hub":
        # Per interleaved pair: reference seconds / ours for the same tokens.
        row["vs_keras_hub"] = statistics.median(
            (ref / ours) * (seq / reference.seq_len) for ours, ref in zip(*seconds))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--user_rounds", type=int, default=3)
    parser.add_argument("--user_view_only", action="store_true", help="only the whole-process comparison")
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
    view = user_view(workdir, args.user_rounds, args.batch_size)
    ratios = ", ".join(f"{r['ratio']:.2f}" for r in view["rounds"])
    print(f"lmstack train vs a stock keras-hub script, whole processes differenced (360 - 60 steps), fastest of "
          f"{args.user_rounds} rounds: {view['best_tokens_per_s']['lmstack']:,.0f} vs "
          f"{view['best_tokens_per_s']['keras-hub']:,.0f} tokens/s: {view['ratio_best']:.2f}x "
          f"(per round: {ratios}; median {view['ratio_median']:.2f}x)")
    if args.user_view_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved = RESULTS / "train_speed.json"
        previous = json.loads(saved.read_text()) if saved.exists() else {}
        (RESULTS / "train_speed.json").write_text(json.dumps({**previous, "user_view": view}, indent=2) + "\n")
        return
    runs: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
    schedule = [CONFIGS if r % 2 == 0 else list(reversed(CONFIGS)) for r in range(args.rounds)]
    for r, order in enumerate(schedule):
        for impl, preset, xla, allocator in order:
            child = f"{impl}:{preset}:{int(xla)}:{workdir}"
            env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC=str(allocator == "bfc").lower())
            out = subprocess.run([sys.executable, __file__, f"--child={child}", f"--steps={args.steps}",
                                  f"--batch_size={args.batch_size}"], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{child} failed:\n{out.stderr[-3000:]}")
            run = runs[(impl, preset, xla, allocator)]
            run.append({**json.loads(out.stdout.strip().splitlines()[-1]), "allocator": allocator})
            print(f"round {r + 1}: {impl} {preset} xla={xla} {allocator}: {run[-1]['tokens_per_s']:,.0f} tokens/s",
                  file=sys.stderr)

    rows = []
    for values in runs.values():
        row = dict(values[0])
        for field in ("tokens_per_s", "mfu", "matmul_peak_gflops", "peak_rss_mb"):
            row[field] = statistics.median(v[field] for v in values)
        row["vs_keras_hub"] = statistics.median(v.get("vs_keras_hub", 1.0) for v in values)
        rows.append(row)
    # What a user sees: lmstack's process (its allocator) vs a keras-hub script run as it comes.
    # Separate processes of the same round, so noisier than the in-process ratios.
    result = {"benchmark": "train_speed", "steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds,
              "steps_per_call": STEPS_PER_CALL, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "user_view": view, "rows": rows}
    header = (f"{'model':12} {'preset':6} {'xla':5} {'allocator':10} {'params':>9} {'tokens/s':>9} "
              f"{'vs keras-hub':>12} {'MFU':>6} {'peak MB':>8}")
    print(header)
    for r in rows:
        print(f"{r['impl']:12} {r['preset']:6} {str(r['xla']):5} {r['allocator']:10} {r['params']:9,} "
              f"{r['tokens_per_s']:9,.0f} {r['vs_keras_hub']:12.2f} {r['mfu']:6.1%} {r['peak_rss_mb']:8.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/train_speed.json")


if __name__ == "__main__":
    main()
