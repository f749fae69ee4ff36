"""Tokenizers: learned from the corpus, saved in the workdir, loaded as keras-nlp tokenizers.

Five kinds learned by `prepare`, all with the same reserved ids:

    0 [PAD]   1 [UNK]   2 [BOS]   3 [EOS]

- `char`: one id per character seen in the training text (most frequent
  first); exact round trip of text whose characters are in the vocabulary.
- `byte`: one id per UTF-8 byte (ids 4..259); exact round trip of any text.
- `wordpiece`: keras-nlp's `compute_word_piece_vocabulary` + `WordPieceTokenizer`.
- `sentencepiece`: keras-nlp's `compute_sentence_piece_proto` (unigram) +
  `SentencePieceTokenizer`.
- `bpe`: GPT-2's byte-level BPE, merges learned by the `tokenizers` library
  (Hugging Face's fast trainer) and run by keras-nlp's `BytePairTokenizer`,
  exactly as an imported GPT-2 tokenizer runs; exact round trip of any text.

A tokenizer imported with a pre-trained model (`lmstack import`) keeps its own
ids: GPT-2's `<|endoftext|>` (50256) ends and pads documents. So code that
needs the end-of-document or padding id reads it from the loaded tokenizer,
`tokenizer.eos_id` and `tokenizer.pad_id` (`load` sets both), never a constant.

The subword kinds normalize white space (WordPiece splits on it and rejoins
with single spaces; SentencePiece's NFKC rules turn newlines into spaces), so
use `char` or `byte` when layout matters.

Every tokenizer is a `keras_nlp.tokenizers.Tokenizer` that runs as TensorFlow
ops: the same graph tokenizes in `prepare`, in tf.data and inside exported
SavedModels, which need only tensorflow and tensorflow_text to run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import tempfile
import typing
from typing import Any, Iterable, Literal, Sequence

import keras_nlp
import numpy as np
import tensorflow as tf
# keras-nlp's tokenizers turn their eager outputs into Python values with it; ours do the same.
from keras_hub.src.utils.tensor_utils import preprocessing_function
from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

from pipelines import fs
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError, check_choice

RESERVED_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(RESERVED_TOKENS))
Kind = Literal["char", "byte", "wordpiece", "sentencepiece", "bpe"]
KINDS = typing.get_args(Kind)
DEFAULT_SUBWORD_VOCAB = 8000
BYTE_VOCAB_SIZE = len(RESERVED_TOKENS) + 256

CONFIG_FILE = "tokenizer.json"
CHAR_VOCAB_FILE = "vocabulary.json"
WORDPIECE_VOCAB_FILE = "vocabulary.txt"
SENTENCEPIECE_FILE = "sentencepiece.model"
BPE_VOCAB_FILE = "vocab.json"  # GPT-2's file names: an imported tokenizer is a copy
BPE_MERGES_FILE = "merges.txt"


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """What tokenizer to learn.

    Attributes:
        kind: the tokenizer to learn: char, byte, wordpiece, sentencepiece or bpe (GPT-2's byte-level BPE).
        vocab_size: vocabulary size including the 4 reserved tokens (0: the kind's natural size: every
            character seen; 260 for bytes; 8000 for subwords; bpe needs at least 260, the 256 bytes and
            the reserved tokens).
        lowercase: fold case before tokenizing (wordpiece and sentencepiece only).
    """
    kind: Kind = "char"
    vocab_size: int = 0
    lowercase: bool = False

    def validate(self) -> None:
        """Raises ConfigError naming the bad value."""
        check_choice("kind", self.kind, KINDS)
        if self.vocab_size < 0:
            raise ConfigError("vocab_size", self.vocab_size, "must be positive (or 0 for the default)")
        if self.kind == "byte" and self.vocab_size not in (0, BYTE_VOCAB_SIZE):
            raise ConfigError("vocab_size", self.vocab_size, f"the byte tokenizer has a fixed vocabulary of "
                              f"{BYTE_VOCAB_SIZE} (256 bytes + 4 reserved tokens); leave it at 0")
        minimum = len(RESERVED_TOKENS) + 1
        if self.vocab_size and self.vocab_size < minimum:
            raise ConfigError("vocab_size", self.vocab_size,
                              f"too small: {self.kind} needs the {len(RESERVED_TOKENS)} reserved tokens "
                              f"{' '.join(RESERVED_TOKENS)} plus at least one token of text; use {minimum} or more")
        if self.kind == "bpe" and 0 < self.vocab_size < BYTE_VOCAB_SIZE:
            raise ConfigError("vocab_size", self.vocab_size, f"too small for bpe: it starts from the 256 bytes "
                              f"and the {len(RESERVED_TOKENS)} reserved tokens; use {BYTE_VOCAB_SIZE} or more")
        if self.lowercase and self.kind in ("char", "byte", "bpe"):
            raise ConfigError("lowercase", True, f"applies to wordpiece and sentencepiece, not {self.kind}")


class CharTokenizer(keras_nlp.tokenizers.Tokenizer):
    """One id per character, with a vocabulary learned from the corpus.

    Text is decoded into Unicode code points and a lookup table turns code
    points into ids (unknown characters into [UNK]).
    Detokenizing drops [PAD]/[BOS]/[EOS] and writes [UNK] as U+FFFD.

    Args:
        vocabulary: the 4 reserved tokens, then one single-character string per id.

    Example:
    >>> tok = CharTokenizer(list(RESERVED_TOKENS) + list("ab "))
    >>> tok.tokenize("ab ba").numpy().tolist()
    [4, 5, 6, 5, 4]
    """

    def __init__(self, vocabulary: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        vocabulary = list(vocabulary)
        if tuple(vocabulary[:len(RESERVED_TOKENS)]) != RESERVED_TOKENS:
            raise ValueError(f"a char vocabulary starts with {RESERVED_TOKENS}, got {vocabulary[:4]}")
        chars = vocabulary[len(RESERVED_TOKENS):]
        if any(len(c) != 1 for c in chars):
            raise ValueError("a char vocabulary holds single characters after the reserved tokens")
        self.vocabulary = vocabulary
        self._to_id = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant([ord(c) for c in chars], tf.int32),
                tf.range(len(RESERVED_TOKENS), len(vocabulary), dtype=tf.int32)),
            default_value=UNK_ID)
        # id -> code point; -1 marks ids that print as nothing.
        self._to_codepoint = tf.constant(
            [-1, 0xFFFD, -1, -1] + [ord(c) for c in chars], tf.int32)

    def tokenize(self, inputs):
        # [] -> [T] or [B] -> ragged [B, None]; bad UTF-8 becomes U+FFFD, i.e. [UNK].
        codepoints = tf.strings.unicode_decode(
            tf.convert_to_tensor(inputs, tf.string), "UTF-8", errors="replace")
        if isinstance(codepoints, tf.RaggedTensor):
            return tf.ragged.map_flat_values(self._to_id.lookup, codepoints)
        return self._to_id.lookup(codepoints)

    def detokenize(self, inputs):
        codepoints = tf.gather(self._to_codepoint, _as_ids(inputs))
        codepoints = tf.ragged.boolean_mask(codepoints, codepoints >= 0)
        return tf.strings.unicode_encode(codepoints, "UTF-8")

    def get_vocabulary(self) -> list[str]:
        return list(self.vocabulary)

    def vocabulary_size(self) -> int:
        return len(self.vocabulary)

    def id_to_token(self, id: int) -> str:
        return self.vocabulary[id]

    def token_to_id(self, token: str) -> int:
        return self.vocabulary.index(token)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocabulary": self.vocabulary}


class ByteTokenizer(keras_nlp.tokenizers.Tokenizer):
    """One id per UTF-8 byte: id = byte + 4, after the reserved tokens.

    Round-trips any valid UTF-8 exactly (keras-nlp's own `ByteTokenizer`
    has no room for reserved ids and drops NUL bytes).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._byte_strings = tf.constant([bytes([b]) for b in range(256)])

    def tokenize(self, inputs):
        inputs = tf.convert_to_tensor(inputs, tf.string)
        byte_strings = tf.strings.bytes_split(inputs)  # [T] or ragged [B, None]
        if isinstance(byte_strings, tf.RaggedTensor):
            return tf.ragged.map_flat_values(_decode_bytes, byte_strings)
        return _decode_bytes(byte_strings)

    def detokenize(self, inputs):
        ids = _as_ids(inputs)
        ids = tf.ragged.boolean_mask(ids, ids >= len(RESERVED_TOKENS))
        # id -> one-byte string, joined per sequence; a model can emit byte
        # sequences that are not UTF-8, so those are replaced with U+FFFD.
        byte_strings = tf.gather(self._byte_strings, ids - len(RESERVED_TOKENS))
        text = tf.strings.reduce_join(byte_strings, axis=-1)
        return tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")

    def get_vocabulary(self) -> list[str]:
        return list(RESERVED_TOKENS) + [f"<0x{b:02X}>" for b in range(256)]

    def vocabulary_size(self) -> int:
        return BYTE_VOCAB_SIZE

    def id_to_token(self, id: int) -> str:
        return self.get_vocabulary()[id]

    def token_to_id(self, token: str) -> int:
        return self.get_vocabulary().index(token)


class BytePairTokenizer(keras_nlp.tokenizers.BytePairTokenizer):
    """GPT-2's byte-level BPE: keras-nlp's graph implementation, plus NUL bytes.

    keras-nlp's tokenizer runs as TensorFlow ops (tf.data, SavedModels), but
    tensorflow-text's regex split, which it uses, drops a string from its
    first NUL byte on. This one splits the text at NULs, tokenizes the pieces
    and puts NUL's own token between them, so any UTF-8 text round-trips
    (GPT-2's reference would merge a NUL with neighbouring punctuation; text
    without NUL is tokenized exactly as GPT-2 does).

    Args:
        vocabulary: a `vocab.json`'s mapping (token -> id), or its local path.
        merges: a `merges.txt`'s lines, or its local path.
        unsplittable_tokens: tokens that text may contain literally and that map to their own id
            (GPT-2's `<|endoftext|>`); none for a learned tokenizer.
    """

    def __init__(self, vocabulary, merges, unsplittable_tokens=(), skip_ids=(), **kwargs):
        kwargs.setdefault("_allow_python_workflow", False)  # the graph implementation, always
        super().__init__(vocabulary=vocabulary, merges=merges, unsplittable_tokens=list(unsplittable_tokens),
                         **kwargs)
        self.skip_ids = [int(i) for i in skip_ids]
        byte_strings, characters = bytes_to_unicode()  # GPT-2's map of the 256 bytes to printable characters
        self._nul_id = self.token_to_id(characters[byte_strings.index(b"\0")])

    @preprocessing_function  # as keras-nlp's own methods: Python values out in eager mode
    def tokenize(self, inputs):
        inputs = tf.convert_to_tensor(inputs, tf.string)
        scalar = inputs.shape.rank == 0
        pieces = tf.strings.split(tf.reshape(inputs, [-1]), sep="\0")  # (B, P) ragged
        ids = tf.cast(super().tokenize(pieces.flat_values), tf.int32)  # (N, T) ragged
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.RaggedTensor.from_tensor(ids)
        # NUL's id after every piece, then dropped after each text's last piece.
        nul = tf.fill([tf.shape(ids.row_lengths())[0], 1], self._nul_id)
        ids = tf.concat([ids, tf.RaggedTensor.from_tensor(nul)], axis=1)
        ids = tf.RaggedTensor.from_row_lengths(ids, pieces.row_lengths()).merge_dims(1, 2)[:, :-1]  # (B, T)
        return ids[0] if scalar else ids

    @preprocessing_function
    def detokenize(self, inputs):
        ids = _as_ids(inputs)
        for skip in self.skip_ids:  # reserved tokens print as nothing, as with the other kinds
            ids = tf.ragged.boolean_mask(ids, ids != skip)
        # A model can emit byte sequences that are not UTF-8: those become U+FFFD.
        text = super().detokenize(ids)
        return tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")

    def get_vocabulary(self) -> list[str]:  # keras-nlp returns the JSON's keys, in file order
        return sorted(self.vocabulary, key=self.vocabulary.get)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "skip_ids": self.skip_ids}


