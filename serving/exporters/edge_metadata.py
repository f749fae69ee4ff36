"""What an lmstack .tflite says about itself: TFLite Metadata and the files packed inside.

Every file `lmstack tflite` writes carries, in the format Android Studio, the Task Library
and MediaPipe read (`serving.edge.metadata`):

- the model's name, version (training step), author and a description of every signature;
- the first subgraph's input and output tensors, each described (the metadata schema
  describes one subgraph; the description names the others and their shapes);
- the tokenizer's files as associated files (vocabularies typed VOCABULARY), with a
  tokenizer process unit where the schema has one for the kind (WordPiece: BertTokenizer,
  SentencePiece: SentencePieceTokenizer; char, byte and byte-level BPE have none);
- a classifier's labels on its `scores` tensor (TENSOR_AXIS_LABELS, one per line);
- `lmstack.json`, the sidecar's settings (not what the model and tokenizer.json already say),
  so `serving.edge` needs nothing but the .tflite.
"""

from __future__ import annotations

import json
from typing import Any

from serving.edge import metadata as md
from serving.edge import SIDECAR
LABELS = "labels.txt"

# What each tensor of each signature holds (B: batch_size, T: max_seq_len, V: vocabulary, L: layers).
_TENSORS = {
    "prefill": {  # any prefill_N
        "tokens": "Token ids [B, N] at positions input_pos[0] .., right-padded (padding writes positions that "
                  "later tokens overwrite).",
        "input_pos": "The tokens' positions [N]; only input_pos[0] is read.",
        "logits": "Next-token logits [B, N, V] at every position; read the last real token's.",
        "kv_cache": "Layer {i}'s {kind} [B, 1, T, d] of every position: zeros to start, then the last call's.",
        "kv_cache_out": "Layer {i}'s {kind} with these tokens' written at their positions."},
    "decode": {
        "tokens": "The token just chosen [B, 1].",
        "input_pos": "Its position [1]: the prompt's length, then one more each call.",
        "logits": "Next-token logits [B, 1, V].",
        "kv_cache": "Layer {i}'s {kind} [B, 1, T, d] from the last prefill or decode.",
        "kv_cache_out": "Layer {i}'s {kind} with this token's written at its position."},
    "sequence": {
        "tokens": "Token ids [B, T] of a window, scored from a zero state.",
        "logits": "Next-token logits [B, T, V] at every position."},
    "step": {
        "token": "The next token [B, 1] (prompt tokens one by one, then each chosen token).",
        "h": "Layer {i}'s output h [B, units]: zeros to start, then the previous step's.",
        "c": "Layer {i}'s memory c [B, units]: zeros to start, then the previous step's.",
        "logits": "Next-token logits [B, V].",
        "h_out": "Layer {i}'s h after this token.",
        "c_out": "Layer {i}'s c after this token."},
    "classify": {
        "tokens": "Token ids [N, max_length] per text: [EOS], its first max_length - 1 ids, then [PAD]s.",
        "scores": "Class probabilities [N, C] (softmax), in the order of labels.txt."},
}
_VOCABULARIES = {"vocabulary.json", "vocabulary.txt", "vocab.json"}


def populate(flat: bytes, info: dict[str, Any], tokenizer_files: dict[str, bytes]) -> bytes:
    """`flat` with lmstack's metadata and packed files (`info` is the sidecar's content)."""
    from ai_edge_litert import schema_py_generated as schema

    files = [md.File(name, data, _file_description(name, info["tokenizer"]),
                     md.VOCABULARY if name in _VOCABULARIES else md.UNKNOWN)
             for name, data in tokenizer_files.items()]
    files.append(md.File(SIDECAR, json.dumps(packed_sidecar(info), separators=(",", ":")).encode(),
                         "lmstack's settings: family, model config, lengths, special ids, quantization."))
    model = schema.Model.GetRootAs(flat, 0)
    signature = next(model.SignatureDefs(i) for i in range(model.SignatureDefsLength())
                     if model.SignatureDefs(i).SubgraphIndex() == 0)
    key = signature.SignatureKey().decode()
    graph = model.Subgraphs(0)
    inputs = _tensor_names(signature.Inputs, signature.InputsLength(), graph.InputsAsNumpy())
    outputs = _tensor_names(signature.Outputs, signature.OutputsLength(), graph.OutputsAsNumpy())
    table = _TENSORS.get(key.split("_")[0] if key.startswith("prefill_") else key, {})

    def described(name: str, out: bool = False) -> str:  # one text per kind of h0, c0, ..., kv_cache_k_0, ...
        suffix = "_out" if out else ""
        if name.startswith("kv_cache_"):
            _, _, kind, layer = name.split("_")
            return table.get("kv_cache" + suffix, "").format(i=layer, kind={"k": "keys", "v": "values"}[kind])
        layer = name[1:] if name[:1] in ("h", "c") and name[1:].isdigit() else None
        return table.get((name[0] if layer else name) + suffix, "").format(i=layer)

    output_tensors = []
    for name in outputs:
        tensor = _tensor(name, described(name, out=name in inputs))
        if info["family"] == "classifier" and name == "scores":
            files.append(md.File(LABELS, "".join(f"{label}\n" for label in info["labels"]).encode(),
                                 "The class of each score, one per line.", md.TENSOR_AXIS_LABELS))
            tensor["associated_files"] = [files[-1].entry()]
        output_tensors.append(tensor)
    subgraph = {
        "name": key, "description": _signatures(info),
        "input_tensor_metadata": [_tensor(name, described(name)) for name in inputs],
        "output_tensor_metadata": output_tensors,
        "input_process_units": _tokenizer_unit(info["tokenizer"], files),
    }
    metadata = {
        "name": _name(info), "description": _description(info), "version": f"step {info['checkpoint_step']}",
        "author": "lmstack", "subgraph_metadata": [subgraph],
        "associated_files": [f.entry() for f in files if f.name != LABELS],
    }
    return md.populate(flat, metadata, files)


