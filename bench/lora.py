"""LoRA against full fine-tuning at real size, as a user runs them: seconds per step and peak memory.

For each preset (default: `gpt2`, GPT-2's block at 124 M parameters, and
`smollm-135m`, Llama's block at SmolLM-135M's shape), on the bundled corpus
with GPT-2's byte-level BPE learned to 50,257 tokens:

1. a base run: `lmstack train --preset=P --steps=1` (the trained weights a
   fine-tune starts from; its checkpoint holds the optimizer too, as any run's);
2. full fine-tuning: the same command continued for N more steps;
3. LoRA: `lmstack train --lora_rank=8` on a copy of the base for N steps
   (adapters on every attention and MLP projection, `lora_targets`' default).

Every run is one `lmstack` process; its peak resident memory is its own
(`os.wait4`). Seconds per step are differenced between two step counts
(`--lengths`) so start-up, tracing, the final evaluation and saving cancel; the
full and LoRA runs alternate, so both see the machine in the same mood.

Prints a table and writes bench/results/lora.json.

usage: python bench/lora.py [--presets=gpt2,smollm-135m] [--seq_len=128] [--lengths=2,8] [--rank=8]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="gpt2,smollm-135m")
    parser.add_argument("--seq_len", type=int, default=128, help="the context trained at")
    parser.add_argument("--lengths", default="2,8", help="the two step counts whose difference times a step")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.common import measured_lmstack

    short, long = (int(n) for n in args.lengths.split(","))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-bench-lora-"))
    common = [f"--batch_size={BATCH}", "--eval_every=0", "--progress=none", "--checkpoint_every=1000"]
    prepared = tmp / "prepared"
    measured_lmstack("prepare", f"--corpus={CORPUS}", f"--workdir={prepared}", "--tokenizer=bpe",
                     "--vocab_size=50257", "--val_fraction=0.002")
    vocab = json.loads((prepared / "tokenizer" / "tokenizer.json").read_text())["vocab_size"]
    rows = []
    for preset in args.presets.split(","):
        base = tmp / f"{preset}-base"
        shutil.copytree(prepared, base)
        shape = ["--model=transformer", f"--preset={preset}", f"--seq_len={args.seq_len}", "--dropout=0"]
        measured_lmstack("train", f"--workdir={base}", *shape, *common, "--steps=1")
        runs: dict[str, dict[int, dict]] = {"full": {}, "lora": {}}
        for n in (short, long):
            for kind in ("full", "lora"):
                run = tmp / f"{preset}-{kind}-{n}"
                shutil.copytree(base, run)
                argv = [*shape, f"--steps={1 + n}"] if kind == "full" else [f"--lora_rank={args.rank}", f"--steps={n}"]
                runs[kind][n] = measured_lmstack("train", f"--workdir={run}", *argv, *common)
                print(f"{preset} {kind} {n} steps: {runs[kind][n]['seconds']:.0f} s, "
                      f"peak {runs[kind][n]['peak_rss_mb']:,.0f} MB", file=sys.stderr)
                shutil.rmtree(run)
        for kind, walls in runs.items():
            per_step = (walls[long]["seconds"] - walls[short]["seconds"]) / (long - short)
            if per_step <= 0:  # start-up noise larger than the steps between the two runs
                per_step = float("nan")
            rows.append({"preset": preset, "method": kind if kind == "full" else f"LoRA rank {args.rank}",
                         "params": walls[long]["result"]["params"], "seconds_per_step": per_step,
                         "tokens_per_s": BATCH * args.seq_len / per_step,
                         "peak_rss_mb": max(w["peak_rss_mb"] for w in walls.values()),
                         "loss": walls[long]["result"]["loss"]})
        shutil.rmtree(base)
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nbatch {BATCH} x {args.seq_len} tokens, vocabulary {vocab:,} (bpe learned on the bundled corpus), "
          f"float32; every run one `lmstack train` process\n")
    print("| preset | method | parameters in the run | s/step | tokens/s | peak resident MB |\n"
          "|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['method']} | {r['params']:,} | {r['seconds_per_step']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    print(f"\n(s/step differenced between {short} and {long} steps, one run each; full and LoRA runs alternate; "
          "nan: the start-up noise outgrew the difference, rerun with longer --lengths)")
    result = {"benchmark": "lora", "seq_len": args.seq_len, "batch": BATCH, "vocab_size": vocab, "rank": args.rank,
              "lengths": [short, long], "rows": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/lora.json")


if __name__ == "__main__":
    main()