def _decode_bytes(byte_strings: tf.Tensor) -> tf.Tensor:
    """[N] one-byte strings -> [N] int32 ids."""
    values = tf.reshape(tf.io.decode_raw(byte_strings, tf.uint8), [-1])
    return tf.cast(values, tf.int32) + len(RESERVED_TOKENS)


def _as_ids(inputs) -> tf.Tensor | tf.RaggedTensor:
    if isinstance(inputs, (tf.Tensor, tf.RaggedTensor)):
        return tf.cast(inputs, tf.int32)
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], list):
        return tf.ragged.constant(inputs, dtype=tf.int32)
    return tf.convert_to_tensor(inputs, tf.int32)


# ---------------------------------------------------------------------------
# Learning, saving and loading.


def learn(config: TokenizerConfig, lines: Iterable[str], directory: fs.Path) -> None:
    """Learns a tokenizer from training text and writes it to `directory`.

    Args:
        config: what to learn.
        lines: the training text, line by line.
        directory: an existing, empty directory.
    Raises:
        UserError: the vocabulary size does not fit the corpus.
    """
    config.validate()
    size = config.vocab_size
    if config.kind not in ("char", "byte"):  # the trainers take their text whole
        lines = [line for line in lines if line.strip()]
    if config.kind == "char":
        counts = _count_characters(lines)
        counts["\n"] += 1  # lines were split on it; keep it in the vocabulary
        chars = sorted(counts, key=lambda c: (-counts[c], ord(c)))
        if size:
            chars = chars[:size - len(RESERVED_TOKENS)]
        workdir_lib.write_json(directory / CHAR_VOCAB_FILE, list(RESERVED_TOKENS) + chars)
        size = len(RESERVED_TOKENS) + len(chars)
    elif config.kind == "byte":
        size = BYTE_VOCAB_SIZE
    elif config.kind == "wordpiece":
        vocab = keras_nlp.tokenizers.compute_word_piece_vocabulary(
            tf.data.Dataset.from_tensor_slices(lines).batch(1024),
            vocabulary_size=size or DEFAULT_SUBWORD_VOCAB,
            lowercase=config.lowercase, strip_accents=False,
            reserved_tokens=list(RESERVED_TOKENS))
        (directory / WORDPIECE_VOCAB_FILE).write_text("\n".join(vocab) + "\n", encoding="utf-8")
        size = len(vocab)
    elif config.kind == "bpe":
        size = _learn_bpe(lines, size or DEFAULT_SUBWORD_VOCAB, directory)
    else:
        size = size or DEFAULT_SUBWORD_VOCAB
        try:
            with _quiet_stderr():  # SentencePiece's trainer logs pages of settings
                proto = keras_nlp.tokenizers.compute_sentence_piece_proto(
                    tf.data.Dataset.from_tensor_slices(lines), vocabulary_size=size,
                    lowercase=config.lowercase)
        except RuntimeError as e:
            raise ConfigError("vocab_size", size, f"does not fit this corpus for sentencepiece "
                              f"({str(e).strip().splitlines()[-1]}); choose another") from None
        (directory / SENTENCEPIECE_FILE).write_bytes(_rename_special_pieces(proto))
    workdir_lib.write_json(directory / CONFIG_FILE, {
        **dataclasses.asdict(config), "vocab_size": size,
        "requested_vocab_size": config.vocab_size, "reserved_tokens": list(RESERVED_TOKENS),
        "special_ids": {"pad": PAD_ID, "eos": EOS_ID},
    })


