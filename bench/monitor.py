"""The drift report's defaults on real text: what `lmstack monitor` says of in-domain and foreign prompts.

Trains (or reuses, --workdir) a char-level `tiny` transformer on the bundled Shakespeare, then
writes request logs as `lmstack serve` writes them (TensorFlow Serving's PredictionLog protos, one
Predict log of `generate` per prompt), one hour per row, and runs `pipelines.monitor.monitor` over
them with the default thresholds. The rows, each at 20, 60 and 200 prompts:

  shakespeare   lines of plays the model was not trained on (in-domain: should stay quiet)
  reviews       movie-review snippets (data/reviews.csv.bz2: another domain, same language)
  chinese       Tang poems (../shared/corpora/fortunes_zh_tang300.txt, when present: another language)

Prints the table and writes bench/results/monitor.json and bench/results/monitor.png (the plot
`lmstack monitor` draws over these windows).

usage: python bench/monitor.py [--workdir=runs/bench-monitor] [--steps=600]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import json
import os
import pathlib
import platform
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
CHINESE = ROOT.parent / "shared" / "corpora" / "fortunes_zh_tang300.txt"
SIZES = (20, 60, 200)
HOUR = 3600
T0 = 1_796_000_000 // HOUR * HOUR


def sources() -> dict[str, list[str]]:
    with gzip.open(ROOT / "data" / "shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = {"shakespeare": [line.strip() for line in lines[60000:64000] if len(line.strip()) > 20]}
    with bz2.open(ROOT / "data" / "reviews.csv.bz2", "rt", encoding="utf-8") as f:
        out["reviews"] = [row["text"] for row in csv.DictReader(f)]
    if CHINESE.is_file():
        out["chinese"] = [line.strip() for line in CHINESE.read_text(encoding="utf-8").splitlines()
                          if len(line.strip()) > 8]
    return out


def train_workdir(workdir: pathlib.Path, steps: int) -> None:
    import models
    from pipelines import prepare, tokenizers, train

    with gzip.open(ROOT / "data" / "shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir.parent / "corpus.txt").write_text("".join(lines[:60000]), encoding="utf-8")  # not the prompts' lines
    prepare.prepare(prepare.PrepareConfig(corpus=(str(workdir.parent / "corpus.txt"),),
                                          tokenizer=tokenizers.TokenizerConfig("char")), workdir)
    vocab = json.loads((workdir / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    train.train(workdir, models.make_config("transformer", "tiny", vocab),
                train.TrainConfig(steps=steps, batch_size=16, warmup_steps=20, eval_every=0, checkpoint_every=steps),
                verbose=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-monitor" / "run"))
    parser.add_argument("--steps", type=int, default=600, help="training steps of the tiny model (batch 16)")
    args = parser.parse_args()

    import app  # noqa: F401
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from pipelines import evaluate, monitor

    workdir = pathlib.Path(args.workdir)
    if not (workdir / "checkpoints").is_dir():
        train_workdir(workdir, args.steps)
    validation = evaluate.evaluate(workdir)
    texts = sources()
    logs = workdir.parent / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    rows, hour = [], 0
    with tf.io.TFRecordWriter(str(logs / "lm-20261207-000000-1-0001.tfrecord")) as writer:
        for size in SIZES:
            for name, prompts in texts.items():
                for prompt in prompts[:size]:
                    log = prediction_log_pb2.PredictionLog()
                    log.log_metadata.model_spec.name = "lm"
                    log.log_metadata.timestamp_secs = T0 + hour * HOUR + 1
                    log.predict_log.request.inputs["prompt"].CopyFrom(
                        tf.make_tensor_proto(np.array([prompt.encode()], object)))
                    writer.write(log.SerializeToString())
                rows.append({"source": name, "prompts": size, "hour": hour})
                hour += 1
    result = monitor.monitor(str(logs / "lm"), workdir, window=HOUR)
    for row, window in zip(rows, result["windows"]):
        row.update({k: window[k] for k in ("prompt_tokens_total", "js_divergence", "js_baseline", "js_excess",
                                           "unk_rate", "perplexity", "perplexity_baseline", "perplexity_ratio",
                                           "judged", "drift")})
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(result["plots"][0], RESULTS / "monitor.png")
    out = {"benchmark": "monitor", "steps": args.steps, "validation": validation,
           "thresholds": result["thresholds"], "rows": rows,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    (RESULTS / "monitor.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"model: tiny transformer, {args.steps} steps; validation perplexity {validation['perplexity']:.2f}")
    print(f"{'source':12} {'prompts':>7} {'tokens':>7} {'JS':>6} {'JS base':>7} {'JS excess':>9} {'[UNK]':>6} "
          f"{'ppl':>8} {'ppl base':>8} {'ratio':>7}  drift")
    for r in rows:
        print(f"{r['source']:12} {r['prompts']:7} {r['prompt_tokens_total']:7} {r['js_divergence']:6.3f} "
              f"{r['js_baseline']:7.3f} {r['js_excess']:9.3f} {r['unk_rate']:6.3f} {r['perplexity']:8.2f} "
              f"{r['perplexity_baseline']:8.2f} {r['perplexity_ratio']:7.2f}  "
              f"{', '.join(r['drift']) or ('no' if r['judged'] else 'too few tokens')}")
    print("wrote bench/results/monitor.json and bench/results/monitor.png")


if __name__ == "__main__":
    main()
