"""Export: a workdir's model + tokenizer -> a SavedModel that TensorFlow Serving serves, text in and text out.

    EXPORT_BASE/VERSION/
      saved_model.pb, variables/       the signatures of `serving.contract` (fifteen)
      assets/                          the tokenizer's files (vocabulary / SentencePiece model)
      assets.extra/lmstack_config.json the run's config, the tokenizer's, the checkpoint step
      assets.extra/tf_serving_warmup_requests   one PredictionLog per signature

Everything a request needs runs inside the graph: tokenizing (keras-nlp
tokenizers, built from TensorFlow and tensorflow-text ops, which TensorFlow
Serving links), the decoding loop with the KV cache or LSTM state
(`models.decoding.generate_graph`), detokenizing. The graph is not
XLA-compiled: `tensorflow_model_server` refuses XLA functions unless started
with `--xla_cpu_compilation_enabled`.

A version is written into a hidden temporary directory next to its final
place and renamed when complete, so a server polling EXPORT_BASE never loads
half a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import tensorflow as tf

import models
from models import decoding, samplers
from pipelines import checkpoints, fs, tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError
from serving import contract as c
from serving.exporters.module import ServedModule

DEFAULT_EXPORT_DIR = "export"
WARMUP_PROMPT = "The "


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What to export and where.

    Attributes:
        variant: an optimized variant (WORKDIR/optimized/NAME) instead of the trained model ('').
        export_base: TensorFlow Serving's model base path ('': WORKDIR/export/MODEL_NAME).
        version: the version directory to write (0: the next free integer).
        model_name: the model's name in requests (warm-up records, default base path).
        batch_buckets: batch sizes the _xla signatures compile for: a request's rows round up to
            one of them (more rows than the largest run uncompiled, same answer).
        length_buckets: buffer lengths (prompt + new tokens) the _xla signatures compile for, up to a
            transformer's context (an LSTM compiles the largest only); longer run uncompiled.
        xla_warmup: put the _xla signatures' warm-up requests (one per bucket) in TensorFlow
            Serving's warm-up file too, so a tensorflow_model_server started with
            --xla_cpu_compilation_enabled compiles every bucket at load; without that flag it
            then fails to load the export. (`lmstack serve --xla_cpu_compilation_enabled`
            compiles them at load either way.)
        chat_template: a file with the chat template `lmstack serve`'s /v1/chat/completions lays a
            conversation out with: a Jinja template, or a JSON object with "chat_template" and
            optionally "stop" (strings that end the assistant's turn), "bos_token" and
            "eos_token", as Hugging Face's tokenizer_config.json holds them ('': an imported
            checkpoint's own template, else the plain default of `serving.server.chat`).
    """
    variant: str = ""
    export_base: str = ""
    version: int = 0
    model_name: str = c.DEFAULT_MODEL_NAME
    batch_buckets: tuple[int, ...] = decoding.Buckets.batch
    length_buckets: tuple[int, ...] = decoding.Buckets.length
    xla_warmup: bool = False
    chat_template: str = ""

    def __post_init__(self):
        for name in ("batch_buckets", "length_buckets"):
            value = getattr(self, name)
            if not value or min(value) < 1:
                raise ConfigError(name, ",".join(map(str, value)), "needs one or more sizes, each at least 1")
            object.__setattr__(self, name, tuple(sorted(set(value))))
        if self.version < 0:
            raise ConfigError("version", self.version, "must be positive (0 picks the next free one)")


def _spec(signature: str, cache: list | None = None) -> list[tf.TensorSpec]:
    """The signature's input specs; `cache`, the shape of the model's cache (its batch None)."""
    shapes = {1: [None], 2: [None, None], None: cache}
    return [tf.TensorSpec(shapes[t.rank], tf.dtypes.as_dtype(t.dtype), name=name)
            for name, t in c.SIGNATURES[signature].inputs.items()]


def cache_shape(decoder) -> list:
    """The cache's shape in the step signatures: any batch and, for a transformer, any length."""
    shape = [None] + list(decoder.init_cache(1, 1).shape[1:])
    if decoder.max_length is not None:
        shape[3] = None
    return shape


