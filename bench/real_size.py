"""A GPT-2-size model through every stage, as a user runs it: time, peak memory and file sizes.

Each stage is one `lmstack` process on the bundled corpus; its peak resident
memory is the child's own (`os.wait4`'s rusage, so nothing else is counted):

- prepare: GPT-2's byte-level BPE learned to GPT-2's 50,257 tokens (the corpus
  runs out of merges a little before; the table says where) and 1 % held out
- train: the `gpt2` preset (12 x 768, 12 heads, tanh GELU, GPT-2's init) at a
  short context (`--seq_len`, default 128; the position table shrinks with it),
  batch 8, float32 and bf16; seconds/step is differenced between two step counts
  (`--lengths`) so start-up, tracing, the final evaluation and saving cancel
- export (SavedModel with every signature), TFLite float32 and int8 (KV-cache
  signatures, ai-edge-litert), then 32 greedy tokens from the int8 file

Prints a table and writes bench/results/real_size.json.

usage: python bench/real_size.py [--preset=gpt2] [--seq_len=128] [--lengths=3,11] [--precisions=none,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CORPUS = ROOT / "data" / "shakespeare.txt.gz"
BATCH = 8


def megabytes(path: pathlib.Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", help="the transformer preset (gpt2, gpt2-medium)")
    parser.add_argument("--seq_len", type=int, default=128, help="the context trained (and exported) at")
    parser.add_argument("--lengths", default="3,11", help="the two step counts whose difference times a step")
    parser.add_argument("--precisions", default="none,bf16", help="--mixed_precision settings to train with")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.common import measured_lmstack

    short, long = (int(n) for n in args.lengths.split(","))
    precisions = args.precisions.split(",")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-bench-real-size-"))
    rows: dict[str, dict] = {}

    def stage(name: str, *argv: str) -> dict:
        rows[name] = measured_lmstack(*argv)
        print(f"{name}: {rows[name]['seconds']:.0f} s, peak {rows[name]['peak_rss_mb']:,.0f} MB", file=sys.stderr)
        return rows[name]

    prepared = tmp / "prepared"
    stage("prepare (bpe)", "prepare", f"--corpus={CORPUS}", f"--workdir={prepared}", "--tokenizer=bpe",
          "--vocab_size=50257", "--val_fraction=0.01")
    vocab = json.loads((prepared / "tokenizer" / "tokenizer.json").read_text())["vocab_size"]

    steps = {}
    for precision in precisions:
        walls = {}
        for n in (short, long):
            run = tmp / f"train-{precision}-{n}"
            shutil.copytree(prepared, run)
            walls[n] = stage(f"train {precision} {n} steps", "train", f"--workdir={run}", "--model=transformer",
                             f"--preset={args.preset}", f"--seq_len={args.seq_len}", f"--batch_size={BATCH}",
                             f"--steps={n}", f"--mixed_precision={precision}", "--eval_every=0",
                             "--progress=none", "--dropout=0")
        per_step = (walls[long]["seconds"] - walls[short]["seconds"]) / (long - short)
        steps[precision] = {"seconds_per_step": per_step, "tokens_per_s": BATCH * args.seq_len / per_step,
                            "peak_rss_mb": walls[long]["peak_rss_mb"], "params": walls[long]["result"]["params"],
                            "loss": walls[long]["result"]["loss"]}
    trained = tmp / f"train-{precisions[0]}-{long}"  # the later stages start from the first precision's run

    stage("export", "export", f"--workdir={trained}")
    rows["export"]["megabytes"] = megabytes(trained / "export")
    for quantize in ("none", "int8"):
        converted = stage(f"tflite {quantize}", "tflite", f"--workdir={trained}", f"--quantize={quantize}")
        converted["megabytes"] = converted["result"]["bytes"] / 1e6
    stage("generate (litert int8, 32 tokens)", "generate", f"--workdir={trained}", "--backend=tflite",
          "--quantize=int8", "--max_new_tokens=32", "--prompt=ROMEO:")
    shutil.rmtree(tmp, ignore_errors=True)

    params = steps[precisions[0]]["params"]
    result = {
        "benchmark": "real_size", "preset": args.preset, "seq_len": args.seq_len, "batch": BATCH,
        "vocab_size": vocab, "params": params, "lengths": [short, long], "stages": rows, "train": steps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"\n`{args.preset}` preset at context {args.seq_len}, vocabulary {vocab:,} (bpe learned on the bundled "
          f"corpus), {params:,} parameters; every stage one `lmstack` process\n")
    print("| stage | seconds | peak resident MB | output MB |\n|---|---:|---:|---:|")
    for name, row in rows.items():
        size = f"{row['megabytes']:,.0f}" if "megabytes" in row else "-"
        print(f"| {name} | {row['seconds']:,.0f} | {row['peak_rss_mb']:,.0f} | {size} |")
    print(f"\n| training (batch {BATCH} x {args.seq_len}) | s/step | tokens/s | peak resident MB |\n"
          "|---|---:|---:|---:|")
    for precision, row in steps.items():
        print(f"| {'float32' if precision == 'none' else precision} | {row['seconds_per_step']:.2f} | "
              f"{row['tokens_per_s']:,.0f} | {row['peak_rss_mb']:,.0f} |")
    print(f"\n(s/step differenced between {short} and {long} steps; one run each, so a figure of this "
          "machine's mode of the moment)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "real_size.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
