"""`evaluate`: validation loss, perplexity and bits per character of a workdir's model.

Bits per character are total nats / characters of the evaluated text / ln 2,
so models with different tokenizers compare. The text is scored in
non-overlapping windows of the model's training length; the characters
counted are those of the tokens scored (tokens x the text's chars/token).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

import models
from pipelines import checkpoints, classifiers, corpus as corpus_lib, dataset, labelled, tokenizers
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
    @tf.function
    def nats(x, y):
        logits = model(x, training=False)  # (B, T, V)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(logits, tf.float32))
        return tf.reduce_sum(tf.cast(ce, tf.float64)), tf.size(y)

    result = _score(workdir, model_config.seq_len, batch_size, lambda x, y: [float(v) for v in nats(x, y)],
                    corpus, progress)
    if write:
        workdir_lib.write_json(workdir_lib.Workdir(workdir).root / METRICS_FILE, result)
    return result


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What to score.

    Attributes:
        corpus: text files or globs to score instead of the validation split (a classifier: labelled CSV /
            JSONL files with the columns it was trained on).
        variant: an optimized variant (WORKDIR/optimized/NAME) instead of the trained model.
    """
    corpus: tuple[str, ...] = ()
    variant: str = ""


def evaluate_logits(workdir: str | os.PathLike, logits_fn: Callable[[np.ndarray], np.ndarray], seq_len: int,
                    corpus: Sequence[str] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """`evaluate_model` for any scorer of one window: token ids `[T]` -> logits `[T, V]` (e.g. TFLite)."""
    def nats(x, y):
        total = 0.0
        for window, targets in zip(x.numpy(), y.numpy()):
            logits = logits_fn(window).astype(np.float64)
            top = logits.max(axis=-1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
            total += float(np.sum(log_z - logits[np.arange(len(targets)), targets]))
        return total, int(y.shape[0] * y.shape[1])

    return _score(workdir, seq_len, 8, nats, corpus, progress)


def _score(workdir, seq_len: int, batch_size: int, nats, corpus, progress) -> dict[str, Any]:
    progress = progress or Progress()
    wd = workdir_lib.Workdir(workdir)
    manifest = wd.read_manifest()
    if corpus:
        docs = corpus_lib.read_corpus(corpus)
        tokenizer = tokenizers.load(wd.tokenizer_dir)
        blocks = corpus_lib.make_blocks(docs, num_blocks=max(1, sum(len(d.text) for d in docs) // 100_000))
        stream = _tokenize_blocks(tokenizer, blocks, progress)
        chars_per_token = sum(len(d.text) for d in docs) / max(1, stream.size)
        ds, text = _windows_of(stream, seq_len, batch_size), ",".join(corpus)
    else:
        val = manifest["splits"]["val"]
        chars_per_token = val["chars"] / max(1, val["tokens"])
        ds, text = dataset.val_dataset(wd.root, seq_len, batch_size, drop_remainder=False), "validation split"

    total, count = 0.0, 0
    for x, y in ds:
        n, c = nats(x, y)
        total, count = total + n, count + int(c)
    if count == 0:
        raise UserError("nothing to evaluate: the validation split is shorter than one window; "
                        "prepare with a larger --val_fraction")
    loss = total / count
    chars = count * chars_per_token
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_char": total / chars / math.log(2.0), "tokens": count, "chars": round(chars),
            "text": text}


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


# ---------------------------------------------------------------------------
# A classifier workdir: accuracy, per-class precision / recall / F1, confusion


def evaluate_classifier(workdir: str | os.PathLike, corpus: Sequence[str] | None = None,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix of a classifier workdir.

    Scores its validation split, or labelled files with the columns it was trained on.
    Writes WORKDIR/metrics.json (keeping what `finetune` wrote, under the key `evaluation`).
    """
    progress = progress or Progress()
    wd = workdir_lib.Workdir(workdir)
    manifest = wd.read_manifest()
    model, config, labels, step = classifiers.load_classifier(wd.root)
    if corpus:
        parts = [labelled.read(p, manifest["text_column"], manifest["label_column"]) for p in corpus]
        examples = labelled.Examples(sum((p.texts for p in parts), ()), sum((p.labels for p in parts), ()),
                                     ",".join(corpus))
    else:
        examples = classifiers.read_split(wd.root, "val")
    unknown = sorted(set(examples.labels) - set(labels))
    if unknown:
        raise UserError(f"{examples.source}: labels {unknown} are not classes of this classifier ({labels})")
    progress.note(f"classifying {len(examples):,} examples of {examples.source}")
    tokenizer = tokenizers.load(wd.tokenizer_dir)
    probabilities = classifiers.predict_ids(model, tokenizer, examples.texts, config.max_length)
    index = {label: i for i, label in enumerate(labels)}
    result = classification_metrics(labels, np.array([index[x] for x in examples.labels]),
                                    probabilities.argmax(axis=1))
    result.update({"text": examples.source, "checkpoint_step": step})
    path = wd.root / "metrics.json"
    metrics = workdir_lib.read_json(path) if path.is_file() else {}
    workdir_lib.write_json(path, {**metrics, "evaluation": result})
    return result


def classification_metrics(labels: Sequence[str], true: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 / support, macro F1 and the confusion matrix.

    `confusion[i][j]` counts examples of class i predicted as class j.
    """
    n = len(labels)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (true, predicted), 1)
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i, i]
        predicted_i, actual_i = confusion[:, i].sum(), confusion[i, :].sum()
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                            "support": int(actual_i)}
    return {"accuracy": float(np.trace(confusion) / max(1, confusion.sum())),
            "macro_f1": float(np.mean([m["f1"] for m in per_class.values()])),
            "examples": int(confusion.sum()), "per_class": per_class,
            "labels": list(labels), "confusion": confusion.tolist()}


def describe_classifier(result: dict[str, Any]) -> str:
    """Accuracy, a per-class table and the confusion matrix."""
    labels = result["labels"]
    width = max(8, *(len(x) for x in labels))
    lines = [f"accuracy {result['accuracy']:.1%} on {result['examples']:,} examples, macro F1 "
             f"{result['macro_f1']:.3f}",
             f"{'class'.ljust(width)}  precision  recall     f1  support"]
    for label in labels:
        m = result["per_class"][label]
        lines.append(f"{label.ljust(width)}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  "
                     f"{m['support']:7,}")
    lines.append("confusion (rows: true, columns: predicted)")
    lines.append(" " * width + "  " + "  ".join(x.rjust(8) for x in labels))
    for label, row in zip(labels, result["confusion"]):
        lines.append(label.ljust(width) + "  " + "  ".join(f"{v:8,}" for v in row))
    return "\n".join(lines)


def _tokenize_blocks(tokenizer, blocks: Sequence[corpus_lib.Block], progress: Progress) -> np.ndarray:
    """One int32 token stream of an evaluation text; [EOS] closes each document's last block."""
    if not blocks:
        return np.zeros([0], np.int32)
    # Tokenize inside tf.data: the graph path, identical to training and serving.
    ds = tf.data.Dataset.from_tensor_slices([b.text for b in blocks]).map(
        tokenizer.tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pieces, eos = [], np.array([tokenizer.eos_id], np.int32)
    for i, ids in enumerate(ds.as_numpy_iterator()):
        pieces.append(ids.astype(np.int32))
        if i + 1 == len(blocks) or blocks[i + 1].doc != blocks[i].doc:
            pieces.append(eos)
        progress.count("tokenizing evaluation text", i + 1, len(blocks), "blocks")
    return np.concatenate(pieces)
