"""`import`: a pre-trained checkpoint -> a workdir every later stage accepts.

GPT-2 here; Llama 3, Mistral, Qwen2 and SmolLM in `pipelines.pretrained_llama`,
whose checkpoints this module reads through the same two doors. GPT-2 comes in
two formats, told apart by their files:

- a **keras-hub preset** directory (`config.json` naming `GPT2Backbone`,
  `model.weights.h5`, `tokenizer.json`, `assets/tokenizer/{vocabulary.json,
  merges.txt}`), read by keras-hub itself;
- a **Hugging Face** GPT-2 directory (`config.json` with `model_type: gpt2`,
  `model.safetensors`, `vocab.json`, `merges.txt`), read with safetensors'
  numpy loader (no PyTorch).

The weights go into lmstack's own tf_keras GPT (`models.gpt`: pre-LayerNorm
blocks, learned positions, tied embedding; GPT-2's tanh GELU, LayerNorm epsilon
1e-5), so TF-MOT, the exporters and the server treat it as any lmstack model;
the tokenizer becomes a `bpe` tokenizer with GPT-2's own ids
(`<|endoftext|>` ends and pads documents). The workdir:

    WORKDIR/config.json      `import` (source, format) and `model`
    WORKDIR/tokenizer/       tokenizer.json + vocab.json + merges.txt (+ chat_template.json: the
                             checkpoint's chat template, from its tokenizer_config.json)
    WORKDIR/checkpoints/     ckpt-0

It is built aside and renamed into place whole. `lmstack prepare` on it
tokenizes a corpus with the imported tokenizer (for `train`, which continues
pre-training, `evaluate` and int8 calibration); `generate`, `export`, `serve`
and float `tflite` need no data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

import models
from pipelines import checkpoints, hf_tensors, pretrained_llama, tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError
from pipelines.progress import Progress

END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token: ends (and pads) every document
KERAS_HUB = "keras-hub preset"
HUGGING_FACE = "Hugging Face"
# Hugging Face's names for GPT-2's GELU: gelu_new and gelu_pytorch_tanh are the tanh approximation.
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read into numpy, in Hugging Face's tensor names (`h.0.attn.c_attn.weight`, ...).

    Attributes:
        format: KERAS_HUB or HUGGING_FACE.
        architecture: gpt2, or one of `pretrained_llama.ARCHITECTURES`.
        config: the lmstack model config it fits.
        weights: name -> float32 array.
        vocabulary: the byte-level BPE tokenizer's token -> id.
        merges: its merge rules, `"a b"` each.
        eos: the token that ends a document (and pads).
        specials: tokens that text may contain literally, each kept whole as its own id.
        sentencepiece: a SentencePiece model (serialized) instead of the BPE, or None.
    """
    format: str
    architecture: str
    config: models.GPTConfig
    weights: dict[str, np.ndarray]
    vocabulary: dict[str, int]
    merges: list[str]
    eos: str
    specials: list[str]
    sentencepiece: bytes | None = None