class LanguageModelModule(ServedModule):
    """The exported object: tokenizer + model + decoding loop, one method per signature.

    Args:
        model: a built model with its weights.
        config: its config.
        tokenizer: the workdir's keras-nlp tokenizer.
        asset_files: tokenizer files to carry in the SavedModel's assets/.
        buckets: the shapes the _xla signatures compile for (cut to a transformer's context).
    """

    def __init__(self, model, config: models.ModelConfig, tokenizer, asset_files: list[str],
                 buckets: decoding.Buckets = decoding.Buckets()):
        super().__init__("lmstack", model)
        self.tokenizer = tokenizer
        self._eos = tokenizer.eos_id  # ends a document: generation starts after it and stops at it
        self.tokenizer_assets = [tf.saved_model.Asset(f) for f in asset_files]
        self._decoder = models.decoder(model, config)
        self._context = getattr(config, "seq_len", None) if models.family_of(config) == "transformer" else None
        self.buckets = buckets.fit(self._context)

    def _complete(self, prompt, max_new_tokens, sampling: samplers.Sampling, compiled: bool):
        prompts = self._tokenize(prompt)  # ragged (B, None)
        ids = decoding.generate_graph(self._decoder, prompts, max_new_tokens, sampling,
                                        stop_token_id=self._eos, empty_prompt_id=self._eos,
                                        loop=self._loop(compiled))
        return {c.COMPLETION: self._detokenize(ids), c.TOKEN_IDS: ids.to_tensor(default_value=0)}

    @tf.function(input_signature=_spec(c.SERVING_DEFAULT))
    def serving_default(self, prompt, max_new_tokens):
        return self._complete(prompt, max_new_tokens, samplers.Sampling.greedy(tf.shape(prompt)[0]), False)

    @tf.function(input_signature=_spec(c.GENERATE))
    def generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        return self._complete(prompt, max_new_tokens, samplers.Sampling(temperature, top_k, top_p, seed), False)

    @tf.function(input_signature=_spec(c.SERVING_DEFAULT_XLA))
    def serving_default_xla(self, prompt, max_new_tokens):
        return self._complete(prompt, max_new_tokens, samplers.Sampling.greedy(tf.shape(prompt)[0]), True)

    @tf.function(input_signature=_spec(c.GENERATE_XLA))
    def generate_xla(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        return self._complete(prompt, max_new_tokens, samplers.Sampling(temperature, top_k, top_p, seed), True)

    @tf.function(input_signature=_spec(c.GENERATE_CHUNK))
    def generate_chunk(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, generated, num_generated,
                       chunk_tokens):
        return self._chunk(prompt, max_new_tokens, samplers.Sampling(temperature, top_k, top_p, seed), generated,
                           num_generated, chunk_tokens, False)

    @tf.function(input_signature=_spec(c.GENERATE_CHUNK_XLA))
    def generate_chunk_xla(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, generated, num_generated,
                           chunk_tokens):
        return self._chunk(prompt, max_new_tokens, samplers.Sampling(temperature, top_k, top_p, seed), generated,
                           num_generated, chunk_tokens, True)

    def _chunk(self, prompt, max_new_tokens, sampling, generated, num_generated, chunk_tokens, compiled: bool):
        """The next `chunk_tokens` of what `generate` makes, after the `num_generated` it has made.

        The sequence is laid out as `generate` lays it out for `max_new_tokens` ([EOS] for an
        empty prompt, the prompt's end that leaves room for them in a transformer's context, the
        tokens so far), so each token is chosen at the position, with the noise, that `generate`
        chooses it: chunk by chunk, the same text.
        """
        prompts = self._tokenize(prompt)  # ragged (B, None)
        splits = prompts.row_splits.dtype
        empty = tf.cast(prompts.row_lengths() == 0, splits)
        start = tf.RaggedTensor.from_row_lengths(tf.fill([tf.reduce_sum(empty)], self._eos), empty)
        prompts = tf.concat([start, prompts], axis=1)
        total = tf.maximum(max_new_tokens, 0)
        if self._context is not None:  # keep the prompt's end, as generate_graph does for `total`
            with tf.control_dependencies([decoding.check_fits_context(total, self._context)]):
                total = tf.identity(total)
            lengths = tf.cast(prompts.row_lengths(), tf.int32)
            keep = tf.minimum(lengths, self._context - total)
            position = tf.ragged.range(lengths)
            prompts = tf.ragged.boolean_mask(prompts, position >= tf.expand_dims(lengths - keep, 1))
        made = tf.clip_by_value(num_generated, 0, tf.shape(generated)[1])
        so_far = tf.RaggedTensor.from_tensor(generated, lengths=made).with_row_splits_dtype(splits)
        new = tf.clip_by_value(tf.minimum(chunk_tokens, total - made), 0, total)
        ids = decoding.generate_graph(self._decoder, tf.concat([prompts, so_far], axis=1), new, sampling,
                                        stop_token_id=self._eos, empty_prompt_id=self._eos,
                                        loop=self._loop(compiled))
        count = tf.cast(ids.row_lengths(), tf.int32)
        return {c.COMPLETION: self._detokenize(tf.concat([so_far, ids], axis=1)),
                c.TOKEN_IDS: ids.to_tensor(default_value=0), c.FINISHED: count < new}

    # The tokenizer and the decoding loop are traced once (per path) and called by every signature
    # (tracing them per signature doubled a char model's export time, and a BPE tokenizer's merge
    # loop is larger than a tiny model).
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def _tokenize(self, text):
        return tf.cast(self.tokenizer.tokenize(text), tf.int32)

    @tf.function(input_signature=[tf.RaggedTensorSpec([None, None], tf.int32, ragged_rank=1)])
    def _detokenize(self, ids):
        return self.tokenizer.detokenize(ids)

    @tf.function
    def _decode(self, tokens, keep, new, sampling):
        return decoding.decode(self._decoder, tokens, keep, new, sampling, stop_token_id=self._eos)

    @tf.function(jit_compile=True)
    def _decode_xla(self, tokens, keep, new, sampling):
        return decoding.decode(self._decoder, tokens, keep, new, sampling, stop_token_id=self._eos)

    def _loop(self, compiled: bool):
        return decoding.bucketed(self._decode_xla, self.buckets, self._decode) if compiled else self._decode

    @tf.function(input_signature=_spec(c.SCORE))
    def score(self, text):
        """Sum of log p(token | previous tokens), the first token after [EOS] (a document's start).

        Texts longer than the transformer's context are scored in consecutive
        windows of the context length (each window starts afresh).
        """
        tokens = self._tokenize(text)  # ragged (B, None)
        counts = tf.cast(tokens.row_lengths(), tf.int32)
        batch = tf.shape(counts)[0]
        eos = tf.fill([batch, 1], self._eos)
        sequences = tf.concat([tf.RaggedTensor.from_tensor(eos), tokens], axis=1)
        longest = tf.maximum(tf.reduce_max(counts), 1)
        window = longest if self._context is None else tf.minimum(longest, self._context)
        padded = (longest + window - 1) // window * window
        inputs = sequences[:, :-1].to_tensor(default_value=0, shape=[batch, padded])
        targets = sequences[:, 1:].to_tensor(default_value=0, shape=[batch, padded])
        logits = self.model(tf.reshape(inputs, [-1, window]), training=False)  # (B * windows, W, V)
        log_p = -tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.reshape(targets, [-1, window]), logits=tf.cast(logits, tf.float32))
        mask = tf.sequence_mask(counts, padded, dtype=tf.float32)
        return {c.LOG_LIKELIHOOD: tf.reduce_sum(tf.reshape(log_p, [batch, padded]) * mask, axis=1),
                c.NUM_TOKENS: counts}

    @tf.function(input_signature=_spec(c.NEXT_TOKEN_LOGITS))
    def next_token_logits(self, token_ids, num_tokens):
        """Logits for the token after the first `num_tokens` of each row (the last `context` of them are read).

        Positions past a row's `num_tokens` are ignored, whatever they hold: TensorFlow Serving's
        batching pads a shorter request's `token_ids` with its first element to share a batch
        (`pad_variable_length_inputs`), and the answer must not change.
        """
        length = tf.shape(token_ids)[1]
        tf.debugging.assert_positive(num_tokens, message="num_tokens needs at least one token per row")
        tf.debugging.assert_less_equal(num_tokens, length, message="num_tokens is longer than the row of token_ids")
        if self._context is None:
            window, last = token_ids, num_tokens - 1
        else:
            width = tf.minimum(length, self._context)
            start = tf.maximum(0, num_tokens - self._context)  # (B,) each row's window ends at its last token
            window = tf.gather(token_ids, start[:, None] + tf.range(width)[None, :], batch_dims=1)  # (B, W)
            last = num_tokens - start - 1
        logits = self.model(window, training=False)  # (B, W, V); causal, so padding after `last` is not read
        return {c.LOGITS: tf.cast(tf.gather(logits, last, batch_dims=1), tf.float32)}

    @tf.function(input_signature=_spec(c.TOKEN_LOGPROBS))
    def token_logprobs(self, token_ids, num_tokens):
        """log p(token t | tokens before it) at every position t >= 1, and the likeliest tokens there.

        One forward pass (a transformer's context must hold the rows). Positions at or past a row's
        `num_tokens` are 0, whatever they hold (TensorFlow Serving's batching pads rows).
        """
        length = tf.shape(token_ids)[1]
        checks = [tf.debugging.assert_less_equal(num_tokens, length,
                                                 message="num_tokens is longer than the row of token_ids")]
        if self._context is not None:
            checks.append(tf.debugging.assert_less_equal(
                length, self._context, message=f"token_logprobs reads at most the context of {self._context} tokens"))
        with tf.control_dependencies(checks):
            logits = self.model(token_ids, training=False)  # (B, T, V): position t predicts token t + 1
        log_p = tf.nn.log_softmax(tf.cast(logits[:, :-1], tf.float32))  # (B, T-1, V)
        chosen = tf.gather(log_p, token_ids[:, 1:, tf.newaxis], batch_dims=2)[..., 0]  # (B, T-1)
        top_logprobs, top_ids = tf.math.top_k(log_p, k=c.TOP_LOGPROBS)
        valid = tf.range(1, length)[tf.newaxis, :] < num_tokens[:, tf.newaxis]  # (B, T-1)
        front = lambda x: tf.concat([tf.zeros_like(x[:, :1]), x], axis=1)  # position 0 predicts nothing
        return {c.LOGPROBS: front(tf.where(valid, chosen, 0.0)),
                c.TOP_TOKEN_IDS: front(tf.where(valid[..., tf.newaxis], top_ids, 0)),
                c.TOP_LOGPROBS_OUTPUT: front(tf.where(valid[..., tf.newaxis], top_logprobs, 0.0))}

    # -- the step signatures (continuous batching in a server; see serving.contract) --

    def _prefill(self, prompt, max_new_tokens, sampling: samplers.Sampling, compiled: bool):
        """Each prompt laid out as `generate_graph` lays it out, prefilled into a new cache."""
        new = tf.maximum(max_new_tokens, 0)
        if self._context is not None:
            with tf.control_dependencies([decoding.check_fits_context(new, self._context)]):
                new = tf.identity(new)
        tokens, lengths = decoding.layout_prompts(self._tokenize(prompt), new, self._context, self._eos)
        if compiled:  # padded to a bucket: padding rows are one [EOS], padding columns never read
            batch, width = tf.shape(tokens)[0], tf.shape(tokens)[1]
            rows = decoding.round_up(batch, self.buckets.batch)
            columns = decoding.round_up(width, self.buckets.length)

            def padded():
                extra = rows - batch
                token, cache = self._start_xla(
                    tf.pad(tokens, [[0, extra], [0, columns - width]], constant_values=self._eos),
                    tf.pad(lengths, [[0, extra]], constant_values=1), sampling.pad(extra))
                return token[:batch], cache[:batch]

            token, cache = tf.cond((rows > 0) & (columns > 0), padded, lambda: self._start(tokens, lengths, sampling))
        else:
            token, cache = self._start(tokens, lengths, sampling)
        return {c.CACHE: cache, c.TOKEN: token, c.NUM_TOKENS: lengths, c.FINISHED: token == self._eos}

    def _start_rows(self, tokens, lengths, sampling):
        return decoding.start_rows(self._decoder, tokens, lengths, self._context, sampling)

    @tf.function
    def _start(self, tokens, lengths, sampling):
        return self._start_rows(tokens, lengths, sampling)

    @tf.function(jit_compile=True)
    def _start_xla(self, tokens, lengths, sampling):
        return self._start_rows(tokens, lengths, sampling)

    def _continue(self, token, position, cache, steps, sampling: samplers.Sampling, penalties: samplers.Penalties,
                  compiled: bool):
        if compiled:  # a batch beyond the largest bucket runs uncompiled; others are padded to one
            batch = tf.shape(token)[0]
            rows = decoding.round_up(batch, self.buckets.batch)

            def padded():
                extra = rows - batch
                pad = lambda x: tf.pad(x, [[0, extra]] + [[0, 0]] * (len(x.shape) - 1))
                out = self._continue_xla(pad(token), pad(position), pad(cache), pad(steps), sampling.pad(extra),
                                         samplers.Penalties(*map(pad, penalties)))
                return tuple(x[:batch] for x in out)

            ids, count, cache, counts = tf.cond(
                rows > 0, padded, lambda: self._continue_graph(token, position, cache, steps, sampling, penalties))
        else:
            ids, count, cache, counts = self._continue_graph(token, position, cache, steps, sampling, penalties)
        return {c.TOKEN_IDS: ids, c.NUM_TOKENS: count, c.CACHE: cache, c.TOKEN_COUNTS: counts}

    def _continue_rows(self, token, position, cache, steps, sampling, penalties):
        return decoding.continue_rows(self._decoder, token, position, cache, tf.minimum(steps, c.DECODE_STEPS),
                                      sampling, self._eos, penalties)

    @tf.function
    def _continue_graph(self, token, position, cache, steps, sampling, penalties):
        return self._continue_rows(token, position, cache, steps, sampling, penalties)

    @tf.function(jit_compile=True)
    def _continue_xla(self, token, position, cache, steps, sampling, penalties):
        return self._continue_rows(token, position, cache, steps, sampling, penalties)

    def step_signatures(self) -> dict[str, Any]:
        """The prefill, decode, detokenize and tokenize signatures (and the compiled twins)."""
        cache = cache_shape(self._decoder)
        sampled = lambda compiled: tf.function(
            lambda prompt, max_new_tokens, temperature, top_k, top_p, seed: self._prefill(
                prompt, max_new_tokens, samplers.Sampling(temperature, top_k, top_p, seed), compiled),
            input_signature=_spec(c.PREFILL))
        stepped = lambda compiled: tf.function(
            lambda token, position, cache, steps, temperature, top_k, top_p, seed, presence_penalty,
            frequency_penalty, token_counts: self._continue(
                token, position, cache, steps, samplers.Sampling(temperature, top_k, top_p, seed),
                samplers.Penalties(presence_penalty, frequency_penalty, token_counts), compiled),
            input_signature=_spec(c.DECODE, cache))
        detokenize = tf.function(
            lambda token_ids, num_tokens: {c.TEXT: self._detokenize(tf.RaggedTensor.from_tensor(
                token_ids, lengths=tf.clip_by_value(num_tokens, 0, tf.shape(token_ids)[1])))},
            input_signature=_spec(c.DETOKENIZE))
        tokenize = tf.function(
            lambda text: (lambda ids: {c.TOKEN_IDS: ids.to_tensor(default_value=0),
                                       c.NUM_TOKENS: tf.cast(ids.row_lengths(), tf.int32)})(self._tokenize(text)),
            input_signature=_spec(c.TOKENIZE))
        return {c.PREFILL: sampled(False).get_concrete_function(),
                c.TOKENIZE: tokenize.get_concrete_function(),
                c.PREFILL_XLA: sampled(True).get_concrete_function(),
                c.DECODE: stepped(False).get_concrete_function(), c.DECODE_XLA: stepped(True).get_concrete_function(),
                c.DETOKENIZE: detokenize.get_concrete_function()}

    def signatures(self) -> dict[str, Any]:
        steps = self.step_signatures()
        return {name: steps[name] if name in steps else getattr(self, name).get_concrete_function()
                for name in c.SIGNATURES}


