"""Text generation from a cached decoder with keras-nlp's samplers.

Two entry points over the same decoders (`GPTDecoder`, `LSTMDecoder`):

- `generate`: a batch of prompts of different lengths, one graph loop
  (keras-nlp's `Sampler.__call__`, a `tf.while_loop`): prompt tokens are
  kept, the rest are sampled one position at a time from the cache.
- `stream`: one prompt, a Python loop that yields each token as it is
  chosen, for a terminal. Greedy choices are the same as `generate`'s.

Samplers are built outside `tf.function` (they own a seed variable).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Iterator, Literal, Sequence

import keras_nlp
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


def make_sampler(config: SamplerConfig) -> keras_nlp.samplers.Sampler:
    """A fresh keras-nlp sampler (a fresh seed state: same seed, same draws)."""
    s = keras_nlp.samplers
    if config.name == "greedy":
        return s.GreedySampler()
    if config.name == "top_k":
        return s.TopKSampler(k=config.top_k, seed=config.seed, temperature=config.temperature)
    if config.name == "top_p":
        return s.TopPSampler(p=config.top_p, seed=config.seed, temperature=config.temperature)
    return s.RandomSampler(seed=config.seed, temperature=config.temperature)


def fit_to_context(prompt: Sequence[int], max_new_tokens: int, max_length: int | None) -> list[int]:
    """Keeps the end of a prompt that, with the new tokens, would overflow the context."""
    if max_length is None:
        return list(prompt)
    if max_new_tokens >= max_length:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {max_length} tokens")
    return list(prompt)[-(max_length - max_new_tokens):]


def generate(decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
             sampler: keras_nlp.samplers.Sampler, stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """Continues a batch of prompts.

    Args:
        decoder: a `GPTDecoder` or `LSTMDecoder`.
        prompts: token ids per prompt (non-empty; lengths may differ).
        max_new_tokens: per batch or per prompt.
        sampler: from `make_sampler`.
        stop_token_ids: a row ends at the first of these (not included in the result).
    Returns:
        The new tokens of every prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start with [EOS] for none)")
    batch = len(prompts)
    new = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    prompts = [fit_to_context(p, n, decoder.max_length) for p, n in zip(prompts, new)]
    lengths = [len(p) for p in prompts]
    total = max(n + k for n, k in zip(lengths, new))
    padded = np.zeros([batch, total], np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    mask = np.arange(total)[None, :] < np.array(lengths)[:, None]  # True where a prompt token stands
    out = _sample(decoder, sampler, tf.constant(padded), tf.constant(mask), min(lengths),
                  tuple(stop_token_ids) or None).numpy()
    results = []
    for row, n, k in zip(out, lengths, new):
        tokens = row[n:n + k].tolist()
        cut = [i for i, t in enumerate(tokens) if t in stop_token_ids]
        results.append(tokens[:cut[0]] if cut else tokens)
    return results


def _sample(decoder, sampler, prompt, mask, start: int, stop_token_ids):
    # One traced graph per (batch, length, start); the loop itself is a tf.while_loop.
    key = (id(decoder), id(sampler), tuple(prompt.shape), start, stop_token_ids)
    fn = _SAMPLE_FNS.get(key)
    if fn is None:
        # XLA fuses the many small ops of one decoding step (2-5x faster on CPU).
        @tf.function(jit_compile=True)
        def fn(prompt, mask):
            cache = decoder.init_cache(tf.shape(prompt)[0], prompt.shape[1])
            if start > 1:  # prefill the tokens every row has, but the last
                _, cache = decoder.call_with_cache(prompt[:, :start - 1], cache, 0)

            def next_logits(prompt, cache, index):
                # prompt[:, index - 1][:, None], not prompt[:, index - 1:index]: a static [B, 1]
                # shape, or XLA pads every step to the full length.
                token = prompt[:, index - 1][:, tf.newaxis]  # (B, 1)
                logits, cache = decoder.call_with_cache(token, cache, index - 1)
                return logits[:, 0, :], None, cache  # (B, V)

            return sampler(next_logits, prompt, cache, index=start, mask=mask, stop_token_ids=stop_token_ids)
        if len(_SAMPLE_FNS) >= _MAX_SAMPLE_FNS:  # drop the oldest trace
            del _SAMPLE_FNS[next(iter(_SAMPLE_FNS))]
        _SAMPLE_FNS[key] = fn
    return fn(prompt, mask)


# Traced loops by (decoder, sampler, shape, start, stop tokens); the values keep
# the decoder and sampler alive, so their ids in the keys stay unique.
_SAMPLE_FNS: dict = {}
_MAX_SAMPLE_FNS = 16


def stream(decoder, prompt: Sequence[int], max_new_tokens: int, sampler: keras_nlp.samplers.Sampler,
           stop_token_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yields the new tokens of one prompt as they are chosen (a stop token ends it, unyielded)."""
    if len(prompt) == 0:
        raise ValueError("the prompt needs at least one token (start with [EOS] for none)")
    prompt = fit_to_context(prompt, max_new_tokens, decoder.max_length)
    step = tf.function(decoder.call_with_cache, jit_compile=True)
    cache = decoder.init_cache(1, len(prompt) + max_new_tokens)
    logits, cache = step(tf.constant([prompt], tf.int32), cache, tf.constant(0))
    for i in range(max_new_tokens):
        probabilities = sampler.compute_probabilities(logits[:, -1, :])  # (1, V)
        token = int(np.asarray(sampler.get_next_token(probabilities))[0])
        if token in stop_token_ids:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits, cache = step(tf.constant([[token]], tf.int32), cache, tf.constant(len(prompt) + i))


# ---------------------------------------------------------------------------
# Generation as one TensorFlow graph, with per-row settings (for exported SavedModels).


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


def decode(decoder, tokens: tf.Tensor, keep: tf.Tensor, new: tf.Tensor, sampling: "Sampling",
           stop_token_id: int) -> tf.Tensor:
    """The decoding loop on a buffer of fixed shape: what both exported paths run.

    Every shape inside depends only on the shape of `tokens`, never on the
    values, so XLA compiles it once per buffer shape (the export's buckets).

    Args:
        decoder: a `GPTDecoder` or `LSTMDecoder`.
        tokens: int32 `[B, T]`; row i holds its prompt in its first `keep[i]` columns.
        keep: int32 `[B]`, at least 1.
        new: int32 `[B]`, the tokens to add to each row; `keep + new <= T`. A row with 0 is done.
        sampling: per-row settings (`Sampling`); temperature 0 is greedy.
        stop_token_id: a row ends at this token.
    Returns:
        int32 `[B, T]`: row i's new tokens at columns `keep[i] .. keep[i] + new[i] - 1`, zeros after
        its stop token.
    """
    batch, total = tf.shape(tokens)[0], tf.shape(tokens)[1]
    start = tf.reduce_min(keep)
    cache = decoder.prefill(tokens, start - 1, decoder.init_cache(batch, total))
    any_sampled = tf.reduce_any(sampling.temperature > 0)

    def choose(logits, index):
        greedy = lambda: tf.argmax(logits, axis=-1, output_type=tf.int32)  # noqa: E731
        return tf.cond(any_sampled, lambda: sample_next(logits, index, *sampling), greedy)

    def step(index, tokens, cache, done):
        logits, cache = decoder.call_with_cache(tokens[:, index - 1][:, tf.newaxis], cache, index - 1)
        chosen = choose(tf.cast(logits[:, 0, :], tf.float32), index)
        in_prompt = index < keep
        column = tf.one_hot(index, total, on_value=True, off_value=False)[tf.newaxis, :]  # (1, T)
        written = tf.where(in_prompt, tokens[:, index], tf.where(done, 0, chosen))
        tokens = tf.where(column, written[:, tf.newaxis], tokens)
        finished = ~in_prompt & ((chosen == stop_token_id) | (index + 1 - keep >= new))
        return index + 1, tokens, cache, done | finished

    _, tokens, _, _ = tf.while_loop(
        lambda index, tokens, cache, done: (index < total) & ~tf.reduce_all(done),
        step, (start, tokens, cache, new <= 0))
    return tokens


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


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The buffer shapes a compiled loop runs at: batch and length rounded up to one of these.

    A request beyond the largest runs the same loop uncompiled (same tokens, slower).
    """
    batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    length: tuple[int, ...] = (32, 64, 128, 256, 512)

    def fit(self, max_length: int | None) -> "Buckets":
        """The lengths a decoder needs: up to a transformer's context (the context itself is the last);
        for an LSTM (`max_length` None) the largest alone, as its step costs the same at any buffer
        length (its state has a fixed size) and each bucket costs a compilation."""
        if max_length is None:
            return Buckets(self.batch, self.length[-1:])
        kept = tuple(n for n in self.length if n < max_length)
        return Buckets(self.batch, kept + (max_length,))

    def shapes(self) -> list[tuple[int, int]]:
        return [(b, n) for b in self.batch for n in self.length]


def round_up(value: tf.Tensor, sizes: tuple[int, ...]) -> tf.Tensor:
    """The smallest of `sizes` (ascending) at least `value`; -1 when none is."""
    sizes_t = tf.constant(sizes, tf.int32)
    fits = sizes_t >= value
    return tf.cond(tf.reduce_any(fits), lambda: tf.reduce_min(tf.boolean_mask(sizes_t, fits)),
                   lambda: tf.constant(-1))


def bucketed(compiled, buckets: Buckets, fallback):
    """`compiled(tokens, keep, new, sampling)` on a buffer padded to a bucket; `fallback` past the largest.

    Padding rows are done from the start (new 0) and padding columns are never read, so the
    answer is the same as on the unpadded buffer.
    """
    def run(tokens, keep, new, sampling):
        batch, total = tf.shape(tokens)[0], tf.shape(tokens)[1]
        rows, columns = round_up(batch, buckets.batch), round_up(total, buckets.length)

        def padded():
            extra = rows - batch
            out = compiled(tf.pad(tokens, [[0, extra], [0, columns - total]]),
                           tf.pad(keep, [[0, extra]], constant_values=1), tf.pad(new, [[0, extra]]),
                           sampling.pad(extra))
            return out[:batch, :total]

        return tf.cond((rows > 0) & (columns > 0), padded, lambda: fallback(tokens, keep, new, sampling))
    return run


def generate_graph(decoder, prompts: tf.RaggedTensor, max_new_tokens: tf.Tensor, sampling: Sampling,
                   stop_token_id: int, empty_prompt_id: int, loop=None) -> tf.RaggedTensor:
    """Continues a batch of prompts inside one graph: what exported models run.

    Lays the prompts out in a buffer for `decode` (prompt tokens kept, the rest
    chosen one position at a time from the cache), with TensorFlow ops only,
    so it runs inside a SavedModel signature with per-row lengths and settings.

    Args:
        decoder: a `GPTDecoder` or `LSTMDecoder`.
        prompts: int32 ragged `[B, None]`; an empty row starts from `empty_prompt_id`.
        max_new_tokens: int32 `[B]`; cut to fit the context (the prompt's start is dropped first).
        sampling: per-row settings.
        stop_token_id: a row ends at this token (not returned).
        empty_prompt_id: the token an empty prompt starts from.
        loop: `(tokens, keep, new, sampling) -> tokens`, `decode` on this decoder by default
            (e.g. `bucketed` over a compiled `decode`).
    Returns:
        The new tokens, int32 ragged `[B, None]`.
    """
    if loop is None:
        loop = lambda *args: decode(decoder, *args, stop_token_id=stop_token_id)  # noqa: E731
    batch = tf.shape(max_new_tokens)[0]
    lengths = tf.cast(prompts.row_lengths(), tf.int32)
    dense = prompts.to_tensor(default_value=0)
    dense = tf.concat([dense, tf.zeros([batch, 1], tf.int32)], axis=1)  # at least one column
    first = tf.where(lengths > 0, dense[:, 0], empty_prompt_id)
    dense = tf.concat([first[:, tf.newaxis], dense[:, 1:]], axis=1)
    lengths = tf.maximum(lengths, 1)
    new = tf.maximum(max_new_tokens, 0)
    keep = lengths
    if decoder.max_length is not None:
        new = tf.minimum(new, decoder.max_length - 1)
        keep = tf.minimum(lengths, decoder.max_length - new)
    # Left-align the kept end of every prompt: row i holds its last keep[i] tokens.
    total = tf.reduce_max(keep + new)
    columns = tf.range(total)[tf.newaxis, :]
    source = tf.minimum((lengths - keep)[:, tf.newaxis] + columns, tf.shape(dense)[1] - 1)
    tokens = tf.where(columns < keep[:, tf.newaxis], tf.gather(dense, source, batch_dims=1), 0)  # (B, total)
    tokens = loop(tokens, keep, new, sampling)
    # Row i's new tokens are tokens[i, keep[i]:keep[i] + new[i]], up to its first stop token.
    width = tf.reduce_max(new)
    offsets = tf.range(width)[tf.newaxis, :]
    generated = tf.gather(tokens, tf.minimum(keep[:, tf.newaxis] + offsets, total - 1), batch_dims=1)
    stops = tf.cumsum(tf.cast(generated == stop_token_id, tf.int32), axis=1)
    valid = (offsets < new[:, tf.newaxis]) & (stops == 0)
    return tf.ragged.boolean_mask(generated, valid)