def read(path: str | os.PathLike) -> Checkpoint:
    """Reads a GPT-2 checkpoint directory of either format.

    Raises:
        UserError: not a directory, another architecture, a missing file, tensors of the wrong shape.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ConfigError("checkpoint", str(path), "not a directory; give a keras-hub preset or a Hugging Face "
                          "GPT-2 directory")
    config = _read_json(path / "config.json", path)
    if "class_name" in config or (path / "metadata.json").is_file():
        if config.get("class_name") in pretrained_llama.KERAS_HUB_CLASSES:
            hf, weights, tokenizer = pretrained_llama.read_keras_hub(path, config["class_name"])
            return _llama(KERAS_HUB, path, hf, weights, tokenizer)
        return _read_keras_hub(path, config)
    if config.get("model_type") in pretrained_llama.ARCHITECTURES:
        model_config = pretrained_llama.config_of(config, path)  # refuses what it cannot hold before reading
        tokenizer = pretrained_llama.hugging_face_tokenizer(path, config)
        weights = pretrained_llama.read_hugging_face_weights(path)
        return _llama(HUGGING_FACE, path, config, weights, tokenizer, model_config)
    if "model_type" in config:
        return _read_hugging_face(path, config)
    raise UserError(f"{path}/config.json is neither a keras-hub preset's (class_name) nor a Hugging Face "
                    "model's (model_type); lmstack imports GPT-2, Llama, Mistral and Qwen2 in those two formats")


def _llama(format: str, path: pathlib.Path, hf: dict[str, Any], weights: dict[str, np.ndarray],
           tokenizer: pretrained_llama.Tokenizer, config: models.GPTConfig | None = None) -> Checkpoint:
    config = config or pretrained_llama.config_of(hf, path)
    known = pretrained_llama.sentencepiece_pieces(tokenizer.sentencepiece) if tokenizer.sentencepiece \
        else tokenizer.vocabulary
    if not tokenizer.eos or tokenizer.eos not in known:
        raise UserError(f"{path}: the tokenizer has no end-of-text token (eos_token) in its vocabulary; lmstack "
                        "ends documents with it")
    return Checkpoint(format, hf["model_type"], config, weights, tokenizer.vocabulary, tokenizer.merges,
                      tokenizer.eos, tokenizer.specials or [tokenizer.eos], tokenizer.sentencepiece)


def _read_json(file: pathlib.Path, source: pathlib.Path) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"{source} has no {file.name}; a GPT-2 checkpoint directory holds config.json, the "
                        "weights, the vocabulary and merges.txt")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None


def _require(path: pathlib.Path, *names: str) -> list[pathlib.Path]:
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; copy the whole checkpoint directory")
    return [path / n for n in names]


def _gpt_config(vocab: int, context: int, layers: int, width: int, heads: int, inner: int | None,
                dropout: float, activation: str, source: pathlib.Path) -> models.GPTConfig:
    inner = inner or 4 * width
    if inner % width:
        raise UserError(f"{source}: an MLP width of {inner} is not a multiple of the model width {width}; "
                        "lmstack's GPT needs one")
    try:
        return models.GPTConfig(vocab_size=vocab, seq_len=context, layers=layers, d_model=width, heads=heads,
                                mlp_ratio=inner // width, dropout=dropout, init="gpt2", activation=activation)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


def _read_hugging_face(path: pathlib.Path, hf: dict[str, Any]) -> Checkpoint:
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{path} holds a Hugging Face {hf.get('model_type')!r} model; lmstack imports "
                        f"gpt2, {', '.join(pretrained_llama.ARCHITECTURES)}")
    activation = HF_ACTIVATIONS.get(hf.get("activation_function", "gelu_new"))
    if activation is None:
        raise UserError(f"{path}: activation_function={hf['activation_function']!r}; lmstack's GPT has "
                        f"{', '.join(HF_ACTIVATIONS)}")
    unusual = [k for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn") if hf.get(k)]
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5 or hf.get("scale_attn_weights", True) is not True or unusual:
        raise UserError(f"{path}: {', '.join(unusual) or 'its LayerNorm epsilon or attention scaling'} differs "
                        "from GPT-2's; lmstack's GPT computes GPT-2 exactly and nothing else")
    weights_file, vocabulary, merges = _require(path, "model.safetensors", "vocab.json", "merges.txt")
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"{weights_file}: cannot read it as safetensors ({str(e).splitlines()[0]})") from None
    # GPT2LMHeadModel saves `transformer.`-prefixed names; GPT2Model (the Hub's gpt2) plain ones.
    weights = {k.removeprefix("transformer."): v.astype(np.float32) for k, v in raw.items()}
    head = weights.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in weights and not np.array_equal(head, weights["wte.weight"]):
        raise UserError(f"{weights_file}: lm_head differs from the token embedding; lmstack's GPT ties them "
                        "as GPT-2 does")
    config = _gpt_config(hf["vocab_size"], hf["n_positions"], hf["n_layer"], hf["n_embd"], hf["n_head"],
                         hf.get("n_inner"), float(hf.get("resid_pdrop", 0.1)), activation, path)
    return _gpt2(HUGGING_FACE, config, weights, vocabulary, merges)


def _gpt2(format: str, config: models.GPTConfig, weights: dict[str, np.ndarray], vocabulary: pathlib.Path,
          merges: pathlib.Path) -> Checkpoint:
    return Checkpoint(format, "gpt2", config, weights, _read_json(vocabulary, vocabulary.parent),
                      tokenizers._lines(merges), END_OF_TEXT, [END_OF_TEXT])


def _read_keras_hub(path: pathlib.Path, config: dict[str, Any]) -> Checkpoint:
    if config.get("class_name") != "GPT2Backbone":
        raise UserError(f"{path} is a keras-hub {config.get('class_name')!r} preset; lmstack imports "
                        f"GPT2Backbone, {', '.join(pretrained_llama.KERAS_HUB_CLASSES)}")
    _, _, vocabulary, merges = _require(path, "model.weights.h5", "tokenizer.json",
                                        "assets/tokenizer/vocabulary.json", "assets/tokenizer/merges.txt")
    import keras_hub  # Keras 3: its own loader reads its own format

    try:
        backbone = keras_hub.models.Backbone.from_preset(str(path))
    except Exception as e:  # whatever Keras raises, one line
        raise UserError(f"{path}: keras-hub cannot load this preset ({str(e).splitlines()[0]})") from None
    c = backbone.get_config()
    d = c["hidden_dim"]
    weights = {"wte.weight": backbone.token_embedding.embeddings,
               "wpe.weight": backbone.position_embedding.position_embeddings,
               "ln_f.weight": backbone.layer_norm.gamma, "ln_f.bias": backbone.layer_norm.beta}
    for i, block in enumerate(backbone.transformer_layers):
        attention = block._self_attention_layer
        qkv = (attention._query_dense, attention._key_dense, attention._value_dense)
        weights |= {
            f"h.{i}.ln_1.weight": block._self_attention_layer_norm.gamma,
            f"h.{i}.ln_1.bias": block._self_attention_layer_norm.beta,
            # EinsumDense kernels (d, heads, head_dim): heads side by side, as Hugging Face's columns
            f"h.{i}.attn.c_attn.weight": np.concatenate([np.reshape(x.kernel, [d, d]) for x in qkv], axis=1),
            f"h.{i}.attn.c_attn.bias": np.concatenate([np.reshape(x.bias, [d]) for x in qkv]),
            f"h.{i}.attn.c_proj.weight": np.reshape(attention._output_dense.kernel, [d, d]),
            f"h.{i}.attn.c_proj.bias": attention._output_dense.bias,
            f"h.{i}.ln_2.weight": block._feedforward_layer_norm.gamma,
            f"h.{i}.ln_2.bias": block._feedforward_layer_norm.beta,
            f"h.{i}.mlp.c_fc.weight": block._feedforward_intermediate_dense.kernel,
            f"h.{i}.mlp.c_fc.bias": block._feedforward_intermediate_dense.bias,
            f"h.{i}.mlp.c_proj.weight": block._feedforward_output_dense.kernel,
            f"h.{i}.mlp.c_proj.bias": block._feedforward_output_dense.bias,
        }
    weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    config = _gpt_config(c["vocabulary_size"], c["max_sequence_length"], c["num_layers"], d, c["num_heads"],
                         c["intermediate_dim"], float(c.get("dropout", 0.1)), "gelu_tanh", path)
    return _gpt2(KERAS_HUB, config, weights, vocabulary, merges)


def assign(model, checkpoint: Checkpoint) -> None:
    """Copies the checkpoint's tensors into a model built from `checkpoint.config`.

    Raises:
        UserError: a tensor is missing or has another shape than the config says.
    """
    if checkpoint.architecture != "gpt2":
        pretrained_llama.assign(model, checkpoint.config, checkpoint.weights)
        return
    d = checkpoint.config.d_model
    copier = hf_tensors.Copier(model, checkpoint.weights, "GPT-2")
    take, put = copier.take, copier.put
    put("token_embedding", take("wte.weight"))
    put("position_embedding", take("wpe.weight"))
    for i in range(checkpoint.config.layers):
        h = f"h.{i}."
        for j, name in enumerate(("query", "key", "value")):  # c_attn: [q | k | v] columns
            put(f"block{i}_{name}", take(h + "attn.c_attn.weight", lambda x, j=j: x[:, j * d:(j + 1) * d]),
                take(h + "attn.c_attn.bias", lambda x, j=j: x[j * d:(j + 1) * d]))
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2"), ("attention_output", "attn.c_proj"),
                             ("mlp_in", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")):
            put(f"block{i}_{ours}", take(f"{h}{theirs}.weight"), take(f"{h}{theirs}.bias"))
    put("final_ln", take("ln_f.weight"), take("ln_f.bias"))
    copier.check_all_used(constants=("attn.bias", "attn.masked_bias"))  # GPT-2's causal-mask buffers


def _write_tokenizer(checkpoint: Checkpoint, directory: pathlib.Path) -> None:
    if checkpoint.sentencepiece is not None:
        pieces = pretrained_llama.sentencepiece_pieces(checkpoint.sentencepiece)
        size, eos = len(pieces), pieces.index(checkpoint.eos)
        (directory / tokenizers.SENTENCEPIECE_FILE).write_bytes(checkpoint.sentencepiece)
        kind, special = "sentencepiece", {}
    else:
        vocab = checkpoint.vocabulary
        if checkpoint.eos not in vocab:
            raise UserError(f"the checkpoint's vocabulary has no {checkpoint.eos}, its end-of-text token")
        size, eos = len(vocab), int(vocab[checkpoint.eos])
        workdir_lib.write_json(directory / tokenizers.BPE_VOCAB_FILE, vocab)
        (directory / tokenizers.BPE_MERGES_FILE).write_text("".join(m + "\n" for m in checkpoint.merges),
                                                            encoding="utf-8")
        kind, special = "bpe", {"unsplittable_tokens": checkpoint.specials}
    exact = checkpoint.architecture == "gpt2"  # a Llama-family embedding may have rows past the tokenizer's ids
    if size > checkpoint.config.vocab_size or (exact and size != checkpoint.config.vocab_size):
        raise UserError(f"the tokenizer has {size:,} tokens, the model {checkpoint.config.vocab_size:,}; "
                        "the files do not belong together")
    workdir_lib.write_json(directory / tokenizers.CONFIG_FILE, {
        "kind": kind, "vocab_size": size, "lowercase": False, "requested_vocab_size": size,
        "reserved_tokens": checkpoint.specials, "special_ids": {"pad": eos, "eos": eos}, **special,
        "imported": True,
    })


CHAT_TEMPLATE_FILE = "chat_template.json"  # in WORKDIR/tokenizer/: what `lmstack export` carries by default


def chat_template(path: pathlib.Path) -> dict[str, Any] | None:
    """The chat template of a checkpoint's tokenizer_config.json (Hugging Face's place for it), as
    `lmstack export --chat_template` reads one: the template, its special tokens, and its end-of-turn
    token as a stop string. None when it has none."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return None
    config = _read_json(file, path)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str) or not template:
        return None
    token = lambda t: t.get("content", "") if isinstance(t, dict) else (t or "")
    eos = token(config.get("eos_token"))
    return {"chat_template": template, "bos_token": token(config.get("bos_token")), "eos_token": eos,
            "stop": [eos] if eos else []}