def _count_characters(lines: Iterable[str], batch_chars: int = 1 << 22) -> collections.Counter:
    """How often each character occurs in the lines that are not blank: counted as the lines
    stream by (the whole training text is never held), a few MB at a time by code point."""
    counts = collections.Counter()
    batch: list[str] = []
    held = 0

    def flush():
        points = np.frombuffer("".join(batch).encode("utf-32-le"), np.uint32)
        seen = np.bincount(points)
        for point in np.flatnonzero(seen):
            counts[chr(point)] += int(seen[point])

    for line in lines:
        if line.strip():
            batch.append(line)
            held += len(line)
            if held >= batch_chars:
                flush()
                batch, held = [], 0
    if batch:
        flush()
    return counts


def _learn_bpe(lines: Sequence[str], size: int, directory: fs.Path) -> int:
    """GPT-2's byte-level BPE learned by Hugging Face's trainer; returns the vocabulary size."""
    import tokenizers as hf  # the `tokenizers` library, imported only to learn

    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split and byte alphabet
    trainer = hf.trainers.BpeTrainer(
        vocab_size=size, special_tokens=list(RESERVED_TOKENS), show_progress=False,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())  # every byte, seen or not
    tok.train_from_iterator((line + "\n" for line in lines), trainer)  # newlines are text too
    with tempfile.TemporaryDirectory() as local:  # it writes local files only
        for name in tok.model.save(local):  # vocab.json + merges.txt
            fs.copy_file(pathlib.Path(name), directory / pathlib.Path(name).name)
    return tok.get_vocab_size()


