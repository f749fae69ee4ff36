"""Generation with the model as it ships: the exported SavedModel or the TFLite file.

`lmstack generate --backend=savedmodel|tflite` lands here; `keras` (the
checkpoint) is `pipelines.generate.TextGenerator`. All three tokenize with the
run's tokenizer (the TFLite file with the copy packed inside it, run without
TensorFlow) and stop at [EOS]; in float32 their greedy text is the same.
"""

from __future__ import annotations

import os

import tensorflow as tf

from models.samplers import SamplerConfig
from pipelines import fs
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError
from serving import contract as c
from serving import edge
from serving.exporters import tflite


def newest_export(workdir: str | os.PathLike, model_name: str = c.DEFAULT_MODEL_NAME) -> fs.Path:
    base = workdir_lib.Workdir(workdir).root / "export" / model_name
    versions = sorted((int(p.name), p) for p in base.glob("*") if p.is_dir() and p.name.isdigit())
    if not versions:
        raise UserError(f"no export in {base}; run `lmstack export --workdir={workdir}` first or pass --export_dir")
    return versions[-1][1]


def generate(backend: str, workdir: str | os.PathLike, prompt: str, max_new_tokens: int, sampler: SamplerConfig,
             variant: str = "", quantize: str = "none", export_dir: str = "", num_threads: int | None = None) -> str:
    """The continuation of `prompt` by the `savedmodel` or `tflite` backend."""
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens", max_new_tokens, "must be at least 1")
    if backend == "savedmodel":
        return _savedmodel(fs.path(export_dir) if export_dir else newest_export(workdir), prompt,
                           max_new_tokens, sampler)
    if backend != "tflite":
        raise ConfigError("backend", backend, "expected keras, savedmodel or tflite")
    model = edge.EdgeModel(tflite.find(workdir, variant, quantize), num_threads=num_threads)
    ids = model.tokenizer.encode(prompt) if prompt else [model.eos_id]  # the tokenizer inside the file
    temperature, top_k, top_p = sampler.settings()
    try:
        new = model.generate(ids, max_new_tokens, stop_ids=[model.eos_id], temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=sampler.draw_seed(),
                             presence_penalty=sampler.presence_penalty, frequency_penalty=sampler.frequency_penalty)
    except ValueError as e:
        raise UserError(f"{e}; lower --max_new_tokens or convert with a larger --max_seq_len") from None
    return model.tokenizer.decode(new)


def _savedmodel(path: fs.Path, prompt: str, max_new_tokens: int, sampler: SamplerConfig) -> str:
    if not (path / "saved_model.pb").is_file():
        raise UserError(f"{path} is not a SavedModel version directory (no saved_model.pb)")
    loaded = tf.saved_model.load(str(path))
    if sampler.penalized:  # generate's inputs are TF Serving's contract: the step signatures take penalties
        return generate_steps(loaded, prompt, max_new_tokens, sampler, str(path))
    if sampler.name == "greedy":
        out = loaded.signatures[c.SERVING_DEFAULT](prompt=tf.constant([prompt]),
                                                   max_new_tokens=tf.constant([max_new_tokens], tf.int32))
    else:
        temperature, top_k, top_p = sampler.settings()
        out = loaded.signatures[c.GENERATE](
            prompt=tf.constant([prompt]), max_new_tokens=tf.constant([max_new_tokens], tf.int32),
            temperature=tf.constant([temperature], tf.float32), top_k=tf.constant([top_k], tf.int32),
            top_p=tf.constant([top_p], tf.float32), seed=tf.constant([sampler.draw_seed()], tf.int32))
    return out[c.COMPLETION].numpy()[0].decode("utf-8")


def generate_steps(loaded, prompt: str, max_new_tokens: int, sampler: SamplerConfig, path: str = "the export") -> str:
    """One prompt's continuation through a loaded SavedModel's prefill, decode and detokenize signatures,
    as `lmstack serve`'s scheduler runs them (the path that takes presence and frequency penalties)."""
    if c.TOKEN_COUNTS not in loaded.signatures[c.DECODE].structured_input_signature[1]:
        raise UserError(f"{path} was exported before lmstack took presence and frequency penalties: export again")
    temperature, top_k, top_p = sampler.settings()
    sampling = {c.TEMPERATURE: tf.constant([temperature], tf.float32), c.TOP_K: tf.constant([top_k], tf.int32),
                c.TOP_P: tf.constant([top_p], tf.float32), c.SEED: tf.constant([sampler.draw_seed()], tf.int32)}
    first = loaded.signatures[c.PREFILL](prompt=tf.constant([prompt]),
                                         max_new_tokens=tf.constant([max_new_tokens], tf.int32), **sampling)
    tokens = [] if first[c.FINISHED].numpy()[0] else [int(first[c.TOKEN].numpy()[0])]
    position, cache = first[c.NUM_TOKENS], first[c.CACHE]
    vocab = loaded.signatures[c.NEXT_TOKEN_LOGITS](token_ids=tf.constant([[0]]),
                                                   num_tokens=tf.constant([1]))[c.LOGITS].shape[1]
    counts = tf.one_hot(tokens[:1], vocab) if tokens else tf.zeros([1, vocab])
    while tokens and len(tokens) < max_new_tokens:
        steps = min(c.DECODE_STEPS, max_new_tokens - len(tokens))
        out = loaded.signatures[c.DECODE](
            token=tf.constant([tokens[-1]]), position=position, cache=cache, steps=tf.constant([steps]), **sampling,
            presence_penalty=tf.constant([sampler.presence_penalty], tf.float32),
            frequency_penalty=tf.constant([sampler.frequency_penalty], tf.float32), token_counts=counts)
        made = int(out[c.NUM_TOKENS].numpy()[0])
        tokens += out[c.TOKEN_IDS].numpy()[0, :made].tolist()
        position, cache, counts = position + made, out[c.CACHE], out[c.TOKEN_COUNTS]
        if made < steps:
            break  # [EOS]
    text = loaded.signatures[c.DETOKENIZE](token_ids=tf.constant([tokens or [0]], tf.int32),
                                           num_tokens=tf.constant([len(tokens)]))[c.TEXT]
    return text.numpy()[0].decode("utf-8")
