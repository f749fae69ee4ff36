"""A GPT-style decoder: the transformer model of lmstack.

token + learned position embedding -> N pre-LayerNorm blocks (causal
multi-head self-attention, GELU MLP, residuals through `Add` layers) -> final
LayerNorm -> logits through the tied token embedding. Every layer is a stock
tf_keras layer or one of `models.layers`, so TF-MOT can wrap all of them.

`GPTDecoder` runs the same layers incrementally with a key/value cache.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Callable, ClassVar, Literal

import tensorflow as tf

from models import layers
from models.config import check_sizes
from models.backend import keras


Init = Literal["glorot", "gpt2"]
INITS = typing.get_args(Init)
Activation = Literal["gelu", "gelu_tanh"]
ACTIVATIONS = typing.get_args(Activation)
INIT_STD = 0.02  # GPT-2's standard deviation for every weight matrix and embedding


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT decoder.

    Attributes:
        vocab_size: token ids (from the tokenizer).
        seq_len: the context: the longest sequence the position table covers.
        layers: transformer blocks.
        d_model: width of the residual stream.
        heads: attention heads; d_model must divide by it.
        mlp_ratio: the MLP's hidden width is mlp_ratio * d_model.
        dropout: after the embedding, the attention output and the MLP (default: the training run
            decides: 0 for a run that sees its training data fewer than 2 times, else 0.1).
        init: glorot (Keras's defaults; embeddings N(0, 0.02)) or gpt2 (every weight matrix
            N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 * layers)), biases zero).
        activation: the MLP's: gelu (exact, with erf) or gelu_tanh (GPT-2's tanh approximation,
            which its pre-trained weights expect).
    """
    # None dropout: `pipelines.train.run_dropout` decides; a model built with None has rate 0.
    # Glorot is the default init: at the small preset's budget GPT-2's starts slower and ends
    # 0.11 bits/char worse (docs/results.md, "Quality").
    vocab_size: int
    seq_len: int = 128
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float | None = None
    init: Init = "glorot"
    activation: Activation = "gelu"

    PRESETS: ClassVar[dict[str, dict]] = {
        "tiny": dict(seq_len=16, layers=2, d_model=32, heads=2, dropout=0.0),
        "small": dict(seq_len=128, layers=4, d_model=128, heads=4),
        "base": dict(seq_len=256, layers=6, d_model=384, heads=6),
        # GPT-2's shapes (124M and 355M parameters at its 50,257-token vocabulary), its GELU and init.
        "gpt2": dict(seq_len=1024, layers=12, d_model=768, heads=12, init="gpt2", activation="gelu_tanh"),
        "gpt2-medium": dict(seq_len=1024, layers=24, d_model=1024, heads=16, init="gpt2", activation="gelu_tanh"),
    }

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: expected one of {', '.join(INITS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} does not divide into heads={self.heads}")
        check_sizes(self, ("vocab_size", "seq_len", "layers", "d_model", "heads", "mlp_ratio"))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def num_params(self) -> int:
        d, f = self.d_model, self.mlp_ratio * self.d_model
        per_block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # q,k,v,o + MLP + 2 LayerNorms
        return self.vocab_size * d + self.seq_len * d + self.layers * per_block + 2 * d

    def flops_per_token(self) -> int:
        """Forward-pass FLOPs per token at full context (x3 for a training step).

        2 FLOPs per multiply-add of every matmul (projections, MLP, tied output)
        plus attention's QK^T and AV over `seq_len` keys (PaLM's convention).
        """
        d, f = self.d_model, self.mlp_ratio * self.d_model
        matmul_params = self.layers * (4 * d * d + 2 * d * f) + self.vocab_size * d
        return 2 * matmul_params + 2 * 2 * self.layers * self.seq_len * d


@dataclasses.dataclass(frozen=True)
class Block:
    """Transformer block `i`'s layers: x + Dropout(Out(Attn(LN1(x)))), then x + Dropout(MLP(LN2(x))).

    The one definition of the forward pass (`__call__`) and of the layer names TF-MOT,
    checkpoints and the exporters see: `block{i}_{field}`. `build_gpt` makes the layers
    (`Block.build`); `GPTDecoder` finds them in a built model, QAT wrappers included
    (`Block.of`), and runs the same `__call__` with attention over its cache.

    The MLP's exact GELU is `mlp_in`'s activation; GPT-2's tanh GELU is a layer of its
    own, `mlp_act` (TF-MOT's QAT knows activations by name and has no tanh GELU), None
    with the exact one. The dropouts are None when decoding (inference).
    """
    ln1: Callable
    query: Callable
    key: Callable
    value: Callable
    attention_output: Callable
    attention_dropout: Callable | None
    attention_residual: Callable
    ln2: Callable
    mlp_in: Callable
    mlp_act: Callable | None
    mlp_out: Callable
    mlp_dropout: Callable | None
    mlp_residual: Callable

    @classmethod
    def build(cls, config: GPTConfig, i: int) -> Block:
        """New layers for block `i` of a model of `config`."""
        c, rate = config, config.dropout or 0.0

        def dense(field, units, residual=False, **kwargs):
            if c.init == "gpt2":
                std = INIT_STD / math.sqrt(2 * c.layers) if residual else INIT_STD
                kwargs["kernel_initializer"] = keras.initializers.RandomNormal(stddev=std)
            return keras.layers.Dense(units, name=f"block{i}_{field}", **kwargs)

        def norm(field):
            return keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_{field}")

        exact = c.activation == "gelu"
        return cls(
            ln1=norm("ln1"), query=dense("query", c.d_model), key=dense("key", c.d_model),
            value=dense("value", c.d_model), attention_output=dense("attention_output", c.d_model, residual=True),
            attention_dropout=keras.layers.Dropout(rate, name=f"block{i}_attention_dropout"),
            attention_residual=keras.layers.Add(name=f"block{i}_attention_residual"),
            ln2=norm("ln2"), mlp_in=dense("mlp_in", c.mlp_ratio * c.d_model, activation="gelu" if exact else None),
            mlp_act=None if exact else layers.GELU(approximate=True, name=f"block{i}_mlp_act"),
            mlp_out=dense("mlp_out", c.d_model, residual=True),
            mlp_dropout=keras.layers.Dropout(rate, name=f"block{i}_mlp_dropout"),
            mlp_residual=keras.layers.Add(name=f"block{i}_mlp_residual"))

    @classmethod
    def of(cls, model: keras.Model, config: GPTConfig, i: int) -> Block:
        """Block `i`'s layers in a built model, for inference: no dropout."""
        def get(field):
            return layers.get_layer(model, f"block{i}_{field}")

        inference = {"attention_dropout": None, "mlp_dropout": None,
                     "mlp_act": None if config.activation == "gelu" else get("mlp_act")}
        return cls(**{f.name: inference[f.name] if f.name in inference else get(f.name)
                      for f in dataclasses.fields(cls)})

    def __call__(self, x: tf.Tensor, attend: Callable) -> tf.Tensor:
        """Args:
            x: the residual stream `[B, T, d]`.
            attend: `(q, k, v)` -> the attention output `[B, T, d]` before its projection.
        """
        h = self.ln1(x)
        a = self.attention_output(attend(self.query(h), self.key(h), self.value(h)))
        x = self.attention_residual([x, _maybe(self.attention_dropout, a)])
        h = _maybe(self.mlp_act, self.mlp_in(self.ln2(x)))
        h = self.mlp_out(h)
        return self.mlp_residual([x, _maybe(self.mlp_dropout, h)])


def _maybe(layer: Callable | None, x: tf.Tensor) -> tf.Tensor:
    return x if layer is None else layer(x)


def build_gpt(config: GPTConfig, seq_len: int | None = None) -> keras.Model:
    """The functional model: int32 ids `[B, T]` -> float32 logits `[B, T, vocab_size]`.

    A flat functional graph of stock tf_keras layers (and `models.layers`), so
    TF-MOT can wrap each one.

    Args:
        config: the shape.
        seq_len: a static sequence length (TFLite wants one); None accepts any T <= config.seq_len.
    """
    c = config
    ids = keras.Input(shape=(seq_len,), dtype="int32", name="token_ids")
    x, table = layers.TokenEmbedding(c.vocab_size, c.d_model, name="token_embedding")(ids)  # (B, T, d), (V, d)
    x = layers.PositionEmbedding(c.seq_len, name="position_embedding")(x)
    x = keras.layers.Dropout(c.dropout or 0.0, name="embedding_dropout")(x)
    for i in range(c.layers):
        attention = layers.CausalAttention(c.heads, name=f"block{i}_attention")
        x = Block.build(c, i)(x, lambda q, k, v, attention=attention: attention([q, k, v]))
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_ln")(x)
    logits = layers.TiedLogits(name="logits")([x, table])  # (B, T, V)
    return keras.Model(ids, logits, name="gpt")


def write_cache(old: tf.Tensor, update: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
    """Writes `update` into `old` at `positions` along axis 2, keeping every shape static.

    A one-hot placement (an einsum) instead of slicing at a dynamic index, so
    the decoding loop compiles with XLA and converts to TFLite built-in ops.

    Args:
        old: `[B, 2, max_len, d]`.
        update: `[B, 2, S, d]`.
        positions: int `[S]`, consecutive (`start .. start + S - 1`), within `max_len`.
    """
    if update.shape[2] is not None and update.shape[2] == old.shape[2]:
        # S == max_len consecutive positions can only be 0 .. max_len-1: the update is the whole new
        # cache. Exact, and no [S, S] one-hot for an int8 TFLite prefill to quantize.
        return update
    place = tf.one_hot(positions, tf.shape(old)[2], dtype=old.dtype)  # (S, max_len)
    written = tf.einsum("sm,bksd->bkmd", place, update)  # update rows moved to their positions
    keep = 1.0 - tf.reduce_sum(place, axis=0)  # (max_len,): 0 where written
    return old * keep[:, tf.newaxis] + written


class GPTDecoder:
    """Incremental decoding with a key/value cache, on the layers of a built GPT.

    The cache is one float tensor `[B, layers, 2, max_length, d_model]`
    (keys, then values, heads side by side); position p of the cache holds the
    keys/values of the token at position p. Five dimensions at most: TFLite's
    kernels (strided slice, int8 calibration) take no more. Layers and keys/values
    are taken apart with `tf.unstack`, not indexing: TFLite runs UNPACK as block
    copies, while a slice of a 5-D tensor goes to its per-element reference kernel
    (docs/results.md, "TFLite on the device runtime", has the measurement).

    Args:
        model: a model from `build_gpt` (its weights are used, not copied).
        config: the config it was built from.
    """

    def __init__(self, model: keras.Model, config: GPTConfig):
        self.model = model
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_length = config.seq_len
        self._layer = lambda name: layers.get_layer(model, name)
        self.blocks = [Block.of(model, config, i) for i in range(config.layers)]

    def init_cache(self, batch_size, max_length: int | None = None) -> tf.Tensor:
        c = self.config
        length = c.seq_len if max_length is None else max_length
        dtype = self._layer("block0_query").compute_dtype
        return tf.zeros([batch_size, c.layers, 2, length, c.d_model], dtype)

    def prefill(self, ids: tf.Tensor, count, cache: tf.Tensor) -> tf.Tensor:
        """The cache after the first `count` tokens of `ids` `[B, T]`.

        Runs all T positions in one pass (one shape for XLA, whatever `count`);
        the cache past `count` holds what the buffer had there, which decoding
        overwrites position by position before any query reads it (attention is causal).
        """
        del count
        return self.call_with_cache(ids, cache, 0)[1]

    def prefill_rows(self, ids: tf.Tensor, lengths: tf.Tensor, cache_length: int) -> tuple[tf.Tensor, tf.Tensor]:
        """A new cache of `cache_length` positions holding each row's first `lengths[i]` tokens of
        `ids` `[B, T]` (T <= cache_length), in one pass.

        Returns:
            `(logits after each row's last token [B, V] float32, cache)`. The cache past a row's
            length holds what the padding made of it, which decoding overwrites position by
            position before any query reads it (attention is causal).
        """
        # A cache of exactly T positions takes the keys and values whole (no one-hot placement).
        logits, cache = self.call_with_cache(ids, self.init_cache(tf.shape(ids)[0], tf.shape(ids)[1]), 0)
        cache = tf.pad(cache, [[0, 0], [0, 0], [0, 0], [0, cache_length - tf.shape(ids)[1]], [0, 0]])
        return tf.gather(logits, lengths - 1, batch_dims=1), cache

    def call_with_cache(self, ids: tf.Tensor, cache: tf.Tensor, index) -> tuple[tf.Tensor, tf.Tensor]:
        """Runs tokens at positions `index .. index + S - 1` against the cache.

        Args:
            ids: int32 `[B, S]`.
            cache: from `init_cache` or a previous call.
            index: position of `ids[:, 0]` (scalar int).
        Returns:
            `(logits [B, S, V] float32, updated cache)`.
        """
        c, get = self.config, self._layer
        index = tf.convert_to_tensor(index, tf.int32)
        length = tf.shape(ids)[1]
        max_length = tf.shape(cache)[3]
        q_positions = index + tf.range(length)
        k_positions = tf.range(max_length)
        x, table = get("token_embedding")(ids)
        x = get("position_embedding")(x, start_index=index)  # (B, S, d)
        layer_caches = tf.unstack(cache, axis=1)  # c.layers x (B, 2, max_len, d)
        new_cache = []
        for block, layer_cache in zip(self.blocks, layer_caches):
            def attend(q, k, v, layer_cache=layer_cache):
                kv = tf.stack([k, v], axis=1)  # (B, 2, S, d)
                layer_cache = write_cache(layer_cache, kv, q_positions)  # (B, 2, max_len, d)
                new_cache.append(layer_cache)
                keys, values = tf.unstack(layer_cache, axis=1)  # (B, max_len, d) each
                return layers.attention(q, keys, values, c.heads, q_positions, k_positions)

            x = block(x, attend)
        logits = get("logits")([get("final_ln")(x), table])
        return logits, tf.stack(new_cache, axis=1)

    # -- a server's batch of sequences, each at its own position (`models.decoding.continue_rows`) --

    def split_cache(self, cache: tf.Tensor) -> list[tf.Tensor]:
        """The cache as one tensor per layer and kind, `[B, max_len, d]` each (keys of layer 0, its
        values, keys of layer 1, ...): the layout `step_rows` writes in place."""
        return [part for layer in tf.unstack(cache, axis=1) for part in tf.unstack(layer, axis=1)]

    def join_cache(self, parts: list[tf.Tensor]) -> tf.Tensor:
        """The inverse of `split_cache`."""
        return tf.stack([tf.stack(parts[i:i + 2], axis=1) for i in range(0, len(parts), 2)], axis=1)

    def step_rows(self, ids: tf.Tensor, parts: list[tf.Tensor], positions: tf.Tensor,
                  write: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """One token per row, each at its own position, against a cache from `split_cache`.

        Each layer's new key and value go to their row and position by a scatter, which XLA
        does in place inside a decoding loop (the one-hot write of `call_with_cache` rewrites
        the whole cache at every step).

        Args:
            ids, positions: int32 `[B]`; the positions of the rows written below the cache's length.
            write: bool `[B]`, the rows whose cache is updated; the others keep theirs (and their
                logits mean nothing).
        Returns:
            `(logits [B, V] float32, parts)`.
        """
        c, get = self.config, self._layer
        # A row not written may sit past the end (a finished sequence at the context): any position
        # serves it, as its logits mean nothing.
        positions = tf.minimum(positions, tf.shape(parts[0])[1] - 1)
        x, table = get("token_embedding")(ids[:, tf.newaxis])
        x = get("position_embedding")(x, start_index=positions)  # (B, 1, d)
        at = tf.stack([tf.range(tf.shape(ids)[0]), positions], axis=1)  # (B, 2): row, position
        new_parts = []
        for i, block in enumerate(self.blocks):
            def attend(q, k, v, keys=parts[2 * i], values=parts[2 * i + 1]):
                for new, old in ((k, keys), (v, values)):
                    kept = tf.where(write[:, tf.newaxis], new[:, 0], tf.gather_nd(old, at))
                    new_parts.append(tf.tensor_scatter_nd_update(old, at, kept))
                return layers.attention_one(q, new_parts[-2], new_parts[-1], c.heads, positions)

            x = block(x, attend)
        logits = get("logits")([get("final_ln")(x), table])
        return logits[:, 0], new_parts