def packed_sidecar(info: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's content as packed in the file: without what the file says already (the
    signatures' shapes and the op counts are the model's own; the tokenizer's config is the
    packed tokenizer.json)."""
    return {k: v for k, v in info.items() if k not in ("signatures", "ops", "tokenizer", "tokenizer_dir", "bytes")}


def _tensor_names(entry, count: int, order) -> list[str]:
    """A signature's tensor names in the subgraph's input (or output) order."""
    by_index = {entry(i).TensorIndex(): entry(i).Name().decode() for i in range(count)}
    return [by_index[int(i)] for i in order]


def _tensor(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "description": description, "content": {"content_properties": ("FeatureProperties", {})}}


def _tokenizer_unit(config: dict[str, Any], files: list[md.File]) -> list[dict[str, Any]]:
    """The schema's tokenizer process unit for the kinds it has one for."""
    entries = {f.name: f.entry() for f in files}
    if config["kind"] == "wordpiece":
        return [{"options": ("BertTokenizerOptions", {"vocab_file": [entries["vocabulary.txt"]]})}]
    if config["kind"] == "sentencepiece":
        model = [entries["sentencepiece.model"]]
        return [{"options": ("SentencePieceTokenizerOptions", {"sentencePiece_model": model})}]
    return []


def _name(info: dict[str, Any]) -> str:
    if info["family"] == "classifier":
        return f"lmstack {info['backbone']} text classifier"
    return f"lmstack {info['family']} language model" + (f" ({info['variant']})" if info.get("variant") else "")


def _description(info: dict[str, Any]) -> str:
    tokenizer = info["tokenizer"]
    ids = f"[EOS] is id {info['eos_id']}, [PAD] id {info['pad_id']}"
    if info["family"] == "classifier":
        what = (f"Classifies texts into {', '.join(info['labels'])} (labels.txt). Call `classify` with "
                f"{info['batch_size']} texts of {info['max_length']} token ids.")
    else:
        rows = f" {info['batch_size']} rows a call, decoded in lockstep." if info.get("batch_size", 1) > 1 else ""
        what = (f"Generates text: start after [EOS], stop at it.{rows} " + (
            "Run a `prefill_N` on the prompt (right-padded to N), then `decode` per new token, passing the "
            "kv caches from call to call (LiteRT-LM's signatures)." if info["family"] == "transformer"
            else "Run `step` per token from a zero state; `sequence` scores a window."))
    weights = "float32" if info["quantize"] == "none" else info["quantize"]
    return (f"{what} Tokenizer: {tokenizer['kind']}, {tokenizer['vocab_size']} ids ({ids}); its files are packed "
            f"in this file (a zip archive after the model). Weights: {weights}. lmstack.json has the rest.")


def _signatures(info: dict[str, Any]) -> str:
    """Every signature with its tensors' shapes: the schema describes only the first."""
    parts = []
    for name, signature in info["signatures"].items():
        def shapes(side, signature=signature):
            return ", ".join(f"{k} {v['dtype']} {v['shape']}" for k, v in signature[side].items())
        parts.append(f"{name}({shapes('inputs')}) -> {shapes('outputs')}")
    return "; ".join(parts)


def _file_description(name: str, tokenizer: dict[str, Any]) -> str:
    kind = tokenizer["kind"]
    return {
        "tokenizer.json": f"The tokenizer's config: kind {kind}, vocabulary size, reserved tokens, special ids.",
        "vocabulary.json": "The char tokenizer's vocabulary: a JSON list, a token's id is its index.",
        "vocabulary.txt": "The WordPiece vocabulary, one token per line (continuations start with ##).",
        "vocab.json": "The byte-level BPE vocabulary (GPT-2's format): token -> id.",
        "merges.txt": "The byte-level BPE merges in rank order (GPT-2's format).",
        "sentencepiece.model": "The SentencePiece model (a serialized ModelProto).",
    }.get(name, f"A file of the {kind} tokenizer.")
