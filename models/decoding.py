"""Decoding: one loop over a cached decoder (`GPTDecoder`, `LSTMDecoder`) for every backend.

- `Generator.generate`: a batch of prompts of different lengths in this process, `decode`
  compiled by XLA for the batch's shape;
- `Generator.stream`: one prompt, a Python loop that yields each token as it is chosen, for a
  terminal; the same tokens as `generate`;
- `generate_graph`: the same loop inside an exported SavedModel's signatures, uncompiled or
  compiled over shape buckets (`Buckets`, `bucketed`).

Each picks tokens with `models.samplers.sample_next`, the one rule.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from models.samplers import Penalties, Sampling, SamplerConfig, penalize, penalize_numpy, sample_next

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


class Generator:
    """Generation in this process from one decoder; it owns the decoder's XLA-compiled functions.

    `generate` runs `decode` compiled once per batch shape (and stop token); `stream` runs the
    compiled `call_with_cache` one token at a time. Keep one Generator for repeated calls: the
    compilations live as long as it does.

    Args:
        decoder: a `GPTDecoder` or `LSTMDecoder`.
    """

    def __init__(self, decoder):
        self.decoder = decoder
        self._step = tf.function(decoder.call_with_cache, jit_compile=True)
        self._decoders: dict[int, Callable] = {}

    def _decode(self, stop_token_id: int, penalized: bool) -> Callable:
        key = (stop_token_id, penalized)
        if key not in self._decoders:
            self._decoders[key] = tf.function(
                lambda tokens, keep, new, sampling, penalties=None: decode(self.decoder, tokens, keep, new, sampling,
                                                                           stop_token_id, penalties),
                jit_compile=True)
        return self._decoders[key]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampler: SamplerConfig = SamplerConfig(), stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
        """Continues a batch of prompts (`decode`, XLA-compiled once per batch shape).

        Args:
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
        prompts = [fit_to_context(p, n, self.decoder.max_length) for p, n in zip(prompts, new)]
        keep = [len(p) for p in prompts]
        tokens = np.zeros([batch, max(k + n for k, n in zip(keep, new))], np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        stop = stop_token_ids[0] if stop_token_ids else -1
        extra = (sampler.penalties(batch, self.decoder.vocab_size),) if sampler.penalized else ()
        out = self._decode(stop, sampler.penalized)(tf.constant(tokens), tf.constant(keep, tf.int32),
                                                    tf.constant(new, tf.int32),
                                                    sampler.sampling(batch, sampler.draw_seed()), *extra)
        results = []
        for row, k, n in zip(out.numpy(), keep, new):
            row = row[k:k + n].tolist()
            results.append(row[:row.index(stop)] if stop in row else row)
        return results

    def stream(self, prompt: Sequence[int], max_new_tokens: int, sampler: SamplerConfig = SamplerConfig(),
               stop_token_ids: Sequence[int] = ()) -> Iterator[int]:
        """Yields the new tokens of one prompt as they are chosen (a stop token ends it, unyielded).

        The same tokens as `generate` for the same sampler and seed.
        """
        if len(prompt) == 0:
            raise ValueError("the prompt needs at least one token (start with [EOS] for none)")
        prompt = fit_to_context(prompt, max_new_tokens, self.decoder.max_length)
        step = self._step
        sampling = sampler.sampling(1, sampler.draw_seed())
        cache = self.decoder.init_cache(1, len(prompt) + max_new_tokens)
        logits, cache = step(tf.constant([prompt], tf.int32), cache, tf.constant(0))
        counts = np.zeros([self.decoder.vocab_size], np.float32)
        for i in range(max_new_tokens):
            position = len(prompt) + i
            last = tf.cast(logits[:, -1, :], tf.float32)
            if sampler.penalized:
                last = penalize_numpy(last.numpy()[0], counts, sampler.presence_penalty,
                                      sampler.frequency_penalty)[np.newaxis]
            token = int(_choose(last, tf.constant(position), *sampling)[0])
            if token in stop_token_ids:
                return
            counts[token] += 1
            yield token
            if i + 1 < max_new_tokens:
                logits, cache = step(tf.constant([[token]], tf.int32), cache, tf.constant(position))


def decode(decoder, tokens: tf.Tensor, keep: tf.Tensor, new: tf.Tensor, sampling: Sampling,
           stop_token_id: int, penalties: Penalties | None = None) -> tf.Tensor:
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
        penalties: presence and frequency penalties, their counts zero (`samplers.penalize`), or
            None; each row's new tokens add to its counts.
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

    def step(index, tokens, cache, done, counts):
        logits, cache = decoder.call_with_cache(tokens[:, index - 1][:, tf.newaxis], cache, index - 1)
        logits = tf.cast(logits[:, 0, :], tf.float32)
        if penalties is not None:
            logits = penalize(logits, penalties._replace(counts=counts))
        chosen = choose(logits, index)
        in_prompt = index < keep
        column = tf.one_hot(index, total, on_value=True, off_value=False)[tf.newaxis, :]  # (1, T)
        written = tf.where(in_prompt, tokens[:, index], tf.where(done, 0, chosen))
        tokens = tf.where(column, written[:, tf.newaxis], tokens)
        if penalties is not None:
            counts += tf.one_hot(chosen, tf.shape(counts)[1]) * tf.cast(~in_prompt & ~done, tf.float32)[:, tf.newaxis]
        finished = ~in_prompt & ((chosen == stop_token_id) | (index + 1 - keep >= new))
        return index + 1, tokens, cache, done | finished, counts

    counts = penalties.counts if penalties is not None else tf.zeros([batch, 0])
    _, tokens, _, _, _ = tf.while_loop(
        lambda index, tokens, cache, done, counts: (index < total) & ~tf.reduce_all(done),
        step, (start, tokens, cache, new <= 0, counts))
    return tokens


STEPS = 64  # the most decoding steps one `continue_rows` call runs (the width of its output)


def start_rows(decoder, tokens: tf.Tensor, lengths: tf.Tensor, cache_length, sampling: Sampling
               ) -> tuple[tf.Tensor, tf.Tensor]:
    """Starts a batch of sequences for a server that decodes them step by step (continuous batching).

    Prefills each row's tokens into a fresh cache and chooses its first new token, at position
    `lengths[i]`, as `decode` chooses it.

    Args:
        decoder: a `GPTDecoder` or `LSTMDecoder`.
        tokens: int32 `[B, T]`; row i's sequence in its first `lengths[i]` columns (at least 1).
        lengths: int32 `[B]`.
        cache_length: the cache's length (a transformer's: the context; ignored by an LSTM).
        sampling: per-row settings.
    Returns:
        `(first new token [B], cache [B, ...])`.
    """
    logits, cache = decoder.prefill_rows(tokens, lengths, cache_length)
    return _choose_rows(logits, lengths, sampling), cache


def continue_rows(decoder, tokens: tf.Tensor, positions: tf.Tensor, cache: tf.Tensor, steps: tf.Tensor,
                  sampling: Sampling, stop_token_id: int, penalties: Penalties | None = None) -> tuple:
    """Up to `steps[i]` more tokens for each row, every row at its own position, in one loop.

    Row i's last token `tokens[i]` sits at `positions[i]` and is not yet in its cache. Each step
    feeds every row's last token, and chooses the next at the following position with the row's
    own settings (`sample_next`): what `decode` chooses, whatever else is in the batch. A row
    stops at `stop_token_id` (not returned) or after its steps; its cache then stays as it is.

    Args:
        tokens, positions: int32 `[B]`.
        cache: `[B, ...]`, from `start_rows` or a previous call.
        steps: int32 `[B]`, at most `STEPS`; a row with 0 (a free slot's padding) is left alone.
        sampling: per-row settings.
        stop_token_id: a row ends at this token.
        penalties: presence and frequency penalties with the counts of the tokens generated so far
            (`samplers.penalize`), or None for none; each new token adds to its row's counts.
    Returns:
        `(new tokens [B, STEPS] (zeros after each row's count), count [B], cache)`, and the counts
        after the new tokens with `penalties`. A row's next call continues from its last new token,
        at `positions[i] + count[i]`; a row with `count[i] < steps[i]` met the stop token.
    """
    batch = tf.shape(tokens)[0]
    new = tf.zeros([batch, STEPS], tf.int32)
    columns = tf.range(STEPS)[tf.newaxis, :]
    counts = penalties.counts if penalties is not None else tf.zeros([batch, 0])

    def step(i, token, position, parts, new, count, live, counts):
        logits, parts = decoder.step_rows(token, parts, position, live)
        logits = tf.cast(logits, tf.float32)
        if penalties is not None:
            logits = penalize(logits, penalties._replace(counts=counts))
        chosen = _choose_rows(logits, position + 1, sampling)
        live = live & (chosen != stop_token_id)
        if penalties is not None:
            counts += tf.one_hot(chosen, tf.shape(counts)[1]) * tf.cast(live, tf.float32)[:, tf.newaxis]
        new = tf.where(live[:, tf.newaxis] & (columns == i), chosen[:, tf.newaxis], new)
        count += tf.cast(live, tf.int32)
        token, position = tf.where(live, chosen, token), tf.where(live, position + 1, position)
        return i + 1, token, position, parts, new, count, live & (i + 1 < steps), counts

    loop = tf.while_loop(lambda i, *args: (i < STEPS) & tf.reduce_any(args[-2]), step,
                         (tf.constant(0), tokens, positions, decoder.split_cache(cache), new,
                          tf.zeros([batch], tf.int32), steps > 0, counts))
    out = loop[4], loop[5], decoder.join_cache(loop[3])
    return out + (loop[7],) if penalties is not None else out


def _choose_rows(logits: tf.Tensor, positions: tf.Tensor, sampling: Sampling) -> tf.Tensor:
    """`sample_next` with every row at its own position (greedy batches skip the sampling work)."""
    logits = tf.cast(logits, tf.float32)
    return tf.cond(tf.reduce_any(sampling.temperature > 0), lambda: sample_next(logits, positions, *sampling),
                   lambda: tf.argmax(logits, axis=-1, output_type=tf.int32))


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


def layout_prompts(prompts: tf.RaggedTensor, max_new_tokens: tf.Tensor, max_length: int | None,
                   empty_prompt_id: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Prompts as every generation path lays them out: `(tokens [B, T] int32, lengths [B])`.

    Row i holds its last `lengths[i]` tokens, left-aligned: an empty prompt is `empty_prompt_id`
    alone, and a prompt that would overflow `max_length` with its `max_new_tokens` (less than
    `max_length`) keeps its end. T is the longest row; the rest of a row is zeros.
    """
    batch = tf.shape(max_new_tokens)[0]
    lengths = tf.cast(prompts.row_lengths(), tf.int32)
    dense = prompts.to_tensor(default_value=0)
    dense = tf.concat([dense, tf.zeros([batch, 1], tf.int32)], axis=1)  # at least one column
    first = tf.where(lengths > 0, dense[:, 0], empty_prompt_id)
    dense = tf.concat([first[:, tf.newaxis], dense[:, 1:]], axis=1)
    lengths = tf.maximum(lengths, 1)
    keep = lengths
    if max_length is not None:
        keep = tf.minimum(lengths, max_length - tf.maximum(max_new_tokens, 0))
    width = tf.maximum(tf.reduce_max(keep), 0)  # 0 for no rows
    columns = tf.range(width)[tf.newaxis, :]
    source = tf.minimum((lengths - keep)[:, tf.newaxis] + columns, tf.shape(dense)[1] - 1)
    return tf.where(columns < keep[:, tf.newaxis], tf.gather(dense, source, batch_dims=1), 0), keep


# One compiled rule for every stream's token-by-token choice.
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
    new = tf.maximum(max_new_tokens, 0)
    if decoder.max_length is not None:
        with tf.control_dependencies([check_fits_context(new, decoder.max_length)]):
            new = tf.identity(new)
    tokens, keep = layout_prompts(prompts, new, decoder.max_length, empty_prompt_id)
    total = tf.maximum(tf.reduce_max(keep + new), 0)
    tokens = tf.pad(tokens, [[0, 0], [0, tf.maximum(total - tf.shape(tokens)[1], 0)]])  # room for the new tokens
    tokens = loop(tokens, keep, new, sampling)
    # Row i's new tokens are tokens[i, keep[i]:keep[i] + new[i]], up to its first stop token.
    width = tf.maximum(tf.reduce_max(new), 0)
    offsets = tf.range(width)[tf.newaxis, :]
    generated = tf.gather(tokens, tf.minimum(keep[:, tf.newaxis] + offsets, total - 1), batch_dims=1)
    stops = tf.cumsum(tf.cast(generated == stop_token_id, tf.int32), axis=1)
    valid = (offsets < new[:, tf.newaxis]) & (stops == 0)
    return tf.ragged.boolean_mask(generated, valid)
