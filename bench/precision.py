"""bf16 against float32 training, as a user runs it: whole `lmstack train` processes.

Speed: `lmstack train` of the `small` transformer (batch 16 x 128, dropout 0,
XLA) with `--mixed_precision=bf16` and with the default float32, each at two
step counts so start-up, compilation, the final evaluation and saving cancel:
tokens/s = (long - short) steps x 16 x 128 / (wall(long) - wall(short)). The
two precisions alternate within a round and which goes first alternates
between rounds; the ratio is the median over rounds.

Quality: one run of each precision to `--quality_steps` (the same data order
and seed), then the validation bits/char of each, read from its metrics.json
(evaluated in float32, as every later stage runs it).

Prints a table and writes bench/results/precision.json.

usage: python bench/precision.py [--rounds=3] [--lengths=40,200] [--quality_steps=1200]
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
PRECISIONS = ("none", "bf16")
BATCH, SEQ_LEN = 16, 128


def lmstack(*argv: str) -> tuple[float, str]:
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "app", *argv], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"lmstack {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - began, out.stdout


def train(prepared: pathlib.Path, precision: str, steps: int, keep: pathlib.Path | None = None) -> tuple[float, dict]:
    """Wall seconds and the result of one `lmstack train` on a copy of the prepared workdir."""
    run = keep or pathlib.Path(tempfile.mkdtemp(prefix="lmstack-precision-")) / "run"
    shutil.copytree(prepared, run)
    try:
        wall, out = lmstack("train", f"--workdir={run}", "--model=transformer", "--preset=small", "--dropout=0",
                            f"--batch_size={BATCH}", f"--steps={steps}", "--jit_compile", "--eval_every=0",
                            f"--mixed_precision={precision}", "--progress=none")
        return wall, json.loads(out.strip().splitlines()[-1])
    finally:
        if keep is None:
            shutil.rmtree(run.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", default="40,200")
    parser.add_argument("--quality_steps", type=int, default=1200)
    args = parser.parse_args()
    short, long = (int(n) for n in args.lengths.split(","))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-bench-precision-"))
    lmstack("prepare", f"--corpus={CORPUS}", f"--workdir={tmp / 'prepared'}", "--tokenizer=char")

    tokens = (long - short) * BATCH * SEQ_LEN
    rounds = []
    for r in range(args.rounds):
        order = PRECISIONS if r % 2 == 0 else tuple(reversed(PRECISIONS))
        walls = {p: {} for p in PRECISIONS}
        for steps in (short, long):
            for precision in order:
                walls[precision][steps] = train(tmp / "prepared", precision, steps)[0]
        rates = {p: tokens / (w[long] - w[short]) for p, w in walls.items()}
        rounds.append({"walls": walls, "tokens_per_s": rates, "ratio": rates["bf16"] / rates["none"]})
        print(f"round {r + 1}: float32 {rates['none']:,.0f} tokens/s, bf16 {rates['bf16']:,.0f}: "
              f"{rounds[-1]['ratio']:.2f}x", file=sys.stderr)

    quality = {}
    for precision in PRECISIONS:
        wall, result = train(tmp / "prepared", precision, args.quality_steps, keep=tmp / f"quality-{precision}")
        quality[precision] = {"bits_per_char": result["bits_per_char"], "loss": result["loss"], "wall_seconds": wall}
        print(f"{precision}: {args.quality_steps} steps -> {result['bits_per_char']:.3f} bits/char", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)

    median = {p: statistics.median(r["tokens_per_s"][p] for r in rounds) for p in PRECISIONS}
    ratio = statistics.median(r["ratio"] for r in rounds)
    gap = quality["bf16"]["bits_per_char"] - quality["none"]["bits_per_char"]
    result = {
        "benchmark": "precision", "preset": "small", "batch": BATCH, "seq_len": SEQ_LEN, "lengths": [short, long],
        "rounds": rounds, "median_tokens_per_s": median, "ratio_median": ratio,
        "quality_steps": args.quality_steps, "quality": quality, "bits_per_char_gap": gap,
        "targets": {"ratio": 1.5, "bits_per_char_gap": 0.02},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"\n`lmstack train`, small transformer, batch {BATCH} x {SEQ_LEN}, XLA; tokens/s differenced between "
          f"{short} and {long} steps, median of {args.rounds} interleaved rounds\n")
    print("| precision | tokens/s | vs float32 | bits/char after "
          f"{args.quality_steps} steps |\n|---|---:|---:|---:|")
    for p, name in (("none", "float32"), ("bf16", "bf16 (mixed_bfloat16)")):
        print(f"| {name} | {median[p]:,.0f} | {median[p] / median['none']:.2f}x (rounds: "
              f"{', '.join(format(r['tokens_per_s'][p] / r['tokens_per_s']['none'], '.2f') for r in rounds)}) | "
              f"{quality[p]['bits_per_char']:.3f} |")
    print(f"\nbf16 / float32: {ratio:.2f}x tokens/s (target >= 1.5x), {gap:+.3f} bits/char (target <= +0.02)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "precision.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
