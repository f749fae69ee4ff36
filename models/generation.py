"""Text generation from a cached decoder: one decoding loop and one sampling rule for every backend.

The loop (`decode`) and the rule (`sample_next`) are TensorFlow ops over the
decoders (`GPTDecoder`, `LSTMDecoder`):

- `generate`: a batch of prompts of different lengths in this process,
  `decode` compiled by XLA for the batch's shape;
- `stream`: one prompt, a Python loop that yields each token as it is
  chosen, for a terminal; the same tokens as `generate`;
- `generate_graph`: the same loop inside an exported SavedModel's signatures,
  uncompiled or compiled over shape buckets (`bucketed`).

A token is chosen by `sample_next` from per-row settings (temperature 0 is
greedy) and noise that depends only on (seed, position, token id)
(`uniform_noise`); `serving.edge` draws the same noise in numpy. So a prompt,
a sampler and a seed give the same text in-process, from the SavedModel,
compiled or not, in any batch, and on the device (up to float rounding at a
top-p boundary).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Iterator, Literal, Sequence

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


def context_message(max_length: int) -> str:
    """The one overflow rule, as every backend words it."""
    return (f"max_new_tokens does not fit the model's context of {max_length} tokens: ask for at most "
            f"{max_length - 1} (the prompt's start is dropped to make room for them)")


def check_fits_context(max_new_tokens: tf.Tensor, max_length: int) -> tf.Operation:
    """InvalidArgumentError when a row asks for `max_length` new tokens or more."""
    return tf.debugging.assert_less(max_new_tokens, max_length, message=context_message(max_length))


def fit_to_context(prompt: Sequence[int], max_new_tokens: int, max_length: int | None) -> list[int]:
    """Keeps the end of a prompt that, with the new tokens, would overflow the context."""
    if max_length is None:
        return list(prompt)
    if max_new_tokens >= max_length:
        raise ValueError(f"max_new_tokens={max_new_tokens}: {context_message(max_length)}")
    return list(prompt)[-(max_length - max_new_tokens):]


def generate(decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
             sampler: SamplerConfig = SamplerConfig(), stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """Continues a batch of prompts (`decode`, XLA-compiled once per batch shape).

    Args:
        decoder: a `GPTDecoder` or `LSTMDecoder`.
        prompts: token ids per prompt (non-empty; lengths may differ).
        max_new_tokens: per batch or per prompt.
        sampler: how to choose; every row draws with the same seed (a row's text does not depend
            on the rest of the batch).
        stop_token_ids: at most one id; a row ends at it (not included in the result).
    Returns:
        The new tokens of every prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start with [EOS] for none)")
    if len(stop_token_ids) > 1:
        raise ValueError(f"one stop token at most, got {list(stop_token_ids)}")
    batch = len(prompts)
    new = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    prompts = [fit_to_context(p, n, decoder.max_length) for p, n in zip(prompts, new)]
    keep = [len(p) for p in prompts]
    tokens = np.zeros([batch, max(k + n for k, n in zip(keep, new))], np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    stop = stop_token_ids[0] if stop_token_ids else -1
    out = _compiled_decode(decoder, stop)(tf.constant(tokens), tf.constant(keep, tf.int32),
                                          tf.constant(new, tf.int32), sampler.sampling(batch, sampler.draw_seed()))
    results = []
    for row, k, n in zip(out.numpy(), keep, new):
        row = row[k:k + n].tolist()
        results.append(row[:row.index(stop)] if stop in row else row)
    return results


def _compiled(decoder, key, make):
    """A compiled function kept on the decoder, so it lives (and its traces with it) as long as the decoder."""
    functions = decoder.__dict__.setdefault("_compiled_functions", {})
    if key not in functions:
        functions[key] = make()
    return functions[key]


def _compiled_decode(decoder, stop_token_id: int):
    return _compiled(decoder, ("decode", stop_token_id), lambda: tf.function(
        lambda tokens, keep, new, sampling: decode(decoder, tokens, keep, new, sampling, stop_token_id),
        jit_compile=True))


def _compiled_step(decoder):
    """`decoder.call_with_cache` compiled (each stream reuses its traces)."""
    return _compiled(decoder, "step", lambda: tf.function(decoder.call_with_cache, jit_compile=True))


def stream(decoder, prompt: Sequence[int], max_new_tokens: int, sampler: SamplerConfig = SamplerConfig(),
           stop_token_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yields the new tokens of one prompt as they are chosen (a stop token ends it, unyielded).

    The same tokens as `generate` for the same sampler and seed.
    """
    if len(prompt) == 0:
        raise ValueError("the prompt needs at least one token (start with [EOS] for none)")
    prompt = fit_to_context(prompt, max_new_tokens, decoder.max_length)
    step = _compiled_step(decoder)
    sampling = sampler.sampling(1, sampler.draw_seed())
    cache = decoder.init_cache(1, len(prompt) + max_new_tokens)
    logits, cache = step(tf.constant([prompt], tf.int32), cache, tf.constant(0))
    for i in range(max_new_tokens):
        position = len(prompt) + i
        token = int(_choose(tf.cast(logits[:, -1, :], tf.float32), tf.constant(position), *sampling)[0])
        if token in stop_token_ids:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits, cache = step(tf.constant([[token]], tf.int32), cache, tf.constant(position))


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
        greedy = lambda: tf.argmax(logits, axis=-1, output_type=tf.int32)
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


_choose = tf.function(sample_next, jit_compile=True)


def generate_graph(decoder, prompts: tf.RaggedTensor, max_new_tokens: tf.Tensor, sampling: Sampling,
                   stop_token_id: int, empty_prompt_id: int, loop=None) -> tf.RaggedTensor:
    """Continues a batch of prompts inside one graph: what exported models run.

    Lays the prompts out in a buffer for `decode` (prompt tokens kept, the rest
    chosen one position at a time from the cache), with TensorFlow ops only,
    so it runs inside a SavedModel signature with per-row lengths and settings.

    Args:
        decoder: a `GPTDecoder` or `LSTMDecoder`.
        prompts: int32 ragged `[B, None]`; an empty row starts from `empty_prompt_id`.
        max_new_tokens: int32 `[B]`, less than a transformer's context (InvalidArgumentError
            otherwise); the prompt's start is dropped to make room for them.
        sampling: per-row settings.
        stop_token_id: a row ends at this token (not returned).
        empty_prompt_id: the token an empty prompt starts from.
        loop: `(tokens, keep, new, sampling) -> tokens`, `decode` on this decoder by default
            (e.g. `bucketed` over a compiled `decode`).
    Returns:
        The new tokens, int32 ragged `[B, None]`.
    """
    if loop is None:
        loop = lambda *args: decode(decoder, *args, stop_token_id=stop_token_id)
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
        with tf.control_dependencies([check_fits_context(new, decoder.max_length)]):
            new = tf.identity(new)
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
