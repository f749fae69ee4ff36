"""bf16 against float32 training, as a user runs it: whole `lmstack train` processes.

Speed: `lmstack train` of the `small` transformer (`--preset`; batch 16 x its context, dropout 0)
in three settings: float32 as it comes (TensorFlow's kernels), float32 with
`--jit_compile` (XLA, float32's fastest here) and `--mixed_precision=bf16`
(TensorFlow's oneDNN kernels; XLA's CPU backend has no fast bf16 matmul).
Each runs at two step counts so start-up, compilation, the final evaluation
and saving cancel: tokens/s = (long - short) steps x 16 x 128 /
(wall(long) - wall(short)). The settings alternate within a round and their
order rotates between rounds; ratios are medians over rounds, against the
faster float32.

Quality: one run of each precision to `--quality_steps` (the same data order
and seed), then the validation bits/char of each, read from its metrics.json
(evaluated in float32, as every later stage runs it).

Prints a table and writes bench/results/precision.json.

First it prints the diagnosis: GFLOP/s of single matmuls at the model's shapes,
float32 and bf16, with TensorFlow's kernels and with XLA.

usage: python bench/precision.py [--rounds=3] [--lengths=40,200] [--quality_steps=1200] [--preset=small]
                                 [--matmuls_only]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CORPUS = ROOT / "data" / "shakespeare.txt.gz"
# name -> (--mixed_precision, --jit_compile)
SETTINGS = {"float32": ("none", False), "float32 + XLA": ("none", True), "bf16": ("bf16", False)}
BATCH = 16


def lmstack(*argv: str) -> tuple[float, str]:
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "app", *argv], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"lmstack {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - began, out.stdout


def train(prepared: pathlib.Path, setting: str, steps: int, keep: pathlib.Path | None = None,
          preset: str = "small") -> tuple[float, dict]:
    """Wall seconds and the result of one `lmstack train` on a copy of the prepared workdir."""
    precision, xla = SETTINGS[setting]
    run = keep or pathlib.Path(tempfile.mkdtemp(prefix="lmstack-precision-")) / "run"
    shutil.copytree(prepared, run)
    try:
        wall, out = lmstack("train", f"--workdir={run}", "--model=transformer", f"--preset={preset}", "--dropout=0",
                            f"--batch_size={BATCH}", f"--steps={steps}", f"--jit_compile={xla}", "--eval_every=0",
                            f"--mixed_precision={precision}", "--progress=none")
        return wall, json.loads(out.strip().splitlines()[-1])
    finally:
        if keep is None:
            shutil.rmtree(run.parent, ignore_errors=True)


MATMULS = [(2048, 128, 128), (2048, 128, 512), (2048, 384, 1536), (2048, 768, 768), (1024, 1024, 1024)]


def matmul_rates(seconds: float = 1.0) -> list[dict]:
    """GFLOP/s of one matmul, float32 and bf16, TensorFlow's kernels and XLA (the diagnosis)."""
    import tensorflow as tf

    rows = []
    for m, k, n in MATMULS:
        row = {"shape": f"{m}x{k}x{n}"}
        for dtype in (tf.float32, tf.bfloat16):
            a = tf.cast(tf.random.normal([m, k]), dtype)
            b = tf.cast(tf.random.normal([k, n]), dtype)
            for xla in (False, True):
                f = tf.function(lambda x, y: tf.matmul(x, y), jit_compile=xla)
                f(a, b).numpy()
                began, calls = time.perf_counter(), 0
                while time.perf_counter() - began < seconds:
                    out = f(a, b)
                    calls += 1
                out.numpy()
                elapsed = time.perf_counter() - began
                row[f"{dtype.name}{' xla' if xla else ''}"] = 2 * m * k * n * calls / elapsed / 1e9
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", default="40,200")
    parser.add_argument("--quality_steps", type=int, default=1200)
    parser.add_argument("--preset", default="small", help="the transformer preset (small, base, gpt2, ...)")
    parser.add_argument("--matmuls_only", action="store_true", help="only the matmul table (the diagnosis)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import app  # noqa: F401  (lmstack's environment, as the trained processes have it)

    matmuls = matmul_rates()
    print("| matmul (MxKxN) | float32 | float32 XLA | bf16 | bf16 XLA | bf16 / float32 |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in matmuls:
        print(f"| {r['shape']} | {r['float32']:.0f} | {r['float32 xla']:.0f} | {r['bfloat16']:.0f} | "
              f"{r['bfloat16 xla']:.0f} | {r['bfloat16'] / r['float32']:.2f} |")
    print("(GFLOP/s of one matmul in a tf.function)\n")
    if args.matmuls_only:
        return
    short, long = (int(n) for n in args.lengths.split(","))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-bench-precision-"))
    lmstack("prepare", f"--corpus={CORPUS}", f"--workdir={tmp / 'prepared'}", "--tokenizer=char")

    import models

    seq_len = models.make_config("transformer", args.preset, vocab_size=100).seq_len  # the preset's context
    tokens = (long - short) * BATCH * seq_len
    names = list(SETTINGS)
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        walls = {name: {} for name in names}
        for steps in (short, long):
            for name in order:
                walls[name][steps] = train(tmp / "prepared", name, steps, preset=args.preset)[0]
        rates = {name: tokens / (w[long] - w[short]) for name, w in walls.items()}
        best = max(rates["float32"], rates["float32 + XLA"])
        rounds.append({"walls": walls, "tokens_per_s": rates, "ratio": rates["bf16"] / best})
        print(f"round {r + 1}: " + ", ".join(f"{n} {v:,.0f}" for n, v in rates.items())
              + f" tokens/s; bf16 / best float32 {rounds[-1]['ratio']:.2f}x", file=sys.stderr)

    quality = {}
    for name in ("float32 + XLA", "bf16"):
        wall, result = train(tmp / "prepared", name, args.quality_steps, keep=tmp / f"quality-{SETTINGS[name][0]}",
                             preset=args.preset)
        quality[name] = {"bits_per_char": result["bits_per_char"], "loss": result["loss"], "wall_seconds": wall}
        print(f"{name}: {args.quality_steps} steps -> {result['bits_per_char']:.3f} bits/char", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)

    median = {name: statistics.median(r["tokens_per_s"][name] for r in rounds) for name in names}
    ratio = statistics.median(r["ratio"] for r in rounds)
    gap = quality["bf16"]["bits_per_char"] - quality["float32 + XLA"]["bits_per_char"]
    result = {
        "benchmark": "precision", "preset": args.preset, "batch": BATCH, "seq_len": seq_len, "lengths": [short, long],
        "rounds": rounds, "median_tokens_per_s": median, "matmul_gflops": matmuls, "ratio_median": ratio,
        "quality_steps": args.quality_steps, "quality": quality, "bits_per_char_gap": gap,
        "targets": {"ratio": 1.5, "bits_per_char_gap": 0.02},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"\n`lmstack train`, {args.preset} transformer, batch {BATCH} x {seq_len}; tokens/s differenced between "
          f"{short} and {long} steps, median of {args.rounds} interleaved rounds\n")
    print(f"| setting | tokens/s | vs float32 + XLA | bits/char after {args.quality_steps} steps |\n"
          "|---|---:|---:|---:|")
    for name in names:
        rel = ", ".join(format(r["tokens_per_s"][name] / r["tokens_per_s"]["float32 + XLA"], ".2f") for r in rounds)
        bits = f"{quality[name]['bits_per_char']:.3f}" if name in quality else "-"
        print(f"| {name} | {median[name]:,.0f} | {rel} | {bits} |")
    print(f"\nbf16 / the faster float32: {ratio:.2f}x tokens/s (target >= 1.5x), {gap:+.3f} bits/char "
          "(target <= +0.02)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "precision.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
