"""Reading a text corpus: files, globs and .gz files of UTF-8 text.

A corpus is a list of documents, one per file, each a list of lines. The
train/validation split takes contiguous blocks of lines, never single random
characters or lines, so the validation text is text the model has not seen.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import hashlib
import os
import pathlib
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from pipelines import fs
from pipelines.errors import ConfigError, UserError, check_choice

ENCODING_ERRORS = ("strict", "replace")


@dataclasses.dataclass(frozen=True)
class Document:
    """One input file, decoded.

    Attributes:
        path: the file it came from (absolute).
        sha256: hex digest of the file's bytes as stored (compressed for .gz).
        size: bytes on disk.
        text: the decoded text: BOM removed, CRLF and CR turned into LF.
    """
    path: str
    sha256: str
    size: int
    text: str


def resolve_paths(patterns: Sequence[str]) -> list[fs.Path]:
    """Expands files and globs, in the order given (each glob sorted); local or on a TensorFlow filesystem.

    Raises:
        UserError: a pattern matches nothing, or names a directory.
    """
    if not patterns:
        raise ConfigError("corpus", "", "no corpus given; name text files, globs or .gz files")
    paths: list[fs.Path] = []
    for pattern in patterns:
        where = fs.path(pattern)
        if glob.has_magic(pattern) and fs.is_local(where):
            matches = [pathlib.Path(p) for p in glob.glob(str(where), recursive=True) if os.path.isfile(p)]
        elif glob.has_magic(pattern):
            matches = [fs.GPath(p) for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p)]
        if glob.has_magic(pattern):
            if not matches:
                raise ConfigError("corpus", pattern, "the pattern matches no file")
            paths.extend(sorted(matches))
        else:
            path = where
            if path.is_dir():
                raise ConfigError("corpus", path, f"is a directory; name its files or a glob such as {path}/*.txt")
            if not path.is_file():
                raise ConfigError("corpus", path, "no such file")
            paths.append(path)
    seen, unique = set(), []
    for p in paths:  # the same file twice would double-count it
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def read_document(path: fs.Path, encoding_errors: str = "strict") -> Document:
    """Reads and decodes one file (.gz is decompressed).

    Raises:
        UserError: the file is unreadable, or not UTF-8 with encoding_errors='strict'.
    """
    hashing = _Hashing()
    text = "".join(_text_chunks(path, encoding_errors, hashing))
    return Document(path=str(path.resolve()), sha256=hashing.digest.hexdigest(), size=hashing.size, text=text)


def read_corpus(patterns: Sequence[str], encoding_errors: str = "strict") -> list[Document]:
    """Reads every file of a corpus.

    Raises:
        UserError: a missing or undecodable file, or no text at all.
    """
    docs = [read_document(p, encoding_errors) for p in resolve_paths(patterns)]
    if not any(d.text.strip() for d in docs):
        names = ", ".join(pathlib.Path(d.path).name for d in docs[:5])
        raise UserError(f"the corpus is empty: {names} hold no text; pass files that contain text")
    return docs


# ---------------------------------------------------------------------------
# Streaming: a corpus larger than memory, read a chunk at a time (`prepare`).

CHUNK_BYTES = 1 << 20
# What str.splitlines() ends a line at (CR is gone by then: CRLF and CR become LF).
LINE_BREAKS = frozenset("\n\v\f\x1c\x1d\x1e\x85\u2028\u2029")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file, scanned once and not held: what the manifest and fingerprint need.

    Attributes:
        path: the file (absolute, or its URI).
        sha256: hex digest of the file's bytes as stored (compressed for .gz).
        size: bytes on disk.
        chars: characters of its decoded text (as `Document.text` would hold).
        has_text: it holds something besides whitespace.
    """
    path: str
    sha256: str
    size: int
    chars: int
    has_text: bool


