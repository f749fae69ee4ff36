"""`lmstack tflite --format=litertlm`: a transformer's TFLite file as a bundle for Google's LiteRT-LM.

LiteRT-LM (`litert-lm-api` on PyPI; Kotlin on Android, Swift on iOS, C++ on desktops and
boards) is the engine phones and boards run LLMs with. It loads one `.litertlm` file
holding sections that `litert-lm-builder` writes:

- the TFLite model (`TfLiteModelType.PREFILL_DECODE`): lmstack's transformer file as it
  is, since its signatures already follow the engine's contract (`serving.exporters.tflite`:
  `prefill_N` and `decode`, tokens, input_pos and kv_cache_k_i / kv_cache_v_i);
- the tokenizer: a SentencePiece model as it is, every other kind as a Hugging Face
  `tokenizer.json` that gives lmstack's ids (`hf_tokenizer`);
- LlmMetadata (`llm_metadata`): the stop token ([EOS], and a chat template's end of turn),
  the context, a greedy default sampler, and the chat template when the workdir has one (behind
  a preamble that turns the engine's content parts into the string Hugging Face's templates expect).

WordPiece is refused: Hugging Face's BERT normalizer strips accents where keras-nlp's
lowercasing keeps them, so the engine would read other ids than the model was trained on.
An LSTM is refused too: the engine's contract carries a KV cache from chunk to chunk, and
padding a chunk would run a recurrent state through the padding.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

from pipelines import fs, pretrained, tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError
from serving.edge.tokenizer import byte_char

SUFFIX = ".litertlm"


def check_can_bundle(family: str, batch_size: int, tokenizer_dir: fs.Path) -> None:
    """Raises a one-line error for what the engine cannot run (before anything is converted)."""
    if family != "transformer":
        raise ConfigError("format", "litertlm", f"takes a transformer; this is {'an' if family == 'lstm' else 'a'} "
                          f"{family} (LiteRT-LM carries a KV cache between prompt chunks, which a recurrent state "
                          "cannot follow through their padding); use format tflite and serving.edge")
    if batch_size != 1:
        raise ConfigError("batch_size", batch_size, "LiteRT-LM runs one sequence a call; use 1 with --format=litertlm")
    kind = tokenizers.load_config(tokenizer_dir)["kind"]
    if kind == "wordpiece":
        raise ConfigError("format", "litertlm", "cannot carry a WordPiece tokenizer: Hugging Face's BERT normalizer "
                          "(LiteRT-LM's) strips accents where keras-nlp keeps them, so the engine would read other "
                          "ids; prepare the corpus with a bpe, sentencepiece, byte or char tokenizer")


def hf_tokenizer(config: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """A Hugging Face `tokenizer.json` giving the ids of lmstack's `char`, `byte` or `bpe` tokenizer.

    char and byte are BPE models without merges over lmstack's vocabulary (byte: GPT-2's printable
    stand-ins, read and written by the ByteLevel steps without GPT-2's word split); their reserved
    tokens are in the vocabulary but no text makes them, as in lmstack. bpe is GPT-2's byte-level BPE
    with the vocabulary and merges lmstack learned or imported, its unsplittable tokens as special
    tokens; the word split is GPT-2's regex, which differs from keras-nlp's only in runs of white
    space before the end of a text (docs/guide.md).
    """
    kind = config["kind"]
    model: dict[str, Any] = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                             "ignore_merges": False, "merges": []}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added: list[dict[str, Any]] = []
    if kind == "char":
        vocabulary = json.loads(files["vocabulary.json"])
        model.update(vocab={token: i for i, token in enumerate(vocabulary)}, unk_token=vocabulary[1])
        pre_tokenizer, decoder = None, {"type": "Fuse"}
    elif kind == "byte":
        reserved = list(config.get("reserved_tokens", tokenizers.RESERVED_TOKENS))
        model["vocab"] = {**{t: i for i, t in enumerate(reserved)},
                          **{byte_char(b): b + len(reserved) for b in range(256)}}
        pre_tokenizer, decoder = byte_level, dict(byte_level)
    elif kind == "bpe":
        vocab = json.loads(files["vocab.json"])
        merges = [line for line in files["merges.txt"].decode("utf-8").split("\n")
                  if line.strip() and not line.startswith("#version")]
        model.update(vocab=vocab, merges=merges)
        pre_tokenizer, decoder = dict(byte_level, use_regex=True), dict(byte_level)
        added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for t in config.get("unsplittable_tokens", ()) if t in vocab]
    else:
        raise ValueError(f"no Hugging Face tokenizer.json for a {kind} tokenizer")
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder, "model": model}


# LiteRT-LM hands a template each message's content as a list of parts ([{"type": "text", "text": ...}]),
# where Hugging Face's text-model templates expect a string: this preamble joins the parts' text first.
TEXT_PARTS = ("{%- set ns = namespace(messages=[]) -%}"
              "{%- for m in messages -%}"
              "{%- if m['content'] is string -%}{%- set ns.messages = ns.messages + [m] -%}"
              "{%- else -%}{%- set ns.messages = ns.messages + [{'role': m['role'], "
              "'content': m['content'] | map(attribute='text') | join('')}] -%}"
              "{%- endif -%}{%- endfor -%}{%- set messages = ns.messages -%}")


def llm_metadata(eos_id: int, max_num_tokens: int, chat_template: dict[str, Any] | None) -> bytes:
    """LlmMetadata (litert_lm_builder's proto): stop tokens, context, a greedy default sampler.

    Greedy is TOP_P with k 1: the engine's Python API always sends a TOP_P sampler, and a GREEDY
    or TOP_K type in the metadata fails there as not implemented.
    """
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, sampler_params_pb2

    meta = llm_metadata_pb2.LlmMetadata()
    meta.stop_tokens.add().token_ids.ids.append(eos_id)
    for stop in (chat_template or {}).get("stop", ()):
        meta.stop_tokens.add().token_str = stop
    meta.max_num_tokens = max_num_tokens
    sampler = meta.sampler_params
    sampler.type = sampler_params_pb2.SamplerParameters.TOP_P
    sampler.k, sampler.p, sampler.temperature = 1, 1.0, 1.0
    meta.llm_model_type.generic_model.SetInParent()
    if chat_template:
        meta.jinja_prompt_template = TEXT_PARTS + chat_template["chat_template"]
    return meta.SerializeToString()


def write(wd: workdir_lib.Workdir, name: str, flat: bytes, info: dict[str, Any],
          tokenizer_files: dict[str, bytes]) -> fs.Path:
    """WORKDIR/tflite/NAME.litertlm: `flat` (lmstack's TFLite file, `info` its sidecar), the tokenizer
    (its files by name) and LlmMetadata."""
    from litert_lm_builder import litertlm_builder as builder_lib

    config = info["tokenizer"]
    template_file = wd.tokenizer_dir / pretrained.CHAT_TEMPLATE_FILE
    chat_template = json.loads(template_file.read_text()) if template_file.is_file() else None
    builder = builder_lib.LitertLmFileBuilder()
    builder.add_system_metadata(builder_lib.Metadata(key="Authors", value="lmstack", dtype=builder_lib.DType.STRING))
    with tempfile.TemporaryDirectory(prefix="lmstack-litertlm-") as tmp:
        def local(file_name: str, data: bytes) -> str:
            path = os.path.join(tmp, file_name)
            with open(path, "wb") as f:
                f.write(data)
            return path

        builder.add_tflite_model(local("model.tflite", flat), builder_lib.TfLiteModelType.PREFILL_DECODE)
        if config["kind"] == "sentencepiece":
            builder.add_sentencepiece_tokenizer(local("sentencepiece.model", tokenizer_files["sentencepiece.model"]))
        else:
            builder.add_hf_tokenizer(local("tokenizer.json",
                                           json.dumps(hf_tokenizer(config, tokenizer_files)).encode()))
        builder.add_llm_metadata(local("llm_metadata.pb", llm_metadata(
            int(info["eos_id"]), int(info["max_seq_len"]), chat_template)))
        out = io.BytesIO()
        builder.build(out)
    path = wd.root / "tflite" / f"{name}{SUFFIX}"
    workdir_lib.write_bytes(path, out.getvalue())
    return path