def read_chat_template(path: str):
    """The chat template of `--chat_template=FILE` (see ExportConfig), checked on a small conversation.

    Raises:
        ConfigError: a file that cannot be read, bad JSON, or a template that does not compile.
    """
    from serving.server import chat

    try:
        text = fs.path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("chat_template", path, f"cannot read it ({e})") from None
    try:
        template = chat.ChatTemplate.parse(text, as_json=path.endswith(".json"))
        chat.check(template)
    except chat.TemplateError as e:
        raise ConfigError("chat_template", path, str(e)) from None
    return template


def _tokenizer_files(tokenizer_dir: fs.Path) -> list[str]:
    return sorted(str(p) for p in tokenizer_dir.iterdir() if p.is_file())


_SAMPLED_WARMUP = {c.PROMPT: [WARMUP_PROMPT], c.MAX_NEW_TOKENS: [4], c.TEMPERATURE: [1.0], c.TOP_K: [0],
                   c.TOP_P: [0.9], c.SEED: [0]}
_CHUNK_WARMUP = {**_SAMPLED_WARMUP, c.GENERATED: [[tokenizers.EOS_ID]], c.NUM_GENERATED: [1], c.CHUNK_TOKENS: [2]}


def warmup_requests(model_name: str, cache: list, vocab: int) -> list[bytes]:
    """Serialized PredictionLog records, one small request per uncompiled signature (`cache`: the
    step signatures' cache shape, its None dimensions 1 here; `vocab`: the model's vocabulary size)."""
    import numpy as np

    empty_cache = np.zeros([1 if n is None else n for n in cache], np.float32)
    step = {c.TOKEN: [tokenizers.EOS_ID], c.POSITION: [0], c.CACHE: empty_cache, c.STEPS: [1], c.TEMPERATURE: [1.0],
            c.TOP_K: [0], c.TOP_P: [0.9], c.SEED: [0], c.PRESENCE_PENALTY: [0.0], c.FREQUENCY_PENALTY: [0.0],
            c.TOKEN_COUNTS: np.zeros([1, vocab], np.float32)}
    return _prediction_logs(model_name, [
        (c.SERVING_DEFAULT, {c.PROMPT: [WARMUP_PROMPT], c.MAX_NEW_TOKENS: [4]}),
        (c.GENERATE, {c.PROMPT: [WARMUP_PROMPT], c.MAX_NEW_TOKENS: [4], c.TEMPERATURE: [1.0], c.TOP_K: [0],
                      c.TOP_P: [0.9], c.SEED: [0]}),
        (c.SCORE, {c.TEXT: [WARMUP_PROMPT]}),
        (c.NEXT_TOKEN_LOGITS, {c.TOKEN_IDS: [[tokenizers.EOS_ID]], c.NUM_TOKENS: [1]}),
        (c.TOKEN_LOGPROBS, {c.TOKEN_IDS: [[tokenizers.EOS_ID, tokenizers.EOS_ID]], c.NUM_TOKENS: [2]}),
        (c.GENERATE_CHUNK, _CHUNK_WARMUP),
        (c.PREFILL, _SAMPLED_WARMUP),
        (c.DECODE, step),
        (c.DETOKENIZE, {c.TOKEN_IDS: [[tokenizers.EOS_ID]], c.NUM_TOKENS: [1]}),
        (c.TOKENIZE, {c.TEXT: [WARMUP_PROMPT]}),
    ])



