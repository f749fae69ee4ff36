"""`import` of Llama-family checkpoints: Llama 3, Mistral, Qwen2 and the models built like them (SmolLM).

Two formats, both read into Hugging Face's tensor names:

- a **Hugging Face** directory: `config.json` with `model_type` llama, mistral or
  qwen2, the weights as `model.safetensors` or shards listed by
  `model.safetensors.index.json` (float32, float16 or bfloat16, read here
  without PyTorch), and the tokenizer: byte-level BPE (`tokenizer.json`, or
  `vocab.json` + `merges.txt`) or SentencePiece (`tokenizer.model`: Llama 2,
  Mistral);
- a **keras-hub preset** of `Llama3Backbone`, `LlamaBackbone`,
  `MistralBackbone` or `QwenBackbone`: keras-hub loads it, and its own Hugging
  Face exporter (`keras_hub.src.utils.transformers.export`) names the
  tensors, so both formats meet in one mapping.

The weights go into lmstack's transformer with Llama's block (`models.gpt`:
rotary positions in Hugging Face's half-split layout, RMSNorm, SwiGLU,
grouped-query attention; Qwen2's query/key/value biases); the tokenizer
becomes a `bpe` tokenizer with the checkpoint's ids, its special tokens kept
whole, or a `sentencepiece` one with the checkpoint's own model. Refused with
one line: what lmstack's block cannot compute (scaled or otherwise modified
rotary positions, mixtures of experts, another head size, another activation).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
from typing import Any

import numpy as np

import models
from pipelines import hf_tensors
from pipelines.errors import UserError

ARCHITECTURES = ("llama", "mistral", "qwen2")
# Hugging Face's defaults for a config.json without max_position_embeddings.
DEFAULT_CONTEXT = {"llama": 2048, "mistral": 32768, "qwen2": 32768}
# keras-hub's backbone -> its Hugging Face exporter (Llama 2's LlamaBackbone has Llama 3's layers).
KERAS_HUB_CLASSES = {"Llama3Backbone": "llama3", "LlamaBackbone": "llama3", "MistralBackbone": "mistral",
                     "QwenBackbone": "qwen"}
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def config_of(hf: dict[str, Any], source: pathlib.Path) -> models.GPTConfig:
    """The lmstack config of a Hugging Face Llama-family config.json.

    Raises:
        UserError: a model lmstack's block cannot compute exactly.
    """
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise UserError(f"{source} holds a Hugging Face {kind!r} model; lmstack imports {', '.join(ARCHITECTURES)} "
                        "and gpt2")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    scaling = hf.get("rope_scaling") or {}
    missing = [what for what, present in (
        (f"rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} (lmstack's rotary positions are "
         "unscaled)", scaling and scaling.get("rope_type", scaling.get("type")) != "default"),
        ("a mixture of experts", any(hf.get(k) for k in ("num_experts", "num_local_experts"))),
        (f"head_dim {hf.get('head_dim')} (lmstack's is hidden_size / num_attention_heads = {d // heads})",
         hf.get("head_dim") not in (None, d // heads)),
        (f"hidden_act {hf.get('hidden_act')!r} (lmstack's gated MLP here is silu)",
         hf.get("hidden_act", "silu") != "silu"),
        ("an MLP bias without attention biases, or the reverse",
         kind == "llama" and bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias"))),
    ) if present]
    if missing:
        raise UserError(f"{source}: lmstack cannot hold this {kind} model: it has {'; '.join(missing)}")
    context = hf.get("max_position_embeddings", DEFAULT_CONTEXT[kind])
    # Within its window, sliding-window attention is full attention: a context no longer than the
    # window keeps the model exact.
    window = hf.get("sliding_window") if kind == "mistral" or hf.get("use_sliding_window") else None
    if window:
        context = min(context, window)
    bias = "qkv" if kind == "qwen2" else "all" if hf.get("attention_bias") else "none"
    try:
        return models.GPTConfig(
            vocab_size=hf["vocab_size"], seq_len=context, layers=hf["num_hidden_layers"], d_model=d, heads=heads,
            kv_heads=hf.get("num_key_value_heads", heads), mlp_dim=hf["intermediate_size"], dropout=0.0,
            init="gpt2", activation="silu", positions="rope", rope_theta=float(hf.get("rope_theta", 10_000.0)),
            norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="gated", bias=bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", kind == "qwen2")))
    except (KeyError, ValueError) as e:
        raise UserError(f"{source}/config.json: {e}") from None


def load_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as float32 numpy arrays; bfloat16 too (which numpy lacks)."""
    try:
        with open(file, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
            data = f.read()
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{file}: cannot read it as safetensors ({e})") from None
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":  # the top half of a float32
            value = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            value = np.frombuffer(raw, _SAFETENSORS_DTYPES[info["dtype"]]).astype(np.float32)
        else:
            raise UserError(f"{file}: tensor {name} is {info['dtype']}; lmstack reads float checkpoints "
                            "(F32, F16, BF16)")
        tensors[name] = value.reshape(info["shape"])
    return tensors


def read_hugging_face_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    """model.safetensors, or every shard its index lists, with `model.` taken off the names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(f"{path} has neither model.safetensors nor model.safetensors.index.json; lmstack reads "
                        "safetensors weights (not PyTorch's .bin)")
    weights: dict[str, np.ndarray] = {}
    for shard in shards:
        weights |= load_safetensors(path / shard)
    return {k.removeprefix("model."): v for k, v in weights.items()}


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A checkpoint's tokenizer as lmstack keeps it.

    Attributes:
        vocabulary, merges: a byte-level BPE's token -> id and merge rules (empty for SentencePiece).
        sentencepiece: a SentencePiece model (a serialized ModelProto), or None for BPE.
        eos: the token that ends a document (and pads).
        bos: the token that starts one, if the checkpoint names one.
        specials: BPE tokens that text may contain literally, each kept whole as its own id.
    """
    vocabulary: dict[str, int]
    merges: list[str]
    sentencepiece: bytes | None
    eos: str | None
    bos: str | None
    specials: list[str]


def sentencepiece_pieces(proto: bytes) -> list[str]:
    from sentencepiece import sentencepiece_model_pb2

    return [p.piece for p in sentencepiece_model_pb2.ModelProto.FromString(proto).pieces]


def _sentencepiece(proto: bytes, eos: str | None, bos: str | None, hf: dict[str, Any]) -> Tokenizer:
    pieces = sentencepiece_pieces(proto)
    eos_id, bos_id = hf.get("eos_token_id"), hf.get("bos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    piece = lambda i: pieces[i] if isinstance(i, int) and 0 <= i < len(pieces) else None
    return Tokenizer({}, [], proto, eos or piece(eos_id) or ("</s>" if "</s>" in pieces else None),
                     bos or piece(bos_id), [])


def hugging_face_tokenizer(path: pathlib.Path, hf: dict[str, Any]) -> Tokenizer:
    """A Hugging Face directory's tokenizer: byte-level BPE, or SentencePiece's `tokenizer.model`."""
    tokenizer_config = _json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    token = lambda t: t.get("content") if isinstance(t, dict) else t
    eos, bos = token(tokenizer_config.get("eos_token")), token(tokenizer_config.get("bos_token"))
    spec = _json(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    byte_level = spec is not None and (spec.get("model") or {}).get("type") == "BPE" \
        and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if not byte_level and (path / "tokenizer.model").is_file():
        return _sentencepiece((path / "tokenizer.model").read_bytes(), eos, bos, hf)
    added: dict[str, int] = {}
    if spec is not None:
        if not byte_level:
            raise UserError(f"{path}/tokenizer.json is not a byte-level BPE tokenizer, and there is no "
                            "tokenizer.model (SentencePiece) beside it; lmstack imports those two kinds")
        model = spec["model"]
        vocabulary = dict(model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocabulary = _json(path / "vocab.json")
        merges = [line for line in (path / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
        added = {t["content"]: int(i) for i, t in tokenizer_config.get("added_tokens_decoder", {}).items()}
    else:
        raise UserError(f"{path} has no tokenizer.json, vocab.json + merges.txt or tokenizer.model; lmstack "
                        "imports the checkpoint's own tokenizer")
    vocabulary |= added
    by_id = {i: t for t, i in vocabulary.items()}
    eos_id = hf.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    return Tokenizer(vocabulary, merges, None, eos or by_id.get(eos_id), bos or by_id.get(hf.get("bos_token_id")),
                     sorted(added, key=added.get))


def read_keras_hub(path: pathlib.Path, class_name: str) -> tuple[dict, dict, Tokenizer]:
    """`(Hugging Face config, weights, tokenizer)` of a keras-hub preset, named by keras-hub's own exporter."""
    import importlib

    import keras_hub

    name = KERAS_HUB_CLASSES[class_name]
    try:
        backbone = keras_hub.models.Backbone.from_preset(str(path))
        tokenizer = keras_hub.models.Tokenizer.from_preset(str(path))
    except Exception as e:  # whatever Keras raises, one line
        raise UserError(f"{path}: keras-hub cannot load this preset ({str(e).splitlines()[0]})") from None
    exporter = importlib.import_module(f"keras_hub.src.utils.transformers.export.{name}")
    hf = getattr(exporter, f"get_{name}_config")(backbone)
    hf.setdefault("model_type", {"llama3": "llama", "qwen": "qwen2"}.get(name, name))
    weights = {k.removeprefix("model."): np.asarray(v, np.float32)
               for k, v in getattr(exporter, f"get_{name}_weights_map")(backbone, include_lm_head=True).items()}
    bos = getattr(tokenizer, "start_token", None)
    spm = path / "assets" / "tokenizer" / "vocabulary.spm"
    if spm.is_file():
        return hf, weights, _sentencepiece(spm.read_bytes(), tokenizer.end_token, bos, hf)
    vocabulary = dict(tokenizer.vocabulary) if isinstance(tokenizer.vocabulary, dict) else {
        t: i for i, t in enumerate(tokenizer.vocabulary)}
    specials = [getattr(tokenizer, attr) for attr in getattr(tokenizer, "_special_token_attrs", [])]
    return hf, weights, Tokenizer(vocabulary, list(tokenizer.merges), None, tokenizer.end_token, bos,
                                  [t for t in dict.fromkeys(specials) if t is not None])


def assign(model, config: models.GPTConfig, weights: dict[str, np.ndarray]) -> None:
    """Copies Hugging Face-named Llama-family tensors into a model built from `config`.

    Raises:
        UserError: a tensor missing, of another shape, or left over.
    """
    copier = hf_tensors.Copier(model, weights, " / ".join(ARCHITECTURES))
    take, put = copier.take, copier.put
    transpose = np.transpose  # Hugging Face's Linear weights are [out, in]; Dense kernels [in, out]
    put("token_embedding", take("embed_tokens.weight"))
    for i in range(config.layers):
        h = f"layers.{i}."
        put(f"block{i}_ln1", take(h + "input_layernorm.weight"))
        put(f"block{i}_ln2", take(h + "post_attention_layernorm.weight"))
        projections = (("query", "self_attn.q_proj", config.bias != "none"),
                       ("key", "self_attn.k_proj", config.bias != "none"),
                       ("value", "self_attn.v_proj", config.bias != "none"),
                       ("attention_output", "self_attn.o_proj", config.bias == "all"),
                       ("mlp_gate", "mlp.gate_proj", config.bias == "all"),
                       ("mlp_in", "mlp.up_proj", config.bias == "all"),
                       ("mlp_out", "mlp.down_proj", config.bias == "all"))
        for ours, theirs, bias in projections:
            put(f"block{i}_{ours}", take(f"{h}{theirs}.weight", transpose),
                *([take(f"{h}{theirs}.bias")] if bias else []))
    put("final_ln", take("norm.weight"))
    head = weights.get("lm_head.weight")
    if config.tie_embeddings:
        if head is not None and not np.array_equal(head, weights["embed_tokens.weight"]):
            raise UserError("the checkpoint's lm_head differs from its token embedding, which its config.json "
                            "says are tied (tie_word_embeddings)")
        copier.used.add("lm_head.weight")
    else:
        put("logits", take("lm_head.weight", transpose))
    copier.check_all_used(constants=("rotary_emb.inv_freq",))


def _json(file: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
