"""Tokenizer and tf.data throughput on the bundled corpus.

Measures, interleaved over several rounds in one process (the machines are
shared and noisy, so only same-run ratios mean much):

- keras-nlp tokenizers as lmstack runs them (char, wordpiece, bpe): MB/s of
  text and tokens/s, tokenizing the corpus line batches through tf.data;
- HF `tokenizers` WordPiece and byte-level BPE with the *same* vocabulary
  (and merges) as the references, and the seconds `bpe` takes to learn;
- the training input (`pipelines.dataset.train_dataset`): tokens/s delivered;
- `lmstack prepare` (char, 8 generated files) of a corpus at two sizes (`--stream_gb`,
  default 0.5 and 2 GB of the bundled text repeated), each one process: its peak
  resident memory (the child's own, `os.wait4`) and MB/s. Memory that does not grow
  with the corpus is the claim; 0 skips it.

Prints a table and writes bench/results/pipeline_throughput.json.

usage: python bench/pipeline_throughput.py [--rounds=3] [--batches=3000] [--stream_gb=0.5,2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: F401  (environment before TensorFlow)
import tensorflow as tf

from pipelines import dataset, prepare, tokenizers

CORPUS = ROOT / "data" / "shakespeare.txt.gz"
RESULTS = ROOT / "bench" / "results"


def keras_nlp_rate(tok, lines: list[str], nbytes: int) -> tuple[float, int]:
    ds = tf.data.Dataset.from_tensor_slices(lines).batch(1024).map(
        tok.tokenize, num_parallel_calls=tf.data.AUTOTUNE).map(lambda r: r.flat_values)
    start = time.perf_counter()
    tokens = sum(int(t.shape[0]) for t in ds)
    return nbytes / (time.perf_counter() - start) / 1e6, tokens


def hf_wordpiece(vocab_file: pathlib.Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def hf_bpe(directory: pathlib.Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(directory / tokenizers.BPE_VOCAB_FILE),
                                         str(directory / tokenizers.BPE_MERGES_FILE)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def hf_rate(tok, lines: list[str], nbytes: int) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(lines), 1024):
        tokens += sum(len(e.ids) for e in tok.encode_batch(lines[i:i + 1024], add_special_tokens=False))
    return nbytes / (time.perf_counter() - start) / 1e6, tokens


def dataset_rate(workdir: pathlib.Path, batches: int, seq_len: int = 128, batch: int = 16) -> float:
    ds = dataset.train_dataset(workdir, seq_len, batch, seed=0)
    it = iter(ds)
    for _ in range(50):  # warm-up: fill the shuffle buffer and prefetch
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * seq_len * batch / (time.perf_counter() - start)


def streaming_prepare(root: pathlib.Path, gigabytes: float, text: str) -> dict:
    """`lmstack prepare` (char) of `gigabytes` of text in 8 files: wall seconds, MB/s, peak resident MB."""
    corpus = root / f"corpus-{gigabytes:g}"
    corpus.mkdir()
    data = text.encode("utf-8")
    per_file = int(gigabytes * 1e9 / 8)
    for i in range(8):
        with open(corpus / f"part-{i}.txt", "wb") as f:
            for _ in range(per_file // len(data)):
                f.write(data)
            f.write(data[:per_file % len(data)].rsplit(b"\n", 1)[0] + b"\n")
    nbytes = sum(p.stat().st_size for p in corpus.iterdir())
    from bench.common import measured_lmstack

    run = measured_lmstack("prepare", f"--corpus={corpus}/*.txt", f"--workdir={root / f'stream-{gigabytes:g}'}",
                           "--tokenizer=char")
    shutil.rmtree(corpus)
    shutil.rmtree(root / f"stream-{gigabytes:g}")
    tokens = run["result"]["train_tokens"] + run["result"]["val_tokens"]
    return {"gigabytes": round(nbytes / 1e9, 3), "seconds": round(run["seconds"], 1),
            "mb_per_s": round(nbytes / 1e6 / run["seconds"], 2), "peak_rss_mb": round(run["peak_rss_mb"]),
            "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--stream_gb", default="0.5,2", help="corpus sizes for the streaming prepare (0: skip)")
    args = parser.parse_args()

    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()
    lines = text.splitlines()
    nbytes = len(text.encode("utf-8"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-bench-"))
    toks, learn_seconds = {}, {}
    for kind, size in (("char", 0), ("wordpiece", 8000), ("bpe", 8000)):
        (tmp / kind).mkdir()
        began = time.perf_counter()
        tokenizers.learn(tokenizers.TokenizerConfig(kind, size), lines, tmp / kind)
        learn_seconds[kind] = round(time.perf_counter() - began, 2)
        toks[f"keras-nlp {kind}"] = tokenizers.load(tmp / kind)
    wordpiece_ref, bpe_ref = "HF tokenizers wordpiece (reference)", "HF tokenizers byte-level BPE (reference)"
    references = {wordpiece_ref: hf_wordpiece(tmp / "wordpiece" / tokenizers.WORDPIECE_VOCAB_FILE),
                  bpe_ref: hf_bpe(tmp / "bpe")}
    # Each row's ratio is against the HF tokenizer of its kind (char has none: WordPiece's).
    reference_of = {"keras-nlp char": wordpiece_ref, "keras-nlp wordpiece": wordpiece_ref, "keras-nlp bpe": bpe_ref,
                    wordpiece_ref: wordpiece_ref, bpe_ref: bpe_ref}
    config = prepare.PrepareConfig(corpus=(str(CORPUS),), tokenizer=tokenizers.TokenizerConfig("char"))
    prepare.prepare(config, tmp / "run")

    rates: dict[str, list[float]] = {name: [] for name in [*toks, *references]}
    counts: dict[str, int] = {}
    pipeline: list[float] = []
    for r in range(args.rounds):
        for name, tok in toks.items():
            mbs, counts[name] = keras_nlp_rate(tok, lines, nbytes)
            rates[name].append(mbs)
        for name, tok in references.items():
            mbs, counts[name] = hf_rate(tok, lines, nbytes)
            rates[name].append(mbs)
        pipeline.append(dataset_rate(tmp / "run", args.batches))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    for name, values in rates.items():
        mbs = statistics.median(values)
        ref = reference_of[name]
        rows.append({"name": name, "mb_per_s": round(mbs, 2), "tokens_per_s": round(mbs * 1e6 / nbytes * counts[name]),
                     "tokens": counts[name], "reference": ref,
                     "vs_reference": round(mbs / statistics.median(rates[ref]), 2)})
    result = {
        "benchmark": "pipeline_throughput",
        "corpus": CORPUS.name, "corpus_bytes": nbytes, "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__},
        "tokenizers": rows, "learn_seconds": learn_seconds,
        "train_dataset": {"seq_len": 128, "batch_size": 16, "tokenizer": "char",
                          "tokens_per_s": round(statistics.median(pipeline)),
                          "rounds_tokens_per_s": [round(p) for p in pipeline]},
        "streaming_prepare": [streaming_prepare(tmp, float(gb), text) for gb in args.stream_gb.split(",")
                              if float(gb) > 0],
    }
    print(f"\n{'tokenizer':42} {'MB/s':>8} {'tokens/s':>12} {'vs HF':>7}  (HF: of its kind; char: WordPiece)")
    for row in rows:
        print(f"{row['name']:42} {row['mb_per_s']:8.2f} {row['tokens_per_s']:12,} {row['vs_reference']:7.2f}")
    print("learning (s): " + ", ".join(f"{k} {v}" for k, v in learn_seconds.items()))
    print(f"\ntrain_dataset (char, seq 128, batch 16): {result['train_dataset']['tokens_per_s']:,} tokens/s")
    if result["streaming_prepare"]:
        print("\n| `lmstack prepare` (char, 8 files) | GB | seconds | MB/s | peak resident MB |\n"
              "|---|---:|---:|---:|---:|")
        for row in result["streaming_prepare"]:
            print(f"| generated corpus | {row['gigabytes']:.2f} | {row['seconds']:,.0f} | {row['mb_per_s']:.1f} | "
                  f"{row['peak_rss_mb']:,} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "pipeline_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
