"""Export: a workdir's model + tokenizer -> a SavedModel that TensorFlow Serving serves, text in and text out.

    EXPORT_BASE/VERSION/
      saved_model.pb, variables/       the four signatures of `serving.contract`
      assets/                          the tokenizer's files (vocabulary / SentencePiece model)
      assets.extra/lmstack_config.json the run's config, the tokenizer's, the checkpoint step
      assets.extra/tf_serving_warmup_requests   one PredictionLog per signature

Everything a request needs runs inside the graph: tokenizing (keras-nlp
tokenizers, built from TensorFlow and tensorflow-text ops, which TensorFlow
Serving links), the decoding loop with the KV cache or LSTM state
(`models.generation.generate_graph`), detokenizing. The graph is not
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
import pathlib
from typing import Any

import tensorflow as tf

import models
from models import generation
from pipelines import checkpoints, tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError
from serving import contract as c

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
    """
    variant: str = ""
    export_base: str = ""
    version: int = 0
    model_name: str = c.DEFAULT_MODEL_NAME


def _spec(signature: str) -> list[tf.TensorSpec]:
    shapes = {1: [None], 2: [None, None]}
    return [tf.TensorSpec(shapes[t.rank], tf.dtypes.as_dtype(t.dtype), name=name)
            for name, t in c.SIGNATURES[signature].inputs.items()]


class LanguageModelModule(tf.Module):
    """The exported object: tokenizer + model + decoding loop, one method per signature.

    Args:
        model: a built model with its weights.
        config: its config.
        tokenizer: the workdir's keras-nlp tokenizer.
        asset_files: tokenizer files to carry in the SavedModel's assets/.
    """

    def __init__(self, model, config: models.ModelConfig, tokenizer, asset_files: list[str]):
        super().__init__(name="lmstack")
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer_assets = [tf.saved_model.Asset(f) for f in asset_files]
        self._decoder = models.decoder(model, config)
        self._context = getattr(config, "seq_len", None) if models.family_of(config) == "transformer" else None

    def _complete(self, prompt, max_new_tokens, choose):
        prompts = tf.cast(self.tokenizer.tokenize(prompt), tf.int32)  # ragged (B, None)
        ids = generation.generate_graph(self._decoder, prompts, max_new_tokens, choose,
                                        stop_token_id=tokenizers.EOS_ID, empty_prompt_id=tokenizers.EOS_ID)
        return {c.COMPLETION: self.tokenizer.detokenize(ids), c.TOKEN_IDS: ids.to_tensor(default_value=0)}

    @tf.function(input_signature=_spec(c.SERVING_DEFAULT))
    def serving_default(self, prompt, max_new_tokens):
        return self._complete(prompt, max_new_tokens,
                              lambda logits, position: tf.argmax(logits, axis=-1, output_type=tf.int32))

    @tf.function(input_signature=_spec(c.GENERATE))
    def generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        def choose(logits, position):
            return generation.sample_next(logits, position, temperature, top_k, top_p, seed)
        return self._complete(prompt, max_new_tokens, choose)

    @tf.function(input_signature=_spec(c.SCORE))
    def score(self, text):
        """Sum of log p(token | previous tokens), the first token after [EOS] (a document's start).

        Texts longer than the transformer's context are scored in consecutive
        windows of the context length (each window starts afresh).
        """
        tokens = tf.cast(self.tokenizer.tokenize(text), tf.int32)  # ragged (B, None)
        counts = tf.cast(tokens.row_lengths(), tf.int32)
        batch = tf.shape(counts)[0]
        eos = tf.fill([batch, 1], tokenizers.EOS_ID)
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

    def signatures(self) -> dict[str, Any]:
        return {name: getattr(self, name).get_concrete_function() for name in c.SIGNATURES}


def _tokenizer_files(tokenizer_dir: pathlib.Path) -> list[str]:
    return sorted(str(p) for p in tokenizer_dir.iterdir() if p.is_file())


def warmup_requests(model_name: str) -> list[bytes]:
    """Serialized PredictionLog records, one small request per signature."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    inputs = {
        c.SERVING_DEFAULT: {c.PROMPT: [WARMUP_PROMPT], c.MAX_NEW_TOKENS: [4]},
        c.GENERATE: {c.PROMPT: [WARMUP_PROMPT], c.MAX_NEW_TOKENS: [4], c.TEMPERATURE: [1.0], c.TOP_K: [0],
                     c.TOP_P: [0.9], c.SEED: [0]},
        c.SCORE: {c.TEXT: [WARMUP_PROMPT]},
        c.NEXT_TOKEN_LOGITS: {c.TOKEN_IDS: [[tokenizers.EOS_ID]], c.NUM_TOKENS: [1]},
    }
    records = []
    for signature, values in inputs.items():
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
        for name, value in values.items():
            dtype = tf.dtypes.as_dtype(c.SIGNATURES[signature].inputs[name].dtype)
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records


def _versions(base: pathlib.Path) -> list[int]:
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def export(workdir: str | os.PathLike, config: ExportConfig = ExportConfig()) -> pathlib.Path:
    """Writes EXPORT_BASE/VERSION/ and returns its path.

    Raises:
        UserError: no trained checkpoint, an unknown variant, an existing version.
    """
    wd = workdir_lib.Workdir(workdir)
    run_config = wd.read_config()
    source = checkpoints.model_dir(wd.root, config.variant)  # UserError for an unknown variant
    base = pathlib.Path(config.export_base) if config.export_base else wd.root / DEFAULT_EXPORT_DIR / config.model_name
    if config.version < 0:
        raise ConfigError("version", config.version, "must be positive (0 picks the next free one)")
    version = config.version or (max(_versions(base), default=0) + 1)
    final = base / str(version)
    if final.exists():
        raise UserError(f"{final} already exists; pick another --version or leave it out for the next free one")
    tokenizer = tokenizers.load(wd.tokenizer_dir)
    files = _tokenizer_files(wd.tokenizer_dir)
    if checkpoints.classifier_section(wd.root) is not None:
        from serving.exporters import classifier

        if config.variant:
            raise UserError(f"{wd.root} is a classifier workdir: it has no optimized variants; drop --variant")
        module, info = classifier.build(wd.root, tokenizer, files)
        signatures, warmup = c.CLASSIFIER_SIGNATURES, classifier.warmup_requests(config.model_name)
        methods = {c.CLASSIFY: c.CLASSIFY_METHOD}
    else:
        model, model_config, step = checkpoints.load_model(source)  # UserError without a checkpoint
        module = LanguageModelModule(model, model_config, tokenizer, files)
        info = {"kind": "language_model", "checkpoint_step": step, "model": models.config_to_json(model_config)}
        signatures, warmup, methods = c.SIGNATURES, warmup_requests(config.model_name), {}

    # Built aside and renamed whole: a server polling EXPORT_BASE never sees half a version.
    with workdir_lib.publish_dir(final) as staging:
        tf.saved_model.save(module, str(staging), signatures=module.signatures())
        if methods:
            classifier.set_method_names(staging, methods)
        extra = staging / c.ASSETS_EXTRA
        extra.mkdir()
        with tf.io.TFRecordWriter(str(extra / c.WARMUP_FILE)) as writer:
            for record in warmup:
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


def describe(path: pathlib.Path) -> str:
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
