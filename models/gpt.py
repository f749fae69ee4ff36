"""A GPT-style decoder: the transformer model of lmstack.

token + learned position embedding -> N pre-LayerNorm blocks (causal
multi-head self-attention, GELU MLP, residuals through `Add` layers) -> final
LayerNorm -> logits through the tied token embedding. Every layer is a stock
tf_keras layer or one of `models.layers`, so TF-MOT can wrap all of them.

The same block in the shape of today's open models (Llama, Mistral, Qwen,
SmolLM) is a matter of settings: rotary positions, RMSNorm, a gated (SwiGLU)
MLP, grouped-query attention, no biases, an untied output (the `llama-*`
presets).

`GPTDecoder` runs the same layers incrementally with a key/value cache. The
config, `GPTConfig`, is in `models.gpt_config`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import tensorflow as tf

from models import layers, lora
from models.backend import keras
from models.gpt_config import ACTIVATIONS, INIT_STD, INITS, GPTConfig  # noqa: F401 (models.gpt.GPTConfig)


@dataclasses.dataclass(frozen=True)
class Block:
    """Transformer block `i`'s layers: x + Dropout(Out(Attn(Norm1(x)))), then x + Dropout(MLP(Norm2(x))).

    The one definition of the forward pass (`__call__`) and of the layer names TF-MOT,
    checkpoints and the exporters see: `block{i}_{field}`. `build_gpt` makes the layers
    (`Block.build`); `GPTDecoder` finds them in a built model, QAT wrappers included
    (`Block.of`), and runs the same `__call__` with attention over its cache.

    The optional layers are None where the config has no use for them:
    - `rotary` turns queries and keys with rotary positions (learned positions: None).
    - `mlp_gate` is a gated MLP's gate projection (plain MLP: None).
    - `mlp_act` is the MLP's activation as a layer of its own: GPT-2's tanh GELU (TF-MOT's
      QAT knows activations by name and has no tanh GELU) or a gated MLP's `act(gate) * up`;
      None with the exact GELU, which is `mlp_in`'s activation.
    - the dropouts are None when decoding (inference).
    """
    ln1: Callable
    query: Callable
    key: Callable
    value: Callable
    rotary: Callable | None
    attention_output: Callable
    attention_dropout: Callable | None
    attention_residual: Callable
    ln2: Callable
    mlp_gate: Callable | None
    mlp_in: Callable
    mlp_act: Callable | None
    mlp_out: Callable
    mlp_dropout: Callable | None
    mlp_residual: Callable

    @staticmethod
    def unused(config: GPTConfig) -> set[str]:
        """The optional layers a model of `config` does not have."""
        return ({"rotary"} if config.positions == "learned" else set()) | (
            {"mlp_gate"} if config.mlp == "plain" else set()) | (
            {"mlp_act"} if config.mlp == "plain" and config.activation == "gelu" else set())

    @classmethod
    def build(cls, config: GPTConfig, i: int) -> Block:
        """New layers for block `i` of a model of `config`."""
        c, rate = config, config.dropout or 0.0

        adapted = lora.projections(c.lora_targets) if c.lora_rank else ()

        def dense(field, units, bias, residual=False, **kwargs):
            if c.init == "gpt2":
                std = INIT_STD / math.sqrt(2 * c.layers) if residual else INIT_STD
                kwargs["kernel_initializer"] = keras.initializers.RandomNormal(stddev=std)
            if field in adapted:
                return lora.LoRADense(units, c.lora_rank, c.lora_alpha_or_rank, use_bias=bias, name=f"block{i}_{field}",
                                      **kwargs)
            return keras.layers.Dense(units, use_bias=bias, name=f"block{i}_{field}", **kwargs)

        qkv_bias, bias = c.bias != "none", c.bias == "all"
        unused = cls.unused(c)
        plain_gelu = "mlp_act" in unused
        if c.mlp == "gated":
            act = layers.GatedActivation(c.activation, name=f"block{i}_mlp_act")
        else:
            act = None if plain_gelu else layers.GELU(approximate=True, name=f"block{i}_mlp_act")
        return cls(
            ln1=norm(c, f"block{i}_ln1"), query=dense("query", c.d_model, qkv_bias),
            key=dense("key", c.kv_dim, qkv_bias), value=dense("value", c.kv_dim, qkv_bias),
            rotary=None if "rotary" in unused else layers.Rotary(c.head_dim, c.rope_theta, name=f"block{i}_rotary"),
            attention_output=dense("attention_output", c.d_model, bias, residual=True),
            attention_dropout=keras.layers.Dropout(rate, name=f"block{i}_attention_dropout"),
            attention_residual=keras.layers.Add(name=f"block{i}_attention_residual"),
            ln2=norm(c, f"block{i}_ln2"),
            mlp_gate=None if "mlp_gate" in unused else dense("mlp_gate", c.hidden_dim, bias),
            mlp_in=dense("mlp_in", c.hidden_dim, bias, activation="gelu" if plain_gelu else None),
            mlp_act=act, mlp_out=dense("mlp_out", c.d_model, bias, residual=True),
            mlp_dropout=keras.layers.Dropout(rate, name=f"block{i}_mlp_dropout"),
            mlp_residual=keras.layers.Add(name=f"block{i}_mlp_residual"))

    @classmethod
    def of(cls, model: keras.Model, config: GPTConfig, i: int) -> Block:
        """Block `i`'s layers in a built model, for inference: no dropout."""
        absent = cls.unused(config) | {"attention_dropout", "mlp_dropout"}
        return cls(**{f.name: None if f.name in absent else layers.get_layer(model, f"block{i}_{f.name}")
                      for f in dataclasses.fields(cls)})

    def __call__(self, x: tf.Tensor, attend: Callable, start=None) -> tf.Tensor:
        """Args:
            x: the residual stream `[B, T, d]`.
            attend: `(q, k, v)` -> the attention output `[B, T, d]` before its projection.
            start: the position of `x[:, 0]` for rotary positions (a scalar, or int `[B]` per
                row); None: 0.
        """
        h = self.ln1(x)
        q, k = self.query(h), self.key(h)
        if self.rotary is not None:
            q, k = self.rotary([q, k]) if start is None else self.rotary([q, k], start_index=start)
        a = self.attention_output(attend(q, k, self.value(h)))
        x = self.attention_residual([x, _maybe(self.attention_dropout, a)])
        h = self.ln2(x)
        if self.mlp_gate is not None:
            h = self.mlp_act([self.mlp_gate(h), self.mlp_in(h)])
        else:
            h = _maybe(self.mlp_act, self.mlp_in(h))
        h = self.mlp_out(h)
        return self.mlp_residual([x, _maybe(self.mlp_dropout, h)])