def import_checkpoint(path: str | os.PathLike, workdir: str | os.PathLike,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Writes a new workdir holding the GPT-2 checkpoint at `path`; returns the `import` section.

    Raises:
        UserError: bad input (nothing is written) or a workdir that exists.
    """
    progress = progress or Progress()
    wd = workdir_lib.Workdir(workdir)
    if wd.root.exists() and (not wd.root.is_dir() or any(wd.root.iterdir())):
        raise UserError(f"{wd.root} exists and is not empty; import into a new --workdir")
    checkpoint = read(path)
    config = checkpoint.config
    progress.note(f"read a {checkpoint.format} {checkpoint.architecture}: {config.layers} layers, width "
                  f"{config.d_model}, {config.heads} heads ({config.num_kv_heads} for keys and values), context "
                  f"{config.seq_len}, {config.num_params():,} parameters")
    model = models.build(config)
    assign(model, checkpoint)
    section = {"source": str(pathlib.Path(path).resolve()), "format": checkpoint.format,
               "architecture": checkpoint.architecture}
    if wd.root.is_dir():
        wd.root.rmdir()  # empty: published whole below
    with workdir_lib.publish_dir(wd.root) as staging:
        (staging / workdir_lib.TOKENIZER_DIR).mkdir()
        _write_tokenizer(checkpoint, staging / workdir_lib.TOKENIZER_DIR)
        template = chat_template(pathlib.Path(path))
        if template is not None:  # `lmstack export` carries it to /v1/chat/completions
            workdir_lib.write_json(staging / workdir_lib.TOKENIZER_DIR / CHAT_TEMPLATE_FILE, template)
            progress.note("kept the checkpoint's chat template (tokenizer_config.json)")
        workdir_lib.write_json(staging / workdir_lib.CONFIG_FILE,
                               {"lmstack_config_version": 1, workdir_lib.IMPORT_SECTION: section})
        checkpoints.save(staging, model, config, step=0)
    progress.note(f"wrote {wd.root}: tokenizer/, checkpoints/ckpt-0, config.json")
    return section

