"""Quality at a fixed budget: what each training default buys, LSTM and transformer, against a PyTorch GPT.

Prepares runs/bench-quality/ (the bundled Shakespeare, char tokenizer, 10%
validation), then trains each row's model at the `small` preset for the same
budget (default 1,500 steps of 32 x 128 tokens, about 1.25 passes over the
training split) through the real `pipelines.train.train` and scores the whole
validation split. The rows are the defaults and each default reverted alone:

  defaults      what `lmstack train` does with no flags: no dropout below two passes over
                the data, peak learning rate 3e-3 (transformer) and 5e-3 (LSTM) at the small
                presets, Keras's initialization
                (seeds 0 and 1)
  dropout 0.1   the dropout lmstack used before, at every run length
  peak LR 1e-3  the learning rate `lmstack train` used before (bench/quality.py used 2e-3)
  before        both: `lmstack train` with no flags until the current defaults
  GPT-2 init    GPT-2's initialization (transformer; tried as a default and not kept)
  Llama block   the `llama-small` preset's block at the same shape: rotary positions, RMSNorm,
                SwiGLU, 2 key/value heads for 4 query heads, no biases (transformer; seeds 0 and 1)

and `pytorch-gpt`: nanoGPT's model and initialization in PyTorch, same shape,
same windows, same schedule as the defaults row, trained in a subprocess of
this job (bench/reference_gpt.py; `make bench` installs it beside the lock);
`pytorch-llama` the same with Llama's block, as the Llama block rows.

XLA is on for the transformer and off for the LSTM (XLA compiles tf_keras's
LSTM step again at every step); it changes speed, not what is learned.
Reference points on this text: gzip -9 3.14 bits/char, bzip2 -9 2.37, xz -9e 2.50.

Prints a table and writes bench/results/quality.json.

usage: python bench/quality.py [--steps=1500] [--rows=transformer/defaults,lstm/before,...] [--reuse]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: F401  (environment before TensorFlow)
import numpy as np
import tensorflow as tf

import models
from pipelines import dataset, prepare, tokenizers, train

CORPUS = ROOT / "data" / "shakespeare.txt.gz"
RESULTS = ROOT / "bench" / "results"
COMPRESSORS = {"gzip -9": 3.14, "bzip2 -9": 2.37, "xz -9e": 2.50}
# The llama-small preset's block settings (its shape is the small preset's).
LLAMA_BLOCK = {k: v for k, v in models.GPTConfig.PRESETS["llama-small"].items()
               if k not in ("seq_len", "layers", "d_model", "heads")}
# row -> (model overrides, train overrides): the defaults, and each default reverted alone.
ROWS = {
    "defaults": ({}, {}),
    "defaults seed 1": ({}, {"seed": 1}),
    "dropout 0.1": ({"dropout": 0.1}, {}),
    "peak LR 1e-3": ({}, {"learning_rate": 1e-3}),
    "before": ({"dropout": 0.1}, {"learning_rate": 1e-3}),
    "GPT-2 init": ({"init": "gpt2"}, {}),
    "Llama block": (LLAMA_BLOCK, {}),
    "Llama block seed 1": (LLAMA_BLOCK, {"seed": 1}),
}
TRANSFORMER_ONLY = ("GPT-2 init", "Llama block", "Llama block seed 1")
FAMILY_ROWS = {"transformer": list(ROWS), "lstm": [r for r in ROWS if r not in TRANSFORMER_ONLY]}


# The row whose trained model stays (checkpoints/): bench/optimize.py and bench/edge.py start from it.
KEPT_ROW = "defaults"


def _finished(run: pathlib.Path, model_config, train_config):
    """The metrics of a finished run with exactly these settings, else None."""
    try:
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    # Settings added since the run was trained take their defaults (what the run trained with).
    saved = models.config_to_json(models.config_from_json(config["model"])) if "model" in config else {}
    saved_model = {k: v for k, v in saved.items() if k != "dropout"}
    wanted_model = {k: v for k, v in models.config_to_json(model_config).items() if k != "dropout"}
    saved_train = config.get("train", {})
    same = (saved_model == wanted_model and metrics.get("steps") == train_config.steps
            and (model_config.dropout is None or model_config.dropout == config["model"].get("dropout"))
            and all(saved_train.get(k) == getattr(train_config, k)
                    for k in ("batch_size", "seed", "warmup_steps", "weight_decay"))
            and saved_train.get("learning_rate") == train_config.for_model(model_config).learning_rate)
    return metrics if same else None


def _windows(workdir: pathlib.Path, seq_len: int, path: pathlib.Path) -> pathlib.Path:
    """The train and validation windows lmstack's tf.data pipeline cuts, saved for the PyTorch reference."""
    def cut(split):
        ds = dataset._windows(dataset.shard_files(workdir, split), seq_len, None, False, None).batch(4096)
        return np.concatenate(list(ds.as_numpy_iterator()))
    vocab = json.loads((workdir / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    np.savez(path, train=cut("train"), val=cut("val"), vocab_size=vocab)
    return path


def _reference(base: pathlib.Path, model_config, train_config, reuse: bool) -> dict | None:
    block = "llama" if model_config.positions == "rope" else "gpt2"
    out = base / f"pytorch-{'llama' if block == 'llama' else 'gpt'}.json"
    settings = {"steps": train_config.steps, "batch_size": train_config.batch_size, "layers": model_config.layers,
                "d_model": model_config.d_model, "heads": model_config.heads,
                "learning_rate": train_config.learning_rate, "warmup_steps": train_config.warmup(),
                "weight_decay": train_config.weight_decay, "beta_2": 0.99, "clip_norm": train_config.clip_norm}
    if block == "llama":
        settings |= {"block": "llama", "kv_heads": model_config.num_kv_heads, "mlp_dim": model_config.hidden_dim}
    if reuse and out.exists():
        saved = json.loads(out.read_text())
        if saved.get("settings") == settings:
            return saved
    if importlib.util.find_spec("torch") is None:
        print(f"{out.stem}: torch is not installed (`make bench` installs it); row left out", file=sys.stderr)
        return None
    data = _windows(base / "data-only", model_config.seq_len, base / "windows.npz")
    print(f"training {out.stem} ...", file=sys.stderr)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "reference_gpt.py"), f"--data={data}",
                           *(f"--{k}={v}" for k, v in settings.items())],
                          capture_output=True, text=True, check=True)
    result = {**json.loads(done.stdout.strip().splitlines()[-1]), "settings": settings}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rows", default="",
                        help="FAMILY/ROW,... (default: every row of both families, then pytorch-gpt)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-quality"))
    parser.add_argument("--reuse", action="store_true",
                        help="take a row's figures from its finished run (same settings) instead of training")
    args = parser.parse_args()

    base = pathlib.Path(args.workdir)
    config = prepare.PrepareConfig(corpus=(str(CORPUS),), tokenizer=tokenizers.TokenizerConfig("char"))
    manifest = prepare.prepare(config, base / "data-only").manifest
    vocab = manifest["tokenizer"]["vocab_size"]
    wanted = [tuple(r.split("/", 1)) for r in args.rows.split(",")] if args.rows else (
        [(f, r) for f in ("transformer", "lstm") for r in FAMILY_ROWS[f]]
        + [("pytorch-gpt", ""), ("pytorch-llama", "")])
    rows = []
    for family, row in wanted:
        if family in ("pytorch-gpt", "pytorch-llama"):
            model_config = models.make_config("transformer", "small", vocab,
                                              **(LLAMA_BLOCK if family == "pytorch-llama" else {}))
            train_config = train.TrainConfig(steps=args.steps, batch_size=args.batch_size).for_model(model_config)
            result = _reference(base, model_config, train_config, args.reuse)
            if result:
                nats = result["val_loss_nats_per_token"]
                rows.append({"model": family, "row": "nanoGPT recipe", "params": result["params"],
                             "steps": args.steps, "dropout": 0.0, "learning_rate": train_config.learning_rate,
                             "val_loss_nats_per_char": nats, "val_bits_per_char": nats / math.log(2),
                             "train_tokens_per_s": result["train_tokens_per_s"],
                             "wall_seconds": result["wall_seconds"], "torch": result["torch"]})
            continue
        model_overrides, train_overrides = ROWS[row]
        model_config = models.make_config(family, "small", vocab, **model_overrides)
        train_config = train.TrainConfig(**{
            "steps": args.steps, "batch_size": args.batch_size, "eval_every": 500, "eval_batches": 20,
            "checkpoint_every": 500, "jit_compile": family == "transformer", "strategy": "default",
            **train_overrides})
        run = base / family / row.replace(" ", "-").replace("+", "plus-")
        summary = _finished(run, model_config, train_config) if args.reuse else None
        if row == KEPT_ROW and not (run / "checkpoints").is_dir():
            summary = None  # bench/optimize.py and bench/edge.py start from this row's model
        if summary is None:
            if run.exists():
                shutil.rmtree(run)
            shutil.copytree(base / "data-only", run)
            print(f"training {family} / {row} ...", file=sys.stderr)
            summary = train.train(run, model_config, train_config, verbose=2)
            if row != KEPT_ROW:  # 20 MB a row; the figures are in metrics.json
                shutil.rmtree(run / "checkpoints", ignore_errors=True)
        saved = json.loads((run / "config.json").read_text())
        rows.append({"model": family, "row": row, "params": summary["params"], "steps": summary["steps"],
                     "block": "llama" if saved["model"].get("positions") == "rope" else "gpt2",
                     "dropout": saved["model"]["dropout"], "learning_rate": saved["train"]["learning_rate"],
                     "init": saved["model"].get("init", ""),
                     "val_loss_nats_per_char": summary["loss"], "val_bits_per_char": summary["bits_per_char"],
                     "train_tokens_per_s": round(summary["tokens_per_s"] or 0),
                     "wall_seconds": summary["wall_seconds"], "config": saved["model"]})
    result = {"benchmark": "quality", "corpus": CORPUS.name, "tokenizer": "char",
              "tokens_per_step": args.batch_size * 128, "rows": rows, "compressors_bits_per_char": COMPRESSORS,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__}}
    print(f"\n{args.steps} steps x {args.batch_size} x 128 tokens, char level, bundled Shakespeare "
          f"(validation: {manifest['splits']['val']['tokens']:,} tokens)\n")
    print(f"{'model':12} {'row':18} {'params':>9} {'dropout':>7} {'init':>6} {'peak LR':>8} "
          f"{'val bits/char':>14} {'tokens/s':>9} {'wall s':>7}")
    for r in rows:
        print(f"{r['model']:12} {r['row']:18} {r['params']:9,} {r['dropout']:7g} {r.get('init', 'gpt2'):>6} "
              f"{r['learning_rate']:8g} {r['val_bits_per_char']:14.3f} {r['train_tokens_per_s']:9,} "
              f"{r['wall_seconds']:7.0f}")
    for name, bpc in COMPRESSORS.items():
        print(f"{name:12} {'':18} {'':>9} {'':>7} {'':>6} {'':>8} {bpc:14.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/quality.json")


if __name__ == "__main__":
    main()
