"""The LSTM baseline: Embedding -> stacked LSTM (or GRU) -> dropout -> logits at every position.

Stock tf_keras recurrent layers, so TF-MOT prunes their kernels and TFLite
fuses a whole-sequence LSTM into its built-in kernel. With
`tie_embeddings=True` the top layer's output is projected to the embedding
width and multiplied by the embedding table (fewer parameters for large
vocabularies).

`LSTMDecoder` runs the same layers one step at a time, carrying `(h, c)`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar, Literal

import tensorflow as tf

from models import layers
from models.config import check_sizes
from models.backend import keras

Cell = Literal["lstm", "gru"]
CELLS = typing.get_args(Cell)


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    """Shape of the LSTM language model.

    Attributes:
        vocab_size: token ids (from the tokenizer).
        embedding_dim: width of the token embedding.
        units: width of each recurrent layer.
        layers: stacked recurrent layers.
        cell: the recurrent cell: lstm or gru.
        dropout: between layers and before the output (default: the training run decides, as for
            the transformer).
        tie_embeddings: logits through the embedding table (after a projection to embedding_dim).
        seq_len: the training sequence length (recurrent models have no context limit).
    """
    vocab_size: int
    embedding_dim: int = 128
    units: int = 256
    layers: int = 2
    cell: Cell = "lstm"
    dropout: float | None = None
    tie_embeddings: bool = False
    seq_len: int = 128

    PRESETS: ClassVar[dict[str, dict]] = {
        "tiny": dict(embedding_dim=16, units=32, layers=2, dropout=0.0, seq_len=16),
        # small/base match the transformer presets' parameters and FLOPs per token.
        "small": dict(embedding_dim=128, units=256, layers=2, seq_len=128),
        "base": dict(embedding_dim=256, units=1024, layers=2, seq_len=256),
    }

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell={self.cell!r}: expected one of {', '.join(CELLS)}")
        check_sizes(self, ("vocab_size", "embedding_dim", "units", "layers", "seq_len"))

    @property
    def gates(self) -> int:
        return 4 if self.cell == "lstm" else 3

    def num_params(self) -> int:
        e, u, g = self.embedding_dim, self.units, self.gates
        total = self.vocab_size * e
        for i in range(self.layers):
            fan_in = e if i == 0 else u
            # GRU in Keras (reset_after=True) has two bias vectors per gate.
            total += g * u * (fan_in + u) + g * u * (1 if self.cell == "lstm" else 2)
        if self.tie_embeddings:
            return total + u * e + e
        return total + u * self.vocab_size + self.vocab_size

    def flops_per_token(self) -> int:
        """Forward-pass FLOPs per token (x3 for a training step): 2 per multiply-add."""
        e, u, g = self.embedding_dim, self.units, self.gates
        macs = sum(g * u * ((e if i == 0 else u) + u) for i in range(self.layers))
        macs += u * e + e * self.vocab_size if self.tie_embeddings else u * self.vocab_size
        return 2 * macs


def _recurrent(config: LSTMConfig, i: int):
    cls = keras.layers.LSTM if config.cell == "lstm" else keras.layers.GRU
    return cls(config.units, return_sequences=True, return_state=True, name=f"rnn{i}")


def build_lstm(config: LSTMConfig, seq_len: int | None = None) -> keras.Model:
    """The functional model: int32 ids `[B, T]` -> float32 logits `[B, T, vocab_size]`.

    Args:
        config: the shape.
        seq_len: a static sequence length (TFLite fuses the LSTM only with one).
    """
    c = config
    ids = keras.Input(shape=(seq_len,), dtype="int32", name="token_ids")
    x, table = layers.TokenEmbedding(c.vocab_size, c.embedding_dim, name="token_embedding")(ids)
    for i in range(c.layers):
        x = _recurrent(c, i)(x)[0]  # (B, T, units); the final states are for decoding
        x = keras.layers.Dropout(c.dropout or 0.0, name=f"rnn{i}_dropout")(x)
    if c.tie_embeddings:
        x = keras.layers.Dense(c.embedding_dim, name="projection")(x)  # (B, T, e)
        logits = layers.TiedLogits(name="logits")([x, table])
    else:
        logits = keras.layers.Dense(c.vocab_size, dtype="float32", name="logits")(x)
    return keras.Model(ids, logits, name="lstm")


class LSTMDecoder:
    """Incremental decoding on the layers of a built LSTM model, carrying its state.

    The state is one float tensor `[B, layers, 2, units]`: `(h, c)` per layer
    (a GRU uses only `h`; its second slot stays zero).

    Args:
        model: a model from `build_lstm` (its weights are used, not copied).
        config: the config it was built from.
    """

    max_length = None  # no context limit

    def __init__(self, model: keras.Model, config: LSTMConfig):
        self.model = model
        self.config = config
        self.vocab_size = config.vocab_size

    def init_cache(self, batch_size, max_length: int | None = None) -> tf.Tensor:
        c = self.config
        dtype = layers.get_layer(self.model, "rnn0").compute_dtype
        return tf.zeros([batch_size, c.layers, 2, c.units], dtype)

    def call_with_cache(self, ids: tf.Tensor, cache: tf.Tensor | None, index=None) -> tuple[tf.Tensor, tf.Tensor]:
        """Feeds tokens `[B, S]` after the state in `cache`; `index` is unused (state is sequential).

        `cache=None` starts from the zero state without passing one, which is
        what lets TFLite fuse each layer into its sequence-LSTM kernel.

        Returns:
            `(logits [B, S, V] float32, updated state)`.
        """
        c, get = self.config, lambda name: layers.get_layer(self.model, name)
        x, table = get("token_embedding")(ids)
        states = []
        for i in range(c.layers):
            layer = get(f"rnn{i}")
            initial = None if cache is None else [cache[:, i, 0], cache[:, i, 1]][:2 if c.cell == "lstm" else 1]
            if c.cell == "lstm":
                x, h, cell = layer(x, initial_state=initial)
            else:
                x, h = layer(x, initial_state=initial)
                cell = tf.zeros_like(h)
            x = get(f"rnn{i}_dropout")(x)  # identity at inference; under QAT it may carry a fake-quant
            states.append(tf.stack([h, cell], axis=1))  # (B, 2, units)
        return self._logits(x, table), tf.stack(states, axis=1)

    def prefill(self, ids: tf.Tensor, count, cache: tf.Tensor) -> tf.Tensor:
        """The state after the first `count` tokens of `ids` `[B, T]`, one `step` at a time (any count, one
        shape for XLA)."""
        def body(i, state):
            return i + 1, self.step(ids[:, i], state)[1]

        return tf.while_loop(lambda i, state: i < count, body, (tf.constant(0), cache))[1]

    def prefill_rows(self, ids: tf.Tensor, lengths: tf.Tensor, cache_length=None) -> tuple[tf.Tensor, tf.Tensor]:
        """A new state after each row's first `lengths[i]` tokens of `ids` `[B, T]`, one token at a time
        (a row's state stops at its length; `cache_length` means nothing to an LSTM).

        Returns:
            `(logits after each row's last token [B, V] float32, state)`.
        """
        def body(i, state, last):
            logits, new_state = self.step(ids[:, i], state)
            state = tf.where((i < lengths)[:, tf.newaxis, tf.newaxis, tf.newaxis], new_state, state)
            return i + 1, state, tf.where((i == lengths - 1)[:, tf.newaxis], logits, last)

        cache = self.init_cache(tf.shape(ids)[0])
        last = tf.zeros([tf.shape(ids)[0], self.vocab_size], tf.float32)
        _, cache, last = tf.while_loop(lambda i, *_: i < tf.reduce_max(lengths), body, (tf.constant(0), cache, last))
        return last, cache

    # A server's batch of sequences (`models.decoding.continue_rows`): the state is one part, and
    # positions mean nothing to it.
    def split_cache(self, cache: tf.Tensor) -> list[tf.Tensor]:
        return [cache]

    def join_cache(self, parts: list[tf.Tensor]) -> tf.Tensor:
        return parts[0]

    def step_rows(self, ids: tf.Tensor, parts: list[tf.Tensor], positions: tf.Tensor,
                  write: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """One token per row `[B]` (`step`); the rows not in `write` keep their state."""
        del positions
        logits, state = self.step(ids, parts[0])
        return logits, [tf.where(write[:, tf.newaxis, tf.newaxis, tf.newaxis], state, parts[0])]

    def step(self, ids: tf.Tensor, cache: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One token per row, `[B]`, through the cells directly (no recurrent loop op).

        The same arithmetic as `call_with_cache` on one token; a TFLite model
        built from it has only element-wise and fully-connected ops, which
        quantize to int8 (TensorFlow's calibrator crashes on LSTM loops that
        return their state).

        Returns:
            `(logits [B, V] float32, updated state)`.
        """
        logits, h, c = self.step_cells(ids, tf.unstack(cache[:, :, 0], axis=1), tf.unstack(cache[:, :, 1], axis=1))
        return logits, tf.stack([tf.stack(h, axis=1), tf.stack(c, axis=1)], axis=2)

    def step_cells(self, ids: tf.Tensor, h: list[tf.Tensor], c: list[tf.Tensor]):
        """`step` on each layer's `h` and `c` `[B, units]` apart, never stacked together: an int8
        TFLite file quantizes a tensor with one scale, and `c` (in the hundreds) would set `h`'s.

        Returns:
            `(logits [B, V] float32, [h per layer], [c per layer])`.
        """
        config, get = self.config, lambda name: layers.get_layer(self.model, name)
        x, table = get("token_embedding")(ids[:, tf.newaxis])
        x = x[:, 0]  # (B, e)
        hs, cs = [], []
        for i in range(config.layers):
            cell = get(f"rnn{i}").cell
            if config.cell == "lstm":
                x, (h_i, c_i) = cell(x, [h[i], c[i]])
            else:
                x, h_i = cell(x, [h[i]])
                h_i = h_i[0] if isinstance(h_i, (list, tuple)) else h_i
                c_i = tf.zeros_like(h_i)
            x = get(f"rnn{i}_dropout")(x)
            hs.append(h_i)
            cs.append(c_i)
        return self._logits(x[:, tf.newaxis], table)[:, 0], hs, cs

    def _logits(self, x: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
        get = lambda name: layers.get_layer(self.model, name)
        if self.config.tie_embeddings:
            return get("logits")([get("projection")(x), table])
        return get("logits")(x)