def norm(config: GPTConfig, name: str) -> keras.layers.Layer:
    """A new normalization layer of the config's kind."""
    if config.norm == "rmsnorm":
        return layers.RMSNorm(config.norm_eps, name=name)
    return keras.layers.LayerNormalization(epsilon=config.norm_eps, center=config.bias == "all", name=name)


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
    if c.positions == "learned":
        x = layers.PositionEmbedding(c.seq_len, name="position_embedding")(x)
    x = keras.layers.Dropout(c.dropout or 0.0, name="embedding_dropout")(x)
    for i in range(c.layers):
        attention = layers.CausalAttention(c.heads, c.kv_heads, name=f"block{i}_attention")
        x = Block.build(c, i)(x, lambda q, k, v, attention=attention: attention([q, k, v]))
    x = norm(c, "final_ln")(x)
    if c.tie_embeddings:
        logits = layers.TiedLogits(name="logits")([x, table])  # (B, T, V)
    else:
        init = keras.initializers.RandomNormal(stddev=INIT_STD) if c.init == "gpt2" else "glorot_uniform"
        logits = keras.layers.Dense(c.vocab_size, use_bias=False, kernel_initializer=init, dtype="float32",
                                    name="logits")(x)
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

    The cache is one float tensor `[B, layers, 2, max_length, kv_dim]` (keys, then
    values, heads side by side; kv_dim is d_model without grouped-query attention);
    position p of the cache holds the keys/values of the token at position p. Five dimensions at most: TFLite's
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
        return tf.zeros([batch_size, c.layers, 2, length, c.kv_dim], dtype)

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
        layer_caches = tf.unstack(cache, axis=1)  # c.layers x (B, 2, max_len, d)
        new_cache = []

        def write(i, k, v, positions):
            layer_cache = write_cache(layer_caches[i], tf.stack([k, v], axis=1), positions)  # (B, 2, max_len, d)
            new_cache.append(layer_cache)
            return tf.unstack(layer_cache, axis=1)  # keys, values (B, max_len, d)

        logits = self._cached(ids, index, tf.shape(cache)[3], write)
        return logits, tf.stack(new_cache, axis=1)

    def call_with_parts(self, ids: tf.Tensor, parts: list[tf.Tensor], index) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """`call_with_cache` on a cache held as one tensor per layer and kind, `[B, 1, max_len, kv_dim]`
        each (keys of layer 0, its values, keys of layer 1, ...): LiteRT-LM's `kv_cache_k_i` /
        `kv_cache_v_i` layout, which lmstack's TFLite files use (`serving.exporters.tflite`).

        Positions past the cache are dropped, not written (a padded prefill chunk may run past the
        end), and read the last position's embedding; no valid position is affected.

        Returns:
            `(logits [B, S, V] float32, parts)`.
        """
        new_parts = []

        def write(i, k, v, positions):
            for new, old in ((k, parts[2 * i]), (v, parts[2 * i + 1])):
                new_parts.append(write_cache(old, new[:, tf.newaxis], positions))
            return tf.squeeze(new_parts[-2], 1), tf.squeeze(new_parts[-1], 1)  # a reshape, not a slice's copy

        return self._cached(ids, index, tf.shape(parts[0])[2], write), new_parts

    def _cached(self, ids: tf.Tensor, index, max_length, write: Callable) -> tf.Tensor:
        """The forward pass of `ids` at positions `index ..` against a cache of `max_length` positions
        that `write(layer, k, v, positions)` updates, returning the layer's keys and values to attend."""
        c, get = self.config, self._layer
        index = tf.convert_to_tensor(index, tf.int32)
        q_positions = index + tf.range(tf.shape(ids)[1])
        x, table = get("token_embedding")(ids)
        if c.positions == "learned":
            x = get("position_embedding")(x, positions=q_positions)  # (B, S, d)
        k_positions = tf.range(max_length)
        for i, block in enumerate(self.blocks):
            def attend(q, k, v, i=i):
                keys, values = write(i, k, v, q_positions)
                return layers.attention(q, keys, values, c.heads, q_positions, k_positions, c.kv_heads)

            x = block(x, attend, start=index)
        return self._logits(get("final_ln")(x), table)

    def _logits(self, x: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
        """The output layer: through the tied embedding `table`, or a matrix of its own."""
        output = self._layer("logits")
        return output([x, table]) if self.config.tie_embeddings else output(x)

    # -- a server's batch of sequences, each at its own position (`models.decoding.continue_rows`) --

    def split_cache(self, cache: tf.Tensor) -> list[tf.Tensor]:
        """The cache as one tensor per layer and kind, `[B, max_len, kv_dim]` each (keys of layer 0, its
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
        if c.positions == "learned":
            x = get("position_embedding")(x, start_index=positions)  # (B, 1, d)
        at = tf.stack([tf.range(tf.shape(ids)[0]), positions], axis=1)  # (B, 2): row, position
        new_parts = []
        for i, block in enumerate(self.blocks):
            def attend(q, k, v, keys=parts[2 * i], values=parts[2 * i + 1]):
                for new, old in ((k, keys), (v, values)):
                    kept = tf.where(write[:, tf.newaxis], new[:, 0], tf.gather_nd(old, at))
                    new_parts.append(tf.tensor_scatter_nd_update(old, at, kept))
                return layers.attention_one(q, new_parts[-2], new_parts[-1], c.heads, positions, c.kv_heads)

            x = block(x, attend, start=positions)
        logits = self._logits(get("final_ln")(x), table)
        return logits[:, 0], new_parts
