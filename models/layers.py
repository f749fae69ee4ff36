"""The few layers lmstack's models need beyond stock tf_keras ones.

Each is a `PrunableLayer`, so TF-MOT's `prune_low_magnitude` can wrap a whole
model, and each stores its constructor arguments in `get_config()`.
`get_layer` finds a layer by name also after TF-MOT's `quantize_apply`
renamed its wrapper.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from models.backend import ClusterableLayer, PrunableLayer, keras


class TokenEmbedding(keras.layers.Layer, PrunableLayer, ClusterableLayer):
    """Token ids -> vectors, plus the embedding table for a tied output layer.

    Returning the table as a second output lets `TiedLogits` reuse it through
    the functional graph, so the tie survives TF-MOT's model cloning (a layer
    holding a Python reference to another layer would not).

    Args:
        vocab_size: number of token ids.
        dim: vector size.
        initializer_stddev: standard deviation of the normal initializer.

    Call arguments:
        ids: int `[B, T]`.

    Returns:
        `[embeddings (B, T, dim), table (vocab_size, dim)]`.
    """

    def __init__(self, vocab_size: int, dim: int, initializer_stddev: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.dim = dim
        self.initializer_stddev = initializer_stddev

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            "embeddings", shape=[self.vocab_size, self.dim],
            initializer=keras.initializers.RandomNormal(stddev=self.initializer_stddev))
        super().build(input_shape)

    def call(self, ids):
        table = tf.convert_to_tensor(self.embeddings)  # (V, d), in the compute dtype
        return [tf.gather(table, ids), table]

    def compute_output_shape(self, input_shape):
        return [tf.TensorShape(input_shape).concatenate([self.dim]), tf.TensorShape([self.vocab_size, self.dim])]

    def get_prunable_weights(self):
        return [self.embeddings]

    def get_clusterable_weights(self):
        return [("embeddings", self.embeddings)]

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "dim": self.dim,
                "initializer_stddev": self.initializer_stddev}


class PositionEmbedding(keras.layers.Layer, PrunableLayer):
    """Adds a learned vector per position: `x + table[start:start + T]`.

    Args:
        max_length: the longest sequence (the model's context).
        initializer_stddev: standard deviation of the normal initializer.

    Call arguments:
        x: float `[B, T, d]`.
        start_index: position of `x[:, 0]` (cached decoding feeds later positions): a scalar, or
            int `[B]`, one per row (a server's batch of sequences at different positions).
        positions: int `[T]`, the positions of every row's tokens instead of `start_index`'s; one
            past the table reads its last row (a padded TFLite prefill chunk may run past the end).
    """

    def __init__(self, max_length: int, initializer_stddev: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length
        self.initializer_stddev = initializer_stddev

    def build(self, input_shape):
        self.positions = self.add_weight(
            "positions", shape=[self.max_length, input_shape[-1]],
            initializer=keras.initializers.RandomNormal(stddev=self.initializer_stddev))
        super().build(input_shape)

    def call(self, x, start_index=0, positions=None):
        length = tf.shape(x)[1]
        table = tf.convert_to_tensor(self.positions)
        if positions is not None:
            return x + tf.gather(table, tf.minimum(positions, self.max_length - 1))[tf.newaxis]  # (B, T, d)
        start_index = tf.convert_to_tensor(start_index, tf.int32)
        if start_index.shape.rank == 1:
            return x + tf.gather(table, start_index[:, tf.newaxis] + tf.range(length)[tf.newaxis, :])  # (B, T, d)
        # A static width (not -1) keeps the slice XLA-compilable at a dynamic start.
        return x + tf.slice(table, [start_index, 0], [length, table.shape[-1]])[tf.newaxis]  # (B, T, d)

    def get_prunable_weights(self):
        return []  # max_length x d: too small to be worth pruning

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length,
                "initializer_stddev": self.initializer_stddev}


def attention(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, num_heads: int,
              q_positions: tf.Tensor, k_positions: tf.Tensor, kv_heads: int | None = None) -> tf.Tensor:
    """Causal multi-head attention of queries over keys/values.

    A query at position p sees the keys at positions <= p. With `kv_heads` < `num_heads`
    (grouped-query attention) query head h reads key/value head h // (num_heads // kv_heads).

    Args:
        q: `[B, Tq, d]`; k, v: `[B, Tk, d * kv_heads / num_heads]`.
        num_heads: query heads; d must divide by it.
        q_positions: int `[Tq]`; k_positions: int `[Tk]`.
        kv_heads: key/value heads (None: num_heads); num_heads must divide by it.
    Returns:
        `[B, Tq, d]`.
    """
    batch, d = tf.shape(q)[0], q.shape[-1]
    head_dim = d // num_heads
    group = num_heads // (kv_heads or num_heads)

    def heads(x):  # (B, T, h * hs) -> (B, h, T, hs)
        return tf.transpose(tf.reshape(x, [batch, -1, x.shape[-1] // head_dim, head_dim]), [0, 2, 1, 3])

    k, v = heads(k), heads(v)
    if group > 1:  # each key/value head once per query head of its group
        k, v = tf.repeat(k, group, axis=1), tf.repeat(v, group, axis=1)
    scores = tf.matmul(heads(q), k, transpose_b=True)  # (B, nh, Tq, Tk)
    scores = scores * tf.cast(1.0 / math.sqrt(head_dim), scores.dtype)
    visible = q_positions[:, tf.newaxis] >= k_positions[tf.newaxis, :]  # (Tq, Tk)
    # Softmax in float32 even under mixed precision. A masked score becomes 30 below the row's
    # lowest, so its weight is under e^-30 of any visible one; no extreme constant such as
    # -1e9, which would stretch an int8 range over every real score in a quantized TFLite model.
    scores = tf.cast(scores, tf.float32)
    floor = tf.stop_gradient(tf.reduce_min(scores, axis=-1, keepdims=True)) - 30.0
    scores = tf.where(visible, scores, floor)
    weights = tf.cast(tf.nn.softmax(scores, axis=-1), v.dtype)
    out = tf.matmul(weights, v)  # (B, nh, Tq, hs)
    return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [batch, -1, d])  # (B, Tq, d)


def attention_one(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, num_heads: int, q_positions: tf.Tensor,
                  kv_heads: int | None = None) -> tf.Tensor:
    """`attention` of one query per row, each at its own position, over keys at positions 0..Tk-1.

    Multiplies and sums instead of batched matmuls: the keys and values are read once, in
    place, where `attention` would lay each cache out head by head (a copy of the whole
    cache at every decoding step, most of a step's time at batch 16). A group of query
    heads meets its key/value head by broadcasting, without copies.

    Args:
        q: `[B, 1, d]`; k, v: `[B, Tk, d * kv_heads / num_heads]`.
        q_positions: int `[B]`.
        kv_heads: key/value heads (None: num_heads).
    Returns:
        `[B, 1, d]`.
    """
    batch, d = tf.shape(q)[0], q.shape[-1]
    head_dim = d // num_heads
    kv_heads = kv_heads or num_heads
    q = tf.reshape(q, [batch, 1, kv_heads, num_heads // kv_heads, head_dim])
    k = tf.reshape(k, [batch, -1, kv_heads, 1, head_dim])  # a view: no transpose
    v = tf.reshape(v, [batch, -1, kv_heads, 1, head_dim])
    scores = tf.reduce_sum(q * k, axis=-1) * tf.cast(1.0 / math.sqrt(head_dim), q.dtype)  # (B, Tk, kvh, g)
    scores = tf.cast(scores, tf.float32)
    visible = tf.range(tf.shape(k)[1])[tf.newaxis, :, tf.newaxis, tf.newaxis] \
        <= q_positions[:, tf.newaxis, tf.newaxis, tf.newaxis]
    floor = tf.stop_gradient(tf.reduce_min(scores, axis=1, keepdims=True)) - 30.0  # as `attention` masks
    weights = tf.cast(tf.nn.softmax(tf.where(visible, scores, floor), axis=1), v.dtype)  # (B, Tk, kvh, g)
    out = tf.reduce_sum(weights[..., tf.newaxis] * v, axis=1)  # (B, kvh, g, hs)
    return tf.reshape(out, [batch, 1, d])


ATTENTION_BLOCKS = 4  # query blocks of `causal_self_attention` (fastest of 2, 4, 8 at T=128 and 256)


def causal_self_attention(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, num_heads: int,
                          blocks: int = ATTENTION_BLOCKS, kv_heads: int | None = None) -> tf.Tensor:
    """Causal self-attention over a whole sequence (queries and keys at positions 0..T-1).

    With a static length T that `blocks` divides (and T >= 16 * blocks), the
    queries are split into `blocks` row blocks and block i attends to keys
    0 .. (i + 1) * T / blocks - 1 only: key blocks wholly in a block's future
    are skipped instead of computed and masked, which saves (blocks - 1) /
    (2 * blocks) of QK^T, the softmax and AV (3/8 at 4 blocks). The result
    equals one `attention` over all positions up to float rounding. Otherwise
    (a dynamic or short T) it is that one `attention`.

    Args:
        q: `[B, T, d]`; k, v: `[B, T, d * kv_heads / num_heads]`.
        num_heads: heads; d must divide by it.
        blocks: query blocks.
        kv_heads: key/value heads (None: num_heads).
    Returns:
        `[B, T, d]`.
    """
    length = q.shape[1]
    if length is None or blocks <= 1 or length % blocks or length < 16 * blocks:
        positions = tf.range(tf.shape(q)[1])
        return attention(q, k, v, num_heads, positions, positions, kv_heads)
    size = length // blocks
    positions = tf.range(length)
    outputs = []
    for i in range(blocks):
        rows, seen = slice(i * size, (i + 1) * size), slice(0, (i + 1) * size)
        outputs.append(attention(q[:, rows], k[:, seen], v[:, seen], num_heads, positions[rows], positions[seen],
                                 kv_heads))
    return tf.concat(outputs, axis=1)  # (B, T, d)


class CausalAttention(keras.layers.Layer, PrunableLayer):
    """The weightless core of causal self-attention: softmax(QK^T / sqrt(hs)) V per head.

    Runs `causal_self_attention`, which skips the masked-out future of a
    static-length sequence.

    The query/key/value/output projections are plain `Dense` layers around it,
    so TF-MOT prunes them and its default 8-bit QAT quantizes them (it does
    not cover `MultiHeadAttention`).

    Args:
        num_heads: number of (query) heads.
        kv_heads: key/value heads (None: num_heads): grouped-query attention.

    Call arguments:
        inputs: `[q, k, v]`: `[B, T, d]`, and keys and values `[B, T, d * kv_heads / num_heads]`.
    """

    def __init__(self, num_heads: int, kv_heads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.kv_heads = kv_heads

    def call(self, inputs):
        q, k, v = inputs
        return causal_self_attention(q, k, v, self.num_heads, kv_heads=self.kv_heads)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "kv_heads": self.kv_heads}


class GELU(keras.layers.Layer, PrunableLayer):
    """GELU as a layer: exact (erf) or GPT-2's tanh approximation.

    Args:
        approximate: the tanh approximation `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    """

    def __init__(self, approximate: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.approximate = approximate

    def call(self, x):
        return tf.nn.gelu(x, approximate=self.approximate)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "approximate": self.approximate}


class GatedActivation(keras.layers.Layer, PrunableLayer):
    """A gated MLP's middle: `act(gate) * up` (SwiGLU with silu, GeGLU with a GELU).

    Args:
        activation: silu, gelu (exact) or gelu_tanh.

    Call arguments:
        inputs: `[gate, up]`, each `[B, T, hidden]`.
    """

    def __init__(self, activation: str = "silu", **kwargs):
        super().__init__(**kwargs)
        self.activation = activation

    def call(self, inputs):
        gate, up = inputs
        if self.activation == "silu":
            return tf.nn.silu(gate) * up
        return tf.nn.gelu(gate, approximate=self.activation == "gelu_tanh") * up

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "activation": self.activation}


class RMSNorm(keras.layers.Layer, PrunableLayer):
    """Root-mean-square normalization (Zhang & Sennrich 2019; Llama's): `x / rms(x) * scale`.

    No centring and no bias; computed in float32 under mixed precision.

    Args:
        epsilon: added to the mean square.
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight("scale", shape=[input_shape[-1]], initializer="ones")
        super().build(input_shape)

    def call(self, x):
        x32 = tf.cast(x, tf.float32)
        normed = x32 * tf.math.rsqrt(tf.reduce_mean(tf.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return tf.cast(normed * tf.cast(self.scale, tf.float32), x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


class Rotary(keras.layers.Layer, PrunableLayer):
    """Rotary position embeddings (RoPE, Su et al. 2021) of queries and keys, as Llama lays them out.

    Each head's `head_dim` features are two halves `(x1, x2)`; at position p, pair i turns by the
    angle `p * theta^(-2i / head_dim)`: `(x1 cos - x2 sin, x2 cos + x1 sin)`. The angles are
    computed in float32 from the positions, as Hugging Face's and keras-hub's Llama compute them
    (no weights, and no table whose size grows with the context).

    Args:
        head_dim: features per head (even).
        theta: the base of the angles' frequencies.

    Call arguments:
        inputs: tensors `[B, T, heads * head_dim]` (queries and keys; any head counts).
        start_index: position of `[:, 0]`: a scalar, or int `[B]`, one per row (as `PositionEmbedding`).

    Returns:
        The inputs, each turned.
    """

    def __init__(self, head_dim: int, theta: float = 10_000.0, **kwargs):
        super().__init__(**kwargs)
        self.head_dim = head_dim
        self.theta = theta
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        self._frequencies = (1.0 / np.float32(theta) ** exponents).astype(np.float32)  # (hd/2,), as HF computes

    def call(self, inputs, start_index=0):
        length = tf.shape(inputs[0])[1]
        start_index = tf.convert_to_tensor(start_index, tf.int32)
        if start_index.shape.rank == 1:
            at = start_index[:, tf.newaxis] + tf.range(length)[tf.newaxis, :]  # (B, T)
        else:
            at = (start_index + tf.range(length))[tf.newaxis, :]  # (1, T)
        angles = tf.cast(at, tf.float32)[:, :, tf.newaxis, tf.newaxis] * self._frequencies  # (B|1, T, 1, hd/2)
        return [self._turn(x, tf.cos(angles), tf.sin(angles)) for x in inputs]

    def _turn(self, x, cos, sin):
        batch, width = tf.shape(x)[0], x.shape[-1]
        half = self.head_dim // 2
        heads = tf.reshape(tf.cast(x, tf.float32), [batch, -1, width // self.head_dim, self.head_dim])
        x1, x2 = heads[..., :half], heads[..., half:]
        turned = tf.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return tf.cast(tf.reshape(turned, [batch, -1, width]), x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "head_dim": self.head_dim, "theta": self.theta}


class TiedLogits(keras.layers.Layer, PrunableLayer):
    """Logits from hidden states and the (tied) token embedding table: `h @ table^T`.

    Computed in float32 under mixed precision, for a stable softmax.

    Call arguments:
        inputs: `[hidden (B, T, d), table (V, d)]`.
    Returns:
        `[B, T, V]`.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        hidden, table = inputs
        return tf.einsum("btd,vd->btv", hidden, table)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[0][:-1]).concatenate(input_shape[1][:1])

    def get_prunable_weights(self):
        return []


QUANTIZED_PREFIX = "quant_"  # what TF-MOT's quantize_apply puts before a wrapped layer's name


def get_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """`model.get_layer(name)`, or its QAT wrapper `quant_NAME` (which applies the fake quantization)."""
    try:
        return model.get_layer(name)
    except ValueError:
        return model.get_layer(QUANTIZED_PREFIX + name)


def custom_objects() -> dict[str, type]:
    """For `keras.models.load_model`, `clone_model` and TF-MOT's `quantize_scope`."""
    from models.lora import LoRADense

    return {cls.__name__: cls for cls in (TokenEmbedding, PositionEmbedding, Rotary, CausalAttention, RMSNorm, GELU,
                                          GatedActivation, TiedLogits, LoRADense)}