def load(directory: str | os.PathLike) -> keras_nlp.tokenizers.Tokenizer:
    """Loads the tokenizer saved in `directory` (a workdir's tokenizer/).

    The tokenizer carries `eos_id` (ends a document; generation starts after
    it and stops at it) and `pad_id`.
    """
    directory = fs.path(directory)
    config = load_config(directory)
    tokenizer = _load(directory, config)
    special = special_ids(config)
    tokenizer.eos_id, tokenizer.pad_id = special["eos"], special["pad"]
    return tokenizer


def special_ids(config: dict[str, Any]) -> dict[str, int]:
    """`{"eos": id, "pad": id}` of a tokenizer config (tokenizer.json)."""
    special = config.get("special_ids", {"pad": PAD_ID, "eos": EOS_ID})  # older workdirs: the reserved ids
    return {"eos": int(special["eos"]), "pad": int(special["pad"])}


def _load(directory: fs.Path, config: dict[str, Any]) -> keras_nlp.tokenizers.Tokenizer:
    kind = config["kind"]
    if kind == "char":
        return CharTokenizer(workdir_lib.read_json(directory / CHAR_VOCAB_FILE))
    if kind == "byte":
        return ByteTokenizer()
    if kind == "wordpiece":
        return keras_nlp.tokenizers.WordPieceTokenizer(
            vocabulary=_lines(directory / WORDPIECE_VOCAB_FILE), lowercase=config["lowercase"],
            strip_accents=False, oov_token=RESERVED_TOKENS[UNK_ID], _allow_python_workflow=False)
    if kind == "bpe":
        special = special_ids(config)
        reserved = config.get("reserved_tokens", list(RESERVED_TOKENS))
        vocab = workdir_lib.read_json(directory / BPE_VOCAB_FILE)
        skip = sorted({vocab[t] for t in reserved if t in vocab} | set(special.values()))
        return BytePairTokenizer(vocab, _lines(directory / BPE_MERGES_FILE),
                                 unsplittable_tokens=config.get("unsplittable_tokens", ()), skip_ids=skip)
    return keras_nlp.tokenizers.SentencePieceTokenizer(
        proto=(directory / SENTENCEPIECE_FILE).read_bytes(), _allow_python_workflow=False)


def _lines(path: fs.Path) -> list[str]:
    """A vocabulary or merges file's lines, as keras-nlp reads a local one (each right-stripped)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return [line.rstrip() for line in (lines[:-1] if lines[-1] == "" else lines)]


def load_config(directory: str | os.PathLike | fs.GPath) -> dict[str, Any]:
    path = fs.path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer at {directory} ({CONFIG_FILE} is missing); run `lmstack prepare` first")
    return workdir_lib.read_json(path)


def _rename_special_pieces(proto: bytes) -> bytes:
    """Names SentencePiece's ids 0-3 like the other kinds' reserved tokens."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    for i, token in enumerate(RESERVED_TOKENS):
        model.pieces[i].piece = token
    spec = model.trainer_spec
    spec.pad_piece, spec.unk_piece, spec.bos_piece, spec.eos_piece = RESERVED_TOKENS
    return model.SerializeToString()


@contextlib.contextmanager
def _quiet_stderr():
    """Silences C++ logging on file descriptor 2 for the duration."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
