"""How the next token is chosen: the settings, the rule and its noise, the same on every backend.

A token is chosen by `sample_next` from per-row settings (`Sampling`; temperature 0 is greedy) and
noise that depends only on (seed, position, token id) (`uniform_noise`); `serving.edge` draws the same
noise in numpy. So a prompt, a sampler and a seed give the same text in-process, from the SavedModel,
compiled or not, in any batch, and on the device (up to float rounding at a top-p boundary).
`SamplerConfig` is the user's choice (a named sampler), `Sampling` the per-row tensors it becomes.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

import numpy as np
import tensorflow as tf

Sampler = Literal["greedy", "top_k", "top_p", "random"]
SAMPLERS = typing.get_args(Sampler)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to pick the next token.

    Attributes:
        name: how to pick each token: greedy (argmax), top_k, top_p (nucleus) or random (the full
            distribution).
        temperature: divides the logits before the softmax (not used by greedy).
        top_k: candidates kept by top_k.
        top_p: probability mass kept by top_p.
        seed: the same seed gives the same text (default: a fresh one each time).
    """
    name: Sampler = "greedy"
    temperature: float = 1.0
    top_k: int = 40
    top_p: float = 0.9
    seed: int | None = None

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler {self.name!r}: expected one of {'|'.join(SAMPLERS)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be at least 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    def settings(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) as `sample_next` reads them: temperature 0 is greedy, top_k 0
        and top_p 1 cut nothing."""
        if self.name == "greedy":
            return 0.0, 0, 1.0
        return (self.temperature, self.top_k if self.name == "top_k" else 0,
                self.top_p if self.name == "top_p" else 1.0)

    def draw_seed(self) -> int:
        """The seed, or a fresh one."""
        return self.seed if self.seed is not None else int(np.random.default_rng().integers(2**31 - 1))

    def sampling(self, batch: int, seed: int) -> "Sampling":
        temperature, top_k, top_p = self.settings()
        return Sampling(tf.fill([batch], float(temperature)), tf.fill([batch], top_k), tf.fill([batch], float(top_p)),
                        tf.fill([batch], seed))


class Sampling(typing.NamedTuple):
    """Per-row sampling settings as tensors, `[B]` each (see `sample_next`)."""
    temperature: tf.Tensor
    top_k: tf.Tensor
    top_p: tf.Tensor
    seed: tf.Tensor

    @classmethod
    def greedy(cls, batch) -> "Sampling":
        zeros = tf.zeros([batch], tf.int32)
        return cls(tf.zeros([batch]), zeros, tf.ones([batch]), zeros)

    def pad(self, rows) -> "Sampling":
        """Adds `rows` greedy rows at the end."""
        return Sampling(*(tf.pad(v, [[0, rows]]) for v in self))


class Penalties(typing.NamedTuple):
    """OpenAI's presence and frequency penalties per row, `[B]` each, and the counts they apply to:
    `counts` float `[B, V]`, how many times each token was generated so far (see `penalize`)."""
    presence: tf.Tensor
    frequency: tf.Tensor
    counts: tf.Tensor


def penalize(logits: tf.Tensor, penalties: Penalties) -> tf.Tensor:
    """The logits less each row's frequency penalty times a token's count so far, and its presence
    penalty once the token has appeared (OpenAI's rule; vLLM's too). Applied before `sample_next`,
    greedy rows included; penalties of 0 change nothing."""
    counts = tf.cast(penalties.counts, logits.dtype)
    return (logits - penalties.frequency[:, tf.newaxis] * counts
            - penalties.presence[:, tf.newaxis] * tf.cast(counts > 0, logits.dtype))


_MASK = 0xFFFFFFFF


def _mix32(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x7FEB352D, _MASK)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = tf.bitwise.bitwise_and(x * 0x846CA68B, _MASK)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def uniform_noise(seed: tf.Tensor, position: tf.Tensor, vocab) -> tf.Tensor:
    """Uniform noise in (0, 1), float32 `[B, vocab]`, a function of (seed, position, token id) only.

    A counter-based hash with exact float32 results: TensorFlow, XLA and numpy
    (`serving.edge.uniform_noise`) give the same bits, so a seed picks the same
    tokens on every backend (stateless TF random ops give other bits under XLA).
    """
    seed = tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), _MASK)  # (B,)
    position = tf.cast(position, tf.int64)
    row = _mix32(tf.bitwise.bitwise_xor(seed, _mix32(tf.bitwise.bitwise_and(position + 0x9E3779B9, _MASK))))
    ids = tf.bitwise.bitwise_and(tf.range(tf.cast(vocab, tf.int64)) * 0x85EBCA6B, _MASK)  # (V,)
    bits = _mix32(tf.bitwise.bitwise_xor(row[:, tf.newaxis], ids[tf.newaxis, :]))  # (B, V)
    return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) / float(1 << 24)


def sample_next(logits: tf.Tensor, position: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor,
                top_p: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Picks one token per row, each row with its own settings.

    A row with `temperature <= 0` takes the argmax (greedy). Otherwise the
    logits are divided by the temperature, cut to the `top_k` most likely
    tokens (0: no cut), then to the smallest set of those whose probability
    reaches `top_p` (1 or 0: no cut), and a token is drawn from what is left.
    The draw depends only on the row's `seed` and `position` (Gumbel-max with
    `uniform_noise`), so a request gets the same tokens whatever else is in
    its batch, compiled by XLA or not, and on the device (`serving.edge`
    draws the same noise in numpy).

    Args:
        logits: float `[B, V]`.
        position: int32 scalar, the position being chosen.
        temperature, top_p: float `[B]`; top_k, seed: int32 `[B]`.
    Returns:
        int32 `[B]`.
    """
    logits = tf.cast(logits, tf.float32)
    vocab = tf.shape(logits)[1]
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    scaled = logits / tf.where(temperature > 0, temperature, 1.0)[:, tf.newaxis]
    ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")  # (B, V)
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)  # (B,)
    in_top_k = tf.range(vocab)[tf.newaxis, :] < k[:, tf.newaxis]
    probabilities = tf.nn.softmax(tf.where(in_top_k, ranked, -math.inf))
    mass_before = tf.cumsum(probabilities, axis=-1, exclusive=True)
    p = tf.where((top_p > 0) & (top_p < 1), top_p, 1.0)
    kept = tf.reduce_sum(tf.cast(in_top_k & (mass_before < p[:, tf.newaxis]), tf.int32), axis=-1)  # >= 1
    threshold = tf.gather(ranked, kept - 1, batch_dims=1)  # the smallest kept logit
    filtered = tf.where(scaled >= threshold[:, tf.newaxis], scaled, -math.inf)

    uniform = uniform_noise(seed, position, vocab)  # (B, V)
    sampled = tf.argmax(filtered - tf.math.log(-tf.math.log(uniform)), axis=-1, output_type=tf.int32)
    return tf.where(temperature > 0, sampled, greedy)