def xla_warmup_requests(model_name: str, buckets: decoding.Buckets, tokenizer) -> list[bytes]:
    """Records that compile every bucket of the _xla signatures: one request of each (batch, length).

    (decode_xla's buckets are compiled by the server that schedules steps, which holds the caches:
    a record would carry a whole batch of them.)
    """
    requests = []
    for batch, length in buckets.shapes():
        # An empty prompt is one token ([EOS]): with length - 1 new tokens the buffer is `length`.
        requests.append((c.SERVING_DEFAULT_XLA, {c.PROMPT: [""] * batch, c.MAX_NEW_TOKENS: [length - 1] * batch}))
        # A prompt of `length` tokens (the char "x" or a byte: a token or more each) prefills at `length`.
        prompt = "x" * length
        requests.append((c.PREFILL_XLA, {c.PROMPT: [prompt] * batch, c.MAX_NEW_TOKENS: [0] * batch,
                                         **{k: v * batch for k, v in _SAMPLED_WARMUP.items()
                                            if k not in (c.PROMPT, c.MAX_NEW_TOKENS)}}))
    # The sampled and chunked twins run the same compiled loop: one request each prepares their graphs.
    requests.append((c.GENERATE_XLA, _SAMPLED_WARMUP))
    requests.append((c.GENERATE_CHUNK_XLA, _CHUNK_WARMUP))
    return _prediction_logs(model_name, requests)


