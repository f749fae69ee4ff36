"""The word-level LSTM language model as the article writes it, in plain Keras.

    words -> TextVectorization (10,000 words) -> Embedding(10000, 256) -> LSTM(512) -> Dense softmax
    fit for a few epochs; then sample one word at a time with tf.random.categorical

This is the hands-on example lmstack grew from, kept runnable as written so
its figures can be compared with lmstack's commands on the same text (README,
"The article's example": what lmstack does differently and why). It reads
the bundled Shakespeare and needs only TensorFlow and tf_keras.

usage: python examples/article_lstm.py [--max_words=200000] [--epochs=3] [--prompt="to be or not"]
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
import tf_keras as keras

CORPUS = pathlib.Path(__file__).resolve().parent.parent / "data" / "shakespeare.txt.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_words", type=int, default=200_000, help="train on the first N words")
    parser.add_argument("--vocab_size", type=int, default=10_000)
    parser.add_argument("--embedding_dim", type=int, default=256)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--seq_len", type=int, default=32, help="words per training sequence")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--prompt", default="to be or not")
    parser.add_argument("--words", type=int, default=40, help="words to sample")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)

    # 1. Words to ids: lowercase, punctuation stripped, the most frequent words; the rest is [UNK] (id 1).
    text = " ".join(gzip.open(CORPUS, "rt", encoding="utf-8").read().split()[:args.max_words])
    vectorize = keras.layers.TextVectorization(max_tokens=args.vocab_size, standardize="lower_and_strip_punctuation",
                                               split="whitespace")
    vectorize.adapt([text])
    vocab = vectorize.get_vocabulary()  # ['', '[UNK]', 'the', ...]
    ids = vectorize(text)  # (N,)

    # 2. Sequences of seq_len + 1 words: the input is the first seq_len, the target each next word.
    windows = tf.data.Dataset.from_tensor_slices(ids).batch(args.seq_len + 1, drop_remainder=True)
    data = (windows.map(lambda w: (w[:-1], w[1:])).shuffle(10_000, seed=args.seed)
            .batch(args.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

    # 3. The model: an embedding, one LSTM, a softmax over the vocabulary at every position.
    model = keras.Sequential([
        keras.layers.Embedding(len(vocab), args.embedding_dim),
        keras.layers.LSTM(args.units, return_sequences=True),
        keras.layers.Dense(len(vocab), activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    history = model.fit(data, epochs=args.epochs, verbose=2)
    for epoch, loss in enumerate(history.history["loss"], 1):
        print(f"epoch {epoch}: loss {loss:.4f} nats/word")

    # 4. Sampling: feed the words so far, take the last position's distribution, draw the next word
    # with tf.random.categorical from its logits (log-probabilities), scaled by the temperature.
    words = vectorize(args.prompt).numpy().tolist()
    for _ in range(args.words):
        probs = model(tf.constant([words[-args.seq_len:]]))[:, -1]  # (1, V)
        logits = tf.math.log(probs + 1e-9) / args.temperature
        words.append(int(tf.random.categorical(logits, 1, seed=args.seed)[0, 0]))
    print("sample:", " ".join(vocab[i] for i in words))


if __name__ == "__main__":
    main()
