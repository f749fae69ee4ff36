"""`tflite`: a workdir's model as a TFLite file that generates text on a device.

The file holds signatures an app calls step by step, with fixed shapes
(`max_seq_len` tokens, batch 1 or `--batch_size` rows decoded in lockstep):

    transformer  prefill_N(tokens int32 [B, N], input_pos int32 [N], kv_cache_k_0, kv_cache_v_0, ...)
                     -> logits [B, N, V], kv_cache_k_0, kv_cache_v_0, ...   (kv caches [B, 1, max_seq_len, d])
                 decode(tokens int32 [B, 1], input_pos int32 [1], kv caches) -> logits [B, 1, V], kv caches
    lstm         sequence(tokens int32 [B, T])             -> logits [B, T, V]
                 step(token int32 [B, 1], h0, c0, h1, c1, ... [B, units]) -> logits [B, V], h0, c0, ...

The transformer's signatures are LiteRT-LM's (Google's on-device LLM engine; its
runtime's contract): a `prefill_N` per length of `--prefill_lengths` and one of the
whole cache (which scores a window), and `decode`. Each writes the keys and values of
its tokens at positions `input_pos[0] ..` of every layer's cache and returns the
caches, so a runtime may bind each cache's input and output to one buffer. Prompts
go through the prefills in chunks (a short chunk right-padded: its padding writes
positions that later tokens overwrite before any query reads them), the chosen
tokens through `decode`. `--format=litertlm` packs the same file with its tokenizer
and LlmMetadata into a `.litertlm` bundle the engine runs (`serving.exporters.litertlm`).

Only TFLite built-in ops are allowed: a model that would need Flex
(SELECT_TF_OPS) kernels does not run in ai-edge-litert, so conversion fails
with the ops named. Quantization as TFLite defines it: `float16` weights,
`dynamic` range (int8 weights, float activations), `int8` full-integer with
ranges calibrated on validation windows (float32 in and out). QAT variants
bring their own learned ranges.

Writes WORKDIR/tflite/NAME.tflite (NAME = family[-variant]-quantization) with
TFLite Metadata and the tokenizer's files inside (`edge_metadata`: an app ships
the file alone), a NAME.json sidecar (model and tokenizer config, signatures
with tensor shapes, quantization, op counts; packed in the file too) and the
tokenizer files in WORKDIR/tflite/tokenizer/.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import tempfile
import time
import typing
from typing import Any, Callable, Literal

import numpy as np
import tensorflow as tf

import models
from pipelines import checkpoints, dataset, evaluate, fs, tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError, check_choice
from pipelines.progress import Progress
from serving import edge
from serving.edge import metadata as tflite_metadata
from serving.exporters import edge_metadata, litertlm

Quantize = Literal["none", "float16", "dynamic", "int8"]
QUANTIZATIONS = typing.get_args(Quantize)
Format = Literal["tflite", "litertlm"]
TFLITE_DIR = "tflite"
PREFILL, DECODE, SEQUENCE, STEP, CLASSIFY = "prefill", "decode", "sequence", "step", "classify"


@dataclasses.dataclass(frozen=True)
class TFLiteConfig:
    """What to convert.

    Attributes:
        variant: an optimized variant (WORKDIR/optimized/NAME) instead of the trained model ('').
        quantize: none (float32), float16, dynamic (int8 weights) or int8 (weights and activations).
        max_seq_len: the fixed sequence length / cache size (0: the model's context).
        calibration_windows: int8: validation windows (a classifier's: validation texts) that
            calibrate the ranges.
        batch_size: rows per call: a classifier's texts, or a language model's sequences decoded in
            lockstep (one position for every row: N samples of one prompt, or prompts of one length).
        per_channel: int8: a scale per output channel of each weight matrix (TFLite's default)
            instead of one per matrix. Off by default: each signature stores its own copy of
            every weight's scales and int64 zero points, 18 % of the `small` transformer's int8
            file, for 0.01 % perplexity there (docs/results.md).
        prefill_lengths: a transformer's prefill signatures besides the whole cache's (lengths not
            shorter than max_seq_len are dropped): a runtime prefills a prompt in chunks of these.
        format: tflite (lmstack's file, run by `serving.edge`), or litertlm: that file and a
            `.litertlm` bundle of it for Google's LiteRT-LM engine (transformers only).
    """
    variant: str = ""
    quantize: Quantize = "none"
    max_seq_len: int = 0
    calibration_windows: int = 32
    batch_size: int = 1
    per_channel: bool = False
    prefill_lengths: tuple[int, ...] = (32, 128)
    format: Format = "tflite"

    def validate(self) -> None:
        """The checks that need no model (the pipeline runs them before its first stage)."""
        check_choice("quantize", self.quantize, QUANTIZATIONS)
        check_choice("format", self.format, typing.get_args(Format))
        if any(n < 1 for n in self.prefill_lengths):
            raise ConfigError("prefill_lengths", ",".join(map(str, self.prefill_lengths)), "must be at least 1 each")
        for name in ("calibration_windows", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be at least 1")
        if self.max_seq_len < 0:
            raise ConfigError("max_seq_len", self.max_seq_len, "expected 0 (the model's context) or a length")


def file_name(family: str, variant: str, quantize: str, batch_size: int = 1) -> str:
    """family[-variant]-quantization[-batchN]: `transformer-int8`, `lstm-pruned50-dynamic-batch4`."""
    return (f"{family}{'-' + variant if variant else ''}-{'float32' if quantize == 'none' else quantize}"
            + (f"-batch{batch_size}" if batch_size > 1 else ""))


def find(workdir: str | os.PathLike, variant: str = "", quantize: str = "none") -> fs.Path:
    """The TFLite file `convert` wrote for this model and quantization.

    Raises:
        UserError: an unknown quantization or variant, or no such file yet.
    """
    if quantize not in QUANTIZATIONS:
        check_choice("quantize", quantize, QUANTIZATIONS)
    config = checkpoints.read_model_config(checkpoints.model_dir(workdir, variant))
    name = file_name(models.family_of(config), variant, quantize)
    path = workdir_lib.Workdir(workdir).root / TFLITE_DIR / f"{name}.tflite"
    if not path.is_file():
        raise UserError(f"no {path}; run `lmstack tflite --workdir={workdir} --quantize={quantize}"
                        + (f" --variant={variant}" if variant else "") + "` first")
    return path


def cache_names(layers: int) -> list[str]:
    """A transformer file's cache inputs and outputs, LiteRT-LM's names: kv_cache_k_0, kv_cache_v_0, ..."""
    return [f"kv_cache_{kind}_{i}" for i in range(layers) for kind in "kv"]


def prefill_name(length: int) -> str:
    return f"{PREFILL}_{length}"


def prefill_lengths(seq_len: int, asked: typing.Iterable[int] = ()) -> list[int]:
    """The prefill signatures' lengths: those asked that are shorter than the cache, and the cache's."""
    return sorted({n for n in asked if n < seq_len} | {seq_len})


def signature_functions(model, config, seq_len: int, batch: int = 1, cell_clip: float = 0.0,
                        prefill: typing.Iterable[int] = ()) -> dict[str, Callable]:
    """The family's signatures as tf.functions with fixed input shapes (`batch` rows of `seq_len` tokens).

    A transformer gets LiteRT-LM's signatures (one `prefill_N` per length of `prefill_lengths`, and
    `decode`); see the module's docstring.

    `cell_clip` > 0 keeps the LSTM's memory `c` within ±cell_clip after every token (TFLite's own
    LSTM kernel has the same option), for int8 files: see `CELL_CLIP`.
    """
    decoder = models.decoder(model, config)
    family = models.family_of(config)
    tokens = tf.TensorSpec([batch, seq_len], tf.int32, name="tokens")
    token = tf.TensorSpec([batch, 1], tf.int32, name="token")
    if family == "transformer":
        parts = [tf.TensorSpec([batch, 1, seq_len, config.kv_dim], tf.float32, name=name)
                 for name in cache_names(config.layers)]

        def signature(length: int):
            def run(tokens, input_pos, *caches):
                logits, caches = decoder.call_with_parts(tokens, list(caches), input_pos[0])
                return {"logits": logits, **{spec.name: cache for spec, cache in zip(parts, caches)}}

            return tf.function(run, input_signature=[tf.TensorSpec([batch, length], tf.int32, name="tokens"),
                                                     tf.TensorSpec([length], tf.int32, name="input_pos"), *parts])

        lengths = prefill_lengths(seq_len, prefill)
        return {**{prefill_name(n): signature(n) for n in lengths}, DECODE: signature(1)}
    # The LSTM's state is a tensor per layer and kind, h0, c0, h1, c1, ... [B, units]: an int8 file
    # gives each tensor one scale, and c runs into the hundreds where h stays within ±1 (carried
    # together as one tensor, h would lose its precision; docs/results.md has the measurement).
    states = [tf.TensorSpec([batch, config.units], tf.float32, name=f"{kind}{i}")
              for i in range(config.layers) for kind in "hc"]

    def cells(ids, h, c):
        logits, h, c = decoder.step_cells(ids, h, c)
        return logits, h, [tf.clip_by_value(x, -cell_clip, cell_clip) for x in c] if cell_clip else c

    def sequence(tokens):
        def one_step(t, h, c, logits):
            out, h, c = cells(tokens[:, t], h, c)
            return t + 1, h, c, logits.write(t - 1, out)

        # The first token from the zero state outside the loop: the loop's h and c then start as
        # tensors of their own (one shared zero constant would tie their int8 scales together).
        zeros = [tf.zeros([batch, config.units])] * config.layers
        first, h, c = cells(tokens[:, 0], zeros, zeros)
        _, _, _, rest = tf.while_loop(lambda t, *_: t < seq_len, one_step,
                                      (tf.constant(1), h, c, tf.TensorArray(tf.float32, seq_len - 1)))
        return {"logits": tf.concat([first[:, tf.newaxis], tf.transpose(rest.stack(), [1, 0, 2])], axis=1)}  # (B, T, V)

    def step(token, *state):
        logits, h, c = cells(token[:, 0], list(state[0::2]), list(state[1::2]))
        return {"logits": logits, **{f"h{i}": t for i, t in enumerate(h)}, **{f"c{i}": t for i, t in enumerate(c)}}

    return {SEQUENCE: tf.function(sequence, input_signature=[tokens]),
            STEP: tf.function(step, input_signature=[token, *states])}


def _op_counts(flat: bytes) -> dict[str, int]:
    """Operators by name over every subgraph (signatures and loop bodies)."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flat, 0))
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    return dict(collections.Counter(names.get(codes[op.opcodeIndex], "?")
                                    for graph in model.subgraphs for op in graph.operators or []))


def non_builtin_ops(flat: bytes) -> list[str]:
    """Custom and Flex ops in a TFLite flatbuffer (none may remain)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flat, 0))
    custom = schema.BuiltinOperator.CUSTOM
    return sorted({(code.customCode or b"?").decode() for code in model.operatorCodes
                   if max(code.builtinCode, code.deprecatedBuiltinCode) == custom})


def convert_functions(functions: dict[str, Callable], quantize: str = "none",
                      representative: Callable | None = None, trackable=None, per_channel: bool = True) -> bytes:
    """Converts tf.functions (with input signatures) to one TFLite model of built-in ops.

    `per_channel=False` gives int8 weights one scale per tensor.

    Raises:
        UserError: an op has no TFLite built-in kernel (the ops are named).
    """
    with tempfile.TemporaryDirectory(prefix="lmstack-tflite-") as path:
        module = trackable or tf.Module()
        for name, fn in functions.items():
            setattr(module, f"_{name}", fn)
        tf.saved_model.save(module, path, signatures={n: f.get_concrete_function() for n, f in functions.items()})
        converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=list(functions))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter._experimental_disable_per_channel = not per_channel  # the converter's only switch for it
        try:
            flat = converter.convert()
        except Exception as e:  # ConverterError; its text lists the ops without a built-in kernel
            ops = sorted(set(re.findall(r"\btf\.[A-Z][A-Za-z0-9_]*", str(e))))
            if not ops:
                raise
            raise UserError(f"the model needs TensorFlow ops without a TFLite built-in kernel ({', '.join(ops)}); "
                            "they would need Flex ops, which ai-edge-litert does not run") from None
    bad = non_builtin_ops(flat)
    if bad:
        raise UserError(f"the converted model contains non-built-in ops ({', '.join(bad)}), which ai-edge-litert "
                        "does not run")
    return flat


# An int8 LSTM file clips the memory `c` at ±CELL_CLIP after each token, as TFLite's LSTM kernel's
# `cell_clip` does: int8 gives `c` one scale, and a trained LSTM's rare |c| of 100 would set it
# (steps of ~0.8, where tanh(c) turns within ±2). Past ±8, tanh(c) is 1 to 7 digits; what the clip
# changes is how long a saturated memory lasts (docs/results.md measures the choice of 8).
CELL_CLIP = 8.0


def _calibration(workdir, functions, family: str, seq_len: int, windows: int, batch: int = 1):
    """int8's representative samples: validation windows (`batch` a sample) through every signature,
    the transformer's shorter prefills and decode at random positions with the caches they would see."""
    ds = dataset.val_dataset(workdir, seq_len, batch).take(-(-windows // batch))
    rng = np.random.default_rng(0)

    def samples():
        for x, _ in ds:
            tokens = x.numpy().astype(np.int32)
            if len(tokens) < batch:  # a short last batch
                tokens = np.resize(tokens, (batch, seq_len))
            if family == "transformer":
                yield from _transformer_samples(functions, tokens, rng)
                continue
            yield SEQUENCE, {"tokens": tokens}
            position = int(rng.integers(1, seq_len))
            # The LSTM's state as the file's own `step` makes it (its cell clip included).
            step = functions[STEP]
            state = {spec.name: tf.zeros(spec.shape) for spec in step.input_signature[1:]}  # h0, c0, h1, ...
            for t in range(position):
                out = step(tf.constant(tokens[:, t:t + 1]), *state.values())
                state = {name: out[name] for name in state}
            yield STEP, {"token": tokens[:, position:position + 1],
                         **{name: value.numpy() for name, value in state.items()}}
    return samples


def _transformer_samples(functions, tokens: np.ndarray, rng):
    """A window through the whole-cache prefill from empty caches; each other signature at a random
    position that fits, with the caches the window left (later positions hold what the window put
    there, as a runtime's caches hold earlier chunks' padding)."""
    seq_len = tokens.shape[1]
    whole = prefill_name(seq_len)
    specs = functions[whole].input_signature[2:]
    caches = {spec.name: np.zeros(spec.shape, np.float32) for spec in specs}
    yield whole, {"tokens": tokens, "input_pos": np.arange(seq_len, dtype=np.int32), **caches}
    out = functions[whole](tf.constant(tokens), tf.range(seq_len), *caches.values())
    caches = {spec.name: out[spec.name].numpy() for spec in specs}
    for name, fn in functions.items():
        length = fn.input_signature[0].shape[1]
        if name == whole:
            continue
        start = int(rng.integers(1 if length == 1 else 0, seq_len - length + 1))
        yield name, {"tokens": tokens[:, start:start + length],
                     "input_pos": np.arange(start, start + length, dtype=np.int32), **caches}


def convert(workdir: str | os.PathLike, config: TFLiteConfig = TFLiteConfig(),
            progress: Progress | None = None) -> fs.Path:
    """Writes WORKDIR/tflite/NAME.tflite (+ NAME.json, tokenizer/) and returns its path.

    Raises:
        UserError: no trained model, an unknown variant or quantization, a bad
            max_seq_len, an op without a built-in kernel.
    """
    progress = progress or Progress()
    config.validate()
    wd = workdir_lib.Workdir(workdir)
    wd.read_config()
    if checkpoints.classifier_section(wd.root) is not None:
        if config.format == "litertlm":
            raise ConfigError("format", config.format, f"{wd.root} is a classifier workdir; LiteRT-LM runs language "
                              "models: use format tflite")
        return _convert_classifier(wd, config, progress)
    source = checkpoints.model_dir(wd.root, config.variant)
    if config.format == "litertlm":  # refused before the model loads
        litertlm.check_can_bundle(models.family_of(checkpoints.read_model_config(source)), config.batch_size,
                                  wd.tokenizer_dir)
    model, model_config, step = checkpoints.load_model(source)
    made = checkpoints.optimization(source) or {}
    family = models.family_of(model_config)
    seq_len = config.max_seq_len or model_config.seq_len
    if seq_len < 2 or (family == "transformer" and seq_len > model_config.seq_len):
        limit = f"2..{model_config.seq_len} (the model's context)" if family == "transformer" else "at least 2"
        raise ConfigError("max_seq_len", config.max_seq_len, f"expected {limit}")
    name = file_name(family, config.variant, config.quantize, config.batch_size)
    progress.note(f"converting {family}{' variant ' + config.variant if config.variant else ''} "
                  f"(step {step}) to TFLite, {config.quantize} quantization, max_seq_len {seq_len}"
                  + (f", {config.batch_size} rows a call" if config.batch_size > 1 else ""))
    cell_clip = CELL_CLIP if family == "lstm" and config.quantize == "int8" else 0.0
    functions = signature_functions(model, model_config, seq_len, config.batch_size, cell_clip,
                                    config.prefill_lengths)
    representative = (_calibration(wd.root, functions, family, seq_len,
                                   config.calibration_windows, config.batch_size)
                      if config.quantize == "int8" else None)
    holder = tf.Module()
    holder.model = model  # the functions' variables
    flat = convert_functions(functions, config.quantize, representative, trackable=holder,
                             per_channel=config.per_channel)

    return _write(wd, name, flat, config, progress=progress, info={
        "family": family, "variant": config.variant or None, "max_seq_len": seq_len, "batch_size": config.batch_size,
        "checkpoint_step": step, "model": models.config_to_json(model_config), "optimization": made.get("method"),
        "cell_clip": cell_clip or None})


def _convert_classifier(wd: workdir_lib.Workdir, config: TFLiteConfig, progress: Progress) -> fs.Path:
    """A `lmstack finetune` workdir as `classify(tokens int32 [batch_size, max_length]) -> scores [batch_size, C]`:
    the app tokenizes as `pipelines.classifiers.encode` does ([EOS], the first max_length - 1 tokens,
    [PAD]s) and reads softmax scores in the order of the sidecar's `labels`."""
    from pipelines import classifiers

    if config.variant:
        raise UserError(f"{wd.root} is a classifier workdir: it has no optimized variants (--variant={config.variant})")
    model, cls_config, labels, step = classifiers.load_classifier(wd.root)
    if config.max_seq_len:
        raise ConfigError("max_seq_len", config.max_seq_len,
                          f"is for language models; this classifier reads {cls_config.max_length} tokens a text "
                          "(finetune's --max_length)")
    length, rows = cls_config.max_length, config.batch_size
    progress.note(f"converting the classifier (step {step}) to TFLite, {config.quantize} quantization, "
                  f"{rows} x {length} tokens per call")
    spec = tf.TensorSpec([rows, length], tf.int32, name="tokens")
    classify = tf.function(lambda tokens: {"scores": tf.nn.softmax(tf.cast(model(tokens, training=False), tf.float32))},
                           input_signature=[spec])
    representative = None
    if config.quantize == "int8":
        tokenizer = tokenizers.load(wd.tokenizer_dir)
        texts = classifiers.read_split(wd.root, "val").texts or classifiers.read_split(wd.root, "train").texts
        texts = texts[:config.calibration_windows]
        batches = [texts[i:i + rows] for i in range(0, len(texts), rows)]

        def representative():
            rng = np.random.default_rng(0)
            for batch in batches:
                # Each text whole and cut to a few words: a short text's pooled state is not averaged
                # down, and ranges calibrated on long texts alone clip it.
                for group in (batch, [" ".join(t.split()[:int(rng.integers(1, 4))]) for t in batch]):
                    ids = classifiers.encode(tokenizer, tf.constant(group), length).numpy()
                    yield CLASSIFY, {"tokens": np.resize(ids, (rows, length))}  # a short last batch repeats rows
    holder = tf.Module()
    holder.model = model
    flat = convert_functions({CLASSIFY: classify}, config.quantize, representative, trackable=holder,
                             per_channel=config.per_channel)
    name = file_name("classifier", "", config.quantize, config.batch_size)
    return _write(wd, name, flat, config, progress=progress, info={
        "family": "classifier", "backbone": models.family_of(cls_config.backbone), "labels": labels,
        "max_length": length, "batch_size": rows, "pooling": cls_config.pooling, "checkpoint_step": step})


def _write(wd: workdir_lib.Workdir, name: str, flat: bytes, config: TFLiteConfig, info: dict[str, Any],
           progress: Progress) -> fs.Path:
    """WORKDIR/tflite/NAME.tflite with its metadata and files inside, its NAME.json sidecar and
    (once) the tokenizer files next to it; with `--format=litertlm` also NAME.litertlm, the same
    file with what LiteRT-LM reads beside it (the bundle's path is returned then)."""
    out = wd.root / TFLITE_DIR
    out.mkdir(exist_ok=True)
    if not (out / "tokenizer").is_dir():
        with workdir_lib.publish_dir(out / "tokenizer") as staging:
            for path in wd.tokenizer_dir.iterdir():
                fs.copy_file(path, staging / path.name)
    tokenizer_config = tokenizers.load_config(wd.tokenizer_dir)
    special = tokenizers.special_ids(tokenizer_config)
    info = {
        "format": edge.FORMAT, "file": f"{name}.tflite", **info, "quantize": config.quantize,
        "per_channel": config.per_channel if config.quantize == "int8" else None,
        "tokenizer": tokenizer_config, "tokenizer_dir": "tokenizer", "eos_id": special["eos"],
        "pad_id": special["pad"], "signatures": _signature_shapes(flat), "ops": _op_counts(flat),
    }
    tokenizer_files = {p.name: p.read_bytes() for p in sorted(wd.tokenizer_dir.iterdir()) if p.is_file()}
    try:
        flat = edge_metadata.populate(flat, info, tokenizer_files)
    except tflite_metadata.OutsideWeights as e:
        progress.note(f"{e}; the app reads {name}.json and tflite/tokenizer/")
    workdir_lib.write_bytes(out / f"{name}.tflite", flat)
    workdir_lib.write_json(out / f"{name}.json", {**info, "bytes": len(flat)})
    if config.format == "litertlm":
        return litertlm.write(wd, name, flat, info, tokenizer_files)
    return out / f"{name}.tflite"


def _signature_shapes(flat: bytes) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flat)
    result = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        result[name] = {
            side: {k: {"shape": [int(d) for d in v["shape"]], "dtype": np.dtype(v["dtype"]).name}
                   for k, v in details.items()}
            for side, details in (("inputs", runner.get_input_details()), ("outputs", runner.get_output_details()))}
    return result


def describe(path: fs.Path) -> str:
    """What `lmstack tflite` wrote (`path`: a .tflite or a .litertlm) and how to run it."""
    tflite_file = path.with_suffix(".tflite")
    info = workdir_lib.read_json(path.with_suffix(".json"))

    def inputs(signature):
        caches = [v["shape"] for k, v in signature["inputs"].items() if k.startswith("kv_cache_")]
        return ", ".join([f"{k} {v['shape']}" for k, v in signature["inputs"].items() if not k.startswith("kv_cache_")]
                         + ([f"{len(caches)} kv caches {caches[0]}"] if caches else []))

    sigs = ", ".join(f"{n}({inputs(s)})" for n, s in info["signatures"].items())
    bundle = path.suffix == litertlm.SUFFIX
    run = (f"{info['batch_size']} rows in lockstep: run it with serving.edge.EdgeModel(...).generate_batch"
           if info.get("batch_size", 1) > 1 else
           f"generate: lmstack generate --workdir={path.parent.parent} --backend=tflite --quantize={info['quantize']}"
           + (f" --variant={info['variant']}" if info["variant"] else ""))
    return "\n".join([
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB: {tflite_file.name}, its tokenizer and LlmMetadata)"
        if bundle else
        f"wrote {path} ({info['bytes'] / 1e6:.2f} MB, {info['quantize']}) and {path.with_suffix('.json').name}",
        f"signatures: {sigs}",
        f"ops: {sum(info['ops'].values())} built-in",
        f"classes: {', '.join(info['labels'])}; run it with serving.edge.EdgeClassifier"
        if info["family"] == "classifier" else run,
        *([f"LiteRT-LM: litert_lm.Engine(\"{path}\") in Python, Engine(EngineConfig(modelPath=...)) on Android "
           "(docs/guide.md)"] if bundle else []),
    ])


def measure(workdir: str | os.PathLike, path: fs.Path, latency: bool = True) -> dict[str, Any]:
    """A TFLite file's validation perplexity and bits/char, and ms per decoded token (1 thread)."""
    model = edge.EdgeModel(path, num_threads=1)
    result = evaluate.evaluate_logits(workdir, model.window_logits, model.max_seq_len)
    out = {"perplexity": result["perplexity"], "bits_per_char": result["bits_per_char"]}
    if latency:
        tokens = min(32, model.max_seq_len - 2) if model.family == "transformer" else 32
        model.generate([model.eos_id], tokens)  # warm-up
        began = time.perf_counter()
        model.generate([model.eos_id], tokens)
        out["ms_per_token"] = (time.perf_counter() - began) / tokens * 1e3
    return out

