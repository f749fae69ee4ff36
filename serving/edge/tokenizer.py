"""The tokenizer of an lmstack TFLite file, without TensorFlow: text to ids and back on a device.

    tokenizer = EdgeModel("transformer-int8.tflite").tokenizer   # read from the file itself
    ids = tokenizer.encode("ROMEO.")
    text = tokenizer.decode(ids)

The same ids as the keras-nlp tokenizer lmstack trained with (`pipelines.tokenizers`),
which runs as TensorFlow ops: `tests/test_edge_tokenizer.py` holds the two together for
every kind. char and byte are plain Python; WordPiece is BERT's split and greedy
longest-match, as keras-nlp's and tensorflow-text's; SentencePiece runs in the
`sentencepiece` library and byte-level BPE in Hugging Face's `tokenizers`, both already
lmstack dependencies and both built for phones and boards as well.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Mapping, Sequence

RESERVED = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0-3 of every learned kind
_MAX_WORD_BYTES = 100  # tensorflow-text's FastWordpieceTokenizer: a longer word is [UNK]
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class EdgeTokenizer:
    """Text <-> ids for a tokenizer saved by `lmstack prepare` (its tokenizer.json config and files).

    Args:
        config: the tokenizer's config (tokenizer.json, or the sidecar's "tokenizer").
        files: the tokenizer's files by name (the .tflite's packed files, or tflite/tokenizer/).
    """

    def __init__(self, config: Mapping[str, Any], files: Mapping[str, bytes]):
        self.kind = config["kind"]
        special = config.get("special_ids", {"pad": 0, "eos": 3})
        self.eos_id, self.pad_id = int(special["eos"]), int(special["pad"])
        if self.kind == "char":
            self.vocabulary = json.loads(files["vocabulary.json"])
            self._ids = {c: i for i, c in enumerate(self.vocabulary) if i >= len(RESERVED)}
        elif self.kind == "wordpiece":
            self.vocabulary = files["vocabulary.txt"].decode("utf-8").split("\n")
            if self.vocabulary[-1] == "":
                self.vocabulary.pop()
            self.vocabulary = [token.rstrip() for token in self.vocabulary]  # as keras-nlp reads the file
            self._ids = {token: i for i, token in enumerate(self.vocabulary)}
            self._lowercase = bool(config.get("lowercase"))
        elif self.kind == "sentencepiece":
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_proto=files["sentencepiece.model"])
        elif self.kind == "bpe":
            self._bpe, self._nul, self._skip = _byte_level_bpe(config, files)
            self._unsplittable = list(config.get("unsplittable_tokens", ()))
        elif self.kind != "byte":
            raise ValueError(f"unknown tokenizer kind {self.kind!r}")

    def encode(self, text: str) -> list[int]:
        """The ids of `text` (no [EOS] added)."""
        if self.kind == "char":
            return [self._ids.get(c, 1) for c in text]
        if self.kind == "byte":
            return [b + len(RESERVED) for b in text.encode("utf-8")]
        if self.kind == "wordpiece":  # tensorflow-text's regex split ends a text at its first NUL; so does this
            words = _bert_words(text.split("\0", 1)[0], self._lowercase)
            return [self._ids[piece] for word in words for piece in self._pieces(word)]
        if self.kind == "sentencepiece":
            return list(self._sp.encode(text))
        # keras-nlp's regex split drops a text from its first NUL on: lmstack splits there and puts NUL's id back.
        ids: list[int] = []
        for i, piece in enumerate(text.split("\0")):
            words = _gpt2_words(piece, self._unsplittable)
            ids += ([self._nul] if i else []) + (self._bpe.encode(words, is_pretokenized=True).ids if words else [])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; reserved ids print as nothing, text that is not UTF-8 as U+FFFD."""
        ids = [int(i) for i in ids]
        if self.kind == "char":
            return "".join("\ufffd" if i == 1 else self.vocabulary[i] for i in ids if i == 1 or i >= len(RESERVED))
        if self.kind == "byte":
            return bytes(i - len(RESERVED) for i in ids if i >= len(RESERVED)).decode("utf-8", "replace")
        if self.kind == "wordpiece":
            words: list[str] = []
            for n, token in enumerate(self.vocabulary[i] for i in ids):
                if n and len(token) > 2 and token.startswith("##"):  # a continuation joins the word before
                    words[-1] += token[2:]
                else:
                    words.append(token)
            return " ".join(words)
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._bpe.decode([i for i in ids if i not in self._skip], skip_special_tokens=False)

    def _pieces(self, word: str) -> list[str]:
        """WordPiece: the longest vocabulary prefix, then `##` continuations; [UNK] if any part has none."""
        if len(word.encode("utf-8")) > _MAX_WORD_BYTES:
            return [RESERVED[1]]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = ("##" if start else "") + word[start:end]
                if piece in self._ids:
                    break
            else:
                return [RESERVED[1]]
            pieces.append(piece)
            start = end
        return pieces


