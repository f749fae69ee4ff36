"""`evaluate`: validation loss, perplexity and bits per character of a workdir's model.

Bits per character are total nats / characters of the evaluated text / ln 2,
so models with different tokenizers compare. The text is scored in
non-overlapping windows of the model's training length; the characters
counted are those of the tokens scored (tokens x the text's chars/token).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

import models
from pipelines import checkpoints, corpus as corpus_lib, dataset, prepare, tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import UserError
from pipelines.progress import Progress

METRICS_FILE = "metrics.json"


def _windows_of(stream: np.ndarray, seq_len: int, batch_size: int) -> tf.data.Dataset:
    count = stream.size // (seq_len + 1)
    if count == 0:
        raise UserError(f"the text has {stream.size} tokens, fewer than one window of {seq_len + 1}; "
                        "evaluate on more text")
    windows = stream[:count * (seq_len + 1)].reshape(count, seq_len + 1)
    return tf.data.Dataset.from_tensor_slices((windows[:, :-1], windows[:, 1:])).batch(batch_size)


def evaluate_model(workdir: str | os.PathLike, model, model_config: models.ModelConfig,
                   corpus: Sequence[str] | None = None, batch_size: int = 32, write: bool = True,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Scores the validation split (or a new corpus, tokenized with the run's tokenizer).

    Returns:
        `{"loss", "perplexity", "bits_per_char", "tokens", "chars", "text"}`; also
        written to WORKDIR/metrics.json when `write`.
    """
    progress = progress or Progress()
    wd = workdir_lib.Workdir(workdir)
    manifest = wd.read_manifest()
    seq_len = model_config.seq_len
    if corpus:
        docs = corpus_lib.read_corpus(corpus)
        tokenizer = tokenizers.load(wd.tokenizer_dir)
        blocks = corpus_lib.make_blocks(docs, num_blocks=max(1, sum(len(d.text) for d in docs) // 100_000))
        stream = prepare.tokenize_blocks(tokenizer, blocks, "evaluation text", progress)
        chars_per_token = sum(len(d.text) for d in docs) / max(1, stream.size)
        ds, text = _windows_of(stream, seq_len, batch_size), ",".join(corpus)
    else:
        val = manifest["splits"]["val"]
        chars_per_token = val["chars"] / max(1, val["tokens"])
        ds, text = dataset.val_dataset(wd.root, seq_len, batch_size, drop_remainder=False), "validation split"

    @tf.function
    def nats(x, y):
        logits = model(x, training=False)  # (B, T, V)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(logits, tf.float32))
        return tf.reduce_sum(tf.cast(ce, tf.float64)), tf.size(y)

    total, count = 0.0, 0
    for x, y in ds:
        n, c = nats(x, y)
        total, count = total + float(n), count + int(c)
    if count == 0:
        raise UserError("nothing to evaluate: the validation split is shorter than one window; "
                        "prepare with a larger --val_fraction")
    loss = total / count
    chars = count * chars_per_token
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
              "bits_per_char": total / chars / math.log(2.0), "tokens": count, "chars": round(chars),
              "text": text}
    if write:
        workdir_lib.write_json(wd.root / METRICS_FILE, result)
    return result


def evaluate(workdir: str | os.PathLike, corpus: Sequence[str] | None = None, variant: str = "",
             progress: Progress | None = None) -> dict[str, Any]:
    """Loads the newest checkpoint of the workdir (or of an optimized variant) and evaluates it.

    The result goes to the model's metrics.json (see `evaluate_model`); a
    variant's metrics.json keeps what `optimize` wrote and gains an `evaluation`.
    """
    source = checkpoints.model_dir(workdir, variant)
    model, config, _ = checkpoints.load_model(source)
    result = evaluate_model(workdir, model, config, corpus=corpus, progress=progress, write=not variant)
    if variant:
        path = source / METRICS_FILE
        metrics = workdir_lib.read_json(path) if path.is_file() else {}
        workdir_lib.write_json(path, {**metrics, "evaluation": result})
    return result