def _prediction_logs(model_name: str, requests: list[tuple[str, dict]]) -> list[bytes]:
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    records = []
    for signature, values in requests:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
        for name, value in values.items():
            dtype = tf.dtypes.as_dtype(c.SIGNATURES[signature].inputs[name].dtype)
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records


def _versions(base: fs.Path) -> list[int]:
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def export(workdir: str | os.PathLike, config: ExportConfig = ExportConfig()) -> fs.Path:
    """Writes EXPORT_BASE/VERSION/ and returns its path.

    Raises:
        UserError: no trained checkpoint, an unknown variant, an existing version.
    """
    wd = workdir_lib.Workdir(workdir)
    run_config = wd.read_config()
    source = checkpoints.model_dir(wd.root, config.variant)  # UserError for an unknown variant
    base = fs.path(config.export_base) if config.export_base else wd.root / DEFAULT_EXPORT_DIR / config.model_name
    version = config.version or (max(_versions(base), default=0) + 1)
    final = base / str(version)
    if final.exists():
        raise UserError(f"{final} already exists; pick another --version or leave it out for the next free one")
    from pipelines import pretrained

    carried = wd.tokenizer_dir / pretrained.CHAT_TEMPLATE_FILE  # an imported checkpoint's own
    template_file = config.chat_template or (str(carried) if carried.is_file() else "")
    chat_template = read_chat_template(template_file) if template_file else None
    tokenizer = tokenizers.load(wd.tokenizer_dir)
    files = _tokenizer_files(wd.tokenizer_dir)
    xla_warmup: list[bytes] = []
    if checkpoints.classifier_section(wd.root) is not None:
        from serving.exporters import classifier

        if config.variant:
            raise UserError(f"{wd.root} is a classifier workdir: it has no optimized variants; drop --variant")
        if chat_template is not None:
            raise UserError(f"{wd.root} is a classifier workdir: it does not chat; drop --chat_template")
        module, info = classifier.build(wd.root, tokenizer, files)
        signatures, warmup = c.CLASSIFIER_SIGNATURES, classifier.warmup_requests(config.model_name)
        methods = {c.CLASSIFY: c.CLASSIFY_METHOD}
    else:
        model, model_config, step = checkpoints.load_model(source)  # UserError without a checkpoint
        module = LanguageModelModule(model, model_config, tokenizer, files,
                                     decoding.Buckets(config.batch_buckets, config.length_buckets))
        info = {"kind": "language_model", "checkpoint_step": step, "model": models.config_to_json(model_config),
                "xla_buckets": {"batch": list(module.buckets.batch), "length": list(module.buckets.length)}}
        signatures, methods = c.SIGNATURES, {}
        warmup = warmup_requests(config.model_name, cache_shape(module._decoder), model_config.vocab_size)
        xla_warmup = xla_warmup_requests(config.model_name, module.buckets, tokenizer)
        if config.xla_warmup:
            warmup, xla_warmup = warmup + xla_warmup, []
        if chat_template is not None:
            info["chat_template"] = chat_template.to_json()

    # Built aside and renamed whole: a server polling EXPORT_BASE never sees half a version.
    with workdir_lib.publish_dir(final) as staging:
        tf.saved_model.save(module, str(staging), signatures=module.signatures())
        if methods:
            classifier.set_method_names(staging, methods)
        extra = staging / c.ASSETS_EXTRA
        extra.mkdir()
        for name, records in ((c.WARMUP_FILE, warmup), (c.XLA_WARMUP_FILE, xla_warmup)):
            if records:
                with tf.io.TFRecordWriter(str(extra / name)) as writer:
                    for record in records:
                        writer.write(record)
        workdir_lib.write_json(extra / c.CONFIG_FILE, {
            "model_name": config.model_name, "version": version, "variant": config.variant or None,
            **info, "workdir": str(wd.root),
            "tokenizer": tokenizers.load_config(wd.tokenizer_dir), "run": run_config,
            "signatures": {name: {"inputs": {k: dataclasses.asdict(v) for k, v in s.inputs.items()},
                                  "outputs": {k: dataclasses.asdict(v) for k, v in s.outputs.items()}}
                           for name, s in signatures.items()},
        })
    return final


def describe(path: fs.Path) -> str:
    """What was exported, for people."""
    info = json.loads((path / c.ASSETS_EXTRA / c.CONFIG_FILE).read_text())
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    what = (f"a classifier of {', '.join(info['labels'])} on a {info['classifier']['backbone']['family']} backbone"
            if info.get("kind") == "classifier" else info["model"]["family"])
    return "\n".join([
        f"exported {what} (checkpoint step {info['checkpoint_step']}"
        + (f", variant {info['variant']}" if info["variant"] else "") + f") to {path} ({size / 1e6:.1f} MB)",
        f"signatures: {', '.join(info['signatures'])}",
        f"serve it:   lmstack serve --model_name={info['model_name']} --model_base_path={path.parent}",
        "            (or tensorflow/serving: see deploy/README.md)",
    ])