class _Hashing:
    """A file object that hashes and counts what is read through it."""

    def __init__(self, f=None):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def _text_chunks(path: fs.Path, encoding_errors: str, hashing: _Hashing) -> Iterator[str]:
    """The file's decoded text in chunks (BOM removed, CRLF and CR turned into LF); what is read of
    the file as stored goes through `hashing`.

    Raises:
        UserError: unreadable, a bad .gz, or not UTF-8 with encoding_errors='strict'.
    """
    if encoding_errors not in ENCODING_ERRORS:
        check_choice("encoding_errors", encoding_errors, ENCODING_ERRORS)
    decoder = codecs.getincrementaldecoder("utf-8-sig")(encoding_errors)
    fed, carry = 0, ""
    try:
        with path.open("rb") as raw:
            hashing.f = raw
            stream = gzip.GzipFile(fileobj=hashing, mode="rb") if path.suffix == ".gz" else hashing
            while True:
                try:
                    data = stream.read(CHUNK_BYTES)
                except (OSError, EOFError) as e:
                    raise UserError(f"{path}: not a valid gzip file ({e})") from None
                pending = len(decoder.getstate()[0])
                try:
                    text = carry + decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    where = " of the decompressed text" if path.suffix == ".gz" else ""
                    raise UserError(
                        f"{path}: not valid UTF-8 at byte {fed - pending + e.start}{where}"
                        + f" ({e.object[e.start:e.start + 4]!r}); convert it to UTF-8 or set encoding_errors=replace "
                        "to turn bad bytes into U+FFFD") from None
                fed += len(data)
                carry = "\r" if data and text.endswith("\r") else ""  # its LF may open the next chunk
                if carry:
                    text = text[:-1]
                if text:
                    yield text.replace("\r\n", "\n").replace("\r", "\n")
                if not data:
                    break
            while hashing.read(CHUNK_BYTES):  # what a .gz holds after its end is part of the file's hash
                pass
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def scan(path: fs.Path, encoding_errors: str = "strict") -> Source:
    """Reads a file once, a chunk at a time: its hash, size and character count.

    Raises:
        UserError: as `read_document`.
    """
    hashing = _Hashing()
    chars, has_text = 0, False
    for text in _text_chunks(path, encoding_errors, hashing):
        chars += len(text)
        has_text = has_text or not text.isspace()
    return Source(path=str(path.resolve()), sha256=hashing.digest.hexdigest(), size=hashing.size,
                  chars=chars, has_text=has_text)


def scan_corpus(patterns: Sequence[str], encoding_errors: str = "strict") -> tuple[list[fs.Path], list[Source]]:
    """Scans every file of a corpus (constant memory): their paths and what the manifest records.

    Raises:
        UserError: a missing or undecodable file, or no text at all.
    """
    paths = resolve_paths(patterns)
    sources = [scan(p, encoding_errors) for p in paths]
    if not any(s.has_text for s in sources):
        names = ", ".join(p.name for p in paths[:5])
        raise UserError(f"the corpus is empty: {names} hold no text; pass files that contain text")
    return paths, sources


_LINE_BREAK = re.compile("[" + "".join(sorted(LINE_BREAKS)) + "]")


def _cut_chunks(doc: int, chunks: Iterable[str], target: int) -> Iterator[Block]:
    """Blocks of whole lines of one document, from its text in chunks: a block ends at the first
    line break at or after its `target`-th character (the end of the line that reaches `target`)."""
    part: list[str] = []
    size = 0
    for chunk in chunks:
        pos = 0
        while True:
            found = _LINE_BREAK.search(chunk, pos + max(0, target - 1 - size))
            if found is None:
                break
            part.append(chunk[pos:found.end()])
            yield Block(doc, "".join(part))
            part, size, pos = [], 0, found.end()
        part.append(chunk[pos:])
        size += len(chunk) - pos
    if size:
        yield Block(doc, "".join(part))


def block_target(total_chars: int, num_blocks: int) -> int:
    return max(1, total_chars // max(1, num_blocks))


def iter_blocks(paths: Sequence[fs.Path], target: int, encoding_errors: str = "strict") -> Iterator[Block]:
    """`make_blocks`'s blocks, streamed from the files (`target` from `block_target`)."""
    for i, path in enumerate(paths):
        yield from _cut_chunks(i, _text_chunks(path, encoding_errors, _Hashing()), target)


@dataclasses.dataclass(frozen=True)
class Block:
    """A contiguous run of whole lines of one document."""
    doc: int
    text: str


def make_blocks(docs: Sequence[Document], num_blocks: int) -> list[Block]:
    """Cuts the corpus into about `num_blocks` blocks of whole lines.

    Blocks never cross a document boundary, so a document's end is always a
    block's end.
    """
    target = block_target(sum(len(d.text) for d in docs), num_blocks)
    return [b for i, doc in enumerate(docs) for b in _cut_chunks(i, [doc.text], target)]


def validation_blocks(num_blocks: int, val_fraction: float, seed: int) -> list[int]:
    """Indices of the blocks held out for validation, sorted (a seeded draw).

    Raises:
        ConfigError: val_fraction out of range, or too little text to hold any out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("val_fraction", val_fraction, "expected a fraction in [0, 1), such as 0.1")
    if val_fraction == 0.0:
        return []
    num_val = max(1, round(val_fraction * num_blocks))
    if num_val >= num_blocks:
        raise ConfigError("val_fraction", val_fraction, f"the corpus has too few lines ({num_blocks} blocks) "
                          "to hold this out for validation; add text or lower it")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_blocks, size=num_val, replace=False))


def split_blocks(blocks: Sequence[Block], val_fraction: float, seed: int) -> tuple[list[Block], list[Block], list[int]]:
    """Picks validation blocks with a seeded generator; both splits keep corpus order.

    Returns:
        (train blocks, validation blocks, indices of the validation blocks).
    Raises:
        UserError: val_fraction out of range, or too little text to hold any out.
    """
    val_idx = validation_blocks(len(blocks), val_fraction, seed)
    val_set = set(val_idx)
    train = [b for i, b in enumerate(blocks) if i not in val_set]
    val = [blocks[i] for i in val_idx]
    return train, val, val_idx
