"""Quality at a fixed budget: LSTM vs transformer on the bundled Shakespeare, char level.

Prepares runs/bench-quality/ (char tokenizer, 10% validation), then trains
each model's `small` preset for the same budget (default 1,500 steps of
32 x 128 tokens) through the real `lmstack train` code path and scores the
whole validation split. XLA is on for the transformer and off for the LSTM
(XLA compiles tf_keras's LSTM step again at every step). Reference points on this text: gzip -9 3.14
bits/char, bzip2 -9 2.37, xz -9e 2.50.

Prints a table and writes bench/results/quality.json.

usage: python bench/quality.py [--steps=1500] [--models=transformer,lstm]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402,F401  (environment before TensorFlow)
import tensorflow as tf  # noqa: E402

import models  # noqa: E402
from pipelines import prepare, tokenizers, train  # noqa: E402

CORPUS = ROOT / "data" / "shakespeare.txt.gz"
RESULTS = ROOT / "bench" / "results"
COMPRESSORS = {"gzip -9": 3.14, "bzip2 -9": 2.37, "xz -9e": 2.50}


def _finished(run: pathlib.Path, model_config, steps: int):
    """The metrics of a finished run of this exact model and step count, else None."""
    try:
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("model") != models.config_to_json(model_config) or metrics.get("steps") != steps:
        return None
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--models", default="transformer,lstm")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-quality"))
    parser.add_argument("--reuse", action="store_true",
                        help="take a model's figures from its finished run (same config and steps) instead of training")
    args = parser.parse_args()

    base = pathlib.Path(args.workdir)
    config = prepare.PrepareConfig(corpus=(str(CORPUS),), tokenizer=tokenizers.TokenizerConfig("char"))
    manifest = prepare.prepare(config, base / "data-only").manifest
    rows = []
    for family in args.models.split(","):
        run = base / family
        model_config = models.make_config(family, "small", manifest["tokenizer"]["vocab_size"])
        train_config = train.TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=2e-3,
                                         warmup_steps=100, eval_every=500, eval_batches=20,
                                         checkpoint_every=500, jit_compile=(family == "transformer"),
                                         strategy="default")
        summary = _finished(run, model_config, args.steps) if args.reuse else None
        if summary is None:
            if run.exists():
                shutil.rmtree(run)
            shutil.copytree(base / "data-only", run)
            print(f"training {family} ...", file=sys.stderr)
            summary = train.train(run, model_config, train_config, verbose=2)
        rows.append({"model": family, "params": summary["params"], "steps": summary["steps"],
                     "tokens_per_step": args.batch_size * model_config.seq_len,
                     "val_loss_nats_per_char": summary["loss"], "val_bits_per_char": summary["bits_per_char"],
                     "train_tokens_per_s": round(summary["tokens_per_s"] or 0),
                     "wall_seconds": summary["wall_seconds"],
                     "config": models.config_to_json(model_config)})
    result = {"benchmark": "quality", "corpus": CORPUS.name, "tokenizer": "char", "rows": rows,
              "compressors_bits_per_char": COMPRESSORS,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__}}
    print(f"\n{'model':12} {'params':>10} {'steps':>6} {'val bits/char':>14} {'tokens/s':>10} {'wall s':>8}")
    for r in rows:
        print(f"{r['model']:12} {r['params']:10,} {r['steps']:6} {r['val_bits_per_char']:14.3f} "
              f"{r['train_tokens_per_s']:10,} {r['wall_seconds']:8.0f}")
    for name, bpc in COMPRESSORS.items():
        print(f"{name:12} {'':>10} {'':>6} {bpc:14.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote bench/results/quality.json")


if __name__ == "__main__":
    main()
