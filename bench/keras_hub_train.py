"""What a user would otherwise run: a stock keras-hub script training the same GPT, for bench/train_speed.py.

Written as keras-hub's guides write one: the text read into memory, a
char-level vocabulary, tf.data windows shuffled and batched, `GPT2Backbone`
inside `GPT2CausalLM` (no preprocessor), AdamW, `fit(verbose=0)` with XLA
(`jit_compile=True`, Keras 3's default on the TensorFlow backend when it can),
no metrics, no callbacks, no validation. Prints one JSON line with the wall
time of the whole process so far.

usage: python bench/keras_hub_train.py --corpus=data/shakespeare.txt.gz --steps=360 [--batch_size=16]
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse
import gzip
import json

import keras
import keras_hub
import numpy as np
import tensorflow as tf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()

    opener = gzip.open if args.corpus.endswith(".gz") else open
    with opener(args.corpus, "rt", encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    ids = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    lookup = np.zeros(ids.max() + 1, np.int32)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    windows = tf.data.Dataset.from_tensor_slices(lookup[ids]).batch(args.seq_len + 1, drop_remainder=True)
    ds = (windows.shuffle(10_000, seed=0).repeat().batch(args.batch_size, drop_remainder=True)
          .map(lambda w: ({"token_ids": w[:, :-1], "padding_mask": tf.ones_like(w[:, :-1], tf.bool)}, w[:, 1:]))
          .prefetch(tf.data.AUTOTUNE))

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(chars), num_layers=args.layers, num_heads=args.heads, hidden_dim=args.d_model,
        intermediate_dim=4 * args.d_model, dropout=0.0, max_sequence_length=args.seq_len)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    history = model.fit(ds, steps_per_epoch=args.steps, epochs=1, verbose=0)
    print(json.dumps({"steps": args.steps, "loss": float(history.history["loss"][-1]),
                      "process_seconds": time.perf_counter() - STARTED}))


if __name__ == "__main__":
    main()
