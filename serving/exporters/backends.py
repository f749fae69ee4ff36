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
                             top_k=top_k, top_p=top_p, seed=sampler.draw_seed())
    except ValueError as e:
        raise UserError(f"{e}; lower --max_new_tokens or convert with a larger --max_seq_len") from None
    return model.tokenizer.decode(new)


def _savedmodel(path: fs.Path, prompt: str, max_new_tokens: int, sampler: SamplerConfig) -> str:
    if not (path / "saved_model.pb").is_file():
        raise UserError(f"{path} is not a SavedModel version directory (no saved_model.pb)")
    loaded = tf.saved_model.load(str(path))
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
