"""A classifier workdir (made by `finetune`): its config, its model, its examples, its predictions.

    CLS/
      config.json     `classifier` (backbone config, classes, pooling, ...), `finetune`, `base`
      tokenizer/      the base run's: the classifier reads text exactly as its LM did
      data/           train.jsonl.gz, val.jsonl.gz (text, label) + manifest.json
      checkpoints/ logs/ metrics.json

What reads one - `evaluate`, the exporters, tests - needs this module, not the
fine-tuning driver.
"""

from __future__ import annotations

import dataclasses

import gzip
import json
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

import models
from models import lora
from models import classifier as classifier_lib
from pipelines import checkpoints, fs, labelled
from pipelines import workdir as workdir_lib
from pipelines.errors import UserError

SPLIT_FILES = {"train": "train.jsonl.gz", "val": "val.jsonl.gz"}


def encode(tokenizer, texts: tf.Tensor, max_length: int) -> tf.Tensor:
    """Strings `[B]` -> int32 ids `[B, max_length]`: [EOS] (a document's start, as in training),
    the text's first `max_length - 1` tokens, then [PAD]s."""
    tokens = tf.cast(tokenizer.tokenize(texts), tf.int32)[:, :max_length - 1]  # ragged (B, <= L-1)
    start = tf.fill([tf.shape(texts)[0], 1], tokenizer.eos_id)
    ids = tf.concat([tf.RaggedTensor.from_tensor(start), tokens], axis=1)
    return ids.to_tensor(default_value=tokenizer.pad_id, shape=[None, max_length])


def dataset(tokenizer, texts: Sequence[str], label_ids: np.ndarray, max_length: int, batch_size: int,
             shuffle_seed: int | None) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((list(texts), label_ids.astype(np.int32)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(texts), seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=shuffle_seed is not None)
    ds = ds.map(lambda x, y: (encode(tokenizer, x, max_length), y), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # In-memory examples have no files to shard by: each worker takes every N-th batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def predict_ids(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Class probabilities `[N, C]` of `texts`."""
    ds = dataset(tokenizer, texts, np.zeros(len(texts), np.int32), max_length, batch_size, None)

    @tf.function(input_signature=[tf.TensorSpec([None, max_length], tf.int32)])  # one trace, any batch
    def probabilities(ids):
        return tf.nn.softmax(tf.cast(model(ids, training=False), tf.float32))

    return np.concatenate([probabilities(ids).numpy() for ids, _ in ds]) if texts else np.zeros((0, 0))


def read_classifier_config(workdir: str | os.PathLike) -> tuple[classifier_lib.ClassifierConfig, list[str]]:
    """The classifier's config and its classes (in class-id order)."""
    section = checkpoints.classifier_section(workdir)
    if section is None:
        raise UserError(f"{workdir} is not a classifier workdir; make one with `lmstack finetune`")
    return config_from_json(section), list(section["labels"])


def config_to_json(config: classifier_lib.ClassifierConfig, labels: Sequence[str]) -> dict[str, Any]:
    return {"backbone": models.config_to_json(config.backbone), "num_classes": config.num_classes,
            "pooling": config.pooling, "dropout": config.dropout, "max_length": config.max_length,
            "labels": list(labels)}


def config_from_json(data: dict[str, Any]) -> classifier_lib.ClassifierConfig:
    return classifier_lib.ClassifierConfig(
        backbone=models.config_from_json(data["backbone"]), num_classes=data["num_classes"],
        pooling=data["pooling"], dropout=data["dropout"], max_length=data["max_length"])


def load_classifier(workdir: str | os.PathLike):
    """Rebuilds a classifier workdir's model and restores its newest checkpoint; a backbone trained
    with LoRA adapters comes back plain, each adapter merged into its kernel.

    Returns:
        `(model, config, labels, step)`.
    """
    config, labels = read_classifier_config(workdir)
    latest = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(workdir))
    if latest is None:
        raise UserError(f"no checkpoint in {checkpoints.checkpoint_dir(workdir)}; rerun `lmstack finetune`")
    model = classifier_lib.build_classifier(config)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    if getattr(config.backbone, "lora_rank", 0):
        config = dataclasses.replace(config, backbone=lora.plain_config(config.backbone))
        plain = classifier_lib.build_classifier(config)
        lora.copy_weights(model, plain)
        model = plain
    return model, config, labels, int(latest.rsplit("-", 1)[1])


def write_split(path: fs.Path, examples: labelled.Examples) -> None:
    with path.open("wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as f:
        for text, label in zip(examples.texts, examples.labels):
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def read_split(workdir: str | os.PathLike, split: str) -> labelled.Examples:
    """A classifier workdir's saved train or validation examples."""
    path = workdir_lib.Workdir(workdir).data_dir / SPLIT_FILES[split]
    return labelled.read(path, "text", "label")