def _bert_words(text: str, lowercase: bool) -> list[str]:
    """keras-nlp's WordPiece split: at white space and control characters (dropped), punctuation
    and CJK ideographs (kept as words of their own); then each word case-folded if asked, as
    tensorflow-text's case_fold_utf8 folds (ICU's NFKC_Casefold: "，" becomes ",", but a
    no-break space inside a word, already split, stays in it)."""
    words, word = [], []
    for c in text:
        category = unicodedata.category(c)
        if c in " \t\n\r\f\v" or category in ("Cc", "Cf"):
            kept = None
        elif category.startswith("P") or (not c.isalnum() and ord(c) < 128) or _is_cjk(ord(c)):
            kept = c
        else:
            word.append(c)
            continue
        if word:
            words.append("".join(word))
            word = []
        if kept:
            words.append(kept)
    if word:
        words.append("".join(word))
    if lowercase:
        words = [unicodedata.normalize("NFKC", unicodedata.normalize("NFKD", w).casefold()) for w in words]
    return [w for w in words if w]


def _is_cjk(point: int) -> bool:
    return any(low <= point <= high for low, high in _CJK)


def _byte_level_bpe(config: Mapping[str, Any], files: Mapping[str, bytes]):
    """GPT-2's byte-level BPE in Hugging Face's `tokenizers`: (tokenizer, NUL's id, ids decoded as nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = json.loads(files["vocab.json"])
    merges = [tuple(line.split(" ")) for line in files["merges.txt"].decode("utf-8").split("\n")
              if line.strip() and not line.startswith("#version")]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    # The words come split (`_gpt2_words`): only GPT-2's byte alphabet here.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    unsplittable = list(config.get("unsplittable_tokens", ()))
    if unsplittable:  # GPT-2's <|endoftext|> in text is its own id
        tokenizer.add_special_tokens(unsplittable)
    special = config.get("special_ids", {"pad": 0, "eos": 3})
    skip = ({vocab[t] for t in config.get("reserved_tokens", RESERVED) if t in vocab}
            | {int(v) for v in special.values()})
    return tokenizer, vocab[byte_char(0)], skip


# keras-nlp's GPT-2 split as RE2 runs it (RE2 has no lookahead; its \s is [\t\n\f\r ]): a marker
# "६" goes before a space that starts a word, the text splits at `_WORDS`, each piece's last
# white space splits off, the markers go. (keras-nlp's marker after white space that ends the
# text needs the four special spaces in a row after it, so it is all but never placed: trailing
# spaces split one by one, where GPT-2 keeps them together.)
_SPACES = "\xa0\u2009\u202f\u3000"  # white space RE2's \s misses that GPT-2's Python regex sees
_WORDS = ("'s|'t|'re|'ve|'m|'ll|'d|[\t\n\f\r " + _SPACES + "]+[\n\r\t\f\u096c" + _SPACES + "]"
          "| ?\\p{L}+| ?\\p{N}+| ?[^\t\n\f\r \\p{L}\\p{N}" + _SPACES + "]+")
_LAST_SPACE = "[ \t\r\f\v\u096c" + _SPACES + "]\\Z"


def _gpt2_words(text: str, unsplittable: Sequence[str]) -> list[str]:
    """The pre-tokens keras-nlp's BytePairTokenizer makes of `text` (its graph split, in Python)."""
    import regex  # \p{L}, \p{N}: keras-hub's own dependency

    text = regex.sub("( )([^\t\n\f\r " + _SPACES + "])", "\u096c\\1\\2", text)
    text = regex.sub("([\t\n\f\r ]" + _SPACES + ")\\Z", "\\1\u096c", text)
    pieces = _split_keeping(text, "|".join(map(regex.escape, unsplittable))) if unsplittable else [text]
    words = []
    for piece in pieces:
        if piece in unsplittable:  # GPT-2's <|endoftext|> in text: one word, its own id
            words.append(piece)
            continue
        for word in _split_keeping(piece, _WORDS):
            words += _split_keeping(word, _LAST_SPACE)
    return [w for w in words if w != "\u096c"]


def _split_keeping(text: str, pattern: str) -> list[str]:
    """tensorflow-text's regex_split with the delimiters kept: matches and the text between, none empty."""
    import regex

    pieces, start = [], 0
    for match in regex.finditer(pattern, text):
        pieces += [text[start:match.start()], match.group()]
        start = match.end()
    return [p for p in pieces + [text[start:]] if p]


def byte_char(byte: int) -> str:
    """GPT-2's printable stand-in for a byte (its bytes_to_unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if byte in printable:
        return chr(byte)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(byte))
